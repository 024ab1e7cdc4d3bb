"""One seed of ``rlhflab run --config default --seeds N``, in the same folders and with the same seeds.

``rlhflab run --seeds 5`` runs its seeds one after the other. On a 2-core machine two 1-thread
seeds side by side finish in about the same wall time as two 2-thread seeds in a row, and each
runs at a fixed thread count (the numerics of a run depend on it). This script runs the stages
of one seed so that seeds can be spread over processes; the multi-seed tables of RESULTS.md were
made with it. Generate the data once before starting seeds in parallel (``--data-only``), so two
processes never write it at once.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/seed_run.py runs 0 --data-only
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/seed_run.py runs 3 sft,rm,ppo,eval &
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/seed_run.py runs 4 sft,rm,ppo,eval &
    .venv/bin/python benchmarks/seed_run.py runs 4 ppo,eval ppo.kl_coef=0.1   # overrides last

Seed i writes ``<out>/<name>/seed-i/`` and adds 1000*i to the SFT, RM, PPO and eval seeds (the
data seed is shared), exactly as ``--seeds`` does (``rlhflab.pipeline``); a finished stage is skipped.
"""

from __future__ import annotations

import argparse

from rlhflab import pipeline
from rlhflab.config import load_config
from rlhflab.stages.common import ensure_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="out_dir: the parent of the run folder")
    ap.add_argument("seed", type=int, help="seed index i of --seeds N")
    ap.add_argument("stages", nargs="?", default=",".join(pipeline.STAGES), help="comma-separated stages")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    ap.add_argument("--config", default="default")
    ap.add_argument("--seeds", type=int, default=5, help="N of --seeds N (only needs to be > 1)")
    ap.add_argument("--data-only", action="store_true", help="generate the tldr-synth data and stop")
    args = ap.parse_args()
    cfg = load_config(args.config, [f"out_dir={args.out}", *args.overrides])
    scfg = pipeline._with_seed(cfg, args.seed, args.seeds)
    print(f"[seed_run] data: {ensure_data(scfg)}")
    if not args.data_only:
        pipeline.run_pipeline(scfg, seeds=1, stages=tuple(args.stages.split(",")))


if __name__ == "__main__":
    main()
