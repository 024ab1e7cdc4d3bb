"""What every stage needs around its loop: seeding, metric logging, atomic checkpoints.

Kept small and free of training logic so each stage file still reads top to bottom.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from rlhflab.errors import StageError

# Write failures that are the output folder's fault, not a bug: answered with a clear CheckpointError.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_WRITE_HINT = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "the folder is not writable",
               errno.EPERM: "the folder is not writable"}


class CheckpointError(StageError):
    """A checkpoint could not be written (disk full, read-only folder) or none could be read back."""


@contextlib.contextmanager
def output_errors(what: str, folder: Path):
    """Turn a disk-full / read-only OSError while writing ``what`` into a CheckpointError that says so."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise CheckpointError(f"cannot write {what} ({e.filename or folder}): {_WRITE_HINT[e.errno]} "
                              f"[{e.strerror}]; earlier checkpoints in {folder} are untouched -- free space or "
                              "fix the permissions, then rerun with --resume") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch RNG states, for exact resume: only tuples, ints, floats and
    tensors, so a checkpoint holding them loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item() if v.numel() == 1 else v.detach().cpu().tolist()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    Only the main process writes (``enabled=False`` elsewhere). On resume the jsonl is
    truncated to the steps at or before the checkpoint, so the file never holds two
    different histories of the same step.
    """

    def __init__(self, stage_dir: str | Path, tb_dir: Optional[str | Path] = None, enabled: bool = True,
                 resume_step: Optional[int] = None):
        self.enabled = enabled
        self.path = Path(stage_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        if tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(tb_dir))
            except Exception:  # tensorboard missing or broken: jsonl is the record of truth
                self._tb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=_jsonable)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


# ---------------------------------------------------------------- atomic checkpoints
def atomic_save_dir(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Build a directory with ``write(tmp_dir)`` then move it into place in one rename.

    A crash at any point leaves either the previous ``final`` or the new one, never a
    half-written directory under the final name (stale ``.tmp-*`` siblings are ignored
    and cleaned up by the next save). ``COMPLETE`` records every file's size, so a file
    truncated later on disk is detected (:func:`verify_complete`). A full disk or read-only
    folder raises :class:`CheckpointError` and leaves the previous ``final`` in place.
    """
    final = Path(final)
    with output_errors(final.name, final.parent):
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
        try:
            write(tmp)
            sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            with open(tmp / "COMPLETE", "w") as f:
                json.dump({"time": time.time(), "files": sizes}, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            # torch.save reports a full disk as RuntimeError("... file write failed"): ask the file system.
            problem = None if isinstance(e, OSError) else _disk_problem(final.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written folder on a full disk
            if problem is not None:
                raise CheckpointError(f"cannot write {final.name} in {final.parent}: {problem} ({type(e).__name__}: "
                                      f"{e}); earlier checkpoints are untouched -- free space, then rerun with "
                                      "--resume") from None
            raise
        old = final.parent / f".{final.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    return final


def _disk_problem(folder: Path, min_free: int = 1 << 20) -> Optional[str]:
    """"the disk is full" / "the file system is read-only" when ``folder``'s file system says so."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return "the file system is read-only"
    free = st.f_bavail * st.f_frsize
    return f"the disk is full ({free} bytes free)" if free < min_free else None


def verify_complete(path: str | Path) -> Optional[str]:
    """None when ``path`` is a complete checkpoint whose files have the sizes recorded in its
    ``COMPLETE`` (older checkpoints without sizes are only checked for ``COMPLETE``); otherwise
    what is wrong, naming the file."""
    path = Path(path)
    marker = path / "COMPLETE"
    if not marker.is_file():
        return f"{marker} is missing (an interrupted save)"
    try:
        files = json.loads(marker.read_text()).get("files", {})
    except (ValueError, AttributeError):
        return None  # an older checkpoint: COMPLETE holds only a timestamp
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} is {f.stat().st_size} bytes, {size} when it was written (truncated or overwritten)"
    return None


class CheckpointManager:
    """``state/ckpt-<step>/`` directories written atomically, plus a ``latest`` pointer file.

    The pointer is itself replaced atomically after the checkpoint directory is complete,
    so ``latest()`` always names a complete checkpoint. Keeps the newest ``keep``.
    ``load(read)`` reads the newest checkpoint that verifies and loads, falling back to the
    previous one (with a warning) when a file was damaged on disk -- whatever the format
    ``read`` understands.
    """

    def __init__(self, state_dir: str | Path, keep: int = 2):
        self.dir = Path(state_dir)
        self.keep = keep

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        path = atomic_save_dir(self.dir / f"ckpt-{step:08d}", write)
        with output_errors("the checkpoint pointer", self.dir):
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".latest.")
            with os.fdopen(fd, "w") as f:
                f.write(path.name)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / "latest")
        ckpts = sorted(p for p in self.dir.glob("ckpt-*") if p.is_dir())
        for p in ckpts[: -self.keep]:
            if p != path:
                shutil.rmtree(p, ignore_errors=True)
        return path

    def latest(self) -> Optional[Path]:
        ptr = self.dir / "latest"
        if ptr.exists():
            p = self.dir / ptr.read_text().strip()
            if (p / "COMPLETE").exists():
                return p
        # Pointer missing or stale (crash between the rename and the pointer write): newest complete dir.
        done = sorted(p for p in self.dir.glob("ckpt-*") if (p / "COMPLETE").exists())
        return done[-1] if done else None

    def load(self, read: Callable[[Path], Any], newest: Optional[Path] = None) -> tuple[Path, Any]:
        """``(path, read(path))`` for the newest checkpoint (at or before ``newest``) that verifies
        and reads; each one skipped is warned about, naming the file and the error.

        Raises:
            CheckpointError: no checkpoint could be read (every attempt is listed).
        """
        newest = Path(newest) if newest is not None else self.latest()
        done = sorted((p for p in self.dir.glob("ckpt-*") if (p / "COMPLETE").exists()), reverse=True)
        if newest is not None:
            done = [newest] + [p for p in done if p.name < newest.name]
        failures = []
        for p in done:
            problem = verify_complete(p)
            if problem is None:
                try:
                    return p, read(p)
                except Exception as e:  # a damaged file in a format only `read` understands
                    problem = f"reading it failed: {type(e).__name__}: {e}"
            failures.append(f"{p.name}: {problem}")
            warnings.warn(f"checkpoint {p} is unusable ({problem}); trying the previous one", RuntimeWarning,
                          stacklevel=2)
        raise CheckpointError(f"no readable checkpoint in {self.dir}: " + ("; ".join(failures) or "none found")
                              + " -- delete the folder (or pass force) to start over")


def progress(total: int, desc: str, enabled: bool = True, unit: str = "step"):
    """A tqdm bar with ETA; disabled on non-main processes or when RLHFLAB_NO_PROGRESS=1."""
    from tqdm.auto import tqdm

    disable = (not enabled) or os.environ.get("RLHFLAB_NO_PROGRESS") == "1"
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, smoothing=0.1)
