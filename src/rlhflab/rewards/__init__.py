"""Rewards for PPO and evaluation: one call, :func:`score`, over any weighted sum of sources.

Sources (config ``reward.sources``, each with a ``weight``; the reward is their weighted sum):

* ``rm`` -- a trained reward model (:class:`~rlhflab.models.reward.RewardModel`) reading
  (query text, response) through its own tokenizer, minus its normalisation bias (Huang et al.
  detail) -- the default, and exactly today's PPO reward;
* ``function`` -- a Python function ``package.module:function(prompts, completions, **columns)
  -> list[float]`` (:mod:`rlhflab.rewards.function`), or a callable passed in memory;
* ``remote`` -- an RM server over HTTP: rlhflab's own ``/v1/score`` or OpenRLHF's remote-RM
  shape (:mod:`rlhflab.rewards.remote`), with timeouts, retries and strict answer checks;
* ``gold`` -- the tldr-synth gold judge, :func:`rlhflab.judges.gold.reward`.

Every source is called with the same arguments: ``prompts`` (the query texts the policy saw),
``completions`` (the decoded responses, special tokens skipped, as the RM reads them) and
``columns`` (the prompt rows' other fields, e.g. ``post``, ``title``, ``id``, one list each).
Every answer is checked: one finite number per completion, else :class:`RewardError` naming
the source -- a reward is never silently zero. The bias normalisation belongs to the ``rm``
source only.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Sequence

import torch

from rlhflab.errors import StageError

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float]]


class RewardError(StageError):
    """A reward source failed or answered something that is not one finite score per completion."""


def check_scores(values: Any, n: int, source: str) -> torch.Tensor:
    """``values`` as a float tensor [n]; :class:`RewardError` naming ``source`` unless it is
    exactly n finite real numbers."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().reshape(-1).tolist()
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward source {source}: expected a list of {n} numbers, got {type(values).__name__}") from None
    if len(values) != n:
        raise RewardError(f"reward source {source}: {len(values)} scores for {n} completions")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
            raise RewardError(f"reward source {source}: score {i} is not a number ({v!r})")
        f = float(v)
        if not math.isfinite(f):
            raise RewardError(f"reward source {source}: score {i} is {f}")
        out.append(f)
    return torch.tensor(out, dtype=torch.float32)


def columns_of(prompts: Sequence[Any]) -> dict[str, list]:
    """The prompt rows' fields as columns (NamedTuples such as ``SFTExample``, dicts, dataclasses),
    without token ids and without ``query`` (passed as ``prompts``)."""
    rows = []
    for p in prompts:
        if hasattr(p, "_asdict"):
            rows.append(p._asdict())
        elif isinstance(p, dict):
            rows.append(p)
        elif hasattr(p, "__dict__"):
            rows.append(vars(p))
        else:
            rows.append({})
    keys = [k for k in (rows[0] if rows else {}) if not k.endswith("_ids") and k != "query"]
    return {k: [r.get(k) for r in rows] for k in keys}


class RMSource:
    """A trained RM as a reward source: ``raw - bias`` (its own tokenizer, Huang's normalisation)."""

    def __init__(self, rm, name: str, batch_size: int = 64):
        self.rm, self.name, self.batch_size = rm, name, batch_size

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> torch.Tensor:
        return self.rm.score_texts(list(prompts), list(completions), batch_size=self.batch_size).float().cpu()


class FunctionSource:
    """A Python callable ``fn(prompts, completions, **columns) -> list[float]``, called in batches."""

    def __init__(self, fn: RewardFn, name: str, batch_size: int = 64):
        self.fn, self.name, self.batch_size = fn, name, batch_size

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> list[float]:
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            sl = slice(i, i + self.batch_size)
            try:
                got = self.fn(list(prompts[sl]), list(completions[sl]), **{k: v[sl] for k, v in columns.items()})
            except RewardError:
                raise
            except Exception as e:
                raise RewardError(f"reward source {self.name} raised {type(e).__name__}: {e}") from e
            out.extend(check_scores(got, len(prompts[sl]), self.name).tolist())
        return out


class Reward:
    """A weighted sum of reward sources; ``reward(prompts, completions, **columns)`` -> scores [B] (CPU, float32).

    ``rm``: the trained :class:`~rlhflab.models.reward.RewardModel` among the sources (the
    first one), or None -- PPO initialises the critic from it (Huang) only when it exists.
    """

    def __init__(self, sources: Sequence[tuple[float, Callable]], rm=None, rm_dir: Optional[str] = None):
        if not sources:
            raise ValueError("a Reward needs at least one source")
        self.sources = list(sources)
        self.rm, self.rm_dir = rm, rm_dir

    @property
    def names(self) -> list[str]:
        return [getattr(src, "name", repr(src)) for _, src in self.sources]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns) -> torch.Tensor:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts but {n} completions")
        total = torch.zeros(n, dtype=torch.float32)
        for weight, src in self.sources:
            total += weight * check_scores(src(prompts, completions, **columns), n, getattr(src, "name", repr(src)))
        return total

    def modules(self) -> list[torch.nn.Module]:
        """The torch models inside (the trained RM's), for in-place speed-ups such as ``fuse_gelu``."""
        return [self.rm.model] if self.rm is not None else []


