"""``rlhflab overopt``: gold and proxy reward against KL for best-of-N and PPO (Gao et al. 2022).

On a finished run (``sft/policy``, ``rm/reward``, and ``ppo/snapshots/`` written by PPO with
``ppo.snapshot_every``), reads top to bottom as numbered steps:

1. **posts**: the first ``overopt.n_prompts`` posts of the ``overopt.split`` SFT split, in
   Huang's query format (the posts ``rlhflab eval`` uses);
2. **best-of-N pool**: ``overopt.pool_size`` samples per post from the SFT policy at the PPO
   sampling temperature (PPO's own sampler, one Gumbel-noise seed per sample), truncated
   after the first EOS, each scored by the proxy -- the RM score as PPO sees it
   (``objective/scores``: RM score minus its bias, the no-EOS rule applied) -- and by the
   gold judge;
3. **best-of-n curve** for n = 1, 2, 4, ... <= pool_size: the exact expected proxy and gold
   of the sample best-of-n picks by proxy, over all size-n subsets of the pool
   (:func:`~rlhflab.evaluation.overopt.bon_expected`), at ``KL_bon(n) = log n - (n-1)/n``;
4. **PPO curve**: every ``overopt.snapshot_stride``-th policy snapshot of ``ppo/snapshots/``
   and the final ``ppo/policy``: ``overopt.samples_per_snapshot`` samples per post at the
   PPO temperature (the same noise seeds for every snapshot), their proxy and gold, and the
   measured ``KL(pi || pi_sft) = sum_t (logp_t - ref_logp_t)`` per sample at that
   temperature (PPO's ``objective/kl``, k1); the SFT policy is the point d = 0;
5. **fits** of both functional forms (``d (alpha - beta d)``, ``d (alpha - beta log d)``) to
   the gold and the proxy curves of both methods, relative to the SFT policy's mean (the
   pool mean), with bootstrap CIs over posts on alpha, beta and the peak d*; where gold
   stops rising while the proxy still rises;
6. **best-of-64 beside PPO** (``overopt.compare_n``): gold at the KL PPO reached, and the
   cost of each in samples generated and wall time;
7. write ``<run>/overopt/results.json`` and, last, ``<run>/overopt/metrics.json``.

The pool and each snapshot's scores are cached in ``<run>/overopt/cache/`` (keyed by the
settings that produced them), so a rerun -- e.g. after more PPO -- only measures what is new.

Runs in one process on one device (CUDA when available, else CPU).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch

from rlhflab.config import RunConfig
from rlhflab.errors import StageError
from rlhflab.evaluation import overopt as oo
from rlhflab.runtime import progress, write_json

log = logging.getLogger(__name__)

PROXY_DEFINITION = ("the RM's normalised score (raw - bias) of the decoded response, the no-EOS rule applied "
                    "(ppo.missing_eos) -- PPO's objective/scores")
KL_DEFINITION = ("PPO snapshots: mean over samples of sum_t (logp_t - ref_logp_t) at the PPO sampling temperature "
                 "(PPO's objective/kl, k1), reference = the SFT policy; best-of-n: the analytic log n - (n-1)/n "
                 "(exact for continuous scores, an upper bound with ties)")


class Scored(NamedTuple):
    """Samples of one policy on P posts, S per post: proxy, gold, kl [P, S] (kl None when not measured);
    wall and CPU (this process) seconds of sampling and scoring them."""

    proxy: np.ndarray
    gold: np.ndarray
    kl: Optional[np.ndarray]
    seconds: float
    cpu_seconds: float


# ----------------------------------------------------------------------------- helpers
@torch.no_grad()
def sample_and_score(policy, ref_policy, reward, tok, prompts: Sequence[Any], samples: int, cfg: RunConfig,
                     seed: int, bar=None) -> Scored:
    """``samples`` samples per prompt from ``policy`` at ``ppo.temperature``, scored by proxy and gold.

    Sampling is PPO's (:func:`rlhflab.stages.ppo.sample_responses`: KV cache, Gumbel noise
    seeded per sample by ``(seed, prompt index, sample index)``), so a given seed draws the
    same noise for every policy. ``ref_policy`` None: no KL is measured.
    """
    from rlhflab.algos import apply_missing_eos, logprobs_from_logits, truncate_response
    from rlhflab.data.collate import pad_left
    from rlhflab.data.tldr_synth import gold_scores
    from rlhflab.stages.ppo import response_logits, sample_responses, sample_seed

    p, R, device = cfg.ppo, cfg.response_length, next(policy.parameters()).device
    eos = tok.eos_token_id if p.stop_token == "eos" else None
    rows = [(i, s) for i in range(len(prompts)) for s in range(samples)]
    proxy, gold = np.zeros((len(prompts), samples)), np.zeros((len(prompts), samples))
    kl = np.zeros((len(prompts), samples)) if ref_policy is not None else None
    t0, c0 = time.perf_counter(), time.process_time()
    for b in range(0, len(rows), cfg.overopt.batch_size):
        chunk = rows[b: b + cfg.overopt.batch_size]
        query_ids, query_mask = pad_left([prompts[i].query_ids for i, _ in chunk], tok.pad_token_id)
        query_ids, query_mask = query_ids.to(device), query_mask.to(device)
        seeds = [sample_seed(seed, i * samples + s) for i, s in chunk]
        raw, logprobs = sample_responses(policy, query_ids, query_mask, R, p.temperature, seeds, eos, tok.pad_token_id)
        responses, response_mask, contains_eos = truncate_response(raw, eos, tok.pad_token_id)
        texts = tok.batch_decode(responses.cpu().tolist(), skip_special_tokens=True)
        scores = reward.score_texts([prompts[i].query for i, _ in chunk], texts, batch_size=len(chunk)).to(device)
        if eos is not None:
            scores = apply_missing_eos(scores, contains_eos, p.missing_eos, p.missing_eos_penalty)
        g = gold_scores([prompts[i].post for i, _ in chunk], [t.strip() for t in texts])
        kl_rows = None
        if ref_policy is not None:
            Rm = int(response_mask.any(0).nonzero().max()) + 1 if response_mask.any() else 1
            ids = torch.cat([query_ids, responses[:, :Rm]], 1)
            mask = torch.cat([query_mask, response_mask[:, :Rm]], 1)
            ref_logprobs = logprobs_from_logits(response_logits(ref_policy, ids, mask, Rm), responses[:, :Rm], p.temperature)
            kl_rows = ((logprobs[:, :Rm] - ref_logprobs) * response_mask[:, :Rm]).sum(1).cpu().numpy()
        for row, (i, s) in enumerate(chunk):
            proxy[i, s], gold[i, s] = float(scores[row]), g[row]
            if kl is not None:
                kl[i, s] = kl_rows[row]
        if bar is not None:
            bar.update(len(chunk))
    return Scored(proxy, gold, kl, time.perf_counter() - t0, time.process_time() - c0)


def _cached(path: Path, key: dict, compute) -> Scored:
    """``compute()`` once per ``key``: the arrays live in ``path`` (.npz) with the key beside them."""
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists() and json.loads(meta.read_text()) == key:
        z = np.load(path)
        return Scored(z["proxy"], z["gold"], z["kl"] if "kl" in z.files else None, float(z["seconds"]),
                      float(z["cpu_seconds"]) if "cpu_seconds" in z.files else float("nan"))
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"proxy": out.proxy, "gold": out.gold, "seconds": np.array(out.seconds), "cpu_seconds": np.array(out.cpu_seconds)}
    if out.kl is not None:
        arrays["kl"] = out.kl
    np.savez(path, **arrays)
    meta.write_text(json.dumps(key))
    return out


def sft_posts(cfg: RunConfig, tok, split: str, n: int, skip_bad_rows: bool) -> tuple[list, str]:
    """(the first ``n`` usable posts of an SFT split in Huang's query format, the file label):
    the posts ``rlhflab eval``, ``overopt`` and the on-policy check read."""
    from rlhflab.data.tldr import load_split, tokenize_sft
    from rlhflab.stages.common import sft_source

    rows, label = load_split(sft_source(cfg), split, "sft", skip_bad_rows=skip_bad_rows)
    examples, _ = tokenize_sft(rows, tok, cfg.data.max_query_length, cfg.data.response_length, label,
                               skip_bad_rows=skip_bad_rows)
    return examples[:n], label


ON_POLICY_SEED = 12345  # the same sampling noise for every run, so runs differ only in their SFT and RM


def on_policy_check(cfg: RunConfig, sft_dir: Path, rm_dir: Path, n_prompts: int, samples: int,
                    seed: int = ON_POLICY_SEED, progress_bar: bool = True) -> dict:
    """The RM against the gold judge on the SFT policy's own samples (tldr-synth only).

    ``samples`` samples of each of the first ``n_prompts`` SFT validation posts (as ``rlhflab
    eval`` and ``overopt`` pick them) from the SFT policy at ``ppo.temperature`` with PPO's sampler
    (:func:`sample_and_score`), scored by the RM as PPO reads it and by the gold judge; returns
    :func:`rlhflab.evaluation.on_policy.summarize` (``eval/on_policy/...``) plus its wall time.
    """
    from rlhflab.evaluation.on_policy import summarize
    from rlhflab.models.policy import load_policy, load_tokenizer
    from rlhflab.models.reward import RewardModel

    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(sft_dir, padding_side="left")
    prompts, label = sft_posts(cfg, tok, "validation", n_prompts, skip_bad_rows=True)
    if not prompts:
        raise StageError(f"the on-policy check found no usable post in {label}")
    policy = load_policy(sft_dir).to(device).eval()
    reward = RewardModel.from_pretrained(rm_dir, device=device)
    bar = progress(len(prompts) * samples, "rm: on-policy check", unit="sample", enabled=progress_bar)
    scored = sample_and_score(policy, None, reward, tok, prompts, samples, cfg, seed, bar)
    bar.close()
    return {**summarize(scored.proxy, scored.gold), "eval/on_policy/posts": len(prompts),
            "eval/on_policy/wall_s": round(time.perf_counter() - t0, 2)}


def find_snapshots(run_dir: Path, stride: int) -> list[tuple[int, Path]]:
    """``[(update, policy dir)]``: every ``stride``-th ``ppo/snapshots/update-*`` plus the final
    ``ppo/policy`` (at ``ppo/metrics.json``'s update) when it is not a snapshot already."""
    snaps = sorted((int(m.group(1)), d) for d in (run_dir / "ppo" / "snapshots").glob("update-*")
                   if (m := re.fullmatch(r"update-(\d+)", d.name)) and (d / "config.json").exists())
    chosen = snaps[stride - 1:: stride]
    final = run_dir / "ppo" / "policy"
    done = run_dir / "ppo" / "metrics.json"
    if (final / "config.json").exists() and done.exists():
        last = int(json.loads(done.read_text()).get("update", 0))
        chosen = [s for s in chosen if s[0] != last] + [(last, final)]
    elif snaps and (not chosen or chosen[-1] != snaps[-1]):
        chosen.append(snaps[-1])
    return chosen


def _ci(values: np.ndarray, n_boot: int, seed: int) -> list[float]:
    from rlhflab.evaluation.stats import bootstrap_ci

    _, lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return [lo, hi]


def _fits(kl: np.ndarray, gold: np.ndarray, proxy: np.ndarray, form: str, o, d: np.ndarray) -> Optional[dict]:
    """Both curves fitted (None, with a warning, when fewer than 2 points have a positive mean KL)."""
    try:
        g = oo.fit_with_ci(kl, gold, form, n_boot=o.bootstrap, seed=o.seed)
        pr = oo.fit_with_ci(kl, proxy, form, n_boot=o.bootstrap, seed=o.seed)
    except ValueError as e:
        log.warning("overopt: no %s fit: %s", form, e)
        return None
    return {"gold": g.as_dict(), "proxy": pr.as_dict(),
            "divergence": oo.divergence(d, gold.mean(0), proxy.mean(0), g, pr)}


def reading(res: dict) -> str:
    """One plain-language paragraph on what the fits and the comparison mean."""
    parts = []
    for method, label in (("bon", "best-of-n"), ("ppo", "PPO")):
        f = res["fits"].get(method)
        if not f:
            continue
        dv, g = f["divergence"], f["gold"]
        d_max = max(res[method]["d"])
        if g["alpha"] <= 0:
            parts.append(f"{label}: gold does not rise with optimisation at all (fitted alpha {g['alpha']:.3f} <= 0)")
        elif dv["peak_in_measured_range"]:
            parts.append(f"{label}: gold peaks at d* = {dv['d_star_gold']:.2f} (KL {dv['kl_star_gold']:.1f} nats) inside the "
                         f"measured d <= {d_max:.2f} and falls after it"
                         + (" while the proxy still rises" if dv["proxy_still_rising"] else ""))
        elif g["d_star"] is not None:
            parts.append(f"{label}: the fitted gold peak d* = {g['d_star']:.2f} (KL {g['kl_star']:.1f}) lies beyond the measured "
                         f"d <= {d_max:.2f}: gold is still rising there, over-optimisation not reached")
        else:
            parts.append(f"{label}: the gold fit has no peak (beta <= 0): gold still rising over the measured d <= {d_max:.2f}")
    c = res.get("compare")
    if c and c.get("ppo_gold") is not None:
        diff, lo, hi = c["gold_diff"], c["gold_diff_ci"][0], c["gold_diff_ci"][1]
        verdict = ("matches" if lo <= 0 <= hi else "beats" if lo > 0 else "falls short of")
        parts.append(f"best-of-{c['n']} (KL {c['bon_kl']:.2f}) {verdict} PPO (KL {c['ppo_kl']:.2f}) on gold: "
                     f"{c['bon_gold']:.3f} vs {c['ppo_gold']:.3f} (difference {diff:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]), "
                     f"with no training but {c['n']} samples per post against PPO's {c['ppo_train_samples']} training episodes")
    return "; ".join(parts) + "." if parts else "no over-optimisation curves measured."


# --------------------------------------------------------------------------------- main
def main(cfg: RunConfig, resume: bool = False) -> dict:
    """Measure the curves, fit them, write ``<run>/overopt/``; returns metrics.json's dict.

    ``resume`` is accepted for symmetry and ignored: cached pieces are always reused.
    """
    from rlhflab.data.errors import DataError
    from rlhflab.models.policy import load_policy, load_tokenizer
    from rlhflab.models.reward import RewardModel

    o, run_dir = cfg.overopt, Path(cfg.run_dir)
    out_dir, cache = run_dir / "overopt", run_dir / "overopt" / "cache"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.data.task != "tldr-synth":
        raise StageError("overopt needs a gold judge: it runs on data.task=tldr-synth only")
    sft_dir, rm_dir = run_dir / "sft" / "policy", run_dir / "rm" / "reward"
    for what, d, cmd in (("SFT policy", sft_dir, "sft"), ("reward model", rm_dir, "rm")):
        if not (d / "config.json").is_file():
            raise StageError(f"overopt needs the {what} at {d} (run `rlhflab {cmd}` with the same config first)")

    # 1. posts ---------------------------------------------------------------------------
    tok = load_tokenizer(sft_dir, padding_side="left")
    try:
        prompts, label = sft_posts(cfg, tok, o.split, o.n_prompts, cfg.data.skip_bad_rows)
    except DataError as e:
        raise StageError(f"overopt data: {e}") from None
    if len(prompts) < o.n_prompts:
        raise StageError(f"overopt.n_prompts={o.n_prompts} but {label} has {len(prompts)} usable posts")
    sft = load_policy(sft_dir).to(device).eval()
    reward = RewardModel.from_pretrained(rm_dir, device=device)
    base_key = {"n_prompts": o.n_prompts, "split": o.split, "seed": o.seed, "temperature": cfg.ppo.temperature,
                "response_length": cfg.response_length, "missing_eos": [cfg.ppo.missing_eos, cfg.ppo.missing_eos_penalty],
                "stop_token": cfg.ppo.stop_token}

    # 2. best-of-N pool from the SFT policy ------------------------------------------------
    N = o.pool_size
    bar = progress(o.n_prompts * N, "overopt: best-of-N pool", unit="sample")
    pool = _cached(cache / "pool.npz", {**base_key, "pool_size": N},
                   lambda: sample_and_score(sft, None, reward, tok, prompts, N, cfg, o.seed, bar))
    bar.close()
    sft_gold, sft_proxy = pool.gold.mean(1), pool.proxy.mean(1)  # [P]: the d = 0 point of both methods

    # 3. best-of-n curve ---------------------------------------------------------------------
    ns = sorted({2**k for k in range(int(math.log2(N)) + 1)} | {N, o.compare_n})
    bon_proxy, bon_gold = (np.stack(x, 1) for x in zip(*(oo.bon_expected(pool.proxy, pool.gold, n) for n in ns)))
    bon_kl = np.tile([oo.kl_bon(n) for n in ns], (o.n_prompts, 1))  # [P, K]

    # 4. PPO snapshots -----------------------------------------------------------------------
    snaps = find_snapshots(run_dir, o.snapshot_stride)
    ppo_points = []
    if snaps:
        bar = progress(len(snaps) * o.n_prompts * o.samples_per_snapshot, "overopt: PPO snapshots", unit="sample")
        for update, path in snaps:
            policy = load_policy(path).to(device).eval()
            key = {**base_key, "samples": o.samples_per_snapshot, "update": update, "path": str(path),
                   "mtime": (path / "model.safetensors").stat().st_mtime if (path / "model.safetensors").exists() else None}
            s = _cached(cache / f"ppo-{update:05d}.npz", key,
                        lambda: sample_and_score(policy, sft, reward, tok, prompts, o.samples_per_snapshot, cfg, o.seed + 1, bar))
            ppo_points.append((update, path, s))
            del policy
        bar.close()
    else:
        log.warning("no PPO snapshots under %s and no finished ppo/policy: only best-of-n is measured "
                    "(run `rlhflab ppo` with ppo.snapshot_every > 0)", run_dir / "ppo")

    # 5. fits --------------------------------------------------------------------------------
    d_bon = np.sqrt(bon_kl[0])
    res: dict[str, Any] = {
        "sft": {"gold": float(sft_gold.mean()), "gold_ci": _ci(sft_gold, o.bootstrap, o.seed),
                "proxy": float(sft_proxy.mean()), "proxy_ci": _ci(sft_proxy, o.bootstrap, o.seed)},
        "bon": {"n": ns, "kl": bon_kl[0].tolist(), "d": d_bon.tolist(), "gold": bon_gold.mean(0).tolist(),
                "proxy": bon_proxy.mean(0).tolist(),
                "gold_ci": [_ci(bon_gold[:, k], o.bootstrap, o.seed) for k in range(len(ns))],
                "proxy_ci": [_ci(bon_proxy[:, k], o.bootstrap, o.seed) for k in range(len(ns))]},
        "fits": {"bon": _fits(bon_kl, bon_gold - sft_gold[:, None], bon_proxy - sft_proxy[:, None], "bon", o, d_bon)},
    }
    if res["fits"]["bon"] is None:
        raise StageError(f"overopt.pool_size={N} gives fewer than 2 best-of-n points with n > 1")
    if ppo_points:
        # Per post: the SFT point (KL 0, the pool mean) then each snapshot's mean over its samples.
        kl = np.concatenate([np.zeros((o.n_prompts, 1))] + [s.kl.mean(1, keepdims=True) for _, _, s in ppo_points], 1)
        gold = np.concatenate([sft_gold[:, None]] + [s.gold.mean(1, keepdims=True) for _, _, s in ppo_points], 1)
        proxy = np.concatenate([sft_proxy[:, None]] + [s.proxy.mean(1, keepdims=True) for _, _, s in ppo_points], 1)
        d_ppo = np.sqrt(np.maximum(kl.mean(0), 0.0))
        res["ppo"] = {"update": [0] + [u for u, _, _ in ppo_points], "path": [str(sft_dir)] + [str(p) for _, p, _ in ppo_points],
                      "kl": kl.mean(0).tolist(), "d": d_ppo.tolist(), "gold": gold.mean(0).tolist(), "proxy": proxy.mean(0).tolist(),
                      "kl_ci": [_ci(kl[:, k], o.bootstrap, o.seed) for k in range(kl.shape[1])],
                      "gold_ci": [_ci(gold[:, k], o.bootstrap, o.seed) for k in range(kl.shape[1])],
                      "proxy_ci": [_ci(proxy[:, k], o.bootstrap, o.seed) for k in range(kl.shape[1])]}
        fit = _fits(kl, gold - sft_gold[:, None], proxy - sft_proxy[:, None], "rl", o, d_ppo)
        if fit is not None:
            res["fits"]["ppo"] = fit

    # 6. best-of-n beside PPO, and what each cost ------------------------------------------
    k = ns.index(o.compare_n)
    per_sample_s = pool.seconds / (o.n_prompts * N)
    compare: dict[str, Any] = {
        "n": o.compare_n, "bon_kl": oo.kl_bon(o.compare_n), "bon_gold": float(bon_gold[:, k].mean()),
        "bon_gold_ci": _ci(bon_gold[:, k], o.bootstrap, o.seed), "bon_proxy": float(bon_proxy[:, k].mean()),
        "bon_samples_per_post": o.compare_n,
        "bon_seconds_per_post": per_sample_s * o.compare_n,  # measured pool time per sample x n (sampling + RM + gold)
        "bon_cpu_seconds_per_post": pool.cpu_seconds / (o.n_prompts * N) * o.compare_n,
    }
    if ppo_points:
        ppo_metrics = json.loads((run_dir / "ppo" / "metrics.json").read_text()) if (run_dir / "ppo" / "metrics.json").exists() else {}
        last = ppo_points[-1][2]
        diff = bon_gold[:, k] - last.gold.mean(1)  # paired by post
        ppo_kl = float(last.kl.mean())
        compare.update({
            "ppo_update": ppo_points[-1][0], "ppo_kl": ppo_kl, "ppo_gold": float(last.gold.mean()),
            "ppo_gold_ci": _ci(last.gold.mean(1), o.bootstrap, o.seed), "ppo_proxy": float(last.proxy.mean()),
            "gold_diff": float(diff.mean()), "gold_diff_ci": _ci(diff, o.bootstrap, o.seed),
            "bon_n_at_ppo_kl": oo.bon_n_for_kl(ppo_kl),
            "bon_gold_at_ppo_kl": oo.interpolate(math.sqrt(max(ppo_kl, 0.0)), d_bon, bon_gold.mean(0)),
            # episodes PPO generated up to the evaluated policy (a run still training has no metrics.json yet)
            "ppo_train_samples": ppo_metrics.get("episodes") or ppo_points[-1][0] * cfg.ppo.batch_size,
            "ppo_train_seconds": ppo_metrics.get("time/wall_s"), "ppo_finished": bool(ppo_metrics),
            "ppo_samples_per_post": 1,
            "ppo_seconds_per_post": last.seconds / (o.n_prompts * o.samples_per_snapshot),  # incl. the KL forward
            "ppo_cpu_seconds_per_post": last.cpu_seconds / (o.n_prompts * o.samples_per_snapshot),
        })
        if compare["ppo_train_samples"] and o.compare_n > 1:
            # Posts served before best-of-n's extra (n - 1) samples per post add up to PPO's training samples.
            compare["break_even_posts"] = compare["ppo_train_samples"] / (o.compare_n - 1)
    res["compare"] = compare

    # 7. write -------------------------------------------------------------------------------
    res["meta"] = {
        "split": o.split, "data": label, "n_prompts": o.n_prompts, "pool_size": N, "temperature": cfg.ppo.temperature,
        "samples_per_snapshot": o.samples_per_snapshot, "snapshot_stride": o.snapshot_stride, "seed": o.seed,
        "bootstrap": o.bootstrap, "proxy": PROXY_DEFINITION, "kl": KL_DEFINITION,
        "fits": "OLS of the score minus the SFT policy's (pool mean) on d = sqrt(mean KL): bon d(alpha - beta d), "
                "rl d(alpha - beta log d); percentile bootstrap over posts (95%); d_star null = no peak (beta <= 0)",
        "time_s": {"pool": pool.seconds, "ppo_snapshots": sum(s.seconds for _, _, s in ppo_points)},
        "cpu_s": {"pool": pool.cpu_seconds, "ppo_snapshots": sum(s.cpu_seconds for _, _, s in ppo_points)},
        "samples_generated": {"pool": o.n_prompts * N, "ppo_snapshots": len(ppo_points) * o.n_prompts * o.samples_per_snapshot},
    }
    res["reading"] = reading(res)
    write_json(out_dir / "results.json", res)
    metrics = {"overopt/bon_gold_alpha": res["fits"]["bon"]["gold"]["alpha"], "overopt/bon_gold_beta": res["fits"]["bon"]["gold"]["beta"],
               "overopt/bon_gold_d_star": res["fits"]["bon"]["gold"]["d_star"], "overopt/reading": res["reading"]}
    if res["fits"].get("ppo"):
        f = res["fits"]["ppo"]["gold"]
        metrics.update({"overopt/rl_gold_alpha": f["alpha"], "overopt/rl_gold_beta": f["beta"], "overopt/rl_gold_d_star": f["d_star"]})
    write_json(out_dir / "metrics.json", metrics)  # last: its presence marks the stage finished
    return metrics
