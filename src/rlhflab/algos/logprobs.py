"""Token log-probabilities and entropies from logits, at the sampling temperature.

Huang et al. 2024 detail "sampling temperature is also applied to the logits when
computing logprobs": responses are sampled from ``softmax(logits / T)``, so the rollout
logprobs, the reference logprobs and the PPO-update logprobs must all come from
``logits / T`` too, otherwise the ratio and the KL compare different distributions
(SFD's ppo.py divides ``logits /= args.temperature + 1e-7`` before ``log_softmax``; we
divide by ``temperature`` exactly and refuse ``temperature <= 0``).

Memory and speed. With autograd recording (the PPO update) the whole ``[B, T, V]`` goes
through one autograd function, :class:`_TokenLogprobs`: forward ``log_softmax``, gather of
the chosen tokens, ``probs = softmax(logits / T)`` kept for backward (autograd would keep a
``[B, T, V]`` for any formulation) and, when asked, the entropy from the same
log-softmax; backward writes the gradient of ``log_softmax(z)[token]``, which is
``onehot(token) - probs`` times the incoming gradient, in one dense pass. Plain autograd
over ``log_softmax`` + ``gather`` computes the same numbers but costs a zero fill for the
gather's backward, the log-softmax backward (another ``exp``) and the temperature
division's backward, each a pass over 28 MB at the CPU benchmark shape ([16, 53, 8192]
fp32). An older per-row loop over ``logits[b]`` was slower still: each ``select``'s
backward writes a zero tensor of the whole ``[B, T, V]``. Without autograd (rollout,
reference policy) rows are processed one ``[T, V]`` at a time via ``unbind``, so the
peak extra memory is one row's worth. ``log_softmax`` + ``gather`` is used rather than
``gather - logsumexp``: on CPU (torch 2.13, [16, 53, 8192] fp32) log_softmax took about
half the time of logsumexp. Logits in bf16/fp16 are upcast to float32 first: bf16 keeps
about 3 significant digits, too few for logprob differences (ratios, KL) of nearly equal
policies; the gradient goes back in the logits' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return t


def _as_float(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature`` in float32 (float64 stays float64)."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return x / temperature if temperature != 1.0 else x


def _empty_result(logits: Tensor) -> Tensor:
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.zeros(logits.shape[:2], dtype=dtype, device=logits.device)


def _check_tokens(logits: Tensor, tokens: Tensor) -> Tensor:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)} but logits has shape {tuple(logits.shape)}; expected tokens [B, T] = logits[:, :, 0].shape")
    if tokens.is_floating_point() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    return tokens.long()


def _entropy_from_logp_(logp: Tensor, probs: Tensor) -> Tensor:
    """``-sum_v p_v log p_v`` [...] from log-probabilities ``logp`` and ``probs = logp.exp()`` [..., V].

    A batched dot product (no ``[..., V]`` product tensor). A -inf logprob (a banned token)
    has p = 0 and must add 0, not ``0 * -inf = nan``: ``logp`` is clamped IN PLACE to the
    most negative finite float, which makes that product an exact 0 and changes no finite
    logprob -- so callers pass a ``logp`` they own and no longer need."""
    V = logp.shape[-1]
    logp.clamp_(min=torch.finfo(logp.dtype).min)
    return -torch.bmm(probs.reshape(-1, 1, V), logp.reshape(-1, V, 1)).reshape(logp.shape[:-1])


class _TokenLogprobs(torch.autograd.Function):
    """``log_softmax(logits / T)[token]`` [B, T] and (optionally) the entropy [B, T], with a
    one-pass backward (see the module docstring). The entropy is not differentiated."""

    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float, with_entropy: bool):
        z = _as_float(logits, temperature)
        logp = torch.log_softmax(z, dim=-1)  # [B, T, V], our own tensor
        logprobs = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        # What log_softmax's backward would recompute, saved instead of logp. softmax(z) rather
        # than logp.exp(): equal to rounding, and on CPU ~1.6x faster (torch's exp kernel is slow).
        probs = torch.softmax(z, dim=-1)
        del z
        entropy = _entropy_from_logp_(logp, probs) if with_entropy else None  # logp not used after this
        ctx.save_for_backward(probs, tokens)
        ctx.temperature, ctx.logits_dtype = temperature, logits.dtype
        if entropy is None:
            return logprobs
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor, *unused):
        probs, tokens = ctx.saved_tensors
        # d log_softmax(z)[k] / dz_v = 1[v = k] - p_v: the same products log_softmax's own
        # backward forms (g - p*g at the token, -p*g elsewhere); the 1/T of z = logits / T is
        # applied to the [B, T, 1] incoming gradient, not to the [B, T, V] result.
        g = grad_logprobs.unsqueeze(-1)  # [B, T, 1]
        if ctx.temperature != 1.0:
            g = g / ctx.temperature
        grad = probs * (-g)
        grad.scatter_add_(-1, tokens.unsqueeze(-1), g)
        return grad.to(ctx.logits_dtype), None, None, None


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each token under ``softmax(logits / temperature)``.

    Args:
        logits: ``[B, T, V]``, already aligned with ``tokens`` (for a causal LM over
            ``query + response`` that is ``outputs.logits[:, context_length - 1 : -1]``).
        tokens: ``[B, T]`` integer ids in ``[0, V)``.
        temperature: sampling temperature (> 0).

    Returns:
        ``[B, T]`` logprobs, float32 (float64 if ``logits`` is float64); differentiable
        with respect to ``logits``.
    """
    t = _check_temperature(temperature)
    tokens = _check_tokens(logits, tokens)
    if logits.size(0) == 0:
        return _empty_result(logits)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TokenLogprobs.apply(logits, tokens, t, False)
    out = [torch.log_softmax(_as_float(row, t), dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
           for row, tok in zip(logits.unbind(0), tokens.unbind(0))]  # one [T, V] row at a time bounds the memory
    return torch.stack(out)


def logprobs_and_entropy_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """:func:`logprobs_from_logits` and :func:`entropy_from_logits` from ONE log-softmax.

    The PPO update needs both of the same logits (the loss and ``policy/entropy_token_avg``); the
    entropy reuses the log-softmax the logprobs are gathered from (and, with autograd, the
    probabilities the backward keeps) instead of separate passes. It is computed as
    ``-sum_v p_v log p_v``, equal to :func:`entropy_from_logits`'s
    ``logsumexp(z) - sum_v p_v z_v`` up to float rounding.

    Args:
        logits: ``[B, T, V]`` aligned with ``tokens``; tokens: ``[B, T]`` ids; temperature > 0.

    Returns:
        ``(logprobs [B, T], entropy [B, T])``; logprobs differentiable with respect to
        ``logits`` when autograd records, entropy never (a logged statistic).
    """
    t = _check_temperature(temperature)
    tokens = _check_tokens(logits, tokens)
    if logits.size(0) == 0:
        return _empty_result(logits), _empty_result(logits)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TokenLogprobs.apply(logits, tokens, t, True)
    logprobs, entropy = [], []
    for row, tok in zip(logits.unbind(0), tokens.unbind(0)):
        logp = torch.log_softmax(_as_float(row, t), dim=-1)
        logprobs.append(logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1))
        entropy.append(_entropy_from_logp_(logp, logp.exp()))  # after the gather: clamps logp
    return torch.stack(logprobs), torch.stack(entropy)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` at each position.

    ``H = logsumexp(z) - sum_v softmax(z)_v * z_v`` with ``z = logits / temperature`` (the
    form SFD's ppo.py logs as ``policy/entropy_avg``). Rows are processed one ``[T, V]`` at
    a time (``unbind``) to bound the memory; for a logged statistic, not a loss.

    Args:
        logits: ``[B, T, V]``.
        temperature: sampling temperature (> 0).

    Returns:
        ``[B, T]`` entropies in nats, float32 (float64 for float64 logits).
    """
    t = _check_temperature(temperature)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if logits.size(0) == 0:
        return _empty_result(logits)
    out = []
    for row in logits.unbind(0):
        row = _as_float(row, t)
        probs = torch.softmax(row, dim=-1)
        # where(): a -inf logit (a banned token) has probability 0 and must add 0, not nan.
        p_times_z = torch.where(probs > 0, probs * row, torch.zeros((), dtype=row.dtype, device=row.device))
        out.append(torch.logsumexp(row, dim=-1) - p_times_z.sum(dim=-1))
    return torch.stack(out)
