"""Peak memory and time per PPO update at ~150M parameters: full fine-tuning vs LoRA vs LoRA + shared critic.

    PYTHONPATH=src .venv/bin/python benchmarks/lora_memory.py                 # all three, one process each
    PYTHONPATH=src .venv/bin/python benchmarks/lora_memory.py --worker lora_shared   # one, one JSON line

Each variant runs in its own process (peak RSS is per process: ``resource.getrusage``'s
``ru_maxrss``), with random weights (nothing downloaded):

* ``full_separate``: policy, frozen reference copy, critic (a separate ``...ForSequenceClassification``,
  fully trained) and frozen RM -- 4 models, AdamW state for policy + critic;
* ``lora_separate``: LoRA policy whose reference is the same weights with the adapter off
  (no copy), a LoRA critic on its own frozen copy, frozen RM -- 3 models;
* ``lora_shared``: LoRA policy with the value head on its own trunk (``model.critic=shared``),
  frozen RM -- 2 models.

Model: Llama, WIDTH=768, LAYERS=14, heads 12, MLP 2048, VOCAB=32000, untied LM head:
~148M parameters as a causal LM (~124M as a classifier). One update = the functions
``rlhflab ppo`` runs (:func:`rlhflab.stages.ppo.ppo_update`): BATCH=4 episodes, PROMPT_LEN=32
random tokens, RESP_LEN=16 sampled tokens, EPOCHS=1 PPO epoch (short on purpose: the 2 shared
cores), fp32, THREADS=1. ``sec_per_update``: median of the updates after the first.
LoRA: rank 8, alpha 16, all linear layers but the heads (``model.lora`` defaults).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

ENV = {k: int(os.environ.get(k, d)) for k, d in (("WIDTH", 768), ("LAYERS", 14), ("VOCAB", 32000), ("PROMPT_LEN", 32),
                                                 ("RESP_LEN", 16), ("BATCH", 4), ("UPDATES", 3), ("EPOCHS", 1))}
VARIANTS = ("full_separate", "lora_separate", "lora_shared")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(variant: str) -> dict:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from rlhflab.config import LoraSettings, PPOConfig, derive_batch
    from rlhflab.models.critic import SharedValueHead
    from rlhflab.models.lora import AdapterDisabledReference, apply_lora, count_parameters
    from rlhflab.models.policy import disable_dropout
    from rlhflab.models.reward import RewardModel
    from rlhflab.stages.common import make_accelerator, make_optimizer, make_scheduler
    from rlhflab.stages.ppo import PPOModels, Prompt, make_kl_controller, ppo_update, prepare_ppo_models

    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    rss_imports = _current_rss_mib()
    W, L, V, P, R, B, U, E = (ENV[k] for k in ("WIDTH", "LAYERS", "VOCAB", "PROMPT_LEN", "RESP_LEN", "BATCH", "UPDATES", "EPOCHS"))
    torch.manual_seed(0)
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t1", unk_token="t0")
    tok.padding_side = "left"
    cfg = LlamaConfig(num_hidden_layers=L, hidden_size=W, intermediate_size=2048 * W // 768, num_attention_heads=W // 64,
                      num_key_value_heads=W // 64, vocab_size=V, max_position_embeddings=512, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1, num_labels=1, tie_word_embeddings=False)
    lora = LoraSettings(enabled=True)
    policy = disable_dropout(LlamaForCausalLM(cfg))
    reward = disable_dropout(LlamaForSequenceClassification(cfg)).eval().requires_grad_(False)
    n_policy = sum(p.numel() for p in policy.parameters())
    if variant == "full_separate":
        ref = disable_dropout(LlamaForCausalLM(cfg)).eval().requires_grad_(False)
        critic = disable_dropout(LlamaForSequenceClassification(cfg))
    else:
        policy = apply_lora(policy, lora, "causal")
        ref = AdapterDisabledReference(policy)
        if variant == "lora_separate":
            critic = apply_lora(disable_dropout(LlamaForSequenceClassification(cfg)), lora, "seq_cls")
        else:
            critic = SharedValueHead(policy, seed=0)
    models_ = prepare_ppo_models(PPOModels(policy, ref, critic, RewardModel(reward, tok, bias=0.0, max_length=512), tok))
    rss_models = _current_rss_mib()
    p = PPOConfig(total_episodes=B * U, batch_size=B, micro_batch_size=B, num_mini_batches=1, ppo_epochs=E,
                  temperature=0.7, kl_coef=0.05, response_length=R, missing_eos="subtract", missing_eos_penalty=1.0,
                  optim={"lr": 3e-6, "eps": 1e-5})
    acc = make_accelerator()
    sizes = derive_batch("ppo", B, B, 1, 1)
    params = [x for x in list(policy.parameters()) + list(critic.parameters()) if x.requires_grad]
    opt = make_optimizer(params, p.optim, fused=True)
    sched = make_scheduler(opt, "linear", U)
    kl_ctl = make_kl_controller(p)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (B * U, P), generator=g).tolist()
    prompts = [Prompt(q, tok.decode(q), "") for q in ids]
    times = []
    for u in range(U):
        t = time.perf_counter()
        ppo_update(models_, opt, sched, kl_ctl, prompts[u * B:(u + 1) * B], u + 1, u * B, p, R, sizes, acc)
        times.append(time.perf_counter() - t)
    pc, cc = count_parameters(policy), count_parameters(critic)
    return {"variant": variant, "sec_per_update": round(statistics.median(times[1:] or times), 2),
            "all_s": [round(x, 2) for x in times], "peak_rss_mib": round(_rss_mib()), "rss_after_imports_mib": round(rss_imports),
            "rss_after_models_mib": round(rss_models), "policy_parameters": n_policy,
            "trainable_parameters": pc["trainable"] + cc["trainable"],
            "models_held": {"full_separate": 4, "lora_separate": 3, "lora_shared": 2}[variant],
            "threads": torch.get_num_threads(), "shape": ENV}


def driver() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("THREADS", "1"), "RLHFLAB_NO_PROGRESS": "1"}
    for v in (sys.argv[2:] or VARIANTS):
        out = subprocess.run([sys.executable, __file__, "--worker", v], env=env, capture_output=True, text=True)
        if out.returncode:
            print(json.dumps({"variant": v, "error": out.stderr[-2000:]}), flush=True)
            continue
        print([x for x in out.stdout.splitlines() if x.startswith("{")][-1], flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2])), flush=True)
    else:
        driver()
