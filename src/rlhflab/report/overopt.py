"""The report's over-optimisation section: gold and proxy vs d = sqrt(KL) for best-of-n and PPO.

Reads ``<run>/overopt/results.json`` (written by ``rlhflab overopt``): one figure with a
panel per method, measured points with 95% CIs and Gao et al.'s fitted curves, a table of
alpha, beta, d* with bootstrap CIs, the best-of-n-vs-PPO comparison and the plain reading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from rlhflab.evaluation.overopt import predict
from rlhflab.report.html import PALETTE, _png, _read_json, ci, esc, fmt, missing, table

COLORS = {"gold": PALETTE[2], "proxy": PALETTE[1]}


def overopt_figure(res: dict) -> str:
    """One PNG: left best-of-n, right PPO; gold and proxy minus the SFT policy's, vs d, fits as lines."""
    from matplotlib.figure import Figure

    methods = [(m, t, form) for m, t, form in (("bon", "best-of-n (SFT samples)", "bon"), ("ppo", "PPO snapshots", "rl"))
               if res.get(m)]
    fig = Figure(figsize=(5.0 * len(methods), 3.4), dpi=100)
    base = res["sft"]
    for i, (m, title, form) in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), i + 1)
        d = np.asarray(res[m]["d"], dtype=float)
        grid = np.linspace(0, d.max() * 1.05 if d.max() > 0 else 1.0, 200)
        for curve in ("gold", "proxy"):
            y = np.asarray(res[m][curve], dtype=float) - base[curve]
            lo, hi = (np.asarray(res[m][f"{curve}_ci"], dtype=float) - base[curve]).T
            ax.errorbar(d, y, yerr=[y - lo, hi - y], fmt="o", ms=3.5, color=COLORS[curve], capsize=2, lw=0.8,
                        label=f"{curve} (measured, 95% CI)")
            fit = ((res.get("fits") or {}).get(m) or {}).get(curve)
            if fit:
                ds = fit.get("d_star")
                star = f", d*={ds:.2f}" if ds is not None else ", no peak"
                ax.plot(grid, predict(grid, fit["alpha"], fit["beta"], form), color=COLORS[curve], lw=1.4,
                        linestyle="-" if curve == "gold" else "--",
                        label=f"{curve} fit: a={fit['alpha']:.3f}, b={fit['beta']:.3f}{star}")
        if m == "bon":
            for n, x in zip(res["bon"]["n"], d):
                if n in (4, 16, 64, 256):
                    ax.annotate(f"n={n}", (x, 0), textcoords="offset points", xytext=(0, -12), fontsize=7, ha="center",
                                color="#555")
        ax.axhline(0, color="#999", lw=0.7)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("d = sqrt(KL(pi || pi_sft))  [sqrt(nats)]", fontsize=9)
        ax.set_ylabel("score - SFT policy's score", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return _png(fig, "gold and proxy reward vs sqrt(KL) for best-of-n and PPO, with Gao et al.'s fits")


def _fit_rows(res: dict) -> list[list[str]]:
    rows = []
    for m, label in (("bon", "best-of-n: d(a - b d)"), ("ppo", "PPO: d(a - b log d)")):
        for curve in ("gold", "proxy"):
            f = ((res.get("fits") or {}).get(m) or {}).get(curve)
            if not f:
                continue
            ds = f.get("d_star")
            lo, hi = f.get("d_star_ci") or (None, None)
            ds_txt = "none (b ≤ 0)" if ds is None else f"{ds:.2f} [{'∞' if lo is None else f'{lo:.2f}'}, {'∞' if hi is None else f'{hi:.2f}'}]"
            rows.append([esc(label), curve, ci(f["alpha"], f["alpha_ci"]), ci(f["beta"], f["beta_ci"]), ds_txt,
                         fmt(None if ds is None else ds**2, 2), fmt(f.get("peak_fraction"), 2), fmt(f.get("rmse"))])
    return rows


def section_overopt(run: Path) -> str:
    res: Optional[dict] = _read_json(Path(run) / "overopt" / "results.json")
    out = ["<h2 id=overopt>Over-optimisation (Gao et al. 2022)</h2>"]
    if not isinstance(res, dict) or not res.get("bon"):
        out.append(missing("Not measured: run <code>rlhflab overopt --config &lt;config&gt;</code> on this run "
                           "(PPO with <code>ppo.snapshot_every</code> &gt; 0 for the PPO curve)."))
        return "".join(out)
    meta = res.get("meta", {})
    out.append(f"<div class='verdict info'>{esc(res.get('reading', ''))}</div>")
    out.append(f"<div class=wide>{overopt_figure(res)}</div>")
    out.append(f"<p class=note>{meta.get('n_prompts')} {esc(meta.get('split'))} posts; best-of-n from one pool of "
               f"{meta.get('pool_size')} SFT samples per post (exact expectation over all size-n subsets), KL_bon(n) = "
               f"log n - (n-1)/n; PPO: {meta.get('samples_per_snapshot')} samples per post per snapshot, KL measured. "
               f"Proxy: {esc(meta.get('proxy'))}. Fits: {esc(meta.get('fits'))}.</p>")
    out.append(table(["curve", "score", "alpha [95% CI]", "beta [95% CI]", "d* [95% CI]", "KL* (nats)",
                      "share of refits with a peak", "fit RMSE"], _fit_rows(res), num_cols=(2, 3, 5, 6, 7)))
    c = res.get("compare") or {}
    if c.get("ppo_gold") is not None:
        n = c["n"]
        rows = [[f"best-of-{n} (SFT)", fmt(c["bon_kl"], 2), ci(c["bon_gold"], c["bon_gold_ci"]), fmt(c["bon_proxy"]),
                 "0", f"{n}", fmt(c.get("bon_seconds_per_post"), 2)],
                [f"PPO (update {c['ppo_update']})", fmt(c["ppo_kl"], 2), ci(c["ppo_gold"], c["ppo_gold_ci"]),
                 fmt(c["ppo_proxy"]), f"{c.get('ppo_train_samples')} episodes, {fmt(c.get('ppo_train_seconds'), 0)} s",
                 "1", fmt(c.get("ppo_seconds_per_post"), 2)]]
        out.append("<h3>Best-of-n beside PPO</h3>")
        out.append(table(["policy", "KL (nats)", "gold [95% CI]", "proxy", "training cost", "samples per post served",
                          "seconds per post served"], rows, num_cols=(1, 2, 3, 5, 6)))
        at = c.get("bon_gold_at_ppo_kl")
        out.append(f"<p class=note>Gold difference best-of-{n} - PPO, paired by post: {ci(c['gold_diff'], c['gold_diff_ci'])}. "
                   f"PPO's KL equals best-of-{fmt(c.get('bon_n_at_ppo_kl'), 1)}'s"
                   + (f", whose gold (interpolated on the best-of-n curve) is {fmt(at)}" if at is not None else "")
                   + (f". Best-of-{n}'s {n - 1} extra samples per post add up to PPO's training samples after "
                      f"{fmt(c.get('break_even_posts'), 0)} posts." if c.get("break_even_posts") else ".") + "</p>")
    return "".join(out)
