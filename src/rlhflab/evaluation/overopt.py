"""Reward-model over-optimisation the way Gao, Schulman & Hilton 2022 measured it (pure numpy).

"Scaling Laws for Reward Model Overoptimization" (arXiv 2210.10760) plots the gold (true)
reward and the proxy (RM) reward of a policy against ``d = sqrt(KL(pi || pi_init))`` and fits,
with ``R(0) = 0`` (scores measured relative to the initial policy):

* best-of-n:  ``R_bon(d) = d (alpha - beta d)``         peak ``d* = alpha / (2 beta)``;
* RL (PPO):   ``R_RL(d)  = d (alpha - beta log d)``     peak ``d* = exp(alpha / beta - 1)``.

Both forms are linear in (alpha, beta) for fixed d -- ``alpha d - beta d^2`` and
``alpha d - beta d log d`` -- so ordinary least squares without intercept is the exact fit
(no iterative optimiser, no scipy).

Best-of-n's KL to the sampling policy is the analytic ``KL_bon(n) = log n - (n - 1)/n``
(Stiennon et al. 2020, appendix; used by Gao et al.): exact when the reward has a continuous
distribution (no ties), and an upper bound otherwise (Beirami et al. 2024, "Theoretical
guarantees on the best-of-n alignment policy"); :func:`bon_kl_exact` computes the true value
for a discrete distribution, which the tests compare against.

Best-of-n for every n <= N is read off ONE pool of N samples per prompt without bias: the
expected (proxy, gold) of the chosen sample over all C(N, n) subsets of size n drawn without
replacement, computed exactly from the proxy ranks (:func:`bon_rank_weights`) -- a
U-statistic, so its mean over prompts is an unbiased estimate of best-of-n's expected score.

Confidence intervals come from a percentile bootstrap over prompts: prompts are resampled,
the mean curves (and, for RL, the measured KL) recomputed, and the forms refitted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Sequence

import numpy as np

Form = Literal["bon", "rl"]


# ------------------------------------------------------------------------------ best-of-n
def kl_bon(n: float) -> float:
    """Analytic KL(best-of-n || base) in nats: ``log n - (n - 1)/n`` (0 at n = 1).

    Exact for a continuous reward distribution (no ties); an upper bound when ties occur.
    """
    if n < 1:
        raise ValueError(f"kl_bon: n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def bon_n_for_kl(kl: float, n_max: float = 1e12) -> float:
    """The (real-valued) n whose analytic best-of-n KL equals ``kl`` (bisection on log n)."""
    if kl <= 0:
        return 1.0
    lo, hi = 0.0, math.log(n_max)
    if kl_bon(n_max) < kl:
        return float("inf")
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl_bon(math.exp(mid)) < kl else (lo, mid)
    return math.exp((lo + hi) / 2)


def bon_kl_exact(probs: Sequence[float], rewards: Sequence[float], n: int) -> float:
    """Exact KL(best-of-n || base) for a discrete base distribution, ties broken uniformly at random.

    Args:
        probs: [m] probabilities of the m outcomes (sum 1); rewards: [m] their rewards.
    With ``F(r) = P(reward <= r)`` and ``F-(r) = P(reward < r)``, the best of n samples has
    reward level r with probability ``F(r)^n - F-(r)^n``, and within a level the chosen sample
    is distributed as the base restricted to that level, so
    ``pi_bon(x) = p(x) / p(level) * (F(r_x)^n - F-(r_x)^n)``.
    """
    p = np.asarray(probs, dtype=np.float64)
    r = np.asarray(rewards, dtype=np.float64)
    if p.shape != r.shape or p.ndim != 1 or abs(p.sum() - 1) > 1e-9 or (p < 0).any():
        raise ValueError("bon_kl_exact: probs must be a 1-D probability vector aligned with rewards")
    levels = np.unique(r)
    p_level = np.array([p[r == v].sum() for v in levels])
    cdf = np.cumsum(p_level)
    below = cdf - p_level
    p_best_level = cdf**n - below**n
    kl = 0.0
    for k, v in enumerate(levels):
        for x in np.flatnonzero((r == v) & (p > 0)):
            q = p[x] / p_level[k] * p_best_level[k]
            if q > 0:
                kl += q * math.log(q / p[x])
    return float(kl)


def bon_rank_weights(pool_size: int, n: int) -> np.ndarray:
    """[N] probability that the sample of ascending rank i (0-based) is the best of a uniformly
    random size-n subset of the N pool samples: ``C(i, n-1) / C(N, n)`` (no ties)."""
    if not 1 <= n <= pool_size:
        raise ValueError(f"bon_rank_weights: need 1 <= n <= pool size, got n={n}, pool size {pool_size}")
    total = math.comb(pool_size, n)
    return np.array([math.comb(i, n - 1) / total for i in range(pool_size)], dtype=np.float64)


def bon_expected(proxy: np.ndarray, gold: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected (proxy, gold) of best-of-n, chosen by proxy, per prompt, over all size-n subsets.

    Args:
        proxy, gold: [P, N] scores of a pool of N samples for each of P prompts.
    Returns:
        two [P] arrays. Exact (not Monte Carlo): each sample's probability of being chosen is
        :func:`bon_rank_weights` at its proxy rank; samples with tied proxy scores share the
        mean of their ranks' weights (uniform tie-breaking). n = 1 gives the pool mean.
    """
    proxy, gold = np.asarray(proxy, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    if proxy.shape != gold.shape or proxy.ndim != 2:
        raise ValueError(f"bon_expected: proxy and gold must be [P, N] of one shape, got {proxy.shape} and {gold.shape}")
    w = bon_rank_weights(proxy.shape[1], n)
    out_p, out_g = np.empty(proxy.shape[0]), np.empty(proxy.shape[0])
    for j in range(proxy.shape[0]):
        order = np.argsort(proxy[j], kind="stable")
        s = proxy[j][order]
        wj = w.copy()
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], s.size]):
            if b - a > 1:
                wj[a:b] = wj[a:b].mean()
        out_p[j] = wj @ s
        out_g[j] = wj @ gold[j][order]
    return out_p, out_g


