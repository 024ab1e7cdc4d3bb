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
import random
import shutil
import time
from pathlib import Path

import torch


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

    from rlhflab.algos import truncate_response
    from rlhflab.config import load_config
    from rlhflab.data.collate import pad_left
    from rlhflab.data.tldr import load_preferences
    from rlhflab.data.tldr_synth import _n_words, gold_scores, labeler_prob
    from rlhflab.models.policy import load_policy, load_tokenizer
    from rlhflab.runtime import progress
    from rlhflab.stages.ppo import sample_responses, sample_seed

    src, out = Path(args.data), Path(args.out)
    if out.exists():
        ap.error(f"{out} exists")
    cfg = load_config(args.config, [f"data.dir={src}"])
    synth = cfg.data.synth
    tok = load_tokenizer(args.policy, padding_side="left")
    raw = [json.loads(line) for line in (src / "preference" / "train.jsonl").open()]
    examples, skips = load_preferences(str(src), "train", tok, cfg.data.max_query_length, cfg.data.response_length,
                                       False, cfg.pref_response_length)
    if skips.total or len(examples) != len(raw):
        raise SystemExit(f"{skips.total} train rows were skipped: rows and examples would not line up")

    rng = random.Random(f"on-policy-pairs:{args.seed}")
    post_ids = sorted({r["info"]["id"] for r in raw})
    chosen_posts = set(rng.sample(post_ids, round(args.fraction * len(post_ids))))
    todo = [i for i, r in enumerate(raw) if r["info"]["id"] in chosen_posts]

    policy = load_policy(args.policy).eval()
    eos = tok.eos_token_id if cfg.ppo.stop_token == "eos" else None
    texts: dict[int, list[str]] = {}
    t0 = time.perf_counter()
    bar = progress(2 * len(todo), "SFT samples", unit="sample")
    jobs = [(i, s) for i in todo for s in (0, 1)]
    with torch.no_grad():
        for b in range(0, len(jobs), args.batch_size):
            chunk = jobs[b: b + args.batch_size]
            ids, mask = pad_left([examples[i].query_ids for i, _ in chunk], tok.pad_token_id)
            seeds = [sample_seed(10_000 + args.seed, 2 * i + s) for i, s in chunk]
            resp, _ = sample_responses(policy, ids, mask, cfg.data.response_length, cfg.ppo.temperature, seeds, eos,
                                       tok.pad_token_id)
            resp, _, _ = truncate_response(resp, eos, tok.pad_token_id)
            for (i, _), t in zip(chunk, tok.batch_decode(resp.tolist(), skip_special_tokens=True)):
                texts.setdefault(i, []).append(t.strip())
            bar.update(len(chunk))
    bar.close()

    replaced = same = empty = gold_right = 0
    rows = list(raw)
    for i in todo:
        a, b = texts[i]
        if a == b or not a or not b:  # no comparison to make: the original one stays
            same += a == b
            empty += (not a or not b) and a != b
            continue
        post = raw[i]["info"]["post"]
        ga, gb = gold_scores([post, post], [a, b])
        prob = labeler_prob(ga, gb, _n_words(a), _n_words(b), synth.labeler_tau, synth.labeler_len_beta)
        choice = 0 if rng.random() < prob else 1
        gold_right += (ga > gb) == (choice == 0) if ga != gb else 0
        pair = [" " + a, " " + b]  # leading space, as the generator writes comparison texts
        rows[i] = {"info": raw[i]["info"], "summaries": [{"text": pair[0], "policy": "sft"}, {"text": pair[1], "policy": "sft"}],
                   "choice": choice, "chosen": pair[choice], "rejected": pair[1 - choice]}
        replaced += 1

    shutil.copytree(src, out)
    with open(out / "preference" / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    info = {"source": str(src), "policy": str(args.policy), "fraction_of_posts": args.fraction, "seed": args.seed,
            "train_comparisons": len(raw), "replaced": replaced, "kept_identical_samples": same,
            "kept_empty_samples": empty, "labels_pick_higher_gold": round(gold_right / max(replaced, 1), 4),
            "temperature": cfg.ppo.temperature, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "relabel.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
