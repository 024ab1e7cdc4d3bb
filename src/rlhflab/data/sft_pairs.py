"""tldr-synth: train comparisons between the SFT policy's own samples (``rm.sft_pairs``).

tldr-synth's generator pairs summaries from fixed writers (reference, oracle, halluc, ...). The
comparisons Huang et al. train on (Stiennon et al. 2020) were mostly between samples of the
policies being trained, so the RM learned to rank what a policy writes. Here, for a share of the
train posts, every comparison of the post is replaced by two fresh samples of the run's SFT
policy -- PPO's sampler at ``ppo.temperature``, cut after the first EOS -- labelled by the
generator's simulated labelers (:func:`rlhflab.data.tldr_synth.labeler_prob`: the same tau and
length preference). The validation comparisons are untouched, so the RM's validation accuracy
stays comparable across recipes; ``rm.on_policy_prompts`` measures the RM on the SFT policy's
samples of other posts.

Why by hand: this is tldr-synth's simulated collection of human feedback, the project's own
known-answer task; no library collects comparisons from a policy and a synthetic labeler.
"""

from __future__ import annotations

import random
from typing import Any, Optional, Sequence

import torch

from rlhflab.data.tldr import PrefExample


def relabel(rows: Sequence[dict], examples: Sequence[PrefExample], policy, tok, fraction: float, seed: int,
            response_length: int, temperature: float, stop_at_eos: bool, labeler_tau: float,
            labeler_len_beta: float, batch_size: int = 64, bar: Optional[Any] = None) -> tuple[list[dict], dict]:
    """Replace the comparisons of ``round(fraction * posts)`` train posts by pairs of SFT samples.

    ``rows``: the raw train comparisons (tldr-synth's schema); ``examples``: the same rows as
    loaded (:func:`rlhflab.data.tldr.load_preferences`, one per row, in order) -- their
    ``query_ids`` are what PPO shows the policy. ``seed`` picks the posts, seeds the sampling
    noise (per comparison and sample, :func:`rlhflab.stages.ppo.sample_seed`) and the labels.
    A comparison whose two samples are identical or empty keeps its original pair (counted).
    Returns (new rows, counts); the same inputs give the same rows.
    """
    from rlhflab.algos import truncate_response
    from rlhflab.data.collate import pad_left
    from rlhflab.data.tldr_synth import _n_words, gold_scores, labeler_prob
    from rlhflab.stages.ppo import sample_responses, sample_seed

    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if len(rows) != len(examples):
        raise ValueError(f"{len(rows)} rows but {len(examples)} loaded examples: they must line up one to one")
    rng = random.Random(f"on-policy-pairs:{seed}")
    post_ids = sorted({r["info"]["id"] for r in rows})
    chosen_posts = set(rng.sample(post_ids, round(fraction * len(post_ids))))
    todo = [i for i, r in enumerate(rows) if r["info"]["id"] in chosen_posts]

    device = next(policy.parameters()).device
    eos = tok.eos_token_id if stop_at_eos else None
    texts: dict[int, list[str]] = {}
    jobs = [(i, s) for i in todo for s in (0, 1)]
    if bar is not None:
        bar.reset(total=len(jobs))
    with torch.no_grad():
        for b in range(0, len(jobs), batch_size):
            chunk = jobs[b: b + batch_size]
            ids, mask = pad_left([examples[i].query_ids for i, _ in chunk], tok.pad_token_id)
            seeds = [sample_seed(10_000 + seed, 2 * i + s) for i, s in chunk]
            resp, _ = sample_responses(policy, ids.to(device), mask.to(device), response_length, temperature, seeds,
                                       eos, tok.pad_token_id)
            resp, _, _ = truncate_response(resp, eos, tok.pad_token_id)
            for (i, _), t in zip(chunk, tok.batch_decode(resp.cpu().tolist(), skip_special_tokens=True)):
                texts.setdefault(i, []).append(t.strip())
            if bar is not None:
                bar.update(len(chunk))

    out = list(rows)
    replaced = same = empty = gold_right = gold_differs = 0
    for i in todo:
        a, b = texts[i]
        if a == b or not a or not b:  # nothing to compare: the original comparison stays
            same += a == b
            empty += a != b
            continue
        post = rows[i]["info"]["post"]
        ga, gb = gold_scores([post, post], [a, b])
        prob = labeler_prob(ga, gb, _n_words(a), _n_words(b), labeler_tau, labeler_len_beta)
        choice = 0 if rng.random() < prob else 1
        if ga != gb:
            gold_differs += 1
            gold_right += (ga > gb) == (choice == 0)
        pair = [" " + a, " " + b]  # leading space, as the generator writes comparison texts
        out[i] = {"info": rows[i]["info"], "summaries": [{"text": pair[0], "policy": "sft"}, {"text": pair[1], "policy": "sft"}],
                  "choice": choice, "chosen": pair[choice], "rejected": pair[1 - choice]}
        replaced += 1
    return out, {"train_comparisons": len(rows), "posts": len(post_ids), "posts_relabelled": len(chosen_posts),
                 "replaced": replaced, "kept_identical_samples": same, "kept_empty_samples": empty,
                 "pairs_with_a_gold_difference": gold_differs,
                 "labels_pick_higher_gold": round(gold_right / gold_differs, 4) if gold_differs else None}
