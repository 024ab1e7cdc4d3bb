"""A reward model behind HTTP: rlhflab's own ``POST /v1/score`` or OpenRLHF's remote-RM shape.

Protocols (``reward.sources[].protocol``):

* ``rlhflab`` -- ``rlhflab serve``'s ``/v1/score`` (:mod:`rlhflab.serve.app`): one request per
  distinct prompt, ``{"prompt": str, "responses": [str, ...]}`` -> ``{"scores": [...], ...}``
  where ``scores`` are already normalised by the served RM's bias (``raw - bias``);
* ``openrlhf`` -- OpenRLHF's ``--remote_rm_url``: one request per batch, ``{"query": [prompt +
  response, ...], "prompts": [prompt, ...], "labels": [...]}`` -> ``{"rewards": [...]}``
  (OpenRLHF ``openrlhf/utils/remote_rm_utils.py: remote_rm_fn`` sends that body and reads
  ``"rewards"``; ``openrlhf/cli/serve_rm.py`` answers ``POST /get_reward`` with it). ``labels``
  are the rows' ``label`` column when there is one, else empty strings.

Failure policy -- never a hang, never a silent zero: every request has a timeout
(``timeout_s``, on connecting and on each read); connection errors, timeouts and HTTP 429/5xx are retried ``max_retries`` times
with exponential backoff (``backoff_base_s`` doubling), then raise :class:`RewardError` naming
the URL; other HTTP errors (4xx) and bad answers (not JSON, no score list, wrong length,
non-numbers, NaN/inf) raise at once, since asking again would get the same answer.
Uses only the standard library (``urllib``).
"""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

from rlhflab.rewards import RewardError, check_scores

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class RemoteSource:
    """Scores from a remote RM server; see the module docstring for protocols and failures."""

    def __init__(self, url: str, protocol: str = "rlhflab", timeout_s: float = 30.0, max_retries: int = 3,
                 backoff_base_s: float = 0.5, batch_size: int = 64, headers: dict | None = None):
        if protocol not in ("rlhflab", "openrlhf"):
            raise ValueError(f"unknown remote reward protocol {protocol!r} (rlhflab, openrlhf)")
        self.url, self.protocol = url, protocol
        self.timeout_s, self.max_retries, self.backoff_base_s = timeout_s, max_retries, backoff_base_s
        self.batch_size = batch_size
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.name = f"remote:{url}"
        # A loopback server is reached directly, never through an http_proxy from the environment.
        host = urllib.parse.urlsplit(url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if host in ("localhost", "127.0.0.1", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)

    # -- one HTTP exchange, with retries --------------------------------------------------
    def post(self, body: dict) -> Any:
        """POST ``body`` as JSON; the parsed JSON answer. Retries transient failures, then raises."""
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_base_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
            try:
                with self._opener.open(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace")
                last = f"HTTP {e.code}: {detail}"
                if e.code in RETRY_STATUS:
                    log.warning("reward server %s: %s (attempt %d/%d)", self.url, last, attempt + 1, self.max_retries + 1)
                    continue
                raise RewardError(f"reward server {self.url} answered {last}") from None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}"
                log.warning("reward server %s unreachable: %s (attempt %d/%d)", self.url, last, attempt + 1,
                            self.max_retries + 1)
                continue
            try:
                return json.loads(raw)
            except ValueError:
                raise RewardError(f"reward server {self.url} answered something that is not JSON: {raw[:200]!r}") from None
        raise RewardError(f"reward server {self.url} failed {self.max_retries + 1} times (last: {last}); "
                          "is it running? (reward.sources[].url, timeout_s, max_retries)")

    def _field(self, answer: Any, key: str) -> Any:
        if not isinstance(answer, dict) or key not in answer:
            got = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
            raise RewardError(f"reward server {self.url} ({self.protocol}): no '{key}' in the answer (got {got})")
        return answer[key]

    # -- scores ---------------------------------------------------------------------------
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
        n = len(completions)
        scores: list[float] = [0.0] * n  # every slot is overwritten below or an error is raised
        if self.protocol == "rlhflab":
            groups: dict[str, list[int]] = {}
            for i, p in enumerate(prompts):
                groups.setdefault(p, []).append(i)
            for prompt, rows in groups.items():
                answer = self.post({"prompt": prompt, "responses": [completions[i] for i in rows]})
                got = check_scores(self._field(answer, "scores"), len(rows), self.name)
                for i, s in zip(rows, got.tolist()):
                    scores[i] = s
            return scores
        labels = columns.get("label") or [""] * n
        for s in range(0, n, self.batch_size):
            sl = slice(s, s + self.batch_size)
            body = {"query": [p + c for p, c in zip(prompts[sl], completions[sl])], "prompts": list(prompts[sl]),
                    "labels": [("" if x is None else x) for x in labels[sl]]}
            got = check_scores(self._field(self.post(body), "rewards"), len(body["query"]), self.name)
            scores[sl] = got.tolist()
        return scores
