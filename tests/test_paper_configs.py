"""The paper configs follow SFD (vwxyzjn/summarize_from_feedback_details) exactly where the
recipe is concerned: SFT loss on query + response, no gradient clipping and no warmup in any
stage, SFD's placement of the score, the critic from the RM, SFD's budgets (issue 11)."""

import pytest

from rlhflab.config import load_config

PAPER = ["tldr-pythia-1b", "tldr-pythia-1b-1gpu", "tldr-llama-3.2-1b-1gpu"]


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_follows_sfd(name):
    cfg = load_config(name)
    assert cfg.data.task == "tldr"
    assert cfg.data.max_query_length == 512 and cfg.data.response_length == 53
    assert cfg.pref_response_length == 169                      # SFD tldr_params.max_rm_response_length
    assert cfg.rm_max_length >= 638                             # SFD max_rm_query_response_length: nothing cut
    assert cfg.sft.loss_on_query                                # SFD sft.py: labels = the whole query + response
    for stage in (cfg.sft, cfg.rm, cfg.ppo):
        assert stage.optim.max_grad_norm == 0                   # SFD never clips gradients
        assert stage.optim.warmup_ratio == 0                    # SFD warm_up_steps = 0
        assert stage.optim.eps == 1e-5
    p = cfg.ppo
    assert p.score_placement == "after_eos" and cfg.model.critic == "reward"
    assert (p.temperature, p.kl_coef, p.gamma, p.lam, p.cliprange, p.cliprange_value, p.vf_coef) == (0.7, 0.05, 1.0, 0.95, 0.2, 0.2, 0.1)
    assert (p.ppo_epochs, p.num_mini_batches, p.whiten_rewards, p.anneal_lr) == (4, 1, False, True)
    assert (p.missing_eos, p.missing_eos_penalty, p.kl_estimator) == ("replace", -1.0, "k1")