# ------------------------------------------------------------------------------ the fits
def _design(d: np.ndarray, form: Form) -> np.ndarray:
    if form == "bon":
        return np.stack([d, -d * d], 1)
    if form == "rl":
        safe = np.where(d > 0, d, 1.0)
        return np.stack([d, -d * np.log(safe)], 1)  # d log d -> 0 at d = 0
    raise ValueError(f"unknown functional form {form!r} (expected 'bon' or 'rl')")


def fit_form(d: Sequence[float], r: Sequence[float], form: Form) -> tuple[float, float]:
    """Least-squares (alpha, beta) of ``R(d) = alpha d - beta d^2`` (bon) or ``alpha d - beta d log d`` (rl).

    ``r`` is measured relative to the initial policy (R(0) = 0, as Gao et al.), so there is
    no intercept. Needs at least two points with d > 0.
    """
    d, r = np.asarray(d, dtype=np.float64), np.asarray(r, dtype=np.float64)
    if d.shape != r.shape or d.ndim != 1:
        raise ValueError("fit_form: d and r must be 1-D arrays of one length")
    if (d > 0).sum() < 2:
        raise ValueError(f"fit_form: need at least 2 points with d > 0, got {(d > 0).sum()}")
    coef, *_ = np.linalg.lstsq(_design(d, form), r, rcond=None)
    return float(coef[0]), float(coef[1])


def predict(d: Sequence[float] | np.ndarray, alpha: float, beta: float, form: Form) -> np.ndarray:
    """R(d) of the fitted form."""
    return _design(np.atleast_1d(np.asarray(d, dtype=np.float64)), form) @ np.array([alpha, beta])


def peak(alpha: float, beta: float, form: Form) -> float:
    """d* where the form peaks: alpha/(2 beta) (bon), exp(alpha/beta - 1) (rl); inf when beta <= 0
    (no peak: the curve keeps rising) -- and 0 when alpha <= 0 and beta > 0 for bon."""
    if beta <= 0:
        return float("inf")
    if form == "bon":
        return max(alpha / (2 * beta), 0.0)
    z = alpha / beta - 1
    return math.exp(z) if z < 700 else float("inf")


def slope(d: float, alpha: float, beta: float, form: Form) -> float:
    """dR/dd of the fitted form at d > 0."""
    return alpha - 2 * beta * d if form == "bon" else alpha - beta * (math.log(d) + 1)


@dataclass
class Fit:
    """One fitted curve with percentile-bootstrap CIs (over prompts). d_star = inf: no peak."""

    form: str
    alpha: float
    beta: float
    d_star: float
    alpha_ci: tuple[float, float]
    beta_ci: tuple[float, float]
    d_star_ci: tuple[float, float]
    peak_fraction: float  # share of bootstrap refits that have a peak (beta > 0)
    rmse: float           # root mean squared residual of the point fit
    n_boot: int           # bootstrap refits done (resamples with < 2 points at d > 0 are left out)

    def as_dict(self) -> dict:
        out = asdict(self)
        for k in ("d_star", "d_star_ci"):  # JSON has no inf: null means "no peak"
            v = out[k]
            out[k] = [None if not math.isfinite(x) else x for x in v] if isinstance(v, (list, tuple)) else (
                v if math.isfinite(v) else None)
        out["kl_star"] = None if out["d_star"] is None else out["d_star"] ** 2
        return out


