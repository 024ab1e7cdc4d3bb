"""``rlhflab run``: data -> SFT -> RM -> PPO -> eval -> report, resumable stage by stage.

A stage counts as finished when its ``metrics.json`` exists (each stage writes it last, after
its model directory); a finished stage is not redone. A stage that was interrupted (its
``state/`` holds a checkpoint but there is no ``metrics.json``) is resumed from that
checkpoint. With ``seeds=N`` the stochastic stages (SFT, RM, PPO, eval) run once per seed in
``<run>/seed-<i>/`` sharing one dataset, and ``summary.json`` reports mean ± std.

Under N processes (``accelerate launch ... -m rlhflab.cli run``) every process runs the
training stages together (each writes its files from the main process only, see
:mod:`rlhflab.parallel`); evaluation, the report and ``summary.json`` are the main process's
job while the others wait, so every file is written exactly once.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

from rlhflab.config import RunConfig, save_config
from rlhflab.runtime import write_json

STAGES = ("sft", "rm", "ppo", "eval")


def _stage_dir(cfg: RunConfig, stage: str) -> Path:
    return cfg.run_dir / stage


def stage_status(cfg: RunConfig, stage: str) -> str:
    """'finished', 'interrupted' (a checkpoint but no final metrics) or 'todo'."""
    d = _stage_dir(cfg, stage)
    if (d / "metrics.json").exists():
        return "finished"
    state = d / "state"
    if state.exists() and any(p.name.startswith("ckpt-") for p in state.iterdir()):
        return "interrupted"
    return "todo"


def _runner(stage: str) -> Callable[..., dict]:
    if stage == "sft":
        from rlhflab.stages.sft import main
    elif stage == "rm":
        from rlhflab.stages.rm import main
    elif stage == "ppo":
        from rlhflab.stages.ppo import main
    elif stage == "overopt":
        from rlhflab.stages.overopt import main
    else:
        from rlhflab.stages.evaluate import main
    return main


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def headline(cfg: RunConfig) -> dict:
    """The numbers a reader wants first, gathered from each stage's metrics.json and eval results."""
    run = cfg.run_dir
    data_dir = Path(cfg.data.dir) if cfg.data.dir else run.parent / "data" if run.name.startswith("seed-") else run / "data"
    stats = _load(data_dir / "stats.json")
    sft, rm, ppo = (_load(run / s / "metrics.json") for s in ("sft", "rm", "ppo"))
    ev = _load(run / "eval" / "results.json")
    out: dict[str, Any] = {
        "data/reference_gold": _dig(stats, "gold_mean", "reference"),
        "data/oracle_gold": _dig(stats, "gold_mean", "oracle"),
        "data/bayes_accuracy": stats.get("bayes_accuracy"),
        "sft/gold_score": sft.get("gold/score"),
        "sft/rougeL": sft.get("eval/rougeL"),
        "rm/accuracy": rm.get("eval/accuracy"),
        "rm/normalized_accuracy": rm.get("eval/normalized_accuracy"),
        "rm/normalized_accuracy_se": rm.get("eval/normalized_accuracy_se"),
        "rm/expected_normalized_accuracy": rm.get("eval/expected_normalized_accuracy"),
        "rm/length_covariate_w": rm.get("rm/length_covariate_w"),
        "rm/length_term/normalized_accuracy": rm.get("eval/length_term/normalized_accuracy"),
        "rm/length_term/normalized_accuracy_se": rm.get("eval/length_term/normalized_accuracy_se"),
        "rm/gold_agreement": rm.get("eval/gold_agreement"),
        "rm/length_coef": rm.get("eval/length_coef"),
        "ppo/kl": ppo.get("objective/kl"),
        "ppo/kl_health": ppo.get("kl/health"),
        "ppo/scores": ppo.get("objective/scores"),
        "ppo/gold_score": ppo.get("gold/score"),
    }
    for name, pol in (ev.get("policies") or {}).items():
        for key in ("gold_mean", "gold_ci", "rm_score_mean", "rougeL"):
            if key in pol:
                out[f"eval/{name}/{key}"] = pol[key]
    for c in ev.get("comparisons") or []:
        if c.get("judge") == "gold" and c.get("a") == "ppo" and c.get("b") == "sft":
            out["eval/ppo_vs_sft/win_rate"] = c.get("win_rate")
            out["eval/ppo_vs_sft/ci"] = c.get("ci")
            out["eval/ppo_vs_sft/lc_win_rate"] = c.get("lc_win_rate")
    out.update(overopt_headline(_load(run / "overopt" / "results.json")))
    return {k: v for k, v in out.items() if v is not None}


