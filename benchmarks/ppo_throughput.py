"""Throughput of rlhflab's PPO update against TRL's on the same shape (/work/shared/bench/).

    .venv/bin/python benchmarks/ppo_throughput.py              # alternate ours / TRL, print the ratio
    ROUNDS=3 ARCH=llama LAYERS=4 WIDTH=256 VOCAB=8192 .venv/bin/python benchmarks/ppo_throughput.py
    .venv/bin/python benchmarks/ppo_throughput.py --worker      # one run of ours, one JSON line

Shape (the peer's, see /work/shared/bench/README.md): policy, reference, critic and reward
model of the same architecture (GPT-2 or Llama via ARCH, LAYERS, WIDTH (heads = WIDTH/64),
VOCAB), randomly initialised; prompts of PROMPT_LEN=64 random tokens; responses of exactly
RESP_LEN=53 sampled tokens at temperature 0.7 (random weights practically never sample the
EOS); one update = BATCH=16 episodes, 4 PPO epochs, 1 minibatch, separate critic, k1 KL,
fp32, CPU. ``sec_per_update`` is the median over the updates after the first (as the peer).

"Ours" is :func:`rlhflab.stages.ppo.ppo_update` -- the functions ``rlhflab ppo`` runs each
update (rollout with the KV-cached sampler, ref/critic/RM forwards, the RM reading decoded
text through its own tokenizer, GAE, 4 epochs of clipped policy+value loss), not a copy; the
models get the same exact speed-ups ``load_ppo_models`` applies (``prepare_ppo_models``: fused
tanh-GELU in place of GPT-2's Python-composed ``gelu_new``).
The peer runs in its own venv (``/work/shared/bench/setup_peer.sh``: trl 0.29.1,
transformers<5). Both get the same thread count: THREADS (default 1). One thread is the
default because this machine's 2 cores are shared: with 2 OpenMP threads per process, a
neighbour's load makes every small op spin-wait (measured: the same update took 5.6 s and
56 s minutes apart), while 1-thread timings repeat within a few percent.

Reported: episodes/s of each (median over rounds), their ratio, the phase shares of ours
(generation / scoring = ref+critic+RM forwards / training), and achieved FLOP/s: matmul
FLOPs of our update counted from the shapes (forward 2*params per token per matmul; the
backward twice the forward for the two trained models) divided by the time, against a
measured fp32 matmul peak (a 2048^3 matmul timed on the same threads). BF16=1 adds a
separate bf16-autocast figure (never mixed into the fp32 ratio).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENV = {k: os.environ.get(k, d) for k, d in (("ARCH", "gpt2"), ("LAYERS", "4"), ("WIDTH", "256"), ("VOCAB", "8192"),
                                            ("PROMPT_LEN", "64"), ("RESP_LEN", "53"), ("BATCH", "16"), ("UPDATES", "4"))}
PEER = Path(os.environ.get("PEER_SCRIPT", "/work/shared/bench/trl_ppo_peer.py"))


# ------------------------------------------------------------------------- worker
def build(arch: str, layers: int, width: int, vocab: int):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast)

    from rlhflab.models.policy import disable_dropout
    from rlhflab.models.reward import RewardModel
    from rlhflab.stages.ppo import PPOModels, prepare_ppo_models

    torch.manual_seed(0)
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t1", unk_token="t0")
    tok.padding_side = "left"
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=max(1, width // 64), vocab_size=vocab, n_positions=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, num_labels=1)
        LM, SC = GPT2LMHeadModel, GPT2ForSequenceClassification
    else:
        cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=width, intermediate_size=width * 4,
                          num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 64),
                          vocab_size=vocab, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                          num_labels=1, tie_word_embeddings=False)
        LM, SC = LlamaForCausalLM, LlamaForSequenceClassification
    policy, ref = disable_dropout(LM(cfg)), disable_dropout(LM(cfg)).eval().requires_grad_(False)
    critic, reward = disable_dropout(SC(cfg)), disable_dropout(SC(cfg)).eval().requires_grad_(False)
    # prepare_ppo_models: the same exact speed-ups load_ppo_models applies for `rlhflab ppo` (fused GELU).
    return prepare_ppo_models(PPOModels(policy, ref, critic, RewardModel(reward, tok, bias=0.0, max_length=512), tok)), cfg


def update_flops(cfg, batch: int, prompt: int, resp: int, epochs: int) -> float:
    """Matmul FLOPs of one of our updates (weights and attention; embeddings/elementwise ignored)."""
    d = getattr(cfg, "n_embd", None) or cfg.hidden_size
    L = getattr(cfg, "n_layer", None) or cfg.num_hidden_layers
    ffn = 4 * d if hasattr(cfg, "n_embd") else cfg.intermediate_size
    mlp = (2 if hasattr(cfg, "n_embd") else 3) * d * ffn
    body = L * (4 * d * d + mlp)  # weights per token
    V = cfg.vocab_size
    T = prompt + resp
    attn = lambda n_q, n_k: L * 4 * d * n_q * n_k  # QK^T and AV, 2 FLOPs per MAC
    body_fwd = batch * (2 * body * T) + batch * attn(T, T) / 2  # causal: half the pairs
    head_fwd = batch * 2 * d * V * resp  # LM head on the response positions only
    # generation: prefill + one token at a time (KV cache), LM head on the last position
    gen = batch * (2 * body * T + 2 * d * V * resp) + batch * attn(1, T) * resp / 2
    rollout = (body_fwd + head_fwd) + 2 * body_fwd  # ref (body+head), critic body, RM body
    train = epochs * 3 * ((body_fwd + head_fwd) + body_fwd)  # fwd + 2x bwd, policy and critic
    return gen + rollout + train


def matmul_peak() -> float:
    """FLOP/s of a 2048^3 fp32 matmul (best of 5) on the current thread count."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best


