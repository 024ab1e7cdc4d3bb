"""PPO against the reward model with a per-token KL penalty to the SFT policy (Huang et al. 2024).

``rlhflab ppo --config default`` runs :func:`main`. One PPO update reads as numbered steps
(the same numbers appear in the code below, SFD/torchtune style):

1. **rollout**: sample ``response_length`` tokens per query at temperature 0.7, top-k 0,
   top-p 1, with a KV cache (:func:`sample_responses`);
2. **logprobs, ref_logprobs, values**: logprobs of the sampled tokens under the policy at
   the sampling temperature (detail "temperature in logprobs"), under the frozen SFT
   reference, and the critic's values; forwards on query+response with position ids that
   skip left padding; the logits for response token t come from position t-1;
3. **truncate** after the first EOS (detail) -> ``response_mask``; logprobs at padded
   positions = ``INVALID_LOGPROB``;
4. **scores** from the RM through ITS OWN tokenizer (the policy's responses are decoded,
   special tokens skipped, and re-tokenised with the query text), normalised by the RM
   bias; the no-EOS rule (detail: score -> -1);
5. **KL-shaped per-token rewards** ``-beta * KL_t`` with the score at the last token;
   optional reward whitening;
6. **GAE** (gamma 1, lambda 0.95) and **advantage whitening** (over the global batch);
7. **PPO epochs x minibatches x micro-batches**: new logprobs and values,
   ``policy_loss + vf_coef * value_loss``, backward, gradient clipping, AdamW step
   (eps 1e-5), linear LR anneal (detail);
8. **log** every metric (jsonl + TensorBoard + tqdm postfix), KL health verdict
   (:mod:`rlhflab.monitor`);
9. **checkpoint** (atomic) every ``ppo.save_every`` updates.

All PPO math is in :mod:`rlhflab.algos`; this file only calls it.

Multi-process (``accelerate launch --num_processes N --cpu -m rlhflab.cli ppo ...``): every
process computes the same global prompt order; process r samples, and runs the ref / critic
/ RM forwards for, its contiguous slice of the global batch. The rollout tensors are then
all-gathered (a few ints/floats per token), so steps 5-6 -- including advantage whitening --
run on the GLOBAL batch, identically on every process. Step 7 cuts each global minibatch
into micro-batches; process r trains on its share of them and the gradients are averaged
over processes in the backward by the engine of :mod:`rlhflab.parallel` (FSDP2: sharded with
``parallel.sharding=fsdp2``, replicated otherwise; it hooks the backbone and the score head
the critic is read through). What is equal between N processes and one:

* the prompts of every update and their order (a pure function of seed and update);
* the sampled tokens: each sample draws its Gumbel noise from its own generator seeded by
  ``(ppo.seed, global episode index)``, never from a shared RNG, and every process pads its
  queries to the width of the global batch, so a row sees the same left padding and the same
  noise whatever process samples it (tokens are then equal unless two logits tie within
  float round-off);
* the micro-batches, their losses, and the gradient of every optimizer step: one process
  accumulates ``(1/G) sum_g grad L_g`` over the G micro-batches of a minibatch; N processes
  each accumulate ``(1/(G/N)) sum`` over their G/N and the all-reduce averages -> the same
  sum (up to float summation order). ``tests/test_ppo_multiprocess.py`` checks the final
  weights of 2 processes against 1.

Checkpoints are *deferred*: the state after update k is written at the start of update k+1,
once the rollout of update k+1 has measured its KL and found it not catastrophic. A
catastrophic KL therefore never reaches a checkpoint: the run stops with a
:class:`~rlhflab.errors.StageError` and the latest checkpoint is the last state whose KL was
measured acceptable. (A crash between the two costs at most one update of work.) The state
after the final update is checkpointed at the end.

Only the main process writes files.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from rlhflab.algos import (
    INVALID_LOGPROB,
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos,
    compute_gae,
    kl_shaped_rewards,
    logprobs_from_logits,
    masked_mean,
    maybe_whiten_rewards,
    policy_loss,
    truncate_response,
    value_loss,
    value_mask,
    whiten_advantages,
)
from rlhflab.algos.logprobs import logprobs_and_entropy_from_logits
from rlhflab.config import BatchSizes, PPOConfig, RunConfig, derive_batch, save_config
from rlhflab.errors import StageError
from rlhflab.models.critic import SharedValueHead, is_shared
from rlhflab.models.lora import AdapterDisabledReference, apply_lora, check_resume_state, lora_active, save_outputs
from rlhflab.models.policy import fuse_gelu, load_policy, load_tokenizer, position_ids_from_mask
from rlhflab.models.reward import build_critic, is_decoder_rm, token_scores
from rlhflab.monitor import KLMonitor, verdict_code
from rlhflab.parallel import Engine, all_processes, make_engine, optimizer_params, uses_collectives
from rlhflab.rewards import reward_modules, score as score_rewards
from rlhflab.runtime import (
    CheckpointManager,
    atomic_save_dir,
    progress,
    rng_state,
    seed_everything,
    write_json,
)
from rlhflab.trackers import make_logger, sample_rows

log = logging.getLogger(__name__)


# ============================================================================ containers
@dataclass
class PPOModels:
    """The four models of PPO and the policy's tokenizer.

    ``policy`` and ``critic`` are trained; ``ref_policy`` (the SFT policy) and ``reward`` are
    frozen, in eval mode. ``reward`` is the trained RM (reading text through its own tokenizer)
    or any :class:`rlhflab.rewards.Reward` (functions, remote RMs, the gold judge).
    """

    policy: nn.Module
    ref_policy: nn.Module
    critic: nn.Module
    reward: Any  # RewardModel | rlhflab.rewards.Reward
    tokenizer: Any


class Prompt(NamedTuple):
    """One PPO prompt: the policy's query tokens, the query text (what the RM reads), and the
    raw post (what the tldr-synth gold judge reads). ``data.tldr.SFTExample`` fits too."""

    query_ids: list[int]
    query: str
    post: str


class Rollout(NamedTuple):
    """Steps 1-4 for a batch of B episodes (global after :func:`collect_rollout`).

    query_ids/query_mask: [B, Tq] left-padded queries; responses: [B, R] truncated after the
    first EOS (pad after it); response_mask: [B, R] bool; contains_eos: [B] bool;
    logprobs/ref_logprobs: [B, R] at the sampling temperature (INVALID_LOGPROB where masked);
    value_mask: [B, R] bool, where the critic is trained and GAE runs (``algos.value_mask``:
    the response mask, plus the position after the EOS for ``ppo.score_placement=after_eos``);
    values: [B, R] (0 outside ``value_mask``); scores: [B] after the no-EOS rule; rm_scores: [B] the RM's normalised
    scores before it; response_texts: B decoded responses.
    """

    query_ids: Tensor
    query_mask: Tensor
    responses: Tensor
    response_mask: Tensor
    contains_eos: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    value_mask: Tensor
    values: Tensor
    scores: Tensor
    rm_scores: Tensor
    response_texts: list[str]
    time_generation_s: float
    time_scoring_s: float


class PPOBatch(NamedTuple):
    """A rollout plus steps 5-6: rewards, kl, non_score_reward, advantages (whitened), returns: [B, R];
    raw_advantages: [B, R] before whitening (for logging)."""

    rollout: Rollout
    rewards: Tensor
    kl: Tensor
    non_score_reward: Tensor
    advantages: Tensor
    raw_advantages: Tensor
    returns: Tensor


# ====================================================================== small helpers
def sample_seed(seed: int, episode: int) -> int:
    """Seed of the sampling noise of global episode ``episode`` (0-based over the whole run)."""
    return (int(seed) * 1_000_003 + int(episode) * 7_919 + 17) % (2**62)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def response_logits(model: nn.Module, query_responses: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
    """Logits [B, R, V] predicting each of the last ``R`` tokens of ``query_responses`` [B, Tq+R].

    The logits for response token t come from position ``Tq - 1 + t``; the LM head runs only on
    those R positions, named by a 1-D index tensor (``logits_to_keep``, transformers 5), not on
    the query. (Keeping the last R+1 positions and slicing off the last one gives the same
    numbers, but the backward of that slice writes a zero tensor of the whole [B, R+1, V].)
    """
    T = query_responses.shape[1]
    keep = torch.arange(T - response_length - 1, T - 1, device=query_responses.device)
    out = model(input_ids=query_responses, attention_mask=attention_mask.long(),
                position_ids=position_ids_from_mask(attention_mask), use_cache=False, logits_to_keep=keep)
    return out.logits


def response_values(critic: nn.Module, query_responses: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
    """Critic values [B, R]: V_t is read at the position before response token t (the state it is chosen in)."""
    values = token_scores(critic, query_responses, attention_mask)
    T = query_responses.shape[1]
    return values[:, T - response_length - 1: T - 1].float()


def response_logits_and_values(models: PPOModels, query_responses: Tensor, attention_mask: Tensor,
                               response_length: int) -> tuple[Tensor, Tensor]:
    """Policy logits [B, R, V] and critic values [B, R]. With the shared critic
    (``model.critic=shared``) ONE policy forward gives both: the value head reads the trunk's
    output captured during the logits forward (:meth:`SharedValueHead.capture`)."""
    if is_shared(models.critic):
        with models.critic.capture() as trunk:
            logits = response_logits(models.policy, query_responses, attention_mask, response_length)
        T = query_responses.shape[1]
        values = models.critic.values_from_hidden(trunk.hidden[:, T - response_length - 1: T - 1])
        return logits, values.float()
    return (response_logits(models.policy, query_responses, attention_mask, response_length),
            response_values(models.critic, query_responses, attention_mask, response_length))


def _trim(query_ids: Tensor, query_mask: Tensor, responses: Tensor, response_mask: Tensor,
          keep_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, int]:
    """query+response ids and mask [b, Tq'+R'] without the columns that are padding in every row
    (leading query pads, trailing response pads beyond ``keep_mask``, default ``response_mask``:
    pass the value mask to keep the position after the EOS, whose value is read at the EOS);
    returns them and R'. Masked columns change no real token's result, so this only saves compute."""
    first = int(query_mask.any(0).long().argmax()) if query_mask.any() else 0
    keep = response_mask if keep_mask is None else keep_mask
    R = int(keep.any(0).nonzero().max()) + 1 if keep.any() else 1
    ids = torch.cat([query_ids[:, first:], responses[:, :R]], 1)
    mask = torch.cat([query_mask[:, first:], response_mask[:, :R]], 1)
    return ids, mask, R


def _pad_cols(x: Tensor, width: int, value: float) -> Tensor:
    if x.shape[1] == width:
        return x
    return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1]), value)], 1)


# ============================================================================ step 1
@torch.no_grad()
def sample_responses(policy: nn.Module, query_ids: Tensor, query_mask: Tensor, response_length: int,
                     temperature: float, sample_seeds: Sequence[int], eos_token_id: Optional[int],
                     pad_token_id: int, bf16: bool = False) -> tuple[Tensor, Tensor]:
    """Sample ``response_length`` tokens per row with a KV cache; returns (responses [B, R], logprobs [B, R]).

    Sampling is from ``softmax(logits / temperature)`` over the whole vocabulary (Huang: top-k 0,
    top-p 1) by the Gumbel-max trick, ``argmax(logits/T - log(-log u))``, which is an exact
    sample of that softmax; each row's uniforms ``u`` come from its own generator seeded with
    ``sample_seeds[row]``, so a row's tokens do not depend on the other rows of the batch or
    on which process samples it. ``logprobs`` are the log-softmax at temperature T of the
    sampled tokens, read from the same logits (as TRL does; equal to a full forward's up to
    float round-off, which ``tests/test_ppo.py`` checks), saving one policy forward.

    The loop stops early once every row has produced ``eos_token_id``; the rest is
    ``pad_token_id`` (logprob 0) -- step 3 masks everything after the first EOS anyway.
    """
    B, device = query_ids.shape[0], query_ids.device
    if len(sample_seeds) != B:
        raise ValueError(f"sample_responses: {len(sample_seeds)} seeds for {B} queries")
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in sample_seeds]
    was_training = policy.training
    policy.eval()
    mask = query_mask.long()
    positions = position_ids_from_mask(mask)
    responses = torch.full((B, response_length), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, response_length), dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    with _autocast(device, bf16):
        out = policy(input_ids=query_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, next_pos = out.cache, positions[:, -1:] + 1
    logits = out.logits[:, -1]
    for t in range(response_length):
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        u = torch.stack([torch.rand(logp.shape[-1], generator=g, device=device) for g in gens])
        tokens = (logp - torch.log(-torch.log(u))).argmax(-1)
        responses[:, t] = tokens
        logprobs[:, t] = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)
        if eos_token_id is not None:
            done |= tokens == eos_token_id
            if all_processes(bool(done.all()), policy):  # a sharded policy's forward needs every process
                break
        if t == response_length - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        with _autocast(device, bf16):
            out = policy(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=next_pos,
                         cache=cache, use_cache=True)
        cache, next_pos = out.cache, next_pos + 1
        logits = out.logits[:, -1]
    policy.train(was_training)
    return responses, logprobs


# ======================================================================= steps 1-4
@torch.no_grad()
def collect_rollout(models: PPOModels, prompts: Sequence[Any], first_episode: int, p: PPOConfig,
                    response_length: int, accelerator, forward_batch_size: Optional[int] = None) -> Rollout:
    """Steps 1-4 for this process's share of the global batch ``prompts``, then all-gathered.

    Args:
        prompts: the GLOBAL batch (objects with ``query_ids``, ``query``); this process takes
            its contiguous slice. Queries are left-padded to the width of the global batch.
        first_episode: global index of ``prompts[0]`` over the run (seeds the sampling noise).
        forward_batch_size: rows per ref/critic/RM forward (default ``p.micro_batch_size``).
    Returns:
        the global :class:`Rollout` (identical on every process).
    """
    tok, device = models.tokenizer, accelerator.device
    P, rank = accelerator.num_processes, accelerator.process_index
    per = len(prompts) // P
    mine = range(rank * per, (rank + 1) * per)
    width = max(len(x.query_ids) for x in prompts)
    query_ids = torch.full((per, width), tok.pad_token_id, dtype=torch.long)
    query_mask = torch.zeros((per, width), dtype=torch.bool)
    for row, i in enumerate(mine):
        q = prompts[i].query_ids
        query_ids[row, width - len(q):] = torch.as_tensor(q, dtype=torch.long)
        query_mask[row, width - len(q):] = True
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    eos = tok.eos_token_id if p.stop_token == "eos" else None

    # 1. Rollout: sample with a KV cache; logprobs of the samples at temperature T (step 2, policy part).
    #    ppo.rollout_batch_size rows at a time (a smaller KV cache); every row's tokens are the same
    #    whatever chunk it is sampled in (its own noise, the global batch's padding).
    t0 = time.perf_counter()
    seeds = [sample_seed(p.seed, first_episode + i) for i in mine]
    rb = p.rollout_batch_size or per
    chunks = [sample_responses(models.policy, query_ids[c:c + rb], query_mask[c:c + rb], response_length,
                               p.temperature, seeds[c:c + rb], eos, tok.pad_token_id, bf16=p.bf16)
              for c in range(0, per, rb)]
    raw_responses, logprobs = torch.cat([x for x, _ in chunks]), torch.cat([lp for _, lp in chunks])
    t1 = time.perf_counter()

    # 3. Truncate after the first EOS (Huang detail); pads after it are masked everywhere except,
    # with ppo.score_placement=after_eos (SFD), the one position after the EOS in the value mask.
    responses, response_mask, contains_eos = truncate_response(raw_responses, eos, tok.pad_token_id)
    vmask = value_mask(response_mask, p.score_placement)

    # 2. ref_logprobs and values: forwards on query+response, position ids skipping left padding.
    fb = forward_batch_size or p.forward_batch_size or p.micro_batch_size
    ref_logprobs = torch.zeros_like(logprobs)
    values = torch.zeros_like(logprobs)
    for s in range(0, per, fb):
        sl = slice(s, s + fb)
        ids, mask, R = _trim(query_ids[sl], query_mask[sl], responses[sl], response_mask[sl], vmask[sl])
        with _autocast(device, p.bf16):
            ref_logits = response_logits(models.ref_policy, ids, mask, R)
            ref_logprobs[sl, :R] = logprobs_from_logits(ref_logits, responses[sl, :R], p.temperature)
            values[sl, :R] = response_values(models.critic, ids, mask, R)
    values = torch.where(vmask, values, torch.zeros_like(values))  # SFD: masked_fill(padding_mask_p1, 0)
    logprobs = torch.where(response_mask, logprobs, torch.full_like(logprobs, INVALID_LOGPROB))
    ref_logprobs = torch.where(response_mask, ref_logprobs, torch.full_like(ref_logprobs, INVALID_LOGPROB))

    # 4. Scores: the RM reads (query text, decoded response) through its own tokenizer, minus its bias
    #    (or any other reward source: rlhflab.rewards).
    texts = tok.batch_decode(responses.cpu().tolist(), skip_special_tokens=True)
    rm_scores = score_rewards(models.reward, [prompts[i] for i in mine], texts, batch_size=fb).to(device)
    scores = rm_scores
    if eos is not None:  # Huang detail: no EOS within the budget -> fixed low score
        scores = apply_missing_eos(rm_scores, contains_eos, p.missing_eos, p.missing_eos_penalty)
    t2 = time.perf_counter()

    # Gather the shards: steps 5-7 see the global batch on every process.
    if P > 1:
        from accelerate.utils import gather_object

        query_ids, query_mask, responses, response_mask, contains_eos, logprobs, ref_logprobs, vmask, values, scores, rm_scores = (
            accelerator.gather(x) for x in (query_ids, query_mask, responses, response_mask, contains_eos, logprobs,
                                            ref_logprobs, vmask, values, scores, rm_scores))
        texts = gather_object(texts)
    return Rollout(query_ids, query_mask, responses, response_mask, contains_eos, logprobs, ref_logprobs, vmask, values,
                   scores, rm_scores, list(texts), t1 - t0, t2 - t1)


# ======================================================================= steps 5-6
def compute_advantages(rollout: Rollout, kl_coef: float, p: PPOConfig) -> PPOBatch:
    """Steps 5-6 on the global batch: KL-shaped rewards, (optional) reward whitening, GAE, advantage whitening."""
    r = rollout
    # 5. Per-token rewards -beta * KL_t (k1 by default), the score added one position after the EOS
    # (SFD/TRL, ppo.score_placement=after_eos) or on it ('eos'); reward whitening over the value mask (SFD).
    rewards, kl, non_score_reward = kl_shaped_rewards(r.scores, r.logprobs, r.ref_logprobs, r.response_mask,
                                                      kl_coef, p.kl_estimator, p.score_placement)
    rewards = maybe_whiten_rewards(rewards, r.value_mask, p.whiten_rewards)
    # 6. GAE (Huang: gamma 1, lambda 0.95) over the value mask; advantages whitened over the
    # response tokens (SFD: masked_whiten(advantages, ~padding_mask)), global statistics.
    raw_advantages, returns = compute_gae(rewards, r.values, r.value_mask, p.gamma, p.lam)
    advantages = whiten_advantages(raw_advantages, r.response_mask)
    return PPOBatch(r, rewards, kl, non_score_reward, advantages, raw_advantages, returns)


# ============================================================================ step 7
class NonFiniteError(StageError):
    """Loss, scores or rewards became NaN/inf."""


def ppo_train(models: PPOModels, optimizer: torch.optim.Optimizer, batch: PPOBatch, p: PPOConfig, sizes: BatchSizes,
              update: int, accelerator) -> dict[str, float]:
    """Step 7: ``ppo_epochs`` x minibatches x micro-batches over the global batch.

    Each epoch shuffles the global batch with a generator seeded by (seed, update, epoch);
    minibatch m is a contiguous block of that permutation, cut into micro-batches of
    ``p.micro_batch_size``; this process trains on its contiguous share of them (gradient
    accumulation; the models' FSDP2 hooks average gradients over processes in the backward,
    :mod:`rlhflab.parallel`), then gradients are clipped (policy and critic
    jointly, as SFD's single optimizer over both), and AdamW steps.

    Returns the mean over all micro-batches of ``policy/approxkl_token_avg``, ``policy/clipfrac_avg``,
    ``policy/entropy_token_avg``, ``loss/policy_avg``, ``loss/value_avg``, ``val/clipfrac_avg``,
    ``val/ratio_token_avg`` (the policy terms over response tokens, the value terms over the value mask).
    """
    r = batch.rollout
    device = accelerator.device
    B = r.responses.shape[0]
    mini = B // p.num_mini_batches
    mb, accum = sizes.micro_batch, sizes.grad_accum
    rank = accelerator.process_index
    # The optimizer's parameters, not ``model.parameters()``: after the rollout's no-grad forwards an
    # FSDP2 root unit (embeddings, final norm, heads) stays unsharded and the module then lists its
    # unsharded tensors, whose .grad stays None -- the gradients land on the sharded parameters the
    # optimizer holds. Clipping over the module's list left those out of the norm and the scaling
    # (tests/test_ppo_multiprocess.py).
    params = optimizer_params(optimizer)
    # Wrapped models sync gradients themselves and their forwards need every process.
    collective = uses_collectives(models.policy)
    if accelerator.num_processes > 1 and not (collective and uses_collectives(models.critic)):
        raise StageError("ppo_train on several processes needs models wrapped by rlhflab.parallel (Engine.prepare)")
    keys = ("approxkl", "clipfrac", "entropy", "pg_loss", "vf_loss", "vf_clipfrac", "ratio")
    sums = {k: torch.zeros((), device=device) for k in keys}
    count = 0
    bad: Optional[str] = None
    models.policy.train()
    models.critic.train()
    for epoch in range(p.ppo_epochs):
        g = torch.Generator().manual_seed(sample_seed(p.seed, 10_000_019 * (update + 1) + epoch))
        perm = torch.randperm(B, generator=g).to(device)
        for m in range(p.num_mini_batches):
            mini_inds = perm[m * mini:(m + 1) * mini]
            mine = mini_inds[rank * accum * mb:(rank + 1) * accum * mb]
            for k in range(accum):
                idx = mine[k * mb:(k + 1) * mb]
                ids, mask, R = _trim(r.query_ids[idx], r.query_mask[idx], r.responses[idx], r.response_mask[idx],
                                     r.value_mask[idx])
                response_mask, vmask = r.response_mask[idx, :R], r.value_mask[idx, :R]
                with _autocast(device, p.bf16):
                    logits, new_values = response_logits_and_values(models, ids, mask, R)
                # One log-softmax serves the loss and the logged entropy.
                new_logprobs, entropy_t = logprobs_and_entropy_from_logits(logits, r.responses[idx, :R], p.temperature)
                pg_loss, pg_stats = policy_loss(new_logprobs, r.logprobs[idx, :R], batch.advantages[idx, :R],
                                                response_mask, p.cliprange)
                vf_loss, vf_stats = value_loss(new_values, r.values[idx, :R], batch.returns[idx, :R],
                                               vmask, p.cliprange_value)
                loss = pg_loss + p.vf_coef * vf_loss
                if bad is None and not bool(torch.isfinite(loss)):
                    bad = (f"non-finite PPO loss at update {update} (epoch {epoch + 1}, minibatch {m + 1}, micro-batch "
                           f"{k + 1}): policy loss={pg_loss.item()}, value loss={vf_loss.item()}")
                if bad is not None and not collective:  # wrapped: keep step with the others; raised below
                    break
                (loss / accum).backward()
                with torch.no_grad():
                    entropy = masked_mean(entropy_t, response_mask)
                for key, v in (("approxkl", pg_stats["approxkl"]), ("clipfrac", pg_stats["clipfrac"]),
                               ("entropy", entropy), ("pg_loss", pg_loss.detach()), ("vf_loss", vf_loss.detach()),
                               ("vf_clipfrac", vf_stats["vf_clipfrac"]), ("ratio", pg_stats["ratio"])):
                    sums[key] += v.float()
                count += 1
            # Every process must stop together (a lone raise would leave the others in the all-reduce).
            flag = torch.tensor(0.0 if bad is None else 1.0, device=device)
            if accelerator.num_processes > 1:
                flag = accelerator.reduce(flag, "sum")
            if float(flag) > 0:
                raise NonFiniteError(bad or f"non-finite PPO loss at update {update} on another process")
            if p.optim.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, p.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    stacked = torch.stack([sums[k] / max(count, 1) for k in keys])
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, "mean")
    v = dict(zip(keys, stacked.tolist()))
    # approxkl, entropy and ratio are means over the real response tokens; SFD/TRL log same-named
    # metrics (policy/approxkl_avg, policy/entropy_avg, val/ratio) as means over every position of
    # the padded [B, response_length] tensor, pads included, hence the distinct *_token_avg names.
    # clipfrac and the losses are masked means in SFD/TRL too and keep their names.
    return {"policy/approxkl_token_avg": v["approxkl"], "policy/clipfrac_avg": v["clipfrac"],
            "policy/entropy_token_avg": v["entropy"], "loss/policy_avg": v["pg_loss"], "loss/value_avg": v["vf_loss"],
            "val/clipfrac_avg": v["vf_clipfrac"], "val/ratio_token_avg": v["ratio"]}


# ========================================================================= metrics
def _check_finite(update: int, **tensors: Tensor) -> None:
    for name, x in tensors.items():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            raise NonFiniteError(f"non-finite {name} at update {update} ({int(bad.sum())} of {x.numel()} values NaN/inf)")


def rollout_metrics(batch: PPOBatch) -> dict[str, float]:
    """Step-8 metrics of steps 1-6 (SFD names + the response/advantage/return extras of DESIGN.md)."""
    r = batch.rollout
    mask = r.response_mask
    masked_logprobs = torch.where(mask, r.logprobs, torch.zeros_like(r.logprobs))
    lengths = mask.sum(1).float()
    scores = r.scores.float()
    corr = float("nan")
    if lengths.numel() > 1 and float(lengths.std()) > 0 and float(scores.std()) > 0:
        corr = float(torch.corrcoef(torch.stack([lengths, scores]))[0, 1])
    adv = batch.raw_advantages[mask]
    ret = batch.returns[r.value_mask]
    non_score = batch.non_score_reward.sum(1)
    return {
        "objective/kl": float(batch.kl.sum(1).mean()),
        "objective/entropy": float((-masked_logprobs).sum(1).mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/rlhf_reward": float((scores + non_score).mean()),
        "objective/scores": float(scores.mean()),
        "objective/rm_scores": float(r.rm_scores.float().mean()),
        # Responses that contain an EOS (TRL's val/num_eos_tokens counts EOS tokens in the raw samples).
        "val/num_eos_responses": int(r.contains_eos.sum()),
        "response/length_mean": float(lengths.mean()),
        "response/no_eos_rate": float(1.0 - r.contains_eos.float().mean()),
        "response/length_score_corr": corr,
        "advantages/mean": float(adv.mean()) if adv.numel() else 0.0,
        "advantages/std": float(adv.std()) if adv.numel() > 1 else 0.0,
        "advantages/min": float(adv.min()) if adv.numel() else 0.0,
        "advantages/max": float(adv.max()) if adv.numel() else 0.0,
        "returns/mean": float(ret.mean()) if ret.numel() else 0.0,
        "returns/std": float(ret.std()) if ret.numel() > 1 else 0.0,
    }


# ===================================================================== one update
def ppo_update(models: PPOModels, optimizer: torch.optim.Optimizer, scheduler, kl_ctl, prompts: Sequence[Any],
               update: int, first_episode: int, p: PPOConfig, response_length: int, sizes: BatchSizes,
               accelerator) -> dict[str, float]:
    """Steps 1-7 and the scheduler/KL-controller step of one PPO update, without monitoring or
    checkpointing: exactly the functions :func:`main` calls, in the same order (the throughput
    benchmark times this). Returns the metrics of the update."""
    t0 = time.perf_counter()
    rollout = collect_rollout(models, prompts, first_episode, p, response_length, accelerator)
    batch = compute_advantages(rollout, kl_ctl.value, p)
    metrics = rollout_metrics(batch)
    t1 = time.perf_counter()
    metrics.update(ppo_train(models, optimizer, batch, p, sizes, update, accelerator))
    metrics["lr"] = scheduler.get_last_lr()[0]
    scheduler.step()
    kl_ctl.update(metrics["objective/kl"], len(prompts))
    t2 = time.perf_counter()
    metrics.update({"perf/time_generation_s": rollout.time_generation_s, "perf/time_scoring_s": rollout.time_scoring_s,
                    "perf/time_training_s": t2 - t1, "perf/episodes_per_s": len(prompts) / (t2 - t0)})
    return metrics


# ========================================================================== loading
def load_ppo_models(cfg: RunConfig, device: torch.device, reward_fns: Sequence[tuple[float, Any]] = (),
                    engine: Optional[Engine] = None) -> tuple[PPOModels, str, str]:
    """Policy and reference from ``model.sft_policy`` (default ``<run>/sft/policy``), the reward
    of ``reward.sources`` (default: the RM at ``model.reward_model`` or ``<run>/rm/reward``) plus
    in-memory ``reward_fns`` ((weight, callable) pairs), critic from the RM (Huang) or a new
    value head on the SFT backbone. Returns (models, critic kind, note).
    ``engine``: places the trained models (policy, critic: ``Engine.prepare``) and the frozen
    ones (reference, trained RM: ``Engine.frozen``); None keeps them as loaded (fp32, unwrapped)."""
    from rlhflab.models.sources import sft_policy_dir
    from rlhflab.rewards import build_reward, trained_rm, trained_rm_dir

    sft_dir = sft_policy_dir(cfg)
    reward = build_reward(cfg, device, reward_fns)
    tokenizer = load_tokenizer(sft_dir, padding_side="left")
    policy = load_policy(sft_dir).to(device)
    lora = lora_active(cfg.model.lora, "ppo")
    if (lora or cfg.model.critic == "shared") and engine is not None and engine.wrapped:
        raise StageError("model.lora and model.critic=shared with several processes are not supported yet (peft "
                         "adapters and the shared value head are not wired into the FSDP2 engine); run them on one process")
    if lora:  # the reference is the policy with its adapter switched off: no second copy (TRL's peft PPO)
        policy = apply_lora(policy, cfg.model.lora, "causal", base_path=sft_dir)
        ref_policy = AdapterDisabledReference(policy)
    else:
        ref_policy = load_policy(sft_dir).to(device).eval().requires_grad_(False)
    rm = trained_rm(reward)
    rm_dir = trained_rm_dir(cfg, reward)
    same_tokens = rm is not None and is_decoder_rm(rm.model) and rm.tokenizer.get_vocab() == tokenizer.get_vocab()
    critic_kind, note = cfg.model.critic, ""
    if critic_kind == "reward" and rm is None:
        note = ("model.critic=reward needs a trained RM among reward.sources; the reward here is "
                f"{', '.join(reward.names)}, so the critic is a value head on a copy of the SFT policy (model.critic=policy)")
        log.warning(note)
        critic_kind = "policy"
    elif critic_kind == "reward" and not same_tokens:
        note = (f"model.critic=reward needs an RM that reads the policy's tokens; the RM at {rm_dir} "
                f"({type(rm.model).__name__}) has its own tokenizer, so the critic is a value head on a copy "
                f"of the SFT policy (model.critic=copy)")
        log.warning(note)
        critic_kind = "copy"
    if critic_kind == "shared":
        critic = SharedValueHead(policy, seed=cfg.ppo.seed)  # value head on the policy's own trunk
    elif critic_kind == "reward":
        critic = build_critic(rm_dir)  # Huang: the critic starts as the RM
    else:
        critic = build_critic(sft_dir, reinit_head=True, seed=cfg.ppo.seed)
    if lora and critic_kind != "shared":  # a separate critic gets its own adapter (+ trainable head)
        critic = apply_lora(critic, cfg.model.lora, "seq_cls", base_path=rm_dir if critic_kind == "reward" else sft_dir)
    models = prepare_ppo_models(PPOModels(policy, ref_policy, critic.to(device), reward, tokenizer))
    if engine is not None:
        models.policy = engine.prepare(models.policy)
        if critic_kind != "shared":  # the shared head lives on the policy's trunk
            models.critic = engine.prepare(models.critic)
        if not lora:  # the LoRA reference is a view of the policy
            models.ref_policy = engine.frozen(models.ref_policy)
        if rm is not None:
            rm.model = engine.frozen(rm.model)
    return models, critic_kind, note


def prepare_ppo_models(models: PPOModels) -> PPOModels:
    """Exact speed-ups applied to the four models before PPO (in place; returns ``models``).

    Tanh-GELU activations (GPT-2's Python-composed ``gelu_new``, or an already fused one)
    become :class:`~rlhflab.models.policy.TanhGELU` (:func:`~rlhflab.models.policy.fuse_gelu`):
    the same function up to float rounding, one kernel (on CPU five cheap in-place passes
    through ``sigmoid``) instead of ~8 per MLP forward, and the fused kernel's backward.
    Saved models are unaffected (their config still names the original activation).
    Attention stays transformers' default (``sdpa``): at the benchmark shape (gpt2 4x256,
    117 tokens, CPU, 1 thread) its forward+backward was ~3% faster than ``eager``.
    """
    for model in (models.policy, models.ref_policy, models.critic, *reward_modules(models.reward)):
        if isinstance(model, nn.Module):  # not the LoRA reference view (it computes with the policy's modules)
            fuse_gelu(model)
    return models


def load_prompts(cfg: RunConfig, tokenizer) -> list:
    """The SFT train split's queries (Huang trains PPO on the SFT dataset's queries); SFTExamples.
    data.task=standard: the prompts of ``data.prompt_dataset`` (``data.formats.load_prompt_data``)."""
    from rlhflab.data.formats import load_prompt_data

    examples, report = load_prompt_data(cfg, "train", tokenizer)
    if len(examples) < 1:
        raise StageError(f"ppo: no usable prompts in the train split of {report.file}")
    return examples


def make_kl_controller(p: PPOConfig):
    return AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl else FixedKLController(p.kl_coef)


def gold_score(cfg: RunConfig, prompts: Sequence[Any], texts: Sequence[str]) -> Optional[tuple[float, float]]:
    """Mean tldr-synth gold score of decoded responses on their raw posts, and its standard error
    over the batch (None for real data). The report uses the standard error to tell a change of
    the rollouts' gold score from sampling noise."""
    if cfg.data.task != "tldr-synth":
        return None
    from rlhflab.data.tldr_synth import gold_scores

    scores = torch.tensor(gold_scores([x.post for x in prompts], [t.strip() for t in texts]), dtype=torch.float64)
    if scores.numel() == 0:
        return None
    se = float(scores.std() / scores.numel() ** 0.5) if scores.numel() > 1 else float("nan")
    return float(scores.mean()), se


