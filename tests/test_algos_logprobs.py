"""Logprobs/entropy at the sampling temperature (Huang detail), checked by hand and vs Categorical."""

import math

import pytest
import torch
from torch.distributions import Categorical

from rlhflab.algos import entropy_from_logits, logprobs_from_logits


def test_logprobs_by_hand_with_temperature():
    # logits [0, ln 3]: softmax = [1/4, 3/4].
    logits = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75), abs=1e-15)
    # temperature 2: logits/2 = [0, ln sqrt(3)] -> p(0) = 1 / (1 + sqrt 3)
    lp = logprobs_from_logits(logits, torch.tensor([[0]]), temperature=2.0)
    assert lp.item() == pytest.approx(-math.log(1 + math.sqrt(3)), abs=1e-15)


def test_logprobs_and_entropy_match_categorical_at_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    for temp in (1.0, 0.7, 1.9):
        # The formula, in float64: equal to torch's Categorical to float64 round-off.
        dist64 = Categorical(logits=logits.double() / temp)
        torch.testing.assert_close(logprobs_from_logits(logits.double(), tokens, temp), dist64.log_prob(tokens), rtol=0, atol=1e-12)
        torch.testing.assert_close(entropy_from_logits(logits.double(), temp), dist64.entropy(), rtol=0, atol=1e-12)
        # The float32 path against the float64 truth, within a bound that holds for any kernel
        # order (AVX2, AVX-512, any thread count): a logsumexp over V terms is off by at most a few
        # ulps of the largest |z| = |logit / T|; 8 * eps * (1 + max|z|) per row covers it
        # (observed errors are ~2e-6 at max|z| ~ 20, the bound there is ~2e-5).
        bound = 8 * torch.finfo(torch.float32).eps * (1 + (logits.double() / temp).abs().amax(-1))
        for got, want in ((logprobs_from_logits(logits, tokens, temp), dist64.log_prob(tokens)),
                          (entropy_from_logits(logits, temp), dist64.entropy())):
            assert got.dtype == torch.float32
            assert bool(((got.double() - want).abs() <= bound).all()), (got.double() - want).abs().max()
    # Not dividing by the temperature would give a different answer (so the test can fail).
    assert not torch.allclose(logprobs_from_logits(logits, tokens, 0.7), Categorical(logits=logits).log_prob(tokens), atol=1e-3)


def test_logprobs_gradient_matches_log_softmax():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    tokens = torch.randint(0, 7, (2, 4), generator=g)
    w = torch.randn(2, 4, generator=g, dtype=torch.float64)
    (logprobs_from_logits(a, tokens, 0.7) * w).sum().backward()
    (torch.log_softmax(b / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_bf16_logits_are_upcast():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 3, 50, generator=g) * 4).to(torch.bfloat16)
    tokens = torch.randint(0, 50, (2, 3), generator=g)
    lp = logprobs_from_logits(logits, tokens, 0.7)
    assert lp.dtype == torch.float32
    ref = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp.double(), ref, rtol=0, atol=1e-5)


def test_entropy_by_hand():
    uniform = torch.zeros(1, 1, 4)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(4), abs=1e-6)
    # a banned token (-inf logit) adds nothing: two equal tokens left -> ln 2, not nan
    banned = torch.tensor([[[0.0, 0.0, float("-inf")]]])
    assert entropy_from_logits(banned, temperature=0.5).item() == pytest.approx(math.log(2), abs=1e-6)


def test_bad_arguments():
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, torch.zeros(1, 2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="tokens has shape"):
        logprobs_from_logits(logits, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        logprobs_from_logits(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
