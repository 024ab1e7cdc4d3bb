"""Missing-EOS rule and KL-shaped per-token rewards, by hand."""

import pytest
import torch

from rlhflab.algos import apply_missing_eos, kl_shaped_rewards, maybe_whiten_rewards

T_, F_ = True, False


def test_apply_missing_eos_replace_and_subtract():
    scores = torch.tensor([0.5, 2.0, -0.3])
    contains = torch.tensor([T_, F_, F_])
    assert apply_missing_eos(scores, contains, "replace", -1.0).tolist() == [0.5, -1.0, -1.0]
    # subtract |penalty|: 2 - 1 = 1, -0.3 - 1 = -1.3 (sign of penalty irrelevant)
    assert apply_missing_eos(scores, contains, "subtract", -1.0).tolist() == pytest.approx([0.5, 1.0, -1.3])
    assert apply_missing_eos(scores, contains, "subtract", 1.0).tolist() == pytest.approx([0.5, 1.0, -1.3])
    assert scores.tolist() == pytest.approx([0.5, 2.0, -0.3])  # input untouched


def test_apply_missing_eos_bad_input():
    with pytest.raises(ValueError, match="replace"):
        apply_missing_eos(torch.zeros(2), torch.ones(2, dtype=torch.bool), "drop", -1.0)
    with pytest.raises(ValueError, match="contains_stop"):
        apply_missing_eos(torch.zeros(2), torch.ones(3, dtype=torch.bool))


def test_kl_shaped_rewards_by_hand():
    G = 9.0  # garbage in masked positions
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, G], [G, G, G]], dtype=torch.float64)
    ref_logprobs = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, 0.0, -G], [G, -G, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[T_, T_, T_], [T_, T_, F_], [F_, F_, F_]])
    scores = torch.tensor([2.0, 1.0, 5.0], dtype=torch.float64)
    rewards, kl, nsr = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1, kind="k1",
                                        score_placement="eos")
    # row 0: kl = [0.5, -1, 0] -> nsr = [-0.05, 0.1, 0]; score 2 at index 2
    # row 1: kl = [0.5, -0.5, 0(masked)] -> nsr = [-0.05, 0.05, 0]; score 1 at index 1
    # row 2: empty response: the score lands nowhere
    assert kl.tolist() == [[0.5, -1.0, 0.0], [0.5, -0.5, 0.0], [0.0, 0.0, 0.0]]
    for row, exp in zip(nsr.tolist(), [[-0.05, 0.1, 0.0], [-0.05, 0.05, 0.0], [0.0, 0.0, 0.0]]):
        assert row == pytest.approx(exp, abs=1e-15)
    expected = [[-0.05, 0.1, 2.0], [-0.05, 1.05, 0.0], [0.0, 0.0, 0.0]]
    for row, exp in zip(rewards.tolist(), expected):
        assert row == pytest.approx(exp, abs=1e-15)


def test_kl_shaped_rewards_k3():
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    ref_logprobs = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    rewards, kl, _ = kl_shaped_rewards(torch.tensor([1.0], dtype=torch.float64), logprobs, ref_logprobs,
                                       torch.tensor([[T_, T_]]), kl_coef=0.5, kind="k3")
    # k3: [e^-0.5 - 0.5, e - 2] = [0.10653066, 0.71828183]
    assert kl[0].tolist() == pytest.approx([0.1065306597, 0.7182818285], abs=1e-10)
    assert rewards[0].tolist() == pytest.approx([-0.05326532985, 1.0 - 0.35914091425], abs=1e-10)


def test_kl_shaped_rewards_shape_errors():
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="ref_logprobs has shape"):
        kl_shaped_rewards(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 4), m, 0.1)
    with pytest.raises(ValueError, match="scores must be"):
        kl_shaped_rewards(torch.zeros(3), torch.zeros(2, 3), torch.zeros(2, 3), m, 0.1)


def test_maybe_whiten_rewards():
    rewards = torch.tensor([[0.0, 4.0, 77.0]], dtype=torch.float64)
    mask = torch.tensor([[T_, T_, F_]])
    assert maybe_whiten_rewards(rewards, mask, enabled=False) is rewards
    # mean 2, std 2 -> (x - 2)/2 + 2 = [1, 3]; masked -> 0
    out = maybe_whiten_rewards(rewards, mask, enabled=True)
    assert out[0].tolist() == pytest.approx([1.0, 3.0, 0.0], abs=1e-8)
