"""One PPO update of a 1B-parameter Llama (random weights, bf16) at the 1-GPU config's shape:
time and peak memory per phase, beside `rlhflab plan`'s prediction. Prints one JSON object.

Run through ``benchmarks/gpu_check.sh`` (it installs rlhflab with ``--no-deps`` and checks the
few packages this needs: torch, transformers, tokenizers, pydantic, pyyaml, numpy; no
accelerate, no network). ``GPU_CHECK_TINY=1``: a 2x64 Llama at a tiny shape, on the GPU if
there is one, else on the CPU -- what the test suite runs (tests/test_gpu_check.py).

Shape: ``CONFIG`` (default tldr-llama-3.2-1b-1gpu): its policy architecture (read by the planner
from its table of public configs, no download), PPO batch, micro-batch, rollout and forward
batches, query length (prompts of exactly ``data.max_query_length`` random tokens) and
response length; policy, reference, critic and RM all of that architecture, randomly
initialised, placed by :func:`rlhflab.parallel.make_engine` as ``rlhflab ppo`` places them
(trained models in ``model.dtype``, bf16 autocast for ``parallel.mixed_precision=bf16``, gradient
checkpointing; frozen ones in ``model.frozen_dtype``). The phases are the steps of
:func:`rlhflab.stages.ppo.ppo_update` -- rollout (sampling + ref/critic/RM forwards), advantages,
training (4 PPO epochs) -- with the peak-memory counter reset between them.
Measured peak: ``torch.cuda.max_memory_allocated`` (allocated tensors, what the plan predicts;
``max_memory_reserved`` is printed too); on CPU the resident-set growth (VmHWM minus the RSS
before the models are built).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

TINY = os.environ.get("GPU_CHECK_TINY") == "1"
CONFIG = os.environ.get("CONFIG", "tldr-llama-3.2-1b-1gpu")
# Tiny mode: the same code on a 2-layer, 64-wide Llama, 4 episodes, 16+8 tokens.
TINY_OVERRIDES = ["data.max_query_length=16", "data.response_length=8", "ppo.batch_size=4", "ppo.micro_batch_size=2",
                  "ppo.rollout_batch_size=2", "ppo.forward_batch_size=2", "ppo.total_episodes=4"]


def _rss_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def write_arch(folder: Path, arch) -> None:
    """An HF config.json of ``arch`` (a plan.Arch), so the model builder and the planner read one file."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=arch.hidden, num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                num_key_value_heads=arch.kv_heads or arch.heads, head_dim=arch.head_dim or arch.hidden // arch.heads,
                intermediate_size=arch.intermediate, vocab_size=arch.vocab, tie_word_embeddings=arch.tied,
                max_position_embeddings=min(arch.max_positions, 4096), pad_token_id=0, eos_token_id=1, bos_token_id=1,
                num_labels=1, attention_dropout=0.0).save_pretrained(folder)


