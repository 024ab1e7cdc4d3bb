"""The on-policy check: the RM against the gold judge on the SFT policy's own samples."""

import json
import math

import numpy as np
import pytest

from rlhflab.evaluation import on_policy as op


def test_pair_agreement_by_hand():
    # post 0: gold orders c > b > a; the proxy orders b > c > a.
    #   pairs (a,b) gap 0.10 agree, (a,c) gap 0.30 agree, (b,c) gap 0.20 disagree
    # post 1: gold a=b (gap 0 <= min_gap: left out), c 0.5 above both; the proxy ties a and c (half), b < c agrees
    proxy = np.array([[0.0, 2.0, 1.0], [1.0, 0.0, 1.0]])
    gold = np.array([[0.1, 0.2, 0.4], [0.3, 0.3, 0.8]])
    agreement, n = op.pair_agreement(proxy, gold, min_gap=0.02)
    assert n == 5
    assert agreement == pytest.approx((1 + 1 + 0 + 0.5 + 1) / 5)
    # a larger gap threshold leaves only the pairs with |gold diff| > 0.25: (a,c) of post 0 and both c pairs of post 1
    agreement, n = op.pair_agreement(proxy, gold, min_gap=0.25)
    assert n == 3 and agreement == pytest.approx((1 + 0.5 + 1) / 3)
    assert op.pair_agreement(gold, gold)[0] == 1.0 and op.pair_agreement(-gold, gold)[0] == 0.0
    assert math.isnan(op.pair_agreement(proxy, np.zeros_like(gold))[0])


def test_within_post_corr_ignores_post_means():
    gold = np.array([[0.1, 0.3], [0.6, 0.2]])
    # post offsets in the proxy (+10, -5) change nothing; within-post the proxy is 2 x gold
    proxy = 2 * gold + np.array([[10.0], [-5.0]])
    assert op.within_post_corr(proxy, gold) == pytest.approx(1.0)
    assert op.within_post_corr(-proxy, gold) == pytest.approx(-1.0)
    # by hand: deviations p = (-0.5, 0.5, 0.5, -0.5), g = (-0.1, 0.1, 0.2, -0.2): sum pg = 0.3, sum p^2 = 1, sum g^2 = 0.1
    p = np.array([[0.0, 1.0], [1.0, 0.0]])
    assert op.within_post_corr(p, gold) == pytest.approx(0.3 / math.sqrt(1.0 * 0.1))


def test_best_of_n_gold_gain_by_hand():
    gold = np.array([[0.2, 0.4, 0.9, 0.5], [0.1, 0.3, 0.5, 0.7]])
    proxy = np.array([[0.0, 0.0, 3.0, 1.0], [5.0, 5.0, 0.0, 0.0]])  # picks 0.9; ties 0.1 and 0.3 -> 0.2
    # post 0: 0.9 - 0.5 = 0.4; post 1: 0.2 - 0.4 = -0.2; mean 0.1
    assert op.best_of_n_gold_gain(proxy, gold) == pytest.approx(0.1)
    assert op.best_of_n_gold_gain(np.zeros_like(gold), gold) == pytest.approx(0.0)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="samples >= 2"):
        op.pair_agreement(np.zeros((3, 1)), np.zeros((3, 1)))
    with pytest.raises(ValueError):
        op.within_post_corr(np.zeros((2, 3)), np.zeros((3, 2)))


def test_summarize_names():
    m = op.summarize(np.array([[0.0, 1.0]]), np.array([[0.1, 0.5]]))
    assert m["eval/on_policy/gold_agreement"] == 1.0 and m["eval/on_policy/pairs"] == 1
    assert m["eval/on_policy/samples_per_post"] == 2
    assert m["eval/on_policy/best_of_n_gold_gain"] == pytest.approx(0.2)
    assert m["eval/on_policy/sft_gold_mean"] == pytest.approx(0.3)


def test_rm_stage_reports_the_on_policy_check(smoke_rm_run):
    """The smoke RM stage ran the check on 8 posts x 4 samples of its SFT policy; it is reproducible."""
    from rlhflab.stages.overopt import on_policy_check

    cfg = smoke_rm_run
    final = json.loads((cfg.run_dir / "rm" / "metrics.json").read_text())
    assert final["eval/on_policy/posts"] == 8 and final["eval/on_policy/samples_per_post"] == 4
    assert 0 <= final["eval/on_policy/pairs"] <= 8 * 6
    assert -1.0 <= final["eval/on_policy/sft_gold_mean"] <= 1.0  # the gold judge scores in [-1, 1]
    again = on_policy_check(cfg, cfg.run_dir / "sft" / "policy", cfg.run_dir / "rm" / "reward", 8, 4, progress_bar=False)
    for key in ("eval/on_policy/pairs", "eval/on_policy/sft_gold_mean", "eval/on_policy/best_of_n_gold_gain"):
        assert again[key] == pytest.approx(final[key]), key


def test_on_policy_check_is_skipped_without_a_gold_judge_or_sft(smoke_cfg, caplog):
    from rlhflab.stages.rm import on_policy_metrics

    assert on_policy_metrics(smoke_cfg("rm.on_policy_prompts=0"), None) == {}
    with caplog.at_level("WARNING"):
        assert on_policy_metrics(smoke_cfg(), None) == {}  # a fresh run folder: no sft/policy
    assert "no SFT policy" in caplog.text