# ============================================================================= main
def main(cfg: RunConfig, resume: bool = False, force: bool = False, reward_fns: Sequence[tuple[float, Any]] = ()) -> dict:
    """Run (or resume) PPO; returns the final summary (also ``<run>/ppo/metrics.json``).

    ``reward_fns``: in-memory (weight, callable) reward functions added to ``reward.sources``
    (the Python API's way in: :func:`rlhflab.ppo`).

    ``resume``: continue from ``ppo/state/`` (fresh when none). ``force``: delete ``<run>/ppo``
    first. Without either, a finished stage is skipped and an unfinished one with a
    checkpoint is refused, naming ``--resume``.
    """
    from rlhflab.stages.common import (
        StopRequested,
        global_batch_indices,
        load_train_state,
        restore_optimization,
        make_accelerator,
        make_scheduler,
        prepare_stage_dir,
        stage_dirs,
        stop_after_step,
    )

    t_start = time.time()
    p = cfg.ppo
    accelerator = make_accelerator()
    engine = make_engine(cfg, accelerator)  # sharding, precision, checkpoints (rlhflab.parallel)
    if engine.pc.mixed_precision == "bf16" and not engine.wrapped:
        p = p.model_copy(update={"bf16": True})  # unsharded mixed precision is bf16 autocast, ppo.bf16's path
    is_main, device = accelerator.is_main_process, accelerator.device
    stage_dir, tb_dir = stage_dirs(cfg, "ppo")
    done = prepare_stage_dir(stage_dir, "policy", resume=resume, force=force, is_main=is_main)
    if done is not None:
        return done
    accelerator.wait_for_everyone()
    sizes = derive_batch("ppo", p.batch_size, p.micro_batch_size, accelerator.num_processes, p.num_mini_batches)
    num_updates = p.total_episodes // p.batch_size
    R = cfg.response_length
    if is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")

    # Models, prompts, optimizer (AdamW eps 1e-5 over policy + critic), linear LR anneal (Huang).
    seed_everything(p.seed)
    models, critic_kind, critic_note = load_ppo_models(cfg, device, reward_fns, engine)
    prompts = load_prompts(cfg, models.tokenizer)
    optimizer = engine.optimizer([x for x in list(models.policy.parameters()) + list(models.critic.parameters())
                                  if x.requires_grad], p.optim, fused=True)
    scheduler = make_scheduler(optimizer, "linear" if p.anneal_lr else "constant", num_updates, p.optim.warmup_ratio)
    kl_ctl = make_kl_controller(p)

    ckpts = CheckpointManager(stage_dir / "state")
    start, elapsed_before = 0, 0.0
    latest = ckpts.latest() if resume else None
    if latest is not None:
        check_resume_state(load_train_state(latest).get("policy", {}), models.policy, latest)
        state = engine.load_checkpoint(latest, {"policy": models.policy, "critic": models.critic}, optimizer)
        kl_ctl.load_state_dict(state["kl_controller"])
        start, elapsed_before = restore_optimization(state, optimizer, scheduler)
        del state

    def save_state(step: int) -> None:  # every process: a sharded state is written by all
        engine.save_checkpoint(ckpts, step, {"policy": models.policy, "critic": models.critic}, optimizer,
                               {"step": step, "episode": step * p.batch_size, "data_position": step * p.batch_size,
                                "scheduler": scheduler.state_dict(), "kl_controller": kl_ctl.state_dict(),
                                "rng": rng_state(), "elapsed_s": elapsed_before + time.time() - t_start})

    logger = make_logger(cfg, "ppo", stage_dir, tb_dir, enabled=is_main, resume_step=start if latest is not None else None)
    bar = progress(num_updates * p.batch_size, "ppo", enabled=is_main, unit="ep")
    bar.update(start * p.batch_size)
    monitor = KLMonitor(p.kl_monitor, write=bar.write if is_main else None)
    stop_at = stop_after_step()
    last: dict = {}
    verdict = "barely changed"
    gold_last: Optional[float] = None

    try:
        for update in range(start + 1, num_updates + 1):
            t0 = time.perf_counter()
            first_episode = (update - 1) * p.batch_size
            batch_prompts = [prompts[i] for i in global_batch_indices(len(prompts), p.batch_size, 1.0, p.seed, update - 1)]

            # Steps 1-4: rollout, logprobs/ref/values, truncation, RM scores (sharded, then gathered).
            rollout = collect_rollout(models, batch_prompts, first_episode, p, R, accelerator)
            _check_finite(update, scores=rollout.scores, values=rollout.values)
            # Steps 5-6: KL-shaped rewards, GAE, whitening -- on the global batch.
            batch = compute_advantages(rollout, kl_ctl.value, p)
            _check_finite(update, rewards=batch.rewards, advantages=batch.advantages)
            metrics = rollout_metrics(batch)

            # KL health of the policy that produced this rollout (the state after update-1). A
            # catastrophic KL stops here, before that state can reach a checkpoint; its row is logged.
            keep = ckpts.latest()
            try:
                verdict = monitor.check(update, metrics["objective/kl"],
                                        where=f"Last good checkpoint kept: {keep}." if keep else "No checkpoint was written.")
            except StageError:
                logger.log(update, {**metrics, "episode": first_episode, "kl/coef": kl_ctl.value,
                                    "kl/health": "catastrophic", "kl/health_code": verdict_code("catastrophic")})
                logger.close()
                bar.close()
                raise
            # Step 9 (deferred): the state after update-1 is now known to be healthy enough to keep.
            prev = update - 1
            stopping = stop_at is not None and prev >= stop_at and prev > start
            if prev > start and ((p.save_every and prev % p.save_every == 0) or stopping):
                save_state(prev)
            if stopping:
                bar.close()
                logger.close()
                raise StopRequested(f"ppo stopped after update {prev} (RLHFLAB_STOP_AFTER_STEP); continue with --resume")

            # Step 7: PPO epochs x minibatches x micro-batches.
            t1 = time.perf_counter()
            metrics.update(ppo_train(models, optimizer, batch, p, sizes, update, accelerator))
            metrics["lr"] = scheduler.get_last_lr()[0]
            scheduler.step()
            kl_ctl.update(metrics["objective/kl"], p.batch_size)
            t2 = time.perf_counter()

            # Step 8: log.
            metrics.update({
                "episode": update * p.batch_size, "kl/coef": kl_ctl.value, "kl/health": verdict,
                "kl/health_code": verdict_code(verdict), "perf/time_generation_s": rollout.time_generation_s,
                "perf/time_scoring_s": rollout.time_scoring_s, "perf/time_training_s": t2 - t1,
                "perf/episodes_per_s": p.batch_size / (t2 - t0),
            })
            if is_main and p.gold_eval_every and (update % p.gold_eval_every == 0 or update == num_updates):
                g = gold_score(cfg, batch_prompts, rollout.response_texts)
                if g is not None:
                    metrics["gold/score"], metrics["gold/score_se"] = g
                    gold_last = g[0]
            if p.snapshot_every and update % p.snapshot_every == 0:
                # The policy after this update, kept for `rlhflab overopt` (state/ckpt-* keeps only 2);
                # every process takes part in gathering a sharded policy, the main one writes.
                def write_snapshot(tmp: Path, state_dict: Optional[dict]) -> None:
                    models.policy.save_pretrained(tmp, state_dict=state_dict)
                    models.tokenizer.save_pretrained(tmp)
                engine.save_final(stage_dir / "snapshots" / f"update-{update:05d}", models.policy, write_snapshot)
            last = metrics
            if update % p.log_every == 0 or update == num_updates:
                logger.log(update, metrics)
            if p.sample_table_every and update % p.sample_table_every == 0:
                logger.log_table(update, sample_rows(batch_prompts, rollout.response_texts, rollout.scores.tolist(),
                                                     p.sample_table_rows))
            bar.update(p.batch_size)
            bar.set_postfix({"ep/s": f"{metrics['perf/episodes_per_s']:.1f}", "kl": f"{metrics['objective/kl']:.2f}",
                             "score": f"{metrics['objective/scores']:.3f}"})
    except NonFiniteError as e:
        bar.close()
        logger.close()
        keep = ckpts.latest()
        raise NonFiniteError(f"{e}; PPO stopped. " + (f"Last good checkpoint kept: {keep} (fix the cause, then --resume)."
                             if keep else "No checkpoint was written.")) from None
    bar.close()
    if num_updates > start:
        save_state(num_updates)

    # Outputs: ppo/policy (HF + tokenizer), ppo/value, metrics.json (its presence marks the stage finished).
    # Every process takes part in gathering the full weights; the main process writes them.
    result: dict = {}
    logger.close()
    tok = models.tokenizer
    from rlhflab.models.card import write_model_card
    from rlhflab.models.sources import sft_policy_dir

    card = {k: last[k] for k in ("objective/kl", "objective/scores", "objective/rlhf_reward", "gold/score") if k in last}

    def write_model(model, stage):
        def write(tmp: Path, state_dict: Optional[dict]) -> None:
            model.save_pretrained(tmp, state_dict=state_dict)
            tok.save_pretrained(tmp)
            write_model_card(tmp, cfg, stage, card, base_model=str(sft_policy_dir(cfg)))
        return write

    outputs: dict = {}
    if lora_active(cfg.model.lora, "ppo") or is_shared(models.critic):
        # LoRA: <ppo>/policy_adapter, value_adapter, and the merged models in policy/ and value/; the shared
        # critic's value/ holds only its head (it sits on ppo/policy). One process (refused otherwise).
        if is_main:
            outputs = save_outputs(models.policy, tok, stage_dir, "policy", cfg.model.lora, atomic_save_dir)
            outputs.update({("value_" + k if k == "adapter_dir" else k): v for k, v in
                            save_outputs(models.critic, tok, stage_dir, "value", cfg.model.lora, atomic_save_dir).items()})
    else:
        engine.save_final(stage_dir / "policy", models.policy, write_model(models.policy, "ppo"))
        engine.save_final(stage_dir / "value", models.critic, write_model(models.critic, "ppo-value"))
    if is_main:
        wall = elapsed_before + time.time() - t_start
        history = [row for row in _read_metrics(stage_dir) if "objective/kl" in row]
        result = {
            "update": num_updates, "episodes": num_updates * p.batch_size,
            "objective/kl": last.get("objective/kl", history[-1]["objective/kl"] if history else None),
            "kl/health": last.get("kl/health", history[-1].get("kl/health") if history else None),
            "objective/scores": last.get("objective/scores", history[-1].get("objective/scores") if history else None),
            "objective/rlhf_reward": last.get("objective/rlhf_reward"),
            "gold/score": gold_last if gold_last is not None else next(
                (row["gold/score"] for row in reversed(history) if row.get("gold/score") is not None), None),
            "kl/drifting_warnings": monitor.warnings,
            "critic": critic_kind, **({"critic_note": critic_note} if critic_note else {}),
            "num_processes": accelerator.num_processes, "batch/grad_accum": sizes.grad_accum,
            "time/wall_s": round(wall, 2), "perf/episodes_per_s": round(num_updates * p.batch_size / max(wall, 1e-9), 3),
            "policy_dir": str(stage_dir / "policy"), "value_dir": str(stage_dir / "value"),
            "lora": lora_active(cfg.model.lora, "ppo"), **outputs,
        }
        write_json(stage_dir / "metrics.json", result)
    accelerator.wait_for_everyone()
    if not is_main:
        result = json.loads((stage_dir / "metrics.json").read_text())
    return result


def _read_metrics(stage_dir: Path) -> list[dict]:
    from rlhflab.runtime import read_jsonl

    return read_jsonl(stage_dir / "metrics.jsonl")
