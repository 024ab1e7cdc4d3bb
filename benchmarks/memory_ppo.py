"""Peak memory of ONE PPO update, measured on this machine, beside `rlhflab plan`'s prediction.

    .venv/bin/python benchmarks/memory_ppo.py                       # fp32, Llama 6x512 (~34M/model)
    LAYERS=14 WIDTH=768 MODE=bf16_ckpt .venv/bin/python benchmarks/memory_ppo.py
    torchrun --nproc_per_node 2 benchmarks/memory_ppo.py           # 2 processes (MODE=ddp|fsdp2|offload)

Shape (the throughput benchmark's, benchmarks/ppo_throughput.py, whose model builder this
reuses): policy, reference, critic and reward model of the same randomly initialised Llama
(LAYERS x WIDTH, heads WIDTH/64, MLP 4*WIDTH, VOCAB, untied head); PROMPT_LEN random prompt
tokens, RESP_LEN sampled tokens; one update = BATCH episodes (global), 4 PPO epochs, one
minibatch, micro-batch = the per-process batch; fp32 AdamW over policy + critic. The update
is :func:`rlhflab.stages.ppo.ppo_update` (the function `rlhflab ppo` runs per update).

MODE (the ``parallel.*`` keys given to :func:`rlhflab.parallel.make_engine`, the engine
`rlhflab ppo` uses; :data:`MODES`): ``fp32`` (baseline); ``bf16_ckpt`` (bf16 mixed precision =
autocast with fp32 weights, + gradient checkpointing of policy and critic); ``ddp`` (N processes,
``sharding=none``: plain data parallel); ``fsdp2`` (FSDP2 sharding over N processes);
``offload`` (FSDP2 + CPU offload of params, grads and AdamW states).

Measured per process: peak resident set (``VmHWM`` of /proc/self/status) minus the resident
set just before the models are built (the Python/torch/transformers runtime, which the plan
does not model), and the update's wall time. On a CPU "device" and "host" memory are the same
RAM, so the plan's prediction compared is its device peak plus its host (offloaded) bytes.
Prints one JSON line per process (rank 0 last line also holds the max over ranks).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ENV = {k: os.environ.get(k, d) for k, d in (("LAYERS", "6"), ("WIDTH", "512"), ("VOCAB", "8192"), ("PROMPT_LEN", "64"),
                                            ("RESP_LEN", "53"), ("BATCH", "8"), ("MODE", "fp32"))}


MODES = {"fp32": [], "bf16_ckpt": ["parallel.mixed_precision=bf16", "parallel.gradient_checkpointing=true"],
         "ddp": [], "fsdp2": ["parallel.sharding=fsdp2"],
         "offload": ["parallel.sharding=fsdp2", "parallel.cpu_offload=true"]}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def prediction(L: int, W: int, V: int, P: int, R: int, B: int, nproc: int, mode: str) -> dict:
    from rlhflab.plan import Arch, PlanInputs, plan_stage

    arch = Arch("llama", W, L, max(1, W // 64), 4 * W, V, tied=False, max_positions=512)
    per = B // nproc
    x = PlanInputs(policy=arch, reward=arch, critic_from_policy=False, gpus=nproc, device="cpu",
                   sharding="fsdp2" if mode in ("fsdp2", "offload") else "none",
                   mixed_precision="bf16" if mode == "bf16_ckpt" else "no",
                   cpu_offload=mode == "offload", gradient_checkpointing=mode == "bf16_ckpt",
                   query_length=P, response_length=R, ppo_micro_batch=per,
                   ppo_per_process_batch=per, rollout_batch=per, forward_batch=per)
    sp = plan_stage(x, "ppo")
    return {"predicted_gib": round((sp.peak_bytes + sp.host_bytes) / 2**30, 3), "predicted_phase": sp.peak_phase,
            "predicted_terms_gib": sp.as_dict()["terms_gib"], "predicted_parts_gib": sp.as_dict()["parts_gib"],
            "params": sp.params}


def one_update(L: int, W: int, V: int, P: int, R: int, B: int, mode: str, acc) -> tuple[float, int]:
    """Build the four models and run one PPO update; returns (seconds, RSS in KiB after the build)."""
    import torch

    from rlhflab.config import PPOConfig, derive_batch
    from rlhflab.stages.common import make_scheduler
    from rlhflab.stages.ppo import Prompt, make_kl_controller, ppo_update
    from ppo_throughput import build

    nproc = acc.num_processes
    per = B // nproc
    from rlhflab.config import load_config
    from rlhflab.parallel import make_engine

    models, _ = build("llama", L, W, V)
    # The engine `rlhflab ppo` uses (rlhflab.parallel), configured by the mode's parallel.* keys.
    engine = make_engine(load_config("default", MODES[mode]), acc)
    models.policy, models.critic = engine.prepare(models.policy), engine.prepare(models.critic)
    models.ref_policy, models.reward.model = engine.frozen(models.ref_policy), engine.frozen(models.reward.model)
    bf16_autocast = engine.pc.mixed_precision == "bf16" and not engine.wrapped  # as stages/ppo.py main()
    p = PPOConfig(total_episodes=2 * B, batch_size=B, micro_batch_size=per, num_mini_batches=1, ppo_epochs=4,
                  temperature=0.7, kl_coef=0.05, response_length=R, missing_eos="subtract", missing_eos_penalty=1.0,
                  bf16=bf16_autocast, optim={"lr": 3e-6, "eps": 1e-5})
    sizes = derive_batch("ppo", B, per, nproc, 1)
    opt = engine.optimizer(list(models.policy.parameters()) + list(models.critic.parameters()), p.optim, fused=True)
    sched = make_scheduler(opt, "linear", 2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (B, P), generator=g).tolist()
    prompts = [Prompt(q, models.tokenizer.decode(q), "") for q in ids]
    built_kib = _status_kib("VmRSS")
    t = time.perf_counter()
    ppo_update(models, opt, sched, make_kl_controller(p), prompts, 1, 0, p, R, sizes, acc)
    return time.perf_counter() - t, built_kib


def main() -> dict:
    import gc

    import torch

    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    from rlhflab.stages.common import make_accelerator

    L, W, V = int(ENV["LAYERS"]), int(ENV["WIDTH"]), int(ENV["VOCAB"])
    P, R, B, mode = int(ENV["PROMPT_LEN"]), int(ENV["RESP_LEN"]), int(ENV["BATCH"]), ENV["MODE"]
    acc = make_accelerator()
    nproc, rank = acc.num_processes, acc.process_index
    # Warm-up: the same update on a 1x64 model loads every lazily imported module and kernel, so
    # that the baseline below is the runtime, not the first use of a code path.
    one_update(1, 64, 256, 8, 4, nproc, mode, acc)
    gc.collect()
    _reset_hwm()
    base_kib = _status_kib("VmRSS")
    sec, built_kib = one_update(L, W, V, P, R, B, mode, acc)
    peak_kib = _status_kib("VmHWM")
    out = {"mode": mode, "nproc": nproc, "rank": rank, **{k.lower(): int(v) for k, v in ENV.items() if k != "MODE"},
           "measured_gib": round((peak_kib - base_kib) / 2**20, 3), "peak_rss_gib": round(peak_kib / 2**20, 3),
           "runtime_rss_gib": round(base_kib / 2**20, 3), "after_build_gib": round((built_kib - base_kib) / 2**20, 3),
           "update_s": round(sec, 2), "threads": torch.get_num_threads()}
    out.update(prediction(L, W, V, P, R, B, nproc, mode))
    m = out["measured_gib"]  # a toy shape can round to 0 GiB above the runtime
    out["error_pct"] = round(100 * (out["predicted_gib"] - m) / m, 1) if m > 0 else None
    if nproc > 1:
        from accelerate.utils import gather_object

        out["measured_gib_all_ranks"] = gather_object([out["measured_gib"]])
    return out


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