def worker() -> dict:
    import torch

    from rlhflab.config import PPOConfig, derive_batch
    from rlhflab.stages.common import make_accelerator, make_optimizer, make_scheduler
    from rlhflab.stages.ppo import Prompt, make_kl_controller, ppo_update

    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    arch, L, W, V = ENV["ARCH"], int(ENV["LAYERS"]), int(ENV["WIDTH"]), int(ENV["VOCAB"])
    P, R, B, U = int(ENV["PROMPT_LEN"]), int(ENV["RESP_LEN"]), int(ENV["BATCH"]), int(ENV["UPDATES"])
    bf16 = os.environ.get("BF16") == "1"
    models, cfg = build(arch, L, W, V)
    p = PPOConfig(total_episodes=B * (U + 1), batch_size=B, micro_batch_size=B, num_mini_batches=1, ppo_epochs=4,
                  temperature=0.7, kl_coef=0.05, response_length=R, missing_eos="subtract", missing_eos_penalty=1.0,
                  bf16=bf16, optim={"lr": 3e-6, "eps": 1e-5})
    acc = make_accelerator()
    sizes = derive_batch("ppo", B, B, 1, 1)
    opt = make_optimizer(list(models.policy.parameters()) + list(models.critic.parameters()), p.optim, fused=True)
    sched = make_scheduler(opt, "linear", U + 1)
    kl_ctl = make_kl_controller(p)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (B * (U + 1), P), generator=g).tolist()
    prompts = [Prompt(q, models.tokenizer.decode(q), "") for q in ids]
    times, phases = [], []
    for u in range(U + 1):
        t = time.perf_counter()
        m = ppo_update(models, opt, sched, kl_ctl, prompts[u * B:(u + 1) * B], u + 1, u * B, p, R, sizes, acc)
        times.append(time.perf_counter() - t)
        phases.append((m["perf/time_generation_s"], m["perf/time_scoring_s"], m["perf/time_training_s"]))
    warm = times[1:] or times
    s = statistics.median(warm)
    ph = [statistics.median(x[i] for x in phases[1:] or phases) for i in range(3)]
    flops = update_flops(cfg, B, P, R, 4)
    return {"impl": "rlhflab" + ("-bf16" if bf16 else ""), "arch": arch, "sec_per_update": round(s, 3),
            "episodes_per_s": round(B / s, 2), "all": [round(x, 3) for x in times],
            "phase_s": {"generation": round(ph[0], 3), "scoring": round(ph[1], 3), "training": round(ph[2], 3)},
            "gflop_per_update": round(flops / 1e9, 1), "achieved_gflops": round(flops / s / 1e9, 1),
            "matmul_peak_gflops": round(matmul_peak() / 1e9, 1), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------- driver
def _json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in output:\n{text[-3000:]}")


def _run(cmd: list[str], extra_env: dict) -> dict:
    env = {**os.environ, **ENV, **extra_env, "RLHFLAB_NO_PROGRESS": "1"}
    env["OMP_NUM_THREADS"] = os.environ.get("THREADS", "1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return _json_line(out.stdout)


def driver() -> None:
    peer_py = os.environ.get("PEER_PY") or subprocess.run(["/work/shared/bench/setup_peer.sh"], capture_output=True,
                                                          text=True, check=True).stdout.strip().splitlines()[-1]
    rounds = int(os.environ.get("ROUNDS", "3"))
    ours, trl = [], []
    print(f"shape: {json.dumps(ENV)}; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for r in range(rounds):
        o = _run([sys.executable, __file__, "--worker"], {"BF16": "0"})
        t = _run([peer_py, str(PEER)], {})
        ours.append(o)
        trl.append(t)
        print(f"round {r + 1}: rlhflab {o['sec_per_update']} s/update ({o['episodes_per_s']} ep/s), "
              f"TRL {t['sec_per_update']} s/update ({t['episodes_per_s']} ep/s)", flush=True)
    eo = statistics.median(x["episodes_per_s"] for x in ours)
    et = statistics.median(x["episodes_per_s"] for x in trl)
    last = ours[-1]
    ph = {k: statistics.median(x["phase_s"][k] for x in ours) for k in ("generation", "scoring", "training")}
    tot = sum(ph.values())
    summary = {
        "shape": ENV, "rounds": rounds, "rlhflab_episodes_per_s": eo, "trl_episodes_per_s": et,
        "speedup": round(eo / et, 2),
        "rlhflab_phase_share": {k: round(v / tot, 3) for k, v in ph.items()},
        "rlhflab_gflop_per_update": last["gflop_per_update"],
        "rlhflab_achieved_gflops": statistics.median(x["achieved_gflops"] for x in ours),
        "matmul_peak_gflops": statistics.median(x["matmul_peak_gflops"] for x in ours),
        "threads": last["threads"], "load_average_after": round(os.getloadavg()[0], 2),
    }
    summary["rlhflab_fraction_of_peak"] = round(summary["rlhflab_achieved_gflops"] / summary["matmul_peak_gflops"], 3)
    if os.environ.get("BF16") == "1":
        b = _run([sys.executable, __file__, "--worker"], {"BF16": "1"})
        summary["bf16_autocast_separate"] = {"episodes_per_s": b["episodes_per_s"], "sec_per_update": b["sec_per_update"]}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        print(json.dumps(worker()))
    else:
        driver()
