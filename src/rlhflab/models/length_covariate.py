"""A learned length term in the Bradley-Terry loss: a length-debiased reward model (``rm.length_covariate``).

Labelers, real and simulated, prefer longer summaries at equal quality (tldr-synth's labelers by
``data.synth.labeler_len_beta`` = 0.03 per word; Stiennon et al. 2020 and Singhal et al. 2023,
"A Long Way to Go", report the same of real ones). A plain RM learns that preference as part of
its score, and PPO then buys reward with length. With the covariate the RM is fit as

    P(chosen > rejected) = sigmoid(r(x, y_c) - r(x, y_r) + w * (words(y_c) - words(y_r)))

with one scalar ``w`` learned jointly with ``r``. ``w`` absorbs the length preference the labels
show; the reward that PPO, evaluation and serving read is ``r`` alone. This is the idea of ODIN
(Chen et al. 2024, "Disentangled reward mitigates hacking in RLHF"), which splits the score into
a length head and a quality head; here the length part is the simplest one, linear in words,
the form tldr-synth's labelers use. It is not in Huang et al.: off by default and in the paper
configs (``rm.length_covariate=false``), on in the tldr-synth default (benchmarks/RESULTS.md).

Why by hand: ``w`` is one scalar outside the model. It gets its own AdamW and schedule (the
model's optimizer may hold FSDP2 shards, with which a plain tensor does not mix in
``clip_grad_norm_`` or in distributed checkpoints), its gradient is averaged over processes here
(the model's gradients are averaged by DDP/FSDP2), and its state rides in the checkpoint's
``meta``. Words (whitespace-separated) rather than tokens: independent of the RM's tokenizer, and
the unit of the RM's length diagnostics (``eval/length_coef``).
"""

from __future__ import annotations

from typing import Sequence

import torch

CONFIG_KEY = "rlhflab_length_covariate"  # w, recorded in the saved RM's config.json (not used for scoring)


def word_count_diff(chosen: Sequence[str], rejected: Sequence[str]) -> torch.Tensor:
    """words(chosen_i) - words(rejected_i) as float32 [B]."""
    return torch.tensor([len(c.split()) - len(r.split()) for c, r in zip(chosen, rejected)], dtype=torch.float32)


class LengthCovariate:
    """The scalar ``w`` with its optimizer and schedule (the model's schedule shape, ``w``'s own lr)."""

    def __init__(self, optim, total_steps: int, warmup_ratio: float, device: torch.device):
        from rlhflab.stages.common import make_optimizer, make_scheduler

        self.w = torch.zeros((), device=device, requires_grad=True)
        # No weight decay on w: decaying it would push the length preference back into r.
        self.optimizer = make_optimizer([self.w], optim.model_copy(update={"weight_decay": 0.0}))
        self.scheduler = make_scheduler(self.optimizer, "cosine", total_steps, warmup_ratio)

    def offset(self, chosen: Sequence[str], rejected: Sequence[str]) -> torch.Tensor:
        """w * (words(chosen) - words(rejected)): [B], added to r_chosen - r_rejected in the loss."""
        return self.w * word_count_diff(chosen, rejected).to(self.w.device)

    def step(self, num_processes: int) -> None:
        """Average w's gradient over processes (as DDP/FSDP2 do for the model), step, clear."""
        if self.w.grad is not None and num_processes > 1:
            import torch.distributed as dist

            dist.all_reduce(self.w.grad)
            self.w.grad /= num_processes
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def value(self) -> float:
        return float(self.w.detach())

    def state_dict(self) -> dict:
        return {"w": self.w.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