def overopt_headline(res: dict) -> dict:
    """alpha, beta, d* of the gold fits, best-of-n vs PPO, and the plain-language reading (``rlhflab overopt``)."""
    out: dict[str, Any] = {}
    for method in ("bon", "ppo"):
        for key in ("alpha", "beta", "d_star", "d_star_ci"):
            out[f"overopt/{method}/gold_{key}"] = _dig(res, "fits", method, "gold", key)
        out[f"overopt/{method}/gold_peak_in_range"] = _dig(res, "fits", method, "divergence", "peak_in_measured_range")
    c = res.get("compare") or {}
    n = c.get("n")
    for key in ("bon_gold", "ppo_gold", "ppo_kl", "gold_diff", "gold_diff_ci", "ppo_train_samples"):
        out[f"overopt/bon{n}_vs_ppo/{key}"] = c.get(key)
    out["overopt/reading"] = res.get("reading")
    return out


def _with_seed(cfg: RunConfig, i: int, n: int) -> RunConfig:
    if n == 1:
        return cfg
    data_dir = cfg.data.dir or str(cfg.run_dir / "data")
    upd = cfg.model_dump()
    upd["name"] = f"{cfg.name}/seed-{i}"
    upd["data"]["dir"] = data_dir
    for stage in ("sft", "rm", "ppo", "eval"):
        upd[stage]["seed"] = upd[stage]["seed"] + 1000 * i
    return RunConfig.model_validate(upd)


def run_pipeline(cfg: RunConfig, seeds: int = 1, stages: tuple[str, ...] = STAGES, log: Callable[[str], None] = print) -> dict:
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    from accelerate import PartialState

    procs = PartialState()
    is_main = procs.is_main_process
    if not is_main:
        log = lambda _msg: None  # noqa: E731 - one voice on the console
    t0 = time.time()
    if is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")
    per_seed = []
    for i in range(seeds):
        scfg = _with_seed(cfg, i, seeds)
        if is_main:
            scfg.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(scfg, scfg.run_dir / "config.yaml")
        procs.wait_for_everyone()
        if scfg.data.task == "tldr-synth":
            from rlhflab.stages.common import ensure_data

            log(f"[rlhflab] data: tldr-synth at {ensure_data(scfg)}")
        timings = {}
        for stage in stages:
            status = stage_status(scfg, stage)
            if status == "finished":
                log(f"[rlhflab] {stage}: finished earlier, skipped ({scfg.run_dir / stage})")
                continue
            log(f"[rlhflab] {stage}: {'resuming from its checkpoint' if status == 'interrupted' else 'starting'}"
                + (f" (seed {i + 1}/{seeds})" if seeds > 1 else ""))
            ts = time.time()
            main = _runner(stage)
            if stage == "eval" and not is_main:
                pass  # evaluation keeps no state and writes eval/: one process runs it
            else:
                main(scfg, resume=True) if status == "interrupted" else main(scfg)
            procs.wait_for_everyone()
            timings[stage] = round(time.time() - ts, 1)
            log(f"[rlhflab] {stage}: done in {timings[stage]:.0f}s")
        if is_main:
            from rlhflab.report.html import render_report

            report = render_report(scfg.run_dir)
            log(f"[rlhflab] report: {report}")
            h = headline(scfg)
            h["time/stages_s"] = timings
            write_json(scfg.run_dir / "summary.json", h)
            per_seed.append(h)
        procs.wait_for_everyone()

    if is_main:
        summary: dict[str, Any] = per_seed[0] if seeds == 1 else {"seeds": seeds, "per_seed": per_seed, "mean_std": _mean_std(per_seed)}
        summary["time/total_s"] = round(time.time() - t0, 1)
        summary["report"] = str(cfg.run_dir / ("report.html" if seeds == 1 else "seed-0/report.html"))
        write_json(cfg.run_dir / "summary.json", summary)
    procs.wait_for_everyone()
    return summary if is_main else json.loads((cfg.run_dir / "summary.json").read_text())


def _mean_std(rows: list[dict]) -> dict:
    out = {}
    keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for k in sorted(keys):
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if vals:
            out[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    return out
