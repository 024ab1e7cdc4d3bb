"""The shared-trunk critic (``model.critic=shared``): a value head on the policy's own backbone.

The seed repo (Stiennon et al. / SFD's predecessor) describes the value network as "an
additional head on top of the LLM backbone". :class:`SharedValueHead` is that head: a
``Linear(d_model, 1)`` reading the policy's final hidden states (after the final norm, the
same features the LM head reads). It owns only the head's parameters -- the policy is
referenced, not registered as a submodule -- so the optimizer list ``policy + critic``
holds each parameter once and the critic's state dict (checkpoints) is the head alone.

One forward gives logits and values: :meth:`SharedValueHead.capture` hooks the policy's
trunk (``policy.base_model``, the ``LlamaModel``/``GPT2Model``) and keeps its output while
the policy computes its logits, so PPO's training step runs the backbone once for both.
For the rollout's values (no logits needed) ``token_scores`` reads ``base_model`` and
``score`` of this object like any decoder critic: one trunk forward, no LM head.

Choice (documented in the README): the value loss's gradient flows into the shared trunk,
as in the seed repo's shared network, scaled by ``ppo.vf_coef`` (0.1 by default). Effect:
the trunk is shaped by both objectives -- features that predict returns are also the
policy's features, which can help early and can also pull the policy (its KL to the
reference moves with the value loss, not only with the policy gradient). Huang et al.
keep a separate critic (``model.critic=reward``, the default) precisely to avoid that
coupling; ``shared`` trades it for one model copy and one backbone pass fewer. With LoRA
the trunk's base stays frozen and the value gradient reaches the adapter only.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor, nn


class _Captured:
    hidden: Optional[Tensor] = None


class SharedValueHead(nn.Module):
    """Value head ``Linear(d, 1)`` on ``policy``'s trunk; N(0, 1/sqrt(d+1)) init, bias 0 (as the RM head, Huang)."""

    def __init__(self, policy: nn.Module, seed: int = 0):
        super().__init__()
        object.__setattr__(self, "_policy", policy)  # not a submodule: its parameters stay the policy's
        d = policy.config.hidden_size
        ref = policy.get_input_embeddings().weight
        self.score = nn.Linear(d, 1, bias=True, device=ref.device, dtype=ref.dtype)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.score.weight.copy_(torch.randn(self.score.weight.shape, generator=g) / math.sqrt(d + 1))
            self.score.bias.zero_()

    @property
    def policy(self) -> nn.Module:
        return self._policy

    @property
    def base_model(self) -> nn.Module:
        """The policy's trunk, so that :func:`rlhflab.models.reward.token_scores` reads this critic as any other."""
        return self._policy.base_model

    @property
    def config(self):
        return self._policy.config

    @contextmanager
    def capture(self):
        """Inside: every forward of the policy's trunk stores its final hidden states in ``captured.hidden``."""
        captured = _Captured()

        def hook(_module, _inputs, output):
            captured.hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state

        handle = self.base_model.register_forward_hook(hook)
        try:
            yield captured
        finally:
            handle.remove()

    def values_from_hidden(self, hidden: Tensor) -> Tensor:
        """Values [B, T] from the trunk's final hidden states [B, T, d]."""
        return self.score(hidden).squeeze(-1)

    def save_pretrained(self, out_dir) -> None:
        """``value_head.safetensors`` (weight [1, d], bias [1]) + ``value_head.json``: the head
        sits on the PPO policy saved beside it (``ppo/policy``: its ``base_model``'s last hidden state)."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.score.state_dict().items()},
                  str(out / "value_head.safetensors"))
        (out / "value_head.json").write_text(json.dumps({
            "kind": "shared", "hidden_size": self.score.in_features,
            "reads": "final hidden state of the policy's base_model (after the final norm), every position",
            "policy": "../policy"}, indent=1) + "\n")


def is_shared(critic) -> bool:
    return isinstance(critic, SharedValueHead)
