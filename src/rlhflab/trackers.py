"""Experiment trackers (``report_to``) through accelerate's tracker classes, and sample tables.

``report_to`` lists the trackers besides ``metrics.jsonl`` (always written, the record of
truth): ``tensorboard`` (the default; rlhflab's own writer at ``<run>/tb/<stage>``, as
before), ``wandb``, ``trackio`` and ``mlflow`` (``accelerate.tracking.WandBTracker``,
``TrackioTracker``, ``MLflowTracker``). A tracker whose package is missing is refused before
the stage starts, naming the package and the ``trackers`` extra.

Offline, without a network:

* wandb: ``WANDB_MODE=offline`` (runs are written under ``<run>/wandb``; ``wandb sync`` later);
* mlflow: without ``MLFLOW_TRACKING_URI`` the runs go to the file store ``<out_dir>/mlruns``
  (``mlflow ui --backend-store-uri <out_dir>/mlruns``); a set URI (a server, ``sqlite:///...``)
  is used as it is;
* trackio: local by default (a SQLite database under ``~/.cache/huggingface/trackio``).

Runs are named ``<run name>/<stage>`` in the project / experiment ``rlhflab``.

Sample tables (``ppo.sample_table_every``): every N PPO updates the first
``ppo.sample_table_rows`` episodes of the rollout -- prompt, response, score -- are appended
to ``ppo/samples.jsonl`` (one JSON object per row, with ``step``), and sent as a table to
the trackers that have one: wandb (``log_table``), mlflow (``mlflow.log_table`` as the
artifact ``samples/step_<N>.json``) and TensorBoard (a markdown text summary).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from rlhflab.errors import StageError
from rlhflab.runtime import MetricsLogger, _jsonable

log = logging.getLogger(__name__)

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
PROJECT = "rlhflab"
SAMPLE_COLUMNS = ("prompt", "response", "score")


def check_trackers(report_to: Sequence[str]) -> None:
    """Refuse, before any compute, a tracker whose Python package is not installed."""
    for name in report_to:
        if name == "tensorboard":
            continue  # optional as before: metrics.jsonl is kept when TensorBoard is missing
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise StageError(f"report_to: {name} needs the package '{PACKAGES[name]}', which is not installed "
                             f"(pip install '{PACKAGES[name]}', or pip install 'rlhflab[trackers]')")


def make_tracker(name: str, cfg, stage: str):
    """An accelerate tracker for ``name`` (wandb, trackio, mlflow), started."""
    from accelerate import tracking

    run_name = f"{cfg.name}/{stage}"
    if name == "wandb":
        out = Path(os.environ.get("WANDB_DIR") or cfg.run_dir)
        out.mkdir(parents=True, exist_ok=True)
        tracker = tracking.WandBTracker(PROJECT, name=run_name, dir=str(out))
    elif name == "trackio":
        tracker = tracking.TrackioTracker(PROJECT, name=run_name)
    elif name == "mlflow":
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            # MLflow 3 keeps its file store only on request; it is the store that needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((Path(cfg.out_dir).resolve() / "mlruns").as_uri())
        tracker = tracking.MLflowTracker(experiment_name=PROJECT, run_name=run_name)
    else:  # pragma: no cover - the config refuses other names
        raise StageError(f"report_to: unknown tracker {name!r}")
    tracker.start()
    return tracker


class TrackedLogger(MetricsLogger):
    """:class:`~rlhflab.runtime.MetricsLogger` (jsonl + TensorBoard) plus accelerate trackers and sample tables."""

    def __init__(self, stage_dir, tb_dir=None, enabled: bool = True, resume_step: Optional[int] = None,
                 trackers: Sequence[Any] = ()):
        super().__init__(stage_dir, tb_dir, enabled=enabled, resume_step=resume_step)
        self.trackers = list(trackers) if enabled else []
        self.samples_path = Path(stage_dir) / "samples.jsonl"
        if enabled and self.samples_path.exists():  # as metrics.jsonl: one history per step
            kept = [] if resume_step is None else [
                ln for ln in self.samples_path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.samples_path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, metrics: dict) -> None:
        super().log(step, metrics)
        if not self.enabled:
            return
        scalars = {k: v for k, v in ((k, _jsonable(v)) for k, v in metrics.items())
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for t in self.trackers:
            t.log(scalars, step=int(step))

    def log_table(self, step: int, rows: Sequence[dict], name: str = "samples") -> None:
        """Append ``rows`` (dicts with SAMPLE_COLUMNS) to ``samples.jsonl`` and send them to the trackers with tables."""
        if not self.enabled or not rows:
            return
        with self.samples_path.open("a") as f:
            for r in rows:
                f.write(json.dumps({"step": int(step), **{k: _jsonable(v) for k, v in r.items()}}, ensure_ascii=False) + "\n")
        columns = list(rows[0])
        data = [[r[c] for c in columns] for r in rows]
        for t in self.trackers:
            if t.name == "wandb":
                t.log_table(name, columns=columns, data=data, step=int(step))
            elif t.name == "mlflow":
                import mlflow

                mlflow.log_table({c: [r[c] for r in rows] for c in columns}, artifact_file=f"{name}/step_{int(step)}.json")
        if self._tb is not None:
            head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            body = "".join("| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |\n" for row in data)
            self._tb.add_text(name, head + body, int(step))

    def close(self) -> None:
        super().close()
        for t in self.trackers:
            t.finish()
        self.trackers = []


def make_logger(cfg, stage: str, stage_dir, tb_dir, enabled: bool = True, resume_step: Optional[int] = None) -> TrackedLogger:
    """The metrics logger of ``stage`` for ``cfg.report_to`` (only the main process writes)."""
    check_trackers(cfg.report_to)
    trackers = [make_tracker(n, cfg, stage) for n in cfg.report_to if n != "tensorboard"] if enabled else []
    if trackers:
        from rlhflab.config import describe

        flat = {key: value for key, _, value, _ in describe(cfg) if "[]" not in key}  # [] rows document item defaults
        for t in trackers:
            t.store_init_configuration(flat)
    return TrackedLogger(stage_dir, tb_dir if "tensorboard" in cfg.report_to else None, enabled=enabled,
                         resume_step=resume_step, trackers=trackers)


def sample_rows(prompts: Sequence[Any], texts: Sequence[str], scores: Sequence[float], n: int) -> list[dict]:
    """The first ``n`` (prompt, response, score) rows of a rollout."""
    return [{"prompt": p.query, "response": t, "score": float(s)} for p, t, s in list(zip(prompts, texts, scores))[:n]]
