"""The PPO update's fast paths compute what the straightforward formulas compute.

* ``logprobs_and_entropy_from_logits`` / ``logprobs_from_logits`` with autograd (one autograd
  function, hand-written backward) vs ``log_softmax(logits / T).gather`` and its autograd
  gradient, and vs ``entropy_from_logits``;
* ``fuse_gelu`` (every tanh-GELU -> ``TanhGELU``, which on CPU computes ``x * sigmoid(2u)``
  for ``0.5 x (1 + tanh(u))``) vs the original activations, a float64 reference, and the
  original model's logits;
* ``response_logits`` (LM head on exactly the R response positions) vs slicing a full forward.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ppo_fixtures import make_tokenizer  # noqa: E402

from rlhflab.algos import entropy_from_logits, logprobs_from_logits  # noqa: E402
from rlhflab.algos.logprobs import logprobs_and_entropy_from_logits  # noqa: E402


def _reference_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.double() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _inputs(seed: int, dtype=torch.float64, shape=(3, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(0, shape[-1], shape[:2], generator=g)
    weights = torch.randn(*shape[:2], generator=g, dtype=torch.float64)
    return logits.to(dtype), tokens, weights.to(dtype)


# ----------------------------------------------------------------------------- logprobs
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_with_grad_match_log_softmax_values_and_gradients(temperature):
    logits, tokens, w = _inputs(0)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    lp, ent = logprobs_and_entropy_from_logits(a, tokens, temperature)
    (lp * w).sum().backward()
    ref = torch.log_softmax(b / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (ref * w).sum().backward()
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-14)
    torch.testing.assert_close(ent, entropy_from_logits(logits, temperature), rtol=0, atol=1e-12)
    assert not ent.requires_grad
    # logprobs_from_logits takes the same path and gives the same gradient
    c = logits.clone().requires_grad_(True)
    (logprobs_from_logits(c, tokens, temperature) * w).sum().backward()
    torch.testing.assert_close(c.grad, b.grad, rtol=0, atol=1e-14)


def test_logprobs_gradient_by_hand():
    # logits [0, ln 3] at T = 1: p = [1/4, 3/4]; d log p_1 / dz = onehot(1) - p = [-1/4, 1/4];
    # at T = 2 the chain rule adds 1/2 (and p = softmax(z / 2) = [1/(1+sqrt 3), sqrt 3/(1+sqrt 3)]).
    z = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64, requires_grad=True)
    lp = logprobs_from_logits(z, torch.tensor([[1]]))
    lp.sum().backward()
    assert lp.item() == pytest.approx(math.log(0.75), abs=1e-15)
    assert z.grad.flatten().tolist() == pytest.approx([-0.25, 0.25], abs=1e-15)
    z.grad = None
    (3.0 * logprobs_from_logits(z, torch.tensor([[1]]), temperature=2.0)).sum().backward()
    p0 = 1 / (1 + math.sqrt(3))
    assert z.grad.flatten().tolist() == pytest.approx([-3 * p0 / 2, 3 * p0 / 2], abs=1e-15)


def test_float32_gradient_within_rounding_of_autograd():
    logits, tokens, w = _inputs(1, torch.float32, shape=(4, 7, 300))
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    (logprobs_from_logits(a, tokens, 0.7) * w).sum().backward()
    (torch.log_softmax(b / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


def test_grad_and_no_grad_paths_agree():
    logits, tokens, _ = _inputs(2, torch.float32, shape=(3, 4, 50))
    with torch.no_grad():
        lp0, ent0 = logprobs_and_entropy_from_logits(logits, tokens, 0.7)
        lp1 = logprobs_from_logits(logits, tokens, 0.7)
    lp2, ent2 = logprobs_and_entropy_from_logits(logits.clone().requires_grad_(True), tokens, 0.7)
    torch.testing.assert_close(lp0, lp1, rtol=0, atol=0)
    torch.testing.assert_close(lp2.detach(), lp0, rtol=0, atol=1e-6)
    torch.testing.assert_close(ent2, ent0, rtol=0, atol=1e-5)
    torch.testing.assert_close(lp0.double(), _reference_logprobs(logits, tokens, 0.7), rtol=0, atol=1e-5)


def test_banned_token_adds_zero_entropy_and_no_nan_gradient():
    logits = torch.tensor([[[0.0, 0.0, float("-inf")], [1.0, float("-inf"), 1.0]]], dtype=torch.float64)
    tokens = torch.tensor([[0, 2]])
    a = logits.clone().requires_grad_(True)
    lp, ent = logprobs_and_entropy_from_logits(a, tokens, 0.5)
    lp.sum().backward()
    assert ent.flatten().tolist() == pytest.approx([math.log(2), math.log(2)], abs=1e-12)
    assert lp[0, 0].item() == pytest.approx(math.log(0.5), abs=1e-12)
    assert torch.isfinite(a.grad).all()
    # row 0, token 0: (onehot - p) / T = ([1, 0, 0] - [1/2, 1/2, 0]) / 0.5
    assert a.grad[0, 0].tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-12)


def test_bf16_logits_get_a_bf16_gradient_from_float32_math():
    logits, tokens, w = _inputs(3, torch.float32, shape=(2, 3, 40))
    a = logits.to(torch.bfloat16).requires_grad_(True)
    lp = logprobs_from_logits(a, tokens, 0.7)
    assert lp.dtype == torch.float32
    (lp * w).sum().backward()
    assert a.grad.dtype == torch.bfloat16
    b = a.detach().float().requires_grad_(True)
    (torch.log_softmax(b / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * w).sum().backward()
    torch.testing.assert_close(a.grad.float(), b.grad.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_logprobs_and_entropy_refuse_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        logprobs_and_entropy_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="tokens has shape"):
        logprobs_and_entropy_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer ids"):
        logprobs_and_entropy_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 2))
    lp, ent = logprobs_and_entropy_from_logits(torch.zeros(0, 2, 3), torch.zeros(0, 2, dtype=torch.long))
    assert lp.shape == ent.shape == (0, 2)


# -------------------------------------------------------------------------------- GELU
def _tiny_gpt2(activation="gelu_new", seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64, activation_function=activation,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _gelu_tanh_float64(x):
    x = x.double()
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_gelu_equals_gelu_new_fast_gelu_and_the_fused_kernel(dtype):
    from transformers.activations import FastGELUActivation, NewGELUActivation

    from rlhflab.models.policy import TanhGELU

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8192, generator=g, dtype=torch.float64) * 4).to(dtype)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 1e4, -1e4], dtype=dtype)]).requires_grad_(True)
    ours = TanhGELU()
    y = ours(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    tol = 2e-6 if dtype == torch.float32 else 1e-11
    # against the float64 formula: within what the fused kernel itself achieves
    xd = x.detach().double().requires_grad_(True)
    y64 = _gelu_tanh_float64(xd)
    (g64,) = torch.autograd.grad(y64.sum(), xd)
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=tol)
    torch.testing.assert_close(gx.double(), g64, rtol=0, atol=tol)
    # against torch's fused kernel (whose gradient ours reuses exactly) and transformers' classes
    kernel = nn.GELU(approximate="tanh")
    for original in (kernel, NewGELUActivation(), FastGELUActivation()):
        y_ref = original(x)
        (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=tol)
        torch.testing.assert_close(gx, gx_ref, rtol=0, atol=tol)
    assert torch.equal(gx, torch.autograd.grad(kernel(x).sum(), x)[0])
    # and it is not some other GELU: the exact erf form differs by more than that
    assert (nn.GELU()(x) - y).abs().max() > 1e-4


def test_tanh_gelu_takes_the_sigmoid_path_only_for_cpu_float(monkeypatch):
    from rlhflab.models import policy

    calls = []
    real = policy._SigmoidTanhGELU.apply
    monkeypatch.setattr(policy._SigmoidTanhGELU, "apply", lambda x: calls.append(x.dtype) or real(x))
    act = policy.TanhGELU()
    for dtype in (torch.float32, torch.float64):
        act(torch.randn(64, dtype=dtype))
    assert calls == [torch.float32, torch.float64]
    x = torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(act(x), nn.functional.gelu(x, approximate="tanh"))
    assert len(calls) == 2  # bf16 went to the fused kernel


def test_fuse_gelu_swaps_modules_and_keeps_the_logits_and_gradients():
    from transformers.activations import NewGELUActivation

    from rlhflab.models.policy import TanhGELU, fuse_gelu

    model = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    before.square().sum().backward()
    grads_before = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert fuse_gelu(model) == 2  # one MLP activation per layer
    assert all(isinstance(b.mlp.act, TanhGELU) for b in model.transformer.h)
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert model.config.activation_function == "gelu_new"  # what save_pretrained writes is unchanged
    after = model(input_ids=ids).logits
    after.square().sum().backward()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    for a, p in zip(grads_before, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-5)
    assert fuse_gelu(model) == 0  # idempotent


def test_fuse_gelu_replaces_every_tanh_gelu_and_nothing_else():
    from transformers.activations import GELUActivation, GELUTanh

    from rlhflab.models.policy import TanhGELU, fuse_gelu

    assert fuse_gelu(_tiny_gpt2("gelu_pytorch_tanh")) == 2  # fused already, but the CPU forward is faster
    assert fuse_gelu(_tiny_gpt2("relu")) == 0
    assert fuse_gelu(_tiny_gpt2("gelu")) == 0  # the erf GELU is another function
    holder = nn.Sequential(GELUTanh(use_gelu_tanh_python=True), GELUTanh(), nn.GELU(approximate="tanh"), nn.GELU(),
                           GELUActivation(), nn.SiLU())
    assert fuse_gelu(holder) == 3
    assert [type(m) for m in holder] == [TanhGELU, TanhGELU, TanhGELU, nn.GELU, GELUActivation, nn.SiLU]


# -------------------------------------------------------------------- response logits
def test_response_logits_equal_a_sliced_full_forward_with_gradients():
    from rlhflab.models.policy import position_ids_from_mask
    from rlhflab.stages.ppo import response_logits

    model = _tiny_gpt2(seed=2).train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    R = 4
    w = torch.randn(3, R, 50, generator=g)
    fast = response_logits(model, ids, mask, R)
    (fast * w).sum().backward()
    grads_fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = model(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask)).logits
    ref = full[:, -R - 1:-1]
    (ref * w).sum().backward()
    assert fast.shape == (3, R, 50)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    for a, p in zip(grads_fast, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=1e-5)


def test_prepare_ppo_models_fuses_all_four_models():
    from transformers import GPT2Config, GPT2ForSequenceClassification
    from transformers.activations import NewGELUActivation

    from rlhflab.models.policy import TanhGELU
    from rlhflab.models.reward import RewardModel
    from rlhflab.stages.ppo import PPOModels, prepare_ppo_models

    tok = make_tokenizer()
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64, num_labels=1,
                     pad_token_id=tok.pad_token_id)
    models = PPOModels(_tiny_gpt2(), _tiny_gpt2(), GPT2ForSequenceClassification(cfg),
                       RewardModel(GPT2ForSequenceClassification(cfg), tok), tok)
    assert prepare_ppo_models(models) is models
    for m in (models.policy, models.ref_policy, models.critic, models.reward.model):
        assert not any(isinstance(x, NewGELUActivation) for x in m.modules())
        assert any(isinstance(x, TanhGELU) for x in m.modules())