def main() -> dict:
    import torch
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from rlhflab.config import derive_batch, load_config
    from rlhflab.models.policy import disable_dropout
    from rlhflab.models.reward import RewardModel
    from rlhflab.parallel import make_engine
    from rlhflab.plan import KNOWN_ARCHS, Arch, plan
    from rlhflab.stages.common import make_optimizer, make_scheduler
    from rlhflab.stages.ppo import (PPOModels, Prompt, collect_rollout, compute_advantages, make_kl_controller,
                                    ppo_train, prepare_ppo_models)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    base_cfg = load_config(CONFIG)
    arch = Arch("llama", 64, 2, 2, 128, 512, tied=True) if TINY else KNOWN_ARCHS[base_cfg.model.policy]
    write_arch(tmp / "arch", arch)
    cfg = load_config(CONFIG, [f"model.policy={tmp / 'arch'}"] + (TINY_OVERRIDES if TINY else []))
    p, V = cfg.ppo, arch.vocab
    p = p.model_copy(update={"bf16": cfg.parallel.mixed_precision == "bf16"})  # one process, unwrapped: bf16 autocast
    Q, R, B = cfg.data.max_query_length, cfg.response_length, p.batch_size

    tk = Tokenizer(tk_models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t1", unk_token="t0")
    tok.padding_side = "left"
    hf = AutoConfig.from_pretrained(tmp / "arch")

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_kib = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    acc = SimpleNamespace(device=device, num_processes=1, process_index=0)  # one process: no accelerate needed
    engine = make_engine(cfg, acc)  # model.dtype, model.frozen_dtype, checkpointing: as `rlhflab ppo` places them
    with torch.device(device):
        policy = engine.prepare(disable_dropout(LlamaForCausalLM(hf)))
        ref = engine.frozen(disable_dropout(LlamaForCausalLM(hf)))
        critic = engine.prepare(disable_dropout(LlamaForSequenceClassification(hf)))
        rm = engine.frozen(disable_dropout(LlamaForSequenceClassification(hf)))
    models = prepare_ppo_models(PPOModels(policy, ref, critic, RewardModel(rm, tok, bias=0.0, max_length=Q + R + 2), tok))
    build_s = time.perf_counter() - t0
    sizes = derive_batch("ppo", B, p.micro_batch_size, 1, p.num_mini_batches)
    opt = make_optimizer(list(policy.parameters()) + list(critic.parameters()), p.optim, fused=True)
    sched = make_scheduler(opt, "linear", 2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (B, Q), generator=g).tolist()
    prompts = [Prompt(q, tok.decode(q), "") for q in ids]

    def peak() -> float:
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        return (_rss_kib("VmHWM") - base_kib) / 2**20

    phases: dict[str, dict] = {"build": {"s": round(build_s, 2), "peak_gib": round(peak(), 3)}}
    kl_ctl = make_kl_controller(p)
    # The steps of ppo_update (rlhflab/stages/ppo.py), with the peak counter reset between phases.
    for name in ("rollout", "advantages", "training"):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        if name == "rollout":
            rollout = collect_rollout(models, prompts, 0, p, R, acc, forward_batch_size=p.forward_batch_size)
        elif name == "advantages":
            batch = compute_advantages(rollout, kl_ctl.value, p)
        else:
            stats = ppo_train(models, opt, batch, p, sizes, 1, acc)
            sched.step()
        if cuda:
            torch.cuda.synchronize()
        phases[name] = {"s": round(time.perf_counter() - t, 2), "peak_gib": round(peak(), 3)}
        if cuda:
            phases[name]["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)

    sp = plan(cfg, gpus=1, stages=("ppo",), device=device.type)[0]
    measured = max(v["peak_gib"] for v in phases.values())
    return {
        "config": CONFIG, "tiny": TINY, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "params": sp.params, "shape": {"batch": B, "micro_batch": p.micro_batch_size,
        "rollout_batch": p.rollout_batch_size, "forward_batch": p.forward_batch_size, "query": Q, "response": R},
        "mixed_precision": cfg.parallel.mixed_precision, "gradient_checkpointing": cfg.parallel.gradient_checkpointing,
        "phases": phases, "update_s": round(sum(phases[k]["s"] for k in ("rollout", "advantages", "training")), 2),
        "measured_peak_gib": round(measured, 3),
        "predicted_peak_gib": round(sp.peak_bytes / 2**30, 3), "predicted_phase": sp.peak_phase,
        "predicted_parts_gib": sp.as_dict()["parts_gib"],
        "error_pct": round(100 * (sp.peak_bytes / 2**30 - measured) / measured, 1),
        "loss_value_avg": stats["loss/value_avg"], "kl": float(batch.kl.sum(1).mean()),
    }


if __name__ == "__main__":
    try:
        print(json.dumps(main()), flush=True)
    except ImportError as e:  # a missing package on the device: say which, as JSON
        print(json.dumps({"error": f"missing package: {e}"}), flush=True)
        sys.exit(2)