def mean_curve(kl: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d = sqrt(mean KL) [K] and mean r [K] over the prompts of [P, K] matrices (KL floored at 0)."""
    return np.sqrt(np.maximum(kl.mean(0), 0.0)), r.mean(0)


def fit_with_ci(kl: np.ndarray, r: np.ndarray, form: Form, n_boot: int = 1000, seed: int = 0,
                level: float = 0.95) -> Fit:
    """Fit ``form`` to the prompt-mean curve and bootstrap it over prompts.

    Args:
        kl: [P, K] per-prompt KL of each of K points (for best-of-n: KL_bon(n) in every row;
            for PPO snapshots: the measured per-prompt KL); r: [P, K] per-prompt score
            relative to the initial policy. Rows (prompts) are resampled together.
    """
    kl, r = np.asarray(kl, dtype=np.float64), np.asarray(r, dtype=np.float64)
    if kl.shape != r.shape or kl.ndim != 2:
        raise ValueError(f"fit_with_ci: kl and r must be [P, K] of one shape, got {kl.shape} and {r.shape}")
    d, y = mean_curve(kl, r)
    alpha, beta = fit_form(d, y, form)
    rmse = float(np.sqrt(np.mean((predict(d, alpha, beta, form) - y) ** 2)))
    rng = np.random.default_rng(seed)
    P = kl.shape[0]
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, P, size=P)
        db, yb = mean_curve(kl[i], r[i])
        if (db > 0).sum() < 2:  # a resample whose mean KL is <= 0 at all but one point cannot be fitted
            continue
        a, b = fit_form(db, yb, form)
        boots.append((a, b, peak(a, b, form)))
    bt = np.array(boots).reshape(-1, 3)
    if bt.shape[0] == 0:
        nan = (float("nan"), float("nan"))
        return Fit(form, alpha, beta, peak(alpha, beta, form), nan, nan, nan, float("nan"), rmse, 0)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]

    def ci(col: np.ndarray) -> tuple[float, float]:
        lo, hi = np.percentile(col, q, method="nearest")  # no interpolation: an inf stays inf
        return float(lo), float(hi)

    return Fit(form, alpha, beta, peak(alpha, beta, form), ci(bt[:, 0]), ci(bt[:, 1]), ci(bt[:, 2]),
               float(np.mean(bt[:, 1] > 0)), rmse, bt.shape[0])


def divergence(d: Sequence[float], gold: Sequence[float], proxy: Sequence[float], gold_fit: Fit, proxy_fit: Fit) -> dict:
    """Where gold stops rising while the proxy still rises.

    Returns the fitted gold peak d* (and its KL), the fitted proxy's slope there (> 0: the
    proxy still rises), whether d* lies inside the measured d range, and the measured view:
    the point with the highest mean gold, and how much the proxy and gold moved after it.
    """
    d, gold, proxy = (np.asarray(x, dtype=np.float64) for x in (d, gold, proxy))
    k = int(np.argmax(gold))
    ds = gold_fit.d_star
    finite = math.isfinite(ds) and ds > 0
    out = {
        "d_star_gold": ds if finite else None,
        "kl_star_gold": ds**2 if finite else None,
        "proxy_slope_at_d_star": slope(ds, proxy_fit.alpha, proxy_fit.beta, proxy_fit.form) if finite else None,
        "peak_in_measured_range": bool(finite and d.min() <= ds <= d.max()),
        "measured_peak_d": float(d[k]), "measured_peak_kl": float(d[k] ** 2), "measured_peak_gold": float(gold[k]),
        "gold_change_after_peak": float(gold[-1] - gold[k]), "proxy_change_after_peak": float(proxy[-1] - proxy[k]),
    }
    out["proxy_still_rising"] = bool(out["proxy_slope_at_d_star"] is not None and out["proxy_slope_at_d_star"] > 0)
    return out


def interpolate(x: float, xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Linear interpolation of ys at x over increasing xs; None outside [xs[0], xs[-1]]."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if not xs[0] <= x <= xs[-1]:
        return None
    return float(np.interp(x, xs, ys))
