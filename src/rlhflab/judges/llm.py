"""A pairwise LLM judge over any OpenAI-compatible chat-completions endpoint.

Huang et al. 2024 (like DPO before them) score TL;DR policies by asking GPT-4 which of two
summaries is better, with the order shown to the judge randomised to cancel its position
bias. This client does the same against any ``POST {base_url}/chat/completions`` server
(OpenAI, vLLM, llama.cpp, TGI, ...):

* the A/B order is swapped per comparison, deterministically from ``seed`` and a hash of
  the item, and the verdict is mapped back to the caller's frame;
* requests run in a thread pool bounded by ``concurrency``;
* 429, 5xx, timeouts and connection errors are retried with exponential backoff and
  jitter (``Retry-After`` honoured, capped); malformed JSON and unparseable verdicts are
  retried too, and count as a tie (with the reason recorded) when retries run out;
  400/401/403/404 (and other non-retryable 4xx) raise :class:`JudgeError` at once;
* every successful judgment is cached on disk, one JSON file per sha256 of
  (model, messages), so a rerun makes zero requests.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from rlhflab.extras import require

require("judge")  # httpx: pip install 'rlhflab[judge]'
import httpx  # noqa: E402

__all__ = ["Verdict", "JudgeError", "JudgeStats", "LLMJudge", "parse_verdict", "build_messages"]

log = logging.getLogger(__name__)

SYSTEM_PROMPT = "You compare summaries of forum posts and pick the better one. You are strict and impartial."

USER_TEMPLATE = """Read the forum post and the two candidate summaries of it below.

Which summary is better? The better summary is precise and concise: it covers the most \
important points of the post, leaves out details that do not matter, and says nothing \
the post does not say. Do not let the length of a summary or the order in which the two \
are shown sway you.

Post:
{post}

Summary A:
{summary_a}

Summary B:
{summary_b}

Reply with one sentence comparing the two summaries, then a final line in exactly this \
form, naming only one letter:
Preferred: A
or
Preferred: B"""


class JudgeError(RuntimeError):
    """The endpoint refused the request (non-retryable status) or stayed unreachable."""


@dataclass(frozen=True)
class Verdict:
    """One pairwise judgment, in the caller's frame.

    winner: "a", "b" or "tie" (tie = no parseable verdict after all retries; see reason).
    raw: the model's reply text (last reply seen when it could not be parsed; "" if none).
    swapped: True if the model was shown the caller's B as "Summary A".
    cached: True if the judgment came from the on-disk cache (no request made).
    reason: why the verdict is a tie, else None.
    """

    winner: Literal["a", "b", "tie"]
    raw: str
    swapped: bool
    cached: bool
    reason: Optional[str] = None


@dataclass
class JudgeStats:
    """Counters of one judge's lifetime (thread-safe updates through the judge's lock)."""

    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    cache_hits: int = 0
    unparsed: int = 0  # comparisons that ended as a tie for want of a parseable verdict


# ---------------------------------------------------------------------- verdict parsing
# A labelled line: "Preferred: A", "**Preferred:** B", "Answer - Summary B", "Verdict = A".
_LABELLED = re.compile(
    r"(?i:\b(?:preferred(?:\s+summary)?|preference|final\s+answer|answer|choice|verdict|winner|better\s+summary))"
    r"\s*[:=\-]\s*(.*)$",
    re.MULTILINE,
)
_LETTER_START = re.compile(r"^(?i:summary\s+)?([AB])(?![\w])")
_BOTH = re.compile(r"^(?i:summary\s+)?[AB]\s*(?:,|/|&|\b(?i:and|or)\b)\s*(?i:summary\s+)?[AB](?![\w])")
# Free text: "Summary A is better", "B is the better summary", "I prefer summary B".
_FREE = [
    re.compile(r"(?<![\w])(?i:summary\s+)?([AB])\s+(?i:is\s+(?:clearly\s+|much\s+|slightly\s+)?(?:the\s+)?(?:better|preferred|superior|stronger|more\s+accurate))"),
    re.compile(r"\b(?i:i\s+(?:would\s+)?prefer|preferring)\s+(?i:summary\s+)?([AB])(?![\w])"),
]
_MARKUP = re.compile(r"[*_#`>\"'\u201c\u201d\u2018\u2019]")


def _lone_letter(line: str) -> Optional[str]:
    s = re.sub(r"[\s.:;!()\[\]{}]", "", _MARKUP.sub("", line))
    s = re.sub(r"^(?i:summary)", "", s)
    return s if s in ("A", "B") else None


def parse_verdict(text: str) -> Optional[Literal["A", "B"]]:
    """The letter ("A" or "B", in the frame shown to the model) a judge reply prefers, or None.

    Accepted, in order of precedence:
      1. labelled lines: "Preferred: A", "**Preferred:** B", "Preferred: Summary A.",
         "Answer: B", "Verdict - A" (markdown and quotes ignored);
      2. free text: "Summary A is better", "B is the better summary", "I prefer B";
      3. a reply, or its last non-empty line, that is a lone letter: "A", "**B**", "(A)".
    Returns None when nothing matches, or when the evidence of the first rule that matched
    names both letters ("Preferred: A" and later "Preferred: B", "Preferred: A or B"):
    an ambiguous reply is not guessed at. Lower-case "a" is never read as a verdict (it is
    the article).
    """
    if not isinstance(text, str) or not text.strip():
        return None
    clean = _MARKUP.sub("", text)
    letters: set[str] = set()
    for m in _LABELLED.finditer(clean):
        rest = m.group(1).strip().lstrip("([{").strip()
        if _BOTH.match(rest):
            return None
        lm = _LETTER_START.match(rest)
        if lm:
            letters.add(lm.group(1))
    if not letters:
        for pat in _FREE:
            letters.update(pat.findall(clean))
    if len(letters) == 1:
        return letters.pop()  # type: ignore[return-value]
    if len(letters) > 1:
        return None
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return _lone_letter(text) or (_lone_letter(lines[-1]) if lines else None)  # type: ignore[return-value]


def build_messages(post: str, summary_a: str, summary_b: str) -> list[dict[str, str]]:
    """Chat messages asking which of two summaries (in the order shown) is better."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(post=post.strip(), summary_a=summary_a.strip(), summary_b=summary_b.strip())},
    ]


