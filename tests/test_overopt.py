"""Over-optimisation math (rlhflab.evaluation.overopt) and the `rlhflab overopt` stage on a tiny run."""
from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from rlhflab.evaluation import overopt as oo


# ----------------------------------------------------------------------------- KL_bon
def _bon_distribution_by_enumeration(probs, rewards, n):
    """pi_bon by brute force: every ordered n-tuple of outcomes, the best by reward, ties split evenly."""
    m = len(probs)
    out = [Fraction(0)] * m
    for tup in itertools.product(range(m), repeat=n):
        p = Fraction(1)
        for x in tup:
            p *= probs[x]
        best = max(rewards[x] for x in tup)
        winners = [x for x in tup if rewards[x] == best]  # uniform over the n positions that tie
        for x in winners:
            out[x] += p / len(winners)
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_bon_kl_exact_matches_enumeration_on_a_toy_distribution(n):
    probs = [Fraction(1, 10), Fraction(2, 10), Fraction(3, 10), Fraction(4, 10)]
    rewards = [0.0, 1.0, 1.0, 2.0]  # outcomes 1 and 2 tie
    pi = _bon_distribution_by_enumeration(probs, rewards, n)
    assert sum(pi) == 1
    enumerated = sum(float(q) * math.log(float(q) / float(p)) for q, p in zip(pi, probs) if q > 0)
    exact = oo.bon_kl_exact([float(p) for p in probs], rewards, n)
    assert exact == pytest.approx(enumerated, abs=1e-12)
    # the analytic formula is an upper bound; with ties and coarse levels it is strict for n > 1
    assert exact <= oo.kl_bon(n) + 1e-12
    if n > 1:
        assert exact < oo.kl_bon(n) - 1e-3


@pytest.mark.parametrize("n", [2, 4, 16, 64])
def test_kl_bon_is_exact_in_the_continuous_limit(n):
    # m equally likely distinct rewards: pi_bon(i) = (i/m)^n - ((i-1)/m)^n; the gap closes as m grows
    gaps = []
    for m in (50, 500, 20000):
        exact = oo.bon_kl_exact(np.full(m, 1.0 / m), np.arange(m, dtype=float), n)
        assert exact <= oo.kl_bon(n) + 1e-12
        gaps.append(oo.kl_bon(n) - exact)
    assert gaps[0] > gaps[1] > gaps[2] >= 0
    assert gaps[2] < 2e-3


def test_kl_bon_values_and_inverse():
    assert oo.kl_bon(1) == 0.0
    assert oo.kl_bon(2) == pytest.approx(math.log(2) - 0.5)
    assert oo.kl_bon(64) == pytest.approx(math.log(64) - 63 / 64)
    for n in (1.0, 2.0, 64.0, 256.0):
        assert oo.bon_n_for_kl(oo.kl_bon(n)) == pytest.approx(n, rel=1e-9)
    with pytest.raises(ValueError):
        oo.kl_bon(0.5)


# ---------------------------------------------------------------- unbiased subsampling
def test_rank_weights_are_the_best_of_n_probabilities():
    N, n = 8, 3
    w = oo.bon_rank_weights(N, n)
    counts = np.zeros(N)
    for sub in itertools.combinations(range(N), n):
        counts[max(sub)] += 1
    np.testing.assert_allclose(w, counts / math.comb(N, n), rtol=0, atol=1e-15)
    np.testing.assert_allclose(oo.bon_rank_weights(N, 1), np.full(N, 1 / N))
    assert oo.bon_rank_weights(N, N)[-1] == 1.0


def test_bon_expected_equals_the_average_over_all_subsets_with_ties():
    rng = np.random.default_rng(0)
    proxy = rng.integers(0, 4, size=(3, 7)).astype(float)  # many ties
    gold = rng.normal(size=(3, 7))
    for n in (1, 2, 3, 7):
        p_hat, g_hat = oo.bon_expected(proxy, gold, n)
        for j in range(3):
            gs, ps = [], []
            for sub in itertools.combinations(range(7), n):
                best = max(proxy[j, list(sub)])
                tied = [i for i in sub if proxy[j, i] == best]  # ties broken uniformly
                gs.append(np.mean(gold[j, tied]))
                ps.append(best)
            assert g_hat[j] == pytest.approx(np.mean(gs), abs=1e-12)
            assert p_hat[j] == pytest.approx(np.mean(ps), abs=1e-12)


