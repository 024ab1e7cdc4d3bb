"""The models behind the server and the request batcher.

* :class:`Models` holds the policy (+ tokenizer) and the reward model and runs one
  generation batch (:meth:`Models.generate_batch`) of rows from several requests, each row
  with its own prompt, length, temperature, top-p, stop strings and random generator.
* :class:`Batcher` gathers concurrent requests into such batches: the first queued request
  waits at most ``max_wait_s`` for company, a batch holds at most ``max_batch_rows`` rows
  (a request's ``best_of`` candidates are its rows; one request larger than that runs alone),
  and at most ``max_queue`` requests may wait (429 beyond). One batch runs at a time, in a
  worker thread, so the event loop keeps answering /health, /metrics and new requests.

Rows never influence each other: prompts are left-padded with explicit position ids (as
``stages/ppo.py`` does), and every row samples by the Gumbel-max trick from its OWN
``torch.Generator`` seeded from ``(request seed, row)`` -- the same per-row-generator design
as ``stages/ppo.sample_responses`` -- so a request gets the same tokens alone or in any batch
(up to float round-off of batched matmuls, which leaves greedy/argmax decisions unchanged in
practice; tests check equality). A request that is cancelled (client gone, timeout) only
marks its own rows finished; the others continue untouched, and the batch stops early once
every row is finished.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple, Optional, Sequence, Union

import torch

from rlhflab.errors import StageError

log = logging.getLogger("rlhflab.serve")

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (1/T would overflow)
_SEED_MOD = 2**63


class ServeError(StageError):
    """The server cannot start (missing model, unset API key variable, bad option): printed by the CLI."""


class Candidate(NamedTuple):
    """One sampled completion: decoded ``text`` (cut at a stop string), its generated
    token count (through EOS or the stop), and "stop" (EOS or stop string) or "length"."""

    text: str
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class Cancelled(Exception):
    """The request was cancelled (client gone or timed out); its rows were stopped."""


def cut_at_stop(text: str, stop: Sequence[str]) -> Optional[str]:
    """``text`` before the earliest occurrence of any stop string, or None if none occurs."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)] if hits else None


def row_seed(seed: int, row: int) -> int:
    """The generator seed of candidate ``row`` of a request seeded with ``seed``."""
    return (int(seed) * 1_000_003 + row) % _SEED_MOD


@dataclass
class GenRequest:
    """One request's share of a batch: ``best_of`` rows of the same prompt."""

    prompt_ids: list[int]
    best_of: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None  # None: a fresh random seed
    cancel: threading.Event = field(default_factory=threading.Event)
    # Streaming: called from the worker thread with the row-0 text decoded so far after each token.
    on_text: Optional[Callable[[str], None]] = None
    future: Optional[asyncio.Future] = None
    loop: Optional[asyncio.AbstractEventLoop] = None
    enqueued: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = random.SystemRandom().randrange(_SEED_MOD)

    def resolve(self, result=None, error: Optional[BaseException] = None) -> None:
        """Complete ``future`` from any thread (once)."""
        if self.future is None or self.loop is None:
            return

        def set_it():
            if not self.future.done():
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(set_it)
        except RuntimeError:  # the loop is closed (test client torn down)
            pass


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--dtype``: auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16 or float16."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ServeError(f"--dtype {name!r}: choose auto, float32, bfloat16 or float16")
    return table[name]


