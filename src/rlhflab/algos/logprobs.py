"""Token log-probabilities and entropies from logits, at the sampling temperature.

Huang et al. 2024 detail "sampling temperature is also applied to the logits when
computing logprobs": responses are sampled from ``softmax(logits / T)``, so the rollout
logprobs, the reference logprobs and the PPO-update logprobs must all come from
``logits / T`` too, otherwise the ratio and the KL compare different distributions
(SFD's ppo.py divides ``logits /= args.temperature + 1e-7`` before ``log_softmax``; we
divide by ``temperature`` exactly and refuse ``temperature <= 0``).

Memory and speed: with autograd recording (the PPO update), the whole ``[B, T, V]`` is
put through one ``log_softmax`` and the chosen tokens gathered. Autograd must keep the
``[B, T, V]`` log-softmax for backward whatever the formulation, so this costs no extra
memory, and its backward is one dense pass. (An earlier per-row loop over ``logits[b]``
was much slower: the backward of each ``select`` writes a zero tensor the size of the
whole ``[B, T, V]`` logits and autograd sums B of them -- on the CPU benchmark, gpt2
4x256, vocab 8192, [16, 53, 8192] fp32, that ``fill_`` was 8-18% of the whole PPO
update.) Without autograd (rollout, reference policy, entropies) rows are processed one
``[T, V]`` at a time via ``unbind`` and reduced at once, so the peak extra memory is one
row's worth. We use ``log_softmax`` + ``gather`` rather than ``gather - logsumexp``: same
memory, and on CPU (torch 2.13, [16, 53, 8192] fp32) log_softmax took about half the
time of logsumexp. Logits in bf16/fp16 are upcast to float32 first: bf16 keeps about 3
significant digits, too few for logprob differences (ratios, KL) of nearly equal
policies.
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


def _entropy_from_logp(logp: Tensor) -> Tensor:
    """``-sum_v p_v log p_v`` over the last dim from log-probabilities ``[..., V]``.

    A -inf logprob (a banned token) has p = 0 and must add 0, not ``0 * -inf = nan``: the
    clamp to the most negative finite float makes that product an exact 0 and changes no
    finite logprob."""
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


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
        # One log_softmax over the whole batch (see the module docstring: no per-row select).
        logp = torch.log_softmax(_as_float(logits, t), dim=-1)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    out = [torch.log_softmax(_as_float(row, t), dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
           for row, tok in zip(logits.unbind(0), tokens.unbind(0))]  # one [T, V] row at a time bounds the memory
    return torch.stack(out)


def logprobs_and_entropy_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """:func:`logprobs_from_logits` and :func:`entropy_from_logits` from ONE log-softmax.

    The PPO update needs both of the same logits (the loss and ``policy/entropy_avg``); the
    entropy reuses the log-softmax the logprobs are gathered from instead of a second
    softmax pass. It is computed as ``-sum_v p_v log p_v``, equal to
    :func:`entropy_from_logits`'s ``logsumexp(z) - sum_v p_v z_v`` up to float rounding.

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
        logp = torch.log_softmax(_as_float(logits, t), dim=-1)
        with torch.no_grad():
            entropy = _entropy_from_logp(logp)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), entropy
    logprobs, entropy = [], []
    for row, tok in zip(logits.unbind(0), tokens.unbind(0)):
        logp = torch.log_softmax(_as_float(row, t), dim=-1)
        logprobs.append(logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1))
        entropy.append(_entropy_from_logp(logp))
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