def test_n1_is_plain_sampling_and_larger_n_is_unbiased_for_the_population():
    rng = np.random.default_rng(1)
    # n = 1: the estimate is exactly the pool mean of the gold score (plain sampling)
    proxy, gold = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))
    _, g1 = oo.bon_expected(proxy, gold, 1)
    np.testing.assert_allclose(g1, gold.mean(1), atol=1e-14)
    # best-of-2 of N(0,1) has mean 1/sqrt(pi); best-of-4 about 1.0294. Averaged over many small
    # pools (N = 8), the subset estimate must hit the population value (no small-pool bias).
    pools = rng.normal(size=(20000, 8))
    for n, truth in ((2, 1 / math.sqrt(math.pi)), (4, 1.0293754)):
        p_hat, _ = oo.bon_expected(pools, pools, n)
        se = p_hat.std() / math.sqrt(p_hat.size)
        assert abs(p_hat.mean() - truth) < 4 * se
    # the naive "max of the first n" is unbiased too but noisier: the subset average has lower variance
    naive = pools[:, :2].max(1)
    p2, _ = oo.bon_expected(pools, pools, 2)
    assert p2.var() < 0.7 * naive.var()


# ------------------------------------------------------------------------------ fits
@pytest.mark.parametrize("form,alpha,beta", [("bon", 0.8, 0.25), ("rl", 0.6, 0.3)])
def test_fit_recovers_alpha_beta_from_noisy_curves(form, alpha, beta):
    rng = np.random.default_rng(2)
    P = 300
    kl = np.tile(np.linspace(0, 9, 12), (P, 1))
    d = np.sqrt(kl[0])
    truth = oo.predict(d, alpha, beta, form)
    r = truth + rng.normal(0, 0.3, size=(P, 12))  # per-prompt noise, mean curve noise ~0.017
    r[:, 0] = 0.0
    fit = oo.fit_with_ci(kl, r, form, n_boot=300, seed=0)
    assert fit.alpha == pytest.approx(alpha, abs=0.05)
    assert fit.beta == pytest.approx(beta, abs=0.05)
    assert fit.alpha_ci[0] <= alpha <= fit.alpha_ci[1]
    assert fit.beta_ci[0] <= beta <= fit.beta_ci[1]
    true_peak = oo.peak(alpha, beta, form)
    assert fit.d_star_ci[0] <= true_peak <= fit.d_star_ci[1]
    assert fit.peak_fraction == 1.0
    # and a wrong truth is rejected: the CI is narrow enough to exclude alpha + 0.2
    assert not fit.alpha_ci[0] <= alpha + 0.2 <= fit.alpha_ci[1]


def test_fit_is_exact_without_noise_and_peaks_are_where_the_derivative_vanishes():
    d = np.linspace(0, 4, 9)
    for form, a, b in (("bon", 1.2, 0.4), ("rl", 1.0, 0.7)):
        alpha, beta = oo.fit_form(d, oo.predict(d, a, b, form), form)
        assert (alpha, beta) == pytest.approx((a, b), abs=1e-12)
        ds = oo.peak(a, b, form)
        assert oo.slope(ds, a, b, form) == pytest.approx(0.0, abs=1e-12)
        assert oo.predict(ds, a, b, form)[0] > oo.predict(ds * 1.1, a, b, form)[0]
        assert oo.predict(ds, a, b, form)[0] > oo.predict(ds * 0.9, a, b, form)[0]
    assert oo.peak(1.0, 0.5, "bon") == 1.0
    assert oo.peak(1.0, 0.5, "rl") == pytest.approx(math.e)
    assert oo.peak(1.0, -0.1, "rl") == float("inf")
    with pytest.raises(ValueError):
        oo.fit_form([0.0, 1.0], [0.0, 1.0], "bon")  # only one point with d > 0


def test_divergence_finds_gold_peak_while_proxy_rises():
    P = 50
    kl = np.tile(np.linspace(0, 16, 9), (P, 1))
    d = np.sqrt(kl[0])
    gold = np.tile(oo.predict(d, 0.6, 0.3, "rl"), (P, 1))
    proxy = np.tile(oo.predict(d, 0.5, -0.05, "rl"), (P, 1))
    g, p = oo.fit_with_ci(kl, gold, "rl", n_boot=100), oo.fit_with_ci(kl, proxy, "rl", n_boot=100)
    out = oo.divergence(d, gold.mean(0), proxy.mean(0), g, p)
    assert out["d_star_gold"] == pytest.approx(math.exp(0.6 / 0.3 - 1))
    assert out["peak_in_measured_range"] and out["proxy_still_rising"]
    assert out["gold_change_after_peak"] < 0 < out["proxy_change_after_peak"]
    assert json.loads(json.dumps(p.as_dict()))["d_star"] is None  # no peak -> null, not inf


