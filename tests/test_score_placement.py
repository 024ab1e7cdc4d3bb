"""Where the RM score lands (SFD/TRL: one position after the EOS, with that position in the value
mask; or on the EOS), checked by hand and against SFD's ppo.py step 4-6 formulas on the same tensors;
and the critic starting from the RM *minus the RM bias* (SFD's ScalarModel)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from rlhflab.algos import INVALID_LOGPROB, compute_gae, kl_shaped_rewards, masked_whiten, score_positions, value_mask
from rlhflab.config import PPOConfig

T_, F_ = True, False


def test_value_mask_and_score_positions_by_hand():
    mask = torch.tensor([[T_, T_, F_, F_],   # EOS at 1 -> extra position 2
                         [T_, T_, T_, T_],   # fills the budget (no EOS or EOS last) -> nothing to add
                         [T_, T_, T_, F_],   # EOS at 2 -> extra position 3
                         [F_, F_, F_, F_]])  # empty row stays empty
    assert value_mask(mask, "after_eos").tolist() == [[T_, T_, T_, F_], [T_, T_, T_, T_], [T_, T_, T_, T_], [F_] * 4]
    assert value_mask(mask, "eos").tolist() == mask.tolist()
    assert score_positions(mask, "after_eos").tolist() == [2, 3, 3, -1]
    assert score_positions(mask, "eos").tolist() == [1, 3, 2, -1]
    with pytest.raises(ValueError, match="score_placement"):
        value_mask(mask, "later")


def test_after_eos_rewards_by_hand():
    G = 9.0  # garbage at masked positions
    logprobs = torch.tensor([[-1.0, -2.0, G], [-0.5, -0.5, -1.0]], dtype=torch.float64)
    ref_logprobs = torch.tensor([[-1.5, -1.0, -G], [-1.0, 0.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[T_, T_, F_], [T_, T_, T_]])
    scores = torch.tensor([2.0, 1.0], dtype=torch.float64)
    rewards, kl, _ = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1, score_placement="after_eos")
    # row 0: kl = [0.5, -1, 0]; the score (2) one position after the EOS (index 2), where kl is 0
    # row 1: no room after the last token: the score lands on it (SFD's actual_end fallback)
    assert kl.tolist() == [[0.5, -1.0, 0.0], [0.5, -0.5, 0.0]]
    for row, exp in zip(rewards.tolist(), [[-0.05, 0.1, 2.0], [-0.05, 0.05, 1.0]]):
        assert row == pytest.approx(exp, abs=1e-15)


def test_gae_and_returns_by_hand_for_both_placements():
    # One response of 2 real tokens in a budget of 3: kl-shaped rewards r = [-0.05, 0.1], score 2,
    # values V = [0.5, 0.2] at the two tokens and V_eos+1 = 1.0 after the EOS; gamma 1, lambda 0.5.
    lam = 0.5
    nsr = torch.tensor([[-0.05, 0.1, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[T_, T_, F_]])
    values = torch.tensor([[0.5, 0.2, 1.0]], dtype=torch.float64)

    # after_eos: rewards [-0.05, 0.1, 2]; the mask runs to index 2.
    #   delta_2 = 2 - 1.0 = 1.0; delta_1 = 0.1 + 1.0 - 0.2 = 0.9; delta_0 = -0.05 + 0.2 - 0.5 = -0.35
    #   A_2 = 1.0; A_1 = 0.9 + 0.5 * 1.0 = 1.4; A_0 = -0.35 + 0.5 * 1.4 = 0.35; returns = A + V
    r = nsr.clone()
    r[0, 2] += 2.0
    adv, ret = compute_gae(r, values, value_mask(mask, "after_eos"), 1.0, lam)
    assert adv[0].tolist() == pytest.approx([0.35, 1.4, 1.0], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([0.85, 1.6, 2.0], abs=1e-12)

    # eos: rewards [-0.05, 2.1]; the episode ends at the EOS; V_eos+1 is not read.
    #   delta_1 = 2.1 - 0.2 = 1.9; delta_0 = -0.05 + 0.2 - 0.5 = -0.35; A_1 = 1.9; A_0 = -0.35 + 0.95 = 0.6
    r = nsr.clone()
    r[0, 1] += 2.0
    adv, ret = compute_gae(r, values, value_mask(mask, "eos"), 1.0, lam)
    assert adv[0].tolist() == pytest.approx([0.6, 1.9, 0.0], abs=1e-12)
    assert ret[0].tolist() == pytest.approx([1.1, 2.1, 0.0], abs=1e-12)


def _sfd_steps_4_to_6(scores, logprobs, ref_logprobs, values, sequence_lengths, kl_coef, gamma, lam, whiten_rewards):
    """SFD's ppo.py steps 4-6 written out as that file does them (padding masks from
    ``sequence_lengths``, INVALID_LOGPROB fills, a GAE loop over every position), for comparison."""
    B, T = logprobs.shape
    sequence_lengths_p1 = sequence_lengths + 1
    response_idxs = torch.arange(T).repeat(B, 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    padding_mask_p1 = response_idxs > sequence_lengths_p1.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    values = torch.masked_fill(values, padding_mask_p1, 0)
    kl = logprobs - ref_logprobs
    rewards = -kl_coef * kl
    actual_end = torch.where(sequence_lengths_p1 < T, sequence_lengths_p1, sequence_lengths)
    rewards[torch.arange(B), actual_end] += scores
    if whiten_rewards:
        rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    lastgaelam, advantages_reversed = 0, []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return rewards, advantages, returns, ~padding_mask, ~padding_mask_p1


@pytest.mark.parametrize("whiten_rewards", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_advantages_equals_sfd(seed, whiten_rewards):
    from rlhflab.stages.ppo import Rollout, compute_advantages

    g = torch.Generator().manual_seed(seed)
    B, T = 6, 7
    lengths = torch.tensor([0, 2, 6, 6, 3, 5])  # index of the last real token; 6 = fills the budget
    response_mask = torch.arange(T).unsqueeze(0) <= lengths.unsqueeze(1)
    logprobs = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref_logprobs = logprobs + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    p = PPOConfig(kl_coef=0.07, lam=0.9, whiten_rewards=whiten_rewards, score_placement="after_eos")

    rewards, advantages, returns, pmask, vmask_sfd = _sfd_steps_4_to_6(
        scores, logprobs, ref_logprobs, values, lengths, p.kl_coef, p.gamma, p.lam, whiten_rewards)

    vmask = value_mask(response_mask, "after_eos")
    assert torch.equal(vmask, vmask_sfd) and torch.equal(response_mask, pmask)
    # rlhflab's rollout: INVALID logprobs and zero values outside their masks (as collect_rollout writes them)
    inv = torch.full_like(logprobs, INVALID_LOGPROB)
    rollout = Rollout(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1, dtype=torch.bool), torch.zeros(B, T, dtype=torch.long),
                      response_mask, torch.ones(B, dtype=torch.bool), torch.where(response_mask, logprobs, inv),
                      torch.where(response_mask, ref_logprobs, inv), vmask, torch.where(vmask, values, torch.zeros_like(values)),
                      scores, scores, [""] * B, 0.0, 0.0)
    batch = compute_advantages(rollout, p.kl_coef, p)
    torch.testing.assert_close(batch.rewards, rewards, rtol=0, atol=1e-12)
    torch.testing.assert_close(batch.advantages, advantages, rtol=0, atol=1e-12)
    # returns: SFD's are advantages + values everywhere (0 + 0 past the value mask); ours are 0 outside it
    torch.testing.assert_close(batch.returns, torch.where(vmask, returns, torch.zeros_like(returns)), rtol=0, atol=1e-12)
    assert (returns[~vmask] == 0).all()
    # ... and the EOS placement differs (so the test can tell the two apart)
    other = compute_advantages(rollout._replace(value_mask=response_mask), p.kl_coef, p.model_copy(update={"score_placement": "eos"}))
    assert not torch.allclose(other.advantages, advantages, atol=1e-3)


def _tiny_rm_dir(tmp_path, bias: float):
    from rlhflab.config import ArchConfig
    from rlhflab.models.policy import build_policy
    from rlhflab.models.reward import RewardModel, build_reward_backbone
    from ppo_fixtures import make_tokenizer

    tok = make_tokenizer()
    policy = build_policy(tok, arch=ArchConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                               max_position_embeddings=64), seed=0)
    policy.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    rm = RewardModel(build_reward_backbone(str(tmp_path / "sft"), tok, seed=1), tok, bias=bias, max_length=64)
    with torch.no_grad():  # a head large enough that a missing or doubled shift shows
        rm.model.score.weight.mul_(5.0)
    rm.save(tmp_path / "rm")
    return tok, rm


def test_critic_from_rm_reads_the_normalised_score(tmp_path):
    from rlhflab.models.reward import RewardModel, ShiftedLinear, build_critic, last_token_index, token_scores

    tok, _ = _tiny_rm_dir(tmp_path, bias=0.75)
    rm = RewardModel.from_pretrained(tmp_path / "rm")
    critic = build_critic(tmp_path / "rm")
    assert isinstance(critic.score, ShiftedLinear) and float(critic.score.shift) == 0.75
    ids, mask = rm.encode(["my cat kept the deposit"], ["help now"])
    raw_head = token_scores(rm.model, ids, mask)
    values = token_scores(critic, ids, mask)
    # Every value is the RM's raw head minus the RM bias (SFD: scalar_head(h) - config.bias) ...
    torch.testing.assert_close(values, raw_head - 0.75, rtol=0, atol=1e-6)
    # ... so at the EOS the critic's first value IS the normalised score PPO is trained on.
    at_eos = values.gather(1, last_token_index(mask).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(at_eos, rm.score_texts(["my cat kept the deposit"], ["help now"]), rtol=0, atol=1e-6)
    assert not torch.allclose(values, raw_head, atol=0.5)  # the shift is really there
    # The shift is not a saved tensor: the state dict is that of a plain head (plain transformers loads it).
    assert "score.shift" not in critic.state_dict()
    critic.save_pretrained(tmp_path / "value")
    reloaded = build_critic(tmp_path / "value")
    torch.testing.assert_close(token_scores(reloaded, ids, mask), values, rtol=0, atol=0)
    # A critic on the policy (new head) has no shift.
    fresh = build_critic(tmp_path / "sft", reinit_head=True)
    assert not isinstance(fresh.score, ShiftedLinear)


def test_rm_row_keeps_the_query_head(tmp_path):
    from rlhflab.models.reward import RewardModel

    tok, rm = _tiny_rm_dir(tmp_path, bias=0.0)
    rm = RewardModel(rm.model, tok, max_length=12)
    query = "SUBREDDIT: r/relationships TITLE: help POST: my cat kept the deposit he she rent money job TL;DR:"
    q = tok(query, add_special_tokens=False)["input_ids"]
    r = tok("help now", add_special_tokens=False)["input_ids"]
    row = rm._decoder_row(q, r)
    assert len(row) == 12 and row[-1] == tok.eos_token_id
    room = 12 - len(r) - 1  # 9 query tokens fit: the head and the last tail = min(8, 9 // 2) = 4
    tail = min(RewardModel.QUERY_TAIL, room // 2)
    assert row[: room - tail] == q[: room - tail]          # SUBREDDIT / TITLE survive
    assert row[room - tail: room] == q[-tail:]             # ... and the "TL;DR:" cue before the response
    assert tok.decode(row[:2]) == "SUBREDDIT: r/relationships"
    assert row[room:] == r + [tok.eos_token_id]
    # A row that fits is untouched.
    assert RewardModel(rm.model, tok, max_length=64)._decoder_row(q, r) == q + r + [tok.eos_token_id]


def test_rm_max_length_default_holds_query_and_response():
    from rlhflab.config import load_config

    cfg = load_config("default")
    assert cfg.rm.max_length is None
    assert cfg.rm_max_length == cfg.data.max_query_length + cfg.pref_response_length
    cfg = load_config("default", ["rm.max_length=300"])
    assert cfg.rm_max_length == 300
    # real TL;DR: SFD's 512-token query + 169-token responses fit (SFD's RM reads 638 at most)
    assert load_config("default", ["data.task=tldr", "data.max_query_length=512"]).rm_max_length == 512 + 169
