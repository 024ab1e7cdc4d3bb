"""What two or more stages share: where the data and tokenizer live, the accelerator,
the optimizer and schedule, the global batch order, run-folder bookkeeping.

Only functions with several callers live here; each stage's loop stays in its own file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Iterable, Literal, Optional

import torch

from rlhflab.config import OptimConfig, RunConfig
from rlhflab.errors import StageError

log = logging.getLogger(__name__)

SYNTH_MARKER = "synth_config.json"  # the SynthConfig a generated data folder was built from
STOP_ENV = "RLHFLAB_STOP_AFTER_STEP"  # tests: raise right after the checkpoint of this step (a simulated crash)


class StopRequested(StageError):
    """Raised after the checkpoint of step ``RLHFLAB_STOP_AFTER_STEP`` was written (crash simulation for resume tests)."""


# ------------------------------------------------------------------------------ data
def data_root(cfg: RunConfig) -> Path:
    """tldr-synth data folder: ``cfg.data.dir`` or ``<run_dir>/data``."""
    return Path(cfg.data.dir) if cfg.data.dir else cfg.run_dir / "data"


def _synth_complete(root: Path) -> bool:
    return (root / "sft").is_dir() and (root / "preference").is_dir() and (root / "tokenizer").is_dir()


def ensure_data(cfg: RunConfig, progress: bool = True) -> Optional[Path]:
    """Make sure the tldr-synth data exists (generate it if absent); return its root.

    Only the main process generates (into a temporary folder renamed into place, so a crash
    never leaves half a dataset); the others wait at a barrier. A folder generated here is
    stamped with its ``SynthConfig``; reusing it under a different ``data.synth`` is refused,
    since the stages would silently train on other data than the config says. For
    ``data.task=tldr`` nothing is generated and ``None`` is returned.
    """
    if cfg.data.task != "tldr-synth":
        return None
    from accelerate import PartialState

    from rlhflab.runtime import atomic_save_dir

    root = data_root(cfg)
    want = cfg.data.synth.model_dump(mode="json")
    state = PartialState()
    if state.is_main_process and not _synth_complete(root):
        if root.exists() and any(root.iterdir()):
            raise StageError(f"{root} exists but is not a tldr-synth data folder (needs sft/, preference/, tokenizer/); "
                             "delete it or point data.dir elsewhere")
        from rlhflab.data.tldr_synth import synthesize

        def write(tmp: Path) -> None:
            synthesize(tmp, cfg.data.synth, progress=progress)
            (tmp / SYNTH_MARKER).write_text(json.dumps(want, indent=2))

        if root.exists():
            root.rmdir()  # empty: atomic_save_dir renames the finished folder onto this name
        atomic_save_dir(root, write)
    state.wait_for_everyone()
    if not _synth_complete(root):
        raise StageError(f"tldr-synth data missing at {root} (needs sft/, preference/, tokenizer/)")
    marker = root / SYNTH_MARKER
    if marker.exists():
        # A key added to SynthConfig after the folder was made was at its default then (pair_writers).
        have = {**type(cfg.data.synth)().model_dump(mode="json"), **json.loads(marker.read_text())}
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            raise StageError(f"{root} was generated with other data.synth settings ({', '.join(f'{k}: {have.get(k)!r} vs {want.get(k)!r}' for k in diff)}); "
                             "delete the folder, set data.dir to another folder, or restore the settings")
    return root


def synth_stats(cfg: RunConfig) -> dict:
    """``stats.json`` of the tldr-synth data ({} for real data or when absent)."""
    if cfg.data.task != "tldr-synth":
        return {}
    p = data_root(cfg) / "stats.json"
    return json.loads(p.read_text()) if p.exists() else {}


def sft_source(cfg: RunConfig) -> str:
    """What ``data.tldr.load_split(..., kind="sft")`` reads: the tldr-synth root or ``data.sft_dataset``."""
    return str(data_root(cfg)) if cfg.data.task == "tldr-synth" else cfg.data.sft_dataset


def preference_source(cfg: RunConfig) -> str:
    """What ``load_split(..., kind="preference")`` reads: the tldr-synth root or ``data.preference_dataset``."""
    return str(data_root(cfg)) if cfg.data.task == "tldr-synth" else cfg.data.preference_dataset


def tokenizer_path(cfg: RunConfig) -> str:
    """``model.tokenizer``, else ``model.policy``, else the tldr-synth tokenizer."""
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    if cfg.model.policy:
        return cfg.model.policy
    if cfg.data.task == "tldr-synth":
        return str(data_root(cfg) / "tokenizer")
    raise StageError(f"data.task={cfg.data.task} needs model.policy (an HF causal LM) or model.tokenizer")


def policy_tokenizer(cfg: RunConfig, padding_side: str = "right"):
    """The policy's tokenizer (pad token distinct from EOS, see ``models.policy.load_tokenizer``)."""
    from rlhflab.models.policy import load_tokenizer

    return load_tokenizer(tokenizer_path(cfg), padding_side=padding_side)