class Models:
    """The policy (+ its tokenizer) and the reward model. ``generate_batch`` and ``score``
    block and run in worker threads; ``score`` holds ``reward_lock`` (one RM forward at a time:
    a forward already uses every core or the whole GPU)."""

    def __init__(self, policy, tokenizer, reward, policy_name: str, reward_name: str,
                 device: Optional[Union[str, torch.device]] = None, dtype: str = "auto"):
        from rlhflab.models.reward import RewardModel

        if not isinstance(reward, RewardModel):
            raise ServeError(f"reward must be a RewardModel or its directory, got {type(reward).__name__}")
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ServeError("the policy tokenizer needs an eos_token and a pad_token (use rlhflab.models.policy.load_tokenizer)")
        self.device = torch.device(device) if device is not None else next(policy.parameters()).device
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ServeError(f"--device {self.device}: CUDA is not available on this machine")
        self.dtype = parse_dtype(dtype, self.device)
        self.policy = policy.to(device=self.device, dtype=self.dtype).eval()
        self.tokenizer = tokenizer
        self.reward = reward
        reward.model.to(device=self.device, dtype=self.dtype).eval()
        self.policy_name, self.reward_name = policy_name, reward_name
        self.context_length = int(getattr(policy.config, "max_position_embeddings", 0) or 0) or None
        self.reward_lock = threading.Lock()
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, prompt: str) -> list[int]:
        # Same convention as the data path (rlhflab.data.tldr): no special tokens around queries.
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def render_chat(self, messages: list[dict]) -> str:
        """Chat messages -> prompt text: the tokenizer's chat template with the generation
        prompt, or (no template) the contents joined by a blank line.

        Raises:
            ValueError: the template refused the messages (its message is kept).
        """
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n\n".join(m["content"] for m in messages)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_batch(self, reqs: Sequence[GenRequest], on_step: Optional[Callable[[int], None]] = None
                       ) -> list[Union[list[Candidate], Cancelled]]:
        """Sample every request's ``best_of`` rows in ONE batch; per request, its candidates
        (in row order) or :class:`Cancelled`. Requests cancelled mid-batch are resolved at once
        (``GenRequest.resolve``) and their rows stop; the others are unaffected."""
        from rlhflab.models.policy import position_ids_from_mask

        tok, dev = self.tokenizer, self.device
        owner = [i for i, r in enumerate(reqs) for _ in range(r.best_of)]
        rows_of = []
        for i, r in enumerate(reqs):
            start = len(rows_of) and rows_of[-1][-1] + 1
            rows_of.append(list(range(start, start + r.best_of)))
        B = len(owner)
        L = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((B, L), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, i in enumerate(owner):  # left padding
            p = reqs[i].prompt_ids
            ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, L - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        gens = [torch.Generator(device=dev).manual_seed(row_seed(reqs[i].seed, b - rows_of[i][0]))
                for b, i in enumerate(owner)]
        temps = [reqs[i].temperature for i in owner]
        top_ps = [reqs[i].top_p for i in owner]
        max_new = [reqs[i].max_tokens for i in owner]
        greedy = torch.tensor([t < GREEDY_BELOW for t in temps], device=dev)
        inv_t = torch.tensor([1.0 / t if t >= GREEDY_BELOW else 1.0 for t in temps], device=dev).unsqueeze(1)
        any_top_p = any(p < 1 for p in top_ps)
        top_p_t = torch.tensor(top_ps, device=dev).unsqueeze(1)

        T = max(max_new)
        out = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
        n_tokens = [0] * B  # generated tokens counted per row (through EOS / stop)
        finish: list[Optional[str]] = [None] * B
        done = [False] * B
        cancelled = [False] * len(reqs)
        results: list = [None] * len(reqs)

        positions = position_ids_from_mask(mask)
        o = self.policy(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache, next_pos = o.past_key_values, positions[:, -1:] + 1
        logits = o.logits[:, -1].float()
        steps = 0
        for t in range(T):
            steps = t + 1
            logp = torch.log_softmax(logits * inv_t, dim=-1)
            if any_top_p:  # nucleus: drop tokens outside the smallest set with mass >= top_p (keep the top one)
                sp, si = logp.exp().sort(dim=-1, descending=True)
                outside = (sp.cumsum(-1) - sp) >= top_p_t
                logp = logp.masked_fill(torch.zeros_like(outside).scatter(1, si, outside), float("-inf"))
            u = torch.stack([torch.rand(logp.shape[-1], generator=g, device=dev) for g in gens])
            sampled = (logp - torch.log(-torch.log(u))).argmax(-1)
            tokens = torch.where(greedy, logits.argmax(-1), sampled)
            tokens_cpu = tokens.tolist()
            for b in range(B):
                if done[b]:
                    continue
                out[b, t] = tokens_cpu[b]
                n_tokens[b] = t + 1
                if tokens_cpu[b] == tok.eos_token_id:
                    done[b], finish[b] = True, "stop"
                elif reqs[owner[b]].stop and any(s in tok.decode(out[b, : t + 1].tolist(), skip_special_tokens=True)
                                                  for s in reqs[owner[b]].stop):
                    done[b], finish[b] = True, "stop"
                elif t + 1 >= max_new[b]:
                    done[b], finish[b] = True, "length"
            for i, r in enumerate(reqs):
                if not cancelled[i] and r.cancel.is_set():  # stop this request's rows only
                    cancelled[i] = True
                    for b in rows_of[i]:
                        done[b] = True
                    log.warning("request cancelled: its %d row(s) stopped after %d of %d tokens "
                                "(generation stopped after %d tokens)", r.best_of, t + 1, r.max_tokens, t + 1)
                    results[i] = Cancelled()
                    r.resolve(error=Cancelled())
                elif r.on_text is not None and not cancelled[i]:
                    b = rows_of[i][0]
                    r.on_text(tok.decode(out[b, : n_tokens[b]].tolist(), skip_special_tokens=True))
            if on_step is not None:
                on_step(t + 1)
            if all(done):
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            o = self.policy(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=next_pos,
                            cache=cache, use_cache=True)
            cache, next_pos = o.past_key_values, next_pos + 1
            logits = o.logits[:, -1].float()

        for i, r in enumerate(reqs):
            if cancelled[i]:
                continue
            cands = []
            for b in rows_of[i]:
                row = out[b, : n_tokens[b]].tolist()
                text = tok.decode(row, skip_special_tokens=True)
                reason = finish[b] or "length"
                cut = cut_at_stop(text, r.stop)
                if cut is not None:
                    text, reason = cut, "stop"
                cands.append(Candidate(text, n_tokens[b], reason))
            results[i] = cands
        return results

    def score(self, prompt: str, responses: Sequence[str]) -> tuple[list[float], list[float]]:
        """(normalised scores, raw scores) of each response to ``prompt``, in the RM's own tokens."""
        with self.reward_lock:
            raw = self.reward.score_texts([prompt] * len(responses), list(responses), normalize=False)
        raw_list = [float(x) for x in raw]
        return [r - self.reward.bias for r in raw_list], raw_list


class QueueFull(Exception):
    """More than ``max_queue`` requests are waiting (answered 429)."""


class Batcher:
    """Gathers requests into generation batches (see the module docstring).

    ``metrics`` (optional) gets ``observe_batch(rows, requests)`` and ``set_queue_depth(n)``.
    The worker task starts on the first ``submit`` in the running event loop.
    """

    def __init__(self, models: Models, max_batch_rows: int = 32, max_wait_s: float = 0.01, max_queue: int = 256,
                 metrics=None):
        for name, v in (("max_batch_rows", max_batch_rows), ("max_queue", max_queue)):
            if not isinstance(v, int) or v < 1:
                raise ServeError(f"{name} must be a positive integer, got {v!r}")
        if not max_wait_s >= 0:
            raise ServeError(f"max_wait_s must be >= 0, got {max_wait_s!r}")
        self.models, self.metrics = models, metrics
        self.max_batch_rows, self.max_wait_s, self.max_queue = max_batch_rows, max_wait_s, max_queue
        self.queue: deque[GenRequest] = deque()
        self.batches = 0  # batches run so far
        self.busy = False  # a batch is generating
        self._worker: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._wakeup: Optional[asyncio.Event] = None

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop:
            self._loop, self._wakeup = loop, asyncio.Event()
            self.queue.clear()  # requests of a previous (closed) loop cannot be answered anyway
            self._worker = loop.create_task(self._run())

    async def submit(self, req: GenRequest) -> list[Candidate]:
        """Queue ``req`` and wait for its candidates.

        Raises:
            QueueFull: ``max_queue`` requests are already waiting.
            Cancelled: ``req.cancel`` was set before or during its batch.
        """
        self._ensure_worker()
        if len(self.queue) >= self.max_queue:
            raise QueueFull()
        req.loop = self._loop
        req.future = self._loop.create_future()
        self.queue.append(req)
        self._depth()
        self._wakeup.set()
        return await req.future

    def _depth(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(len(self.queue))

    def _take(self) -> list[GenRequest]:
        """The next batch: FIFO while the rows fit (the first request always goes); cancelled
        waiting requests are answered and dropped."""
        batch, rows = [], 0
        while self.queue:
            r = self.queue[0]
            if r.cancel.is_set():
                self.queue.popleft()
                r.resolve(error=Cancelled())
                continue
            if batch and rows + r.best_of > self.max_batch_rows:
                break
            batch.append(self.queue.popleft())
            rows += r.best_of
        self._depth()
        return batch

    def _queued_rows(self) -> int:
        return sum(r.best_of for r in self.queue if not r.cancel.is_set())

    async def _run(self) -> None:
        import anyio

        while True:
            while not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Bounded wait for company: until the batch is full or the oldest has waited max_wait_s.
            deadline = self.queue[0].enqueued + self.max_wait_s
            while self._queued_rows() < self.max_batch_rows and time.perf_counter() < deadline:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.0, deadline - time.perf_counter()))
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            self.batches += 1
            if self.metrics is not None:
                self.metrics.observe_batch(sum(r.best_of for r in batch), len(batch))
            self.busy = True
            try:
                results = await anyio.to_thread.run_sync(self.models.generate_batch, batch)
            except Exception as e:  # a bug or an out-of-memory: fail this batch's requests, keep serving
                log.exception("generation batch of %d request(s) failed", len(batch))
                for r in batch:
                    r.resolve(error=e)
                continue
            finally:
                self.busy = False
            for r, res in zip(batch, results):
                if isinstance(res, Cancelled):
                    r.resolve(error=res)
                else:
                    r.resolve(result=res)
