"""Relabel part of tldr-synth's train comparisons on the SFT policy's own samples (an experiment).

tldr-synth's comparisons pair summaries from fixed writers (reference, oracle, halluc, ...). In
Stiennon et al. 2020, whose data Huang et al. train on, most comparisons were between samples of
the policies being trained. This script makes such a data folder for one seed: for a fraction of
the train posts (chosen with ``--seed``), every comparison of the post is replaced by two fresh
samples of that seed's SFT policy -- PPO's sampler at ``ppo.temperature``, cut after the first
EOS -- labelled by the same simulated labelers as the generator (``labeler_prob``, with the
generator's tau and length preference). The validation split, the tokenizer and the data stamp
are copied unchanged, so the RM's validation accuracy stays comparable and the SFT policy (whose
tokenizer is the folder's) is reused as it is.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/on_policy_pairs.py runs/tldr-synth/data \\
        runs/tldr-synth/seed-1/sft/policy runs/op/data1 --fraction 0.5 --seed 1
    # then copy the seed's sft/ into runs/op/seed-1/ and train the RM on the new folder:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/seed_run.py runs 1 rm,ppo,eval name=op data.dir=runs/op/data1

Writes ``<out>/relabel.json`` beside the data: how many comparisons were replaced, how often
the labels chose the higher-gold sample, and the time taken.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="a tldr-synth data folder (the default run's runs/tldr-synth/data)")
    ap.add_argument("policy", help="the seed's SFT policy folder (<run>/sft/policy)")
    ap.add_argument("out", help="the new data folder (must not exist)")
    ap.add_argument("--fraction", type=float, default=0.5, help="share of train posts relabelled on SFT samples")
    ap.add_argument("--seed", type=int, default=0, help="picks the posts, seeds the sampling noise and the labels")
    ap.add_argument("--config", default="default", help="the run's config (response length, PPO temperature)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    if not 0 < args.fraction <= 1:
        ap.error("--fraction must be in (0, 1]")

    from rlhflab.config import load_config
    from rlhflab.data.sft_pairs import relabel
    from rlhflab.data.tldr import load_preferences
    from rlhflab.models.policy import load_policy, load_tokenizer
    from rlhflab.runtime import progress

    src, out = Path(args.data), Path(args.out)
    if out.exists():
        ap.error(f"{out} exists")
    cfg = load_config(args.config, [f"data.dir={src}"])
    synth = cfg.data.synth
    tok = load_tokenizer(args.policy, padding_side="left")
    raw = [json.loads(line) for line in (src / "preference" / "train.jsonl").open()]
    examples, _ = load_preferences(str(src), "train", tok, cfg.data.max_query_length, cfg.data.response_length,
                                       False, cfg.pref_response_length)
    t0 = time.perf_counter()
    policy = load_policy(args.policy).eval()
    bar = progress(0, "SFT samples", unit="sample")
    rows, counts = relabel(raw, examples, policy, tok, args.fraction, args.seed, cfg.data.response_length,
                           cfg.ppo.temperature, cfg.ppo.stop_token == "eos", synth.labeler_tau, synth.labeler_len_beta,
                           batch_size=args.batch_size, bar=bar)
    bar.close()

    shutil.copytree(src, out)
    with open(out / "preference" / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    info = {"source": str(src), "policy": str(args.policy), "fraction_of_posts": args.fraction, "seed": args.seed,
            **counts, "temperature": cfg.ppo.temperature, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "relabel.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
