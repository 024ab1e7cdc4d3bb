"""Re-evaluate finished reward models on another (e.g. larger) preference validation split.

The RM stage scores its validation pairs once, at the end of training. On tldr-synth the
normalised accuracy (acc - 0.5)/(bayes - 0.5) divides the label noise of the accuracy by
bayes - 0.5 ~ 0.22, so 4000 pairs leave it a standard error of ~0.034: a bar such as >= 0.8
cannot be judged from one draw. The generator draws each split from its own stream
(``tldr-synth:<seed>:preference:<split>``), so a data folder made with a larger
``data.synth.n_pref_validation`` has the same train pairs and starts with the same validation
pairs; this script scores the saved ``rm/reward`` of each run on that folder's validation split
with the stage's own ``evaluate_rm``, without retraining anything. The queries are cut with the run's
own tokenizer (its config's ``data.dir``); only the pairs come from DATA_DIR. (Before ``8aeb7d2`` the
tokenizer was trained on every split, so a larger validation split changed it; it is now trained on the
train splits only. The run's own tokenizer also lets an RM trained on other pairs, e.g. another
``data.synth.pair_writers`` mix, be scored on the default validation pairs.)

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rm_reeval.py DATA_DIR RUN_DIR [RUN_DIR ...]

Prints one JSON line per run (the RM stage's ``eval/*`` metrics plus ``run``) and writes
``<run>/rm/reeval-<n>.json``; it never touches ``rm/metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rlhflab.config import load_config
from rlhflab.data.formats import load_preference_data
from rlhflab.models.length_covariate import CONFIG_KEY as LENGTH_KEY
from rlhflab.models.reward import RewardModel
from rlhflab.stages.common import policy_tokenizer
from rlhflab.stages.rm import evaluate_rm

KEYS = ("eval/normalized_accuracy", "eval/normalized_accuracy_se", "eval/length_term/normalized_accuracy",
        "eval/length_term/normalized_accuracy_se", "eval/expected_normalized_accuracy",
        "eval/length_term/expected_normalized_accuracy", "eval/accuracy", "data/bayes_accuracy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", help="tldr-synth data folder whose preference/validation.jsonl is scored")
    ap.add_argument("runs", nargs="+", help="run folders with config.yaml and rm/reward")
    args = ap.parse_args()
    for run in map(Path, args.runs):
        t0 = time.time()
        own = load_config(run / "config.yaml")  # the run's own data folder: its tokenizer cuts the queries
        cfg = load_config(run / "config.yaml", [f"data.dir={args.data_dir}"])
        rm = RewardModel.from_pretrained(run / "rm" / "reward")
        length_w = getattr(rm.model.config, LENGTH_KEY, None)
        val, skips = load_preference_data(cfg, "validation", policy_tokenizer(own))
        with torch.no_grad():  # local: a caller's (or a test process's) grad mode is left alone
            metrics, _ = evaluate_rm(rm, val, cfg, batch_size=2 * cfg.rm.micro_batch_size, length_w=length_w)
        out = {"run": str(run), "pairs": len(val), "skipped": skips.total, "secs": round(time.time() - t0, 1),
               **{k: metrics[k] for k in KEYS if k in metrics}}
        (run / "rm" / f"reeval-{len(val)}.json").write_text(json.dumps({**out, "metrics": metrics}, indent=1))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
