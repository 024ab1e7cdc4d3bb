"""From RM scores to per-token PPO rewards.

Huang et al. 2024 details implemented here:

- "no EOS token -> score replaced by -1": a response that never emits the stop token
  within the token budget gets a fixed low score instead of the RM's opinion
  (``apply_missing_eos``, mode "replace"; SFD's ``penalty_reward_value = -1``).
- "per-token KL penalty": reward_t = -beta * KL_t at every response token, and the RM
  score is added at the last response token (the EOS) only (``kl_shaped_rewards``).
- optional reward whitening without shifting the mean (``maybe_whiten_rewards``).

Placement of the score (``score_placement``):

- ``"after_eos"`` (the default, Huang et al.'s code): SFD's ppo.py step 4 and TRL 0.29's
  ppo_trainer add the score one position *after* the last real token
  (``sequence_lengths_p1``, the first pad; the last token itself when the response fills
  the whole budget), and keep that position in the *value* mask (``~padding_mask_p1``): the
  critic's value read there -- the state right after the EOS -- is trained to predict the
  score, GAE runs one step further, and the policy (whose mask stops at the EOS) sees the
  score through ``gamma * lam`` times that extra TD step. :func:`value_mask` builds that mask.
- ``"eos"``: the score on the last real token itself, value mask = response mask (the
  textbook episode that ends with the EOS action).

Both are estimators of the same return; only the first is the paper's, so it is the
default wherever a config claims Huang's recipe.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .kl import KLKind, kl_penalty
from .masking import as_bool_mask, check_same_shape, masked_whiten, sequence_lengths


def apply_missing_eos(
    scores: Tensor, contains_stop: Tensor, mode: Literal["replace", "subtract"] = "replace", penalty: float = -1.0
) -> Tensor:
    """Penalise responses without a stop token (Huang detail: "no EOS -> score -1").

    Args:
        scores: ``[B]`` RM scores.
        contains_stop: ``[B]`` bool, from ``truncate_response``.
        mode: "replace": the score becomes ``penalty``; "subtract": ``|penalty|`` is
            subtracted from the score (keeps the RM's ranking among no-EOS responses).
        penalty: see ``mode`` (config ``ppo.missing_eos_penalty``).

    Returns:
        ``[B]`` new scores (input not modified).
    """
    contains_stop = as_bool_mask(contains_stop, "contains_stop")
    if scores.shape != contains_stop.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and contains_stop {tuple(contains_stop.shape)} must both be [B]")
    if mode == "replace":
        fallback = torch.full_like(scores, float(penalty))
    elif mode == "subtract":
        fallback = scores - abs(float(penalty))
    else:
        raise ValueError(f"missing_eos mode must be 'replace' or 'subtract', got {mode!r}")
    return torch.where(contains_stop, scores, fallback)


ScorePlacement = Literal["after_eos", "eos"]


def value_mask(response_mask: Tensor, score_placement: ScorePlacement = "after_eos") -> Tensor:
    """The positions the critic is trained on and GAE runs over.

    ``"after_eos"``: SFD's ``~padding_mask_p1`` -- the response mask plus the first
    position after each row's last real token, where one exists (a row that fills all
    ``T`` positions gains nothing; an empty row stays empty). ``"eos"``: the response mask.

    Args:
        response_mask: ``[B, T]`` bool, right-truncated (``truncate_response``).
        score_placement: see the module docstring.

    Returns:
        ``[B, T]`` bool.
    """
    mask = as_bool_mask(response_mask)
    if score_placement == "eos":
        return mask
    if score_placement != "after_eos":
        raise ValueError(f"score_placement must be 'after_eos' or 'eos', got {score_placement!r}")
    last = sequence_lengths(mask)  # [B], -1 for empty rows
    idx = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return mask | ((idx == (last + 1).unsqueeze(1)) & (last >= 0).unsqueeze(1))


def score_positions(response_mask: Tensor, score_placement: ScorePlacement = "after_eos") -> Tensor:
    """Index ``[B]`` where each row's score lands (``-1`` for an empty row).

    ``"after_eos"``: SFD's ``actual_end = where(sequence_lengths_p1 < T, sequence_lengths_p1,
    sequence_lengths)``; ``"eos"``: ``sequence_lengths``.
    """
    mask = as_bool_mask(response_mask)
    last = sequence_lengths(mask)
    if score_placement == "eos":
        return last
    if score_placement != "after_eos":
        raise ValueError(f"score_placement must be 'after_eos' or 'eos', got {score_placement!r}")
    return torch.where((last >= 0) & (last + 1 < mask.shape[1]), last + 1, last)


def kl_shaped_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    kl_coef: float,
    kind: KLKind = "k1",
    score_placement: ScorePlacement = "after_eos",
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token rewards ``-kl_coef * KL_t``, plus the score where ``score_placement`` puts it.

    Args:
        scores: ``[B]`` (already through ``apply_missing_eos``).
        logprobs: ``[B, T]`` rollout logprobs of the policy (at the sampling temperature).
        ref_logprobs: ``[B, T]`` reference-policy logprobs of the same tokens.
        response_mask: ``[B, T]`` bool, True at real response tokens.
        kl_coef: beta (``kl_ctl.value``).
        kind: KL estimator, see ``kl_penalty``.
        score_placement: ``"after_eos"`` (SFD/TRL, default) or ``"eos"``; see the module docstring.

    Returns:
        rewards: ``[B, T]`` = non_score_reward, with ``scores[b]`` added at
            ``score_positions(response_mask, score_placement)[b]`` (nonzero only inside
            ``value_mask(response_mask, score_placement)``). A row with an empty mask
            receives its score nowhere (all its rewards are 0): there is no token to credit.
        kl: ``[B, T]`` per-token KL, 0 where masked (``kl.sum(1).mean()`` is SFD's
            ``objective/kl``).
        non_score_reward: ``[B, T]`` = ``-kl_coef * kl``, 0 where masked.
    """
    mask = as_bool_mask(response_mask)
    check_same_shape(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores must be [B] with B={mask.shape[0]}, got shape {tuple(scores.shape)}")
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Sanitise before the estimator: garbage at masked positions (INVALID_LOGPROB, huge
    # values) must not produce inf/nan that a later mask could not undo in gradients.
    kl = kl_penalty(torch.where(mask, logprobs, zero), torch.where(mask, ref_logprobs, zero), kind)
    kl = torch.where(mask, kl, zero)
    non_score_reward = -float(kl_coef) * kl
    last = score_positions(mask, score_placement)  # [B], -1 for empty rows
    has_token = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)
    score_at = torch.zeros_like(non_score_reward)
    score_at[rows[has_token], last[has_token]] = scores[has_token].to(score_at.dtype)
    rewards = non_score_reward + score_at
    return rewards, kl, non_score_reward


def maybe_whiten_rewards(rewards: Tensor, mask: Tensor, enabled: bool) -> Tensor:
    """Whiten shaped rewards over the batch's real tokens, keeping their mean.

    SFD's ``whiten_rewards`` option: ``masked_whiten(rewards, mask, shift_mean=False)``.
    Statistics are per call, over ``mask`` -- SFD whitens over ``~padding_mask_p1``, i.e.
    the :func:`value_mask` (which holds the score).

    Args:
        rewards: ``[B, T]``.
        mask: ``[B, T]`` bool, the value mask.
        enabled: config ``ppo.whiten_rewards``; False returns ``rewards`` unchanged.

    Returns:
        ``[B, T]``; when enabled, 0 where masked.
    """
    if not enabled:
        return rewards
    return masked_whiten(rewards, mask, shift_mean=False)