# ----------------------------------------------------------------------- accelerator
def make_accelerator(bf16: bool = False):
    """An ``accelerate.Accelerator``: the GPU when there is one, else CPU (gloo for many
    processes); bf16 autocast only when asked. Gradient accumulation is done by the stages
    themselves (they normalise by global token/pair counts), so none is configured here.
    The stages pass ``bf16=False``: precision is ``parallel.mixed_precision``, applied by
    ``rlhflab.parallel`` (which refuses a different ``accelerate launch --mixed_precision``)."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if bf16 else "no")


def make_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig, fused: bool = False,
                   foreach: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW with ``optim.eps`` (Huang et al. detail: eps=1e-5 rather than PyTorch's 1e-8).

    ``fused=True`` (the PPO stage) uses PyTorch's fused implementation (one kernel over all
    parameters) where torch accepts it for the parameters' device and dtypes, else the
    default one: the same update up to float rounding
    (``tests/test_runtime.py``); on CPU a ~3.5x faster step (7.5 vs 25-44 ms for the 10.8M
    parameters of the PPO benchmark, one thread), ~1-2% of a PPO update there. SFT and RM keep
    the default implementation: on the default config their stage times did not change with it
    (131 / 205 s against 127 / 204 s without it), only the rounding of the trained weights did.
    ``foreach=False``: the per-parameter loop (``rlhflab.parallel.Engine.optimizer`` uses it for
    sharded models, whose foreach step's temporaries would hold a copy of every parameter shard).
    """
    params = list(params)
    kwargs = dict(lr=optim.lr, eps=optim.eps, weight_decay=optim.weight_decay)
    if foreach is not None:
        kwargs["foreach"] = foreach
    if fused and params and not foreach:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a device/dtype this torch build does not fuse
            pass
    return torch.optim.AdamW(params, **kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, kind: Literal["cosine", "linear", "constant"], total_steps: int,
                   warmup_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``round(warmup_ratio * total_steps)`` steps, then cosine decay to 0,
    linear decay to 0, or constant. ``scheduler.step()`` once per optimizer step."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup = int(round(warmup_ratio * total_steps))
    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))
    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    raise ValueError(f"make_scheduler: kind must be 'cosine', 'linear' or 'constant', got {kind!r}")


