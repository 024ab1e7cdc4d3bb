"""Whatever sits in masked positions (pads, INVALID_LOGPROB, huge numbers) must not change
any output at real tokens, any scalar loss or stat, or any gradient at real tokens."""

import pytest
import torch

from rlhflab.algos import (
    INVALID_LOGPROB,
    compute_gae,
    compute_gae_vectorized,
    kl_shaped_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    maybe_whiten_rewards,
    policy_loss,
    truncate_response,
    value_loss,
    whiten_advantages,
)

B, T = 6, 9


def _mask(seed):
    g = torch.Generator().manual_seed(seed)
    _, mask, _ = truncate_response(torch.randint(0, 5, (B, T), generator=g), stop_token_id=0, pad_token_id=7)
    mask[0] = True
    mask[1] = False
    mask[1, 0] = True  # a one-token response (stop token first)
    return mask


def _garble(x, mask, g):
    """Replace masked entries by garbage: normal*1e4, +-1e30 (squares overflow float32),
    INVALID_LOGPROB and +-inf (so that `x * mask` instead of `where` would give nan)."""
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype) * 1e4
    pick = torch.randint(0, 6, x.shape, generator=g)
    noise = torch.where(pick == 4, torch.full_like(noise, float("inf")), noise)
    noise = torch.where(pick == 5, torch.full_like(noise, float("-inf")), noise)
    noise = torch.where(pick == 1, torch.full_like(noise, 1e30), noise)
    noise = torch.where(pick == 2, torch.full_like(noise, -1e30), noise)
    noise = torch.where(pick == 3, torch.full_like(noise, INVALID_LOGPROB), noise)
    return torch.where(mask, x, noise)


def _same(a, b, mask):
    if a.dim() == 0:
        assert torch.equal(a, b), (a, b)
    elif a.shape == mask.shape:
        assert torch.equal(a[mask], b[mask])
    else:
        assert torch.equal(a, b)


def _inputs(seed):
    g = torch.Generator().manual_seed(100 + seed)
    mask = _mask(seed)
    names = ["x", "logprobs", "old_logprobs", "ref_logprobs", "values", "old_values", "rewards", "returns", "advantages"]
    clean = {n: torch.randn(B, T, generator=g) for n in names}
    clean["logprobs"] = -clean["logprobs"].abs()
    clean["ref_logprobs"] = clean["logprobs"] + 0.1 * clean["ref_logprobs"]
    clean["old_logprobs"] = clean["logprobs"] + 0.1 * clean["old_logprobs"]
    clean["scores"] = torch.randn(B, generator=g)
    dirty = {n: (_garble(v, mask, g) if v.shape == mask.shape else v) for n, v in clean.items()}
    return mask, clean, dirty


CASES = {
    "masked_sum": lambda d, m: (masked_sum(d["x"], m), masked_sum(d["x"], m, dim=1)),
    "masked_mean": lambda d, m: (masked_mean(d["x"], m), masked_mean(d["x"], m, dim=1)),
    "masked_var": lambda d, m: (masked_var(d["x"], m), masked_var(d["x"], m, unbiased=False)),
    "masked_whiten": lambda d, m: (masked_whiten(d["x"], m), masked_whiten(d["x"], m, shift_mean=False)),
    "kl_shaped_rewards": lambda d, m: tuple(
        out for kind in ("k1", "k2", "k3")
        for out in kl_shaped_rewards(d["scores"], d["logprobs"], d["ref_logprobs"], m, 0.05, kind, "eos")
    ),
    "maybe_whiten_rewards": lambda d, m: (maybe_whiten_rewards(d["rewards"], m, True),),
    "compute_gae": lambda d, m: compute_gae(d["rewards"], d["values"], m, 1.0, 0.95),
    "compute_gae_vectorized": lambda d, m: compute_gae_vectorized(d["rewards"], d["values"], m, 0.9, 0.95),
    "whiten_advantages": lambda d, m: (whiten_advantages(d["advantages"], m),),
    "policy_loss": lambda d, m: (lambda loss, s: (loss, *s.values()))(
        *policy_loss(d["logprobs"], d["old_logprobs"], d["advantages"], m, 0.2)),
    "value_loss": lambda d, m: (lambda loss, s: (loss, *s.values()))(
        *value_loss(d["values"], d["old_values"], d["returns"], m, 0.2)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_garbage_changes_nothing(name, seed):
    mask, clean, dirty = _inputs(seed)
    out_clean, out_dirty = CASES[name](clean, mask), CASES[name](dirty, mask)
    assert len(out_clean) == len(out_dirty) > 0
    for a, b in zip(out_clean, out_dirty):
        assert torch.isfinite(b).all(), name
        _same(a, b, mask)
        if a.shape == mask.shape and name not in ("masked_sum", "masked_mean", "masked_var"):
            assert (b[~mask] == 0).all(), f"{name}: masked outputs must be 0"


@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_ignore_masked_garbage(seed):
    mask, clean, dirty = _inputs(seed)
    grads = []
    for d in (clean, dirty):
        lp = d["logprobs"].clone().requires_grad_(True)
        v = d["values"].clone().requires_grad_(True)
        pl, _ = policy_loss(lp, d["old_logprobs"], d["advantages"], mask, 0.2)
        vl, _ = value_loss(v, d["old_values"], d["returns"], mask, 0.2)
        (pl + 0.1 * vl).backward()
        grads.append((lp.grad, v.grad))
    for g_clean, g_dirty in zip(*grads):
        assert torch.equal(g_clean, g_dirty)
        assert (g_dirty[~mask] == 0).all()
    assert (grads[0][0][mask] != 0).any()  # the real tokens do get a gradient


@pytest.mark.parametrize("seed", [0, 1])
def test_after_eos_rewards_and_gae_ignore_garbage_outside_the_value_mask(seed):
    """SFD's placement writes the score one position past the response mask: everything stays
    invariant to garbage outside the *value* mask, and is 0 there."""
    from rlhflab.algos import value_mask

    mask, clean, dirty = _inputs(seed)
    vmask = value_mask(mask, "after_eos")
    outs = []
    for d in (clean, dirty):
        values = torch.where(vmask, clean["values"], d["values"])  # values are real on the value mask
        rewards, kl, nsr = kl_shaped_rewards(d["scores"], d["logprobs"], d["ref_logprobs"], mask, 0.05, "k1", "after_eos")
        adv, ret = compute_gae(rewards, values, vmask, 1.0, 0.95)
        outs.append((rewards, kl, adv, ret))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
        assert (b[~vmask] == 0).all()
    rewards = outs[1][0]
    assert (rewards[vmask & ~mask] != 0).any()  # the scores really sit after the EOS