# ------------------------------------------------------------------------- the client
class _Unparsed(Exception):
    """A reply arrived but held no usable verdict (retryable; a tie if retries run out)."""

    def __init__(self, reason: str, raw: str = "") -> None:
        super().__init__(reason)
        self.reason, self.raw = reason, raw


_RETRYABLE_4XX = {408, 409, 425, 429}


class LLMJudge:
    """Pairwise summary judge over an OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        base_url: e.g. ``http://localhost:8000/v1``; requests go to ``{base_url}/chat/completions``.
        model: model name sent in the request body (and part of the cache key).
        api_key_env: environment variable with the API key; when set and non-empty it is sent
            as ``Authorization: Bearer <key>`` (local servers often need none).
        concurrency: requests in flight at most.
        max_retries: retries after the first attempt (so up to ``max_retries + 1`` requests).
        timeout_s: per-request timeout (connect, read, write, pool).
        cache_dir: folder of cached judgments (None: no cache).
        seed: seeds the per-item A/B swap (changing it changes the order shown, and so the
            cache keys).
        backoff_base_s: first retry waits ``backoff_base_s`` x U(0.5, 1), then doubling, capped
            at ``backoff_cap_s``; a ``Retry-After`` header replaces it, capped at ``retry_after_cap_s``.
        max_tokens: reply budget (one sentence plus the verdict line).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 4,
        max_retries: int = 5,
        timeout_s: float = 60.0,
        cache_dir: Optional[str | Path] = None,
        seed: int = 0,
        backoff_base_s: float = 0.5,
        max_tokens: int = 256,
        backoff_cap_s: float = 30.0,
        retry_after_cap_s: float = 60.0,
    ) -> None:
        if not isinstance(base_url, str) or not re.match(r"^https?://", base_url):
            raise ValueError(f"LLMJudge: base_url must start with http:// or https://, got {base_url!r}")
        if concurrency < 1:
            raise ValueError(f"LLMJudge: concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"LLMJudge: max_retries must be >= 0, got {max_retries}")
        if timeout_s <= 0:
            raise ValueError(f"LLMJudge: timeout_s must be > 0, got {timeout_s}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.timeout_s = float(timeout_s)
        self.seed = seed
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.retry_after_cap_s = retry_after_cap_s
        self.max_tokens = max_tokens
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        key = os.environ.get(api_key_env, "")
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self.stats = JudgeStats()
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: Any, cache_dir: Optional[str | Path] = None, seed: int = 0) -> "LLMJudge":
        """Build from an ``EvalConfig.llm_judge`` section; ``cache_dir`` is the fallback when
        ``cfg.cache_dir`` is null (the evaluate stage passes ``<run>/eval/judge_cache``)."""
        if cfg.base_url is None:
            raise ValueError("eval.llm_judge.base_url is null: no LLM judge is configured")
        return cls(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                   max_retries=cfg.max_retries, timeout_s=cfg.timeout_s,
                   backoff_base_s=cfg.backoff_base_s, max_tokens=cfg.max_tokens,
                   cache_dir=cfg.cache_dir if cfg.cache_dir is not None else cache_dir, seed=seed)

    # ------------------------------------------------------------------ public
    def judge_pairs(self, posts: Sequence[str], summaries_a: Sequence[str], summaries_b: Sequence[str]) -> list[Verdict]:
        """Judge ``summaries_a[i]`` against ``summaries_b[i]`` as summaries of ``posts[i]``.

        Returns one :class:`Verdict` per item, in input order, with ``winner`` in the
        caller's A/B frame. Raises :class:`JudgeError` on a non-retryable HTTP status or
        when an item's retries on 429/5xx/timeouts run out; judgments finished before that
        are in the cache, so a rerun resumes where it stopped.
        """
        n = len(posts)
        if len(summaries_a) != n or len(summaries_b) != n:
            raise ValueError(f"judge_pairs: posts, summaries_a and summaries_b must have the same length, "
                             f"got {n}, {len(summaries_a)} and {len(summaries_b)}")
        for name, seq in (("posts", posts), ("summaries_a", summaries_a), ("summaries_b", summaries_b)):
            for i, s in enumerate(seq):
                if not isinstance(s, str):
                    raise TypeError(f"judge_pairs: {name}[{i}] must be a str, got {type(s).__name__}")
        if n == 0:
            return []
        with httpx.Client(timeout=self.timeout_s) as client:
            if self.concurrency == 1 or n == 1:
                return [self._judge_one(client, posts[i], summaries_a[i], summaries_b[i]) for i in range(n)]
            pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="llm-judge")
            try:
                futures = [pool.submit(self._judge_one, client, posts[i], summaries_a[i], summaries_b[i]) for i in range(n)]
                return [f.result() for f in futures]
            finally:
                # on an error, drop the queued comparisons instead of sending them
                pool.shutdown(wait=True, cancel_futures=True)

    def is_swapped(self, post: str, summary_a: str, summary_b: str) -> bool:
        """Whether this comparison is shown to the model in B, A order (stable across runs)."""
        h = hashlib.sha256(json.dumps([self.seed, post, summary_a, summary_b]).encode()).digest()
        return bool(h[0] & 1)

    # ----------------------------------------------------------------- internals
    def _judge_one(self, client: httpx.Client, post: str, summary_a: str, summary_b: str) -> Verdict:
        swapped = self.is_swapped(post, summary_a, summary_b)
        shown_a, shown_b = (summary_b, summary_a) if swapped else (summary_a, summary_b)
        messages = build_messages(post, shown_a, shown_b)
        key = hashlib.sha256(json.dumps({"model": self.model, "messages": messages}, sort_keys=True).encode()).hexdigest()

        hit = self._cache_get(key)
        if hit is not None:
            with self._lock:
                self.stats.cache_hits += 1
            return Verdict(self._unswap(hit["letter"], swapped), hit["raw"], swapped, cached=True)

        try:
            letter, raw = self._request(client, messages)
        except _Unparsed as e:
            with self._lock:
                self.stats.unparsed += 1
            log.warning("LLM judge: no verdict after %d attempts (%s); counted as a tie", self.max_retries + 1, e.reason)
            return Verdict("tie", e.raw, swapped, cached=False, reason=e.reason)
        self._cache_put(key, {"model": self.model, "letter": letter, "raw": raw, "messages": messages})
        return Verdict(self._unswap(letter, swapped), raw, swapped, cached=False)

    @staticmethod
    def _unswap(letter: str, swapped: bool) -> Literal["a", "b"]:
        w = letter.lower()
        return ("b" if w == "a" else "a") if swapped else w  # type: ignore[return-value]

    def _request(self, client: httpx.Client, messages: list[dict[str, str]]) -> tuple[str, str]:
        """POST until a parseable verdict arrives. Returns (letter shown, raw text).

        Raises _Unparsed if the last failure was a bad reply, JudgeError if it was HTTP/transport.
        """
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        last: Exception = RuntimeError("no attempt made")
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.stats.retries += 1
            with self._lock:
                self.stats.requests += 1
            wait: Optional[float] = None
            try:
                resp = client.post(self.url, json=body, headers=self._headers)
            except httpx.TimeoutException as e:
                last = JudgeError(f"timeout after {self.timeout_s:g} s from POST {self.url} ({type(e).__name__})")
            except httpx.TransportError as e:
                last = JudgeError(f"connection error from POST {self.url}: {type(e).__name__}: {e}")
            else:
                status = resp.status_code
                if status == 429 or status >= 500 or status in _RETRYABLE_4XX:
                    last = JudgeError(f"HTTP {status} from POST {self.url}: {resp.text[:200]!r}")
                    wait = self._retry_after(resp.headers.get("retry-after"))
                elif status >= 400:
                    hint = " (is the API key in the environment variable?)" if status in (401, 403) else ""
                    raise JudgeError(f"HTTP {status} from POST {self.url}{hint}: {resp.text[:300]!r}")
                else:
                    try:
                        return self._read_reply(resp)
                    except _Unparsed as e:
                        last = e
            if attempt < self.max_retries:
                time.sleep(wait if wait is not None else self._backoff(attempt))
        if isinstance(last, _Unparsed):
            raise last
        raise JudgeError(f"{last} (gave up after {self.max_retries + 1} attempts)")

    @staticmethod
    def _read_reply(resp: httpx.Response) -> tuple[str, str]:
        try:
            data = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Unparsed(f"malformed JSON reply: {resp.text[:100]!r}", resp.text[:2000]) from None
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise _Unparsed(f"reply without choices[0].message.content: {str(data)[:100]!r}", str(data)[:2000]) from None
        if not isinstance(text, str):
            raise _Unparsed(f"choices[0].message.content is {type(text).__name__}, not text", str(text)[:2000])
        letter = parse_verdict(text)
        if letter is None:
            raise _Unparsed(f"unparseable verdict: {text[-100:]!r}", text)
        return letter, text

    def _backoff(self, attempt: int) -> float:
        # exponential with "equal jitter": desynchronises threads that failed together
        return min(self.backoff_cap_s, self.backoff_base_s * 2.0**attempt) * random.uniform(0.5, 1.0)

    def _retry_after(self, value: Optional[str]) -> Optional[float]:
        """Seconds from a Retry-After header (delta-seconds or HTTP date), capped; None if absent/bad."""
        if not value:
            return None
        try:
            secs = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            secs = when.timestamp() - time.time()
        return min(max(secs, 0.0), self.retry_after_cap_s)

    # -------------------------------------------------------------------- cache
    def _cache_path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> Optional[dict]:
        if self.cache_dir is None:
            return None
        p = self._cache_path(key)
        try:
            hit = json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            log.warning("LLM judge: ignoring unreadable cache file %s", p)
            return None
        if not isinstance(hit, dict) or hit.get("letter") not in ("A", "B") or not isinstance(hit.get("raw"), str):
            log.warning("LLM judge: ignoring malformed cache file %s", p)
            return None
        return hit

    def _cache_put(self, key: str, record: dict) -> None:
        if self.cache_dir is None:
            return
        p = self._cache_path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        # write to a private temp file, then rename: atomic, so concurrent threads or
        # processes writing the same key never leave a half-written file behind
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{key[:8]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, ensure_ascii=False)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