# ----------------------------------------------------------------------- data order
def num_steps(n_examples: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps for ``epochs`` passes over ``n_examples`` (incomplete last batch dropped)."""
    return int(math.floor(epochs * n_examples / batch_size))


def global_batch_indices(n_examples: int, batch_size: int, epochs: float, seed: int, step: int) -> list[int]:
    """Example indices of global batch ``step`` (0-based): a seeded permutation per epoch,
    concatenated, cut in consecutive batches. Pure function of its arguments, so every
    process (and a resumed run) sees the same order without communication."""
    start, end = step * batch_size, (step + 1) * batch_size
    out: list[int] = []
    epoch = start // n_examples
    while len(out) < batch_size:
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        lo = max(start - epoch * n_examples, 0)
        hi = min(end - epoch * n_examples, n_examples)
        out.extend(perm[lo:hi])
        epoch += 1
    return out


def process_slice(batch: list, process_index: int, num_processes: int) -> list:
    """This process's contiguous share of a global batch (its length divides exactly: ``derive_batch``)."""
    per = len(batch) // num_processes
    return batch[process_index * per:(process_index + 1) * per]


def micro_batches(items: list, micro_batch_size: int) -> list[list]:
    return [items[i:i + micro_batch_size] for i in range(0, len(items), micro_batch_size)]


# -------------------------------------------------------------------- run folders
def stage_dirs(cfg: RunConfig, stage: str) -> tuple[Path, Path]:
    """``(<run>/<stage>, <run>/tb/<stage>)``; refuses a ``report_to`` tracker that is not installed, before any compute."""
    from rlhflab.trackers import check_trackers

    check_trackers(cfg.report_to)
    return cfg.run_dir / stage, cfg.run_dir / "tb" / stage


def is_finished(stage_dir: Path, output: str) -> bool:
    """A stage is finished when its final model folder ``output`` (or, for a LoRA stage saved
    without merging, ``<output>_adapter``) and its ``metrics.json`` exist."""
    return (stage_dir / "metrics.json").is_file() and ((stage_dir / output / "config.json").is_file()
                                                        or (stage_dir / f"{output}_adapter" / "adapter_config.json").is_file())


def prepare_stage_dir(stage_dir: Path, output: str, resume: bool, force: bool, is_main: bool) -> Optional[dict]:
    """Decide what to do with an existing stage folder before any compute.

    * finished and not ``force``: returns its ``metrics.json`` (with ``"skipped": true``) -- the caller returns it;
    * ``force``: deletes the folder, a fresh start;
    * ``resume``: keeps ``state/`` (continue from its latest checkpoint, or fresh when there is none);
    * otherwise a partial run with checkpoints is refused, naming ``--resume``, so that work is never discarded silently.
    """
    from rlhflab.runtime import CheckpointManager

    if force:
        if is_main and stage_dir.exists():
            shutil.rmtree(stage_dir)
        return None
    if is_finished(stage_dir, output):
        done = json.loads((stage_dir / "metrics.json").read_text())
        return {**done, "skipped": True, "reason": f"{stage_dir} is finished (delete it, or pass force=True, to retrain)"}
    latest = CheckpointManager(stage_dir / "state").latest()
    if latest is not None and not resume:
        raise StageError(f"{stage_dir} holds an unfinished run (checkpoint {latest.name}); "
                         "pass --resume to continue it, or delete the folder to start over")
    return None


def stop_after_step() -> Optional[int]:
    """``$RLHFLAB_STOP_AFTER_STEP`` as an int (None when unset): the training loops checkpoint
    that step and raise :class:`StopRequested` -- a reproducible crash for resume tests."""
    at = os.environ.get(STOP_ENV)
    if not at:
        return None
    try:
        return int(at)
    except ValueError:
        raise StageError(f"{STOP_ENV} must be an integer step, got {at!r}") from None


# ------------------------------------------------------------------- train state
def load_train_state(ckpt_dir: Path) -> dict:
    """``state.pt`` of a checkpoint (``parallel.Engine.save_checkpoint``), read with ``weights_only=True``.
    A checkpoint damaged on disk (truncated, unreadable) is skipped with a warning and the previous
    one in the same ``state/`` folder is read instead (``CheckpointManager.load``); ``CheckpointError``
    names every file when none can be read."""
    from rlhflab.parallel import load_state_file
    from rlhflab.runtime import CheckpointManager

    _, state = CheckpointManager(Path(ckpt_dir).parent).load(load_state_file, newest=Path(ckpt_dir))
    return state


def restore_optimization(state: dict, optimizer, scheduler) -> tuple[int, float]:
    """Put optimizer (when ``state`` still holds it), scheduler and RNG states back; return (step, elapsed_s)."""
    from rlhflab.runtime import set_rng_state

    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"]), float(state.get("elapsed_s", 0.0))


# Fields a resumed run may change: they do not alter what is trained.
_RESUME_FREE = {"log_every", "eval_every", "save_every", "eval_samples"}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def training_config(cfg: RunConfig, stage: str) -> dict:
    """The settings a checkpoint of ``stage`` depends on (dotted key -> value): data, model and
    the stage's section, minus logging/eval cadence. Stored in every checkpoint."""
    tree = {"data": cfg.data.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
            stage: {k: v for k, v in getattr(cfg, stage).model_dump(mode="json").items() if k not in _RESUME_FREE}}
    return _flatten(tree)


def check_resume_config(saved: Optional[dict], cfg: RunConfig, stage: str, ckpt: Path) -> None:
    """Refuse to resume under settings that differ from the checkpoint's, naming each key."""
    if saved is None:
        return
    now = training_config(cfg, stage)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:8])
        raise StageError(f"cannot resume from {ckpt}: the config differs from the checkpoint's ({shown}"
                         f"{'; ...' if len(diff) > 8 else ''}); restore those settings or start a new run")
