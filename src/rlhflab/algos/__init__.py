"""The PPO math of Huang et al. 2024 as pure torch functions over a ``response_mask``.

Shapes: ``[B, T]`` per-token tensors (B responses, T response positions), ``[B]`` per
sequence, ``[B, T, V]`` logits. ``response_mask`` is bool, True at real response tokens.
"""

from .advantages import compute_gae, compute_gae_vectorized, whiten_advantages
from .kl import AdaptiveKLController, FixedKLController, kl_penalty
from .logprobs import entropy_from_logits, logprobs_from_logits
from .losses import policy_loss, value_loss
from .masking import (
    INVALID_LOGPROB,
    first_true_indices,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_lengths,
    truncate_response,
)
from .rewards import apply_missing_eos, kl_shaped_rewards, maybe_whiten_rewards, score_positions, value_mask

__all__ = [
    "INVALID_LOGPROB",
    "AdaptiveKLController",
    "FixedKLController",
    "apply_missing_eos",
    "compute_gae",
    "compute_gae_vectorized",
    "entropy_from_logits",
    "first_true_indices",
    "kl_penalty",
    "kl_shaped_rewards",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "maybe_whiten_rewards",
    "policy_loss",
    "score_positions",
    "sequence_lengths",
    "truncate_response",
    "value_loss",
    "value_mask",
    "whiten_advantages",
]