def load_function(spec: str) -> RewardFn:
    """``package.module:function`` -> the callable (the module imported by its dotted name)."""
    import importlib

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise RewardError(f"reward function {spec!r}: expected 'package.module:function'")
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        raise RewardError(f"reward function {spec}: cannot import {module} ({type(e).__name__}: {e})") from None
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise RewardError(f"reward function {spec}: {module} has no attribute {attr}")
    if not callable(fn):
        raise RewardError(f"reward function {spec}: {attr} is not callable")
    return fn


def build_reward(cfg, device: torch.device, functions: Sequence[tuple[float, RewardFn]] = ()):
    """The reward of ``cfg.reward.sources`` plus in-memory ``functions`` ((weight, callable) pairs).

    The default (one ``rm`` source of weight 1, nothing in memory) returns the trained
    :class:`~rlhflab.models.reward.RewardModel` itself, so PPO computes exactly what it
    computed before reward sources existed; anything else returns a :class:`Reward`.
    """
    from rlhflab.models.reward import RewardModel
    from rlhflab.models.sources import reward_model_dir

    specs = cfg.reward.sources
    if not specs and not functions:
        raise RewardError("reward.sources is empty: name at least one source, e.g. reward.sources=[{kind: rm}]")
    if not functions and len(specs) == 1 and specs[0].kind == "rm" and specs[0].weight == 1.0 and not specs[0].path:
        rm = RewardModel.from_pretrained(reward_model_dir(cfg), device=device)
        rm.model.requires_grad_(False)
        return rm
    sources: list[tuple[float, Callable]] = []
    rm, rm_dir = None, None
    for i, s in enumerate(specs):
        if s.kind == "rm":
            d = reward_model_dir(cfg, s.path)
            model = RewardModel.from_pretrained(d, device=device)
            model.model.requires_grad_(False)
            if rm is None:
                rm, rm_dir = model, str(d)
            sources.append((s.weight, RMSource(model, f"rm:{d}", s.batch_size)))
        elif s.kind == "function":
            sources.append((s.weight, FunctionSource(load_function(s.path), f"function:{s.path}", s.batch_size)))
        elif s.kind == "gold":
            from rlhflab.judges.gold import reward as gold_reward

            sources.append((s.weight, FunctionSource(gold_reward, "gold", s.batch_size)))
        elif s.kind == "remote":
            from rlhflab.rewards.remote import RemoteSource

            sources.append((s.weight, RemoteSource(s.url, protocol=s.protocol, timeout_s=s.timeout_s,
                                                   max_retries=s.max_retries, backoff_base_s=s.backoff_base_s,
                                                   batch_size=s.batch_size)))
        else:  # pragma: no cover - the config refuses other kinds
            raise RewardError(f"reward.sources[{i}]: unknown kind {s.kind!r}")
    for k, (weight, fn) in enumerate(functions):
        sources.append((float(weight), FunctionSource(fn, f"callable:{getattr(fn, '__qualname__', k)}")))
    return Reward(sources, rm=rm, rm_dir=rm_dir)


def score(reward, prompts: Sequence[Any], completions: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Scores [B] (CPU float32) of decoded ``completions`` of ``prompts`` (rows with ``.query``).

    ``reward``: a trained :class:`~rlhflab.models.reward.RewardModel` (``raw - bias``, as PPO
    always did) or a :class:`Reward`.
    """
    queries = [p.query if hasattr(p, "query") else p["query"] for p in prompts]
    if isinstance(reward, Reward):
        return reward(queries, list(completions), **columns_of(prompts))
    return reward.score_texts(queries, list(completions), batch_size=batch_size).float().cpu()


def reward_modules(reward) -> list[torch.nn.Module]:
    """Torch models inside ``reward`` (a RewardModel or a :class:`Reward`)."""
    return reward.modules() if isinstance(reward, Reward) else [reward.model]


def trained_rm(reward):
    """The trained RM inside ``reward`` (a RewardModel, or a Reward's first ``rm`` source), else None."""
    return reward.rm if isinstance(reward, Reward) else reward


def trained_rm_dir(cfg, reward) -> Optional[str]:
    """The folder of :func:`trained_rm` (what ``model.critic=reward`` initialises the critic from), else None."""
    if isinstance(reward, Reward):
        return reward.rm_dir
    from rlhflab.models.sources import reward_model_dir

    return str(reward_model_dir(cfg))