# -------------------------------------------------------------------------- the stage
def test_overopt_stage_on_a_tiny_run(tmp_path):
    from ppo_fixtures import build_inputs, make_run, sft_rows

    from rlhflab.stages import overopt, ppo

    tpl = build_inputs(tmp_path)
    (tpl / "synth" / "sft" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows(8, seed=5)))
    cfg = make_run(tpl, tmp_path / "runs", "oo", "data.task=tldr-synth", f"data.dir={tpl / 'synth'}",
                   "ppo.snapshot_every=1", "ppo.total_episodes=24", "ppo.optim.lr=3e-2", "ppo.kl_coef=0", "overopt.n_prompts=4", "overopt.pool_size=8",
                   "overopt.compare_n=4", "overopt.samples_per_snapshot=2", "overopt.bootstrap=100",
                   "overopt.batch_size=16")
    ppo.main(cfg)
    run = cfg.run_dir
    assert sorted(p.name for p in (run / "ppo" / "snapshots").iterdir()) == ["update-00001", "update-00002", "update-00003"]
    # a snapshot is the policy after its update: the last one equals the final policy, the first does not
    import torch

    from rlhflab.models.policy import load_policy

    final = load_policy(run / "ppo" / "policy").state_dict()
    for name, same in (("update-00003", True), ("update-00001", False)):
        snap = load_policy(run / "ppo" / "snapshots" / name).state_dict()
        assert all(torch.equal(snap[k], final[k]) for k in final) is same
    metrics = overopt.main(cfg)
    res = json.loads((run / "overopt" / "results.json").read_text())
    assert res["bon"]["n"] == [1, 2, 4, 8]
    assert res["bon"]["kl"] == pytest.approx([oo.kl_bon(n) for n in (1, 2, 4, 8)])
    assert res["bon"]["gold"][0] == pytest.approx(res["sft"]["gold"])  # best-of-1 = plain SFT sampling
    assert res["bon"]["proxy"] == sorted(res["bon"]["proxy"])  # the proxy of best-of-n never falls with n
    assert res["ppo"]["update"] == [0, 1, 2, 3] and res["ppo"]["kl"][0] == 0.0
    assert res["ppo"]["path"][-1].endswith("ppo/policy")  # the final policy stands for update 3
    assert set(res["fits"]) == {"bon", "ppo"}
    for method in ("bon", "ppo"):
        for curve in ("gold", "proxy"):
            f = res["fits"][method][curve]
            assert f["alpha_ci"][0] <= f["alpha"] <= f["alpha_ci"][1]
    c = res["compare"]
    assert c["n"] == 4 and c["bon_gold"] == pytest.approx(res["bon"]["gold"][2])
    assert c["ppo_train_samples"] == 24 and c["ppo_kl"] == pytest.approx(res["ppo"]["kl"][-1])
    assert metrics["overopt/reading"] == res["reading"] and "best-of-4" in res["reading"]
    # a rerun reuses the cached pool and snapshot scores: identical numbers
    overopt.main(cfg)
    again = json.loads((run / "overopt" / "results.json").read_text())
    assert again["bon"] == res["bon"] and again["ppo"] == res["ppo"]
    # the report's figure and summary.json's headline keys
    from rlhflab.pipeline import headline
    from rlhflab.report.html import render_report

    page = render_report(run).read_text()
    assert "Over-optimisation (Gao et al. 2022)" in page and 'alt="gold and proxy reward vs sqrt(KL)' in page
    h = headline(cfg)
    assert h["overopt/bon/gold_alpha"] == res["fits"]["bon"]["gold"]["alpha"]
    assert h["overopt/bon4_vs_ppo/ppo_kl"] == c["ppo_kl"] and h["overopt/reading"] == res["reading"]


def test_find_snapshots_stride_and_final(tmp_path):
    from rlhflab.stages.overopt import find_snapshots

    for u in (4, 8, 12, 16):
        d = tmp_path / "ppo" / "snapshots" / f"update-{u:05d}"
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    (tmp_path / "ppo" / "snapshots" / "update-00020").mkdir()  # incomplete: no config.json
    # a run still training: every 2nd snapshot, and the newest one always
    assert [u for u, _ in find_snapshots(tmp_path, 2)] == [8, 16]
    assert [u for u, _ in find_snapshots(tmp_path, 3)] == [12, 16]
    # a finished run: the final policy stands for its last update
    (tmp_path / "ppo" / "policy").mkdir()
    (tmp_path / "ppo" / "policy" / "config.json").write_text("{}")
    (tmp_path / "ppo" / "metrics.json").write_text(json.dumps({"update": 16}))
    got = find_snapshots(tmp_path, 1)
    assert [u for u, _ in got] == [4, 8, 12, 16] and got[-1][1] == tmp_path / "ppo" / "policy"
