"""Does the RM rank the SFT policy's own samples as the gold judge does? (pure math on arrays)

A reward model is validated on the comparisons it was trained from, but PPO only ever asks it
to rank samples of the policy, starting with the SFT policy's. On tldr-synth, the RM's accuracy
on its validation comparisons did not predict whether PPO's gold rose (the seed with the best
normalised accuracy, 0.866, won only 0.691 against SFT), while its agreement with the gold judge
on pairs of the SFT policy's samples ranked seven PPO outcomes closely (Spearman 0.86;
benchmarks/RESULTS.md, issue 11). These functions score that agreement on ``[P, S]`` arrays:
``S`` samples of each of ``P`` posts, with the RM's score (``proxy``) and the gold score.
"""

from __future__ import annotations

import numpy as np


def _check(proxy: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    proxy, gold = np.asarray(proxy, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if proxy.ndim != 2 or proxy.shape != gold.shape or proxy.shape[1] < 2:
        raise ValueError(f"proxy and gold must both be [posts, samples >= 2], got {proxy.shape} and {gold.shape}")
    return proxy, gold


def pair_agreement(proxy: np.ndarray, gold: np.ndarray, min_gap: float = 0.02) -> tuple[float, int]:
    """Share of same-post sample pairs whose gold differs by more than ``min_gap`` that the proxy
    orders as gold does; a proxy tie counts one half. Returns (agreement, number of such pairs);
    agreement is NaN when there is no such pair. 0.5 is chance."""
    proxy, gold = _check(proxy, gold)
    i, j = np.triu_indices(proxy.shape[1], k=1)
    dg, dp = gold[:, i] - gold[:, j], proxy[:, i] - proxy[:, j]
    keep = np.abs(dg) > min_gap
    n = int(keep.sum())
    if n == 0:
        return float("nan"), 0
    agree = np.where(dp[keep] == 0, 0.5, (np.sign(dp[keep]) == np.sign(dg[keep])).astype(np.float64))
    return float(agree.mean()), n


def within_post_corr(proxy: np.ndarray, gold: np.ndarray) -> float:
    """Pearson correlation of proxy and gold after subtracting each post's mean from both (pooled
    over all samples): how well the proxy tracks gold among answers to the same post. NaN when
    either has no within-post variance."""
    proxy, gold = _check(proxy, gold)
    p = proxy - proxy.mean(1, keepdims=True)
    g = gold - gold.mean(1, keepdims=True)
    den = np.sqrt((p * p).sum() * (g * g).sum())
    return float((p * g).sum() / den) if den > 0 else float("nan")


def best_of_n_gold_gain(proxy: np.ndarray, gold: np.ndarray) -> float:
    """Mean over posts of (gold of the sample the proxy ranks first) - (mean gold of the post's
    samples), with n = S: what best-of-S by the RM buys in gold. Proxy ties at the top share the
    pick equally. 0 for a proxy unrelated to gold."""
    proxy, gold = _check(proxy, gold)
    top = proxy == proxy.max(1, keepdims=True)
    picked = (gold * top).sum(1) / top.sum(1)
    return float((picked - gold.mean(1)).mean())


def summarize(proxy: np.ndarray, gold: np.ndarray, min_gap: float = 0.02) -> dict:
    """The three figures under the metric names the RM stage logs (``eval/on_policy/...``); the
    best-of-n gain is for n = S = ``eval/on_policy/samples_per_post``."""
    agreement, n = pair_agreement(proxy, gold, min_gap)
    return {"eval/on_policy/gold_agreement": agreement, "eval/on_policy/pairs": n,
            "eval/on_policy/within_post_corr": within_post_corr(proxy, gold),
            "eval/on_policy/best_of_n_gold_gain": best_of_n_gold_gain(proxy, gold),
            "eval/on_policy/samples_per_post": int(np.shape(proxy)[1]),
            "eval/on_policy/sft_gold_mean": float(np.mean(gold)), "eval/on_policy/min_gold_gap": min_gap}
