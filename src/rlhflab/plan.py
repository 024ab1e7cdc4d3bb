"""Memory planner: the per-device peak memory of each stage, predicted from the config alone.

``rlhflab plan --config X [--gpus N] [--gpu-mem GB] [--stage sft|rm|ppo] [--json]`` reads the
model architecture (a local HF ``config.json``, or :data:`KNOWN_ARCHS` for the hub models this
project's configs name; no network), counts parameters from it, and adds up, per device:

* **weights** of the trained models (policy; RM; PPO's policy + critic) and the frozen ones
  (PPO's reference and reward model), in ``model.dtype``;
* **gradients** (the trained parameters' dtype) and **AdamW states** (``exp_avg`` and
  ``exp_avg_sq``, the parameters' dtype: fp32 master copies when ``model.dtype=float32`` and
  ``parallel.mixed_precision=bf16``), divided by the sharding degree under
  ``parallel.sharding=fsdp2`` (ZeRO-3-like: parameters, gradients and states sharded);
  kept on the host under ``parallel.cpu_offload``;
* **activations** saved for the backward of one micro-batch (formula below), or, with
  ``parallel.gradient_checkpointing``, one hidden state per layer plus one recomputed layer;
* the **logits** tensor ``[B, R, V]`` of the response positions and its float32 log-softmax /
  softmax / gradient copies (the PPO training peak of large-vocabulary models);
* the rollout's **KV cache** (``ppo.rollout_batch_size`` rows of query+response) and the
  frozen models' forward chunk (``ppo.forward_batch_size`` rows: logits of the reference).

Activations: per token and per decoder layer, the tensors autograd saves, counted the way
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
section 4.1) count them for GPT -- their ``sbh(34 + 5as/h)`` bytes at 16 bits is 16h elements
per token without dropout masks and without the ``a*s`` attention-score term, which fused
attention (SDPA/flash) does not store. Recounted for the HF implementations (no dropout; SDPA
saves q, k, v, its output and a logsumexp; each norm saves its input and normalised output;
every linear saves its input):

* Llama (RMSNorm, SwiGLU):  ``9h + 2kv + 4i``  (kv = key/value width = kv_heads * head_dim)
* GPT-NeoX / Pythia (parallel residual, LayerNorm, GELU): ``8h + 2i``
* GPT-2 (LayerNorm, GELU): ``9h + 2i``

(h: hidden size, i: MLP width; for GPT-2 with i = 4h that is 17h, Korthikanti's 16h plus the
copy of the merged attention heads). Activation bytes per element: 2 under bf16 (mixed
precision or ``model.dtype=bfloat16``), else 4.

The peak of a training stage is ``weights + optimizer + gradients + activations``: with gradient
accumulation the earlier micro-batches' gradients are alive during the backward; without it the
gradients are freed after each step, but the next forward's activations do not reuse those
blocks (measured: the resident set after the second epoch's forward is that sum within 4%). The PPO peak is the larger of the rollout phase and
the training phase on top of the four models' weights and the AdamW states.

What is left out, by design: the CUDA context and allocator fragmentation (``fits`` keeps
:data:`HEADROOM` of the device free for them), communication buffers, and the Python/torch
runtime (on a CPU the process's resident set also holds the libraries: compare with the peak
RSS minus the RSS before the models are built). Sizes are GiB (2**30 bytes); ``--gpu-mem 80``
means 80 GiB.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

GiB = 2**30
HEADROOM = 0.10  # fraction of device memory kept free for the CUDA context, allocator fragmentation, NCCL buffers


class PlanError(ValueError):
    """The planner cannot read the architecture of a model named in the config."""


# ---------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Arch:
    """The numbers of a decoder (or encoder) that memory depends on."""

    family: str  # llama | gpt_neox | gpt2 | bert
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    tied: bool = False  # input embedding and LM head share one matrix
    max_positions: int = 2048

    @property
    def kv_width(self) -> int:
        return (self.kv_heads or self.heads) * (self.head_dim or self.hidden // self.heads)

    @property
    def q_width(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    def layer_params(self) -> int:
        """Parameters of one decoder layer (weights + biases + norms), from the HF implementation."""
        h, i = self.hidden, self.intermediate
        if self.family == "llama":  # q,k,v,o without bias; gate/up/down; two RMSNorms
            return h * self.q_width + 2 * h * self.kv_width + self.q_width * h + 3 * h * i + 2 * h
        if self.family == "gpt_neox":  # qkv + dense with biases; h->4h, 4h->h with biases; two LayerNorms
            return (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        if self.family in ("gpt2", "bert"):  # fused qkv + proj, fc + proj, two LayerNorms, all with biases
            return (3 * h * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        raise PlanError(f"unknown architecture family {self.family!r}")

    def backbone_params(self) -> int:
        """Embeddings + layers + final norm (what a sequence classifier and a critic hold)."""
        h = self.hidden
        emb = self.vocab * h
        if self.family in ("gpt2", "bert"):
            emb += self.max_positions * h  # learned position embeddings
        final_norm = {"llama": h, "gpt_neox": 2 * h, "gpt2": 2 * h, "bert": 2 * h}[self.family]
        if self.family == "bert":  # embedding LayerNorm + token types; pooler
            final_norm = 2 * h + 2 * h + (h * h + h)
        return emb + self.layers * self.layer_params() + final_norm

    def lm_params(self) -> int:
        """A causal LM: the backbone plus an (untied) LM head."""
        return self.backbone_params() + (0 if self.tied else self.vocab * self.hidden)

    def activation_elems_per_token_layer(self) -> int:
        """Elements saved for the backward per token per layer (module docstring)."""
        h, i = self.hidden, self.intermediate
        if self.family == "llama":
            return 9 * h + 2 * self.kv_width + 4 * i
        if self.family == "gpt_neox":
            return 8 * h + 2 * i
        return 9 * h + 2 * i


# Architecture numbers of the hub models this project's configs and README name, copied from
# their public config.json files on huggingface.co (<name>/blob/main/config.json), so that
# `rlhflab plan` works without the network: hidden_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings.
KNOWN_ARCHS: dict[str, Arch] = {
    "EleutherAI/pythia-1b-deduped": Arch("gpt_neox", 2048, 16, 8, 8192, 50304, max_positions=2048),
    "EleutherAI/pythia-2.8b-deduped": Arch("gpt_neox", 2560, 32, 32, 10240, 50304, max_positions=2048),
    "EleutherAI/pythia-6.9b-deduped": Arch("gpt_neox", 4096, 32, 32, 16384, 50432, max_positions=2048),
    "meta-llama/Llama-3.2-1B": Arch("llama", 2048, 16, 32, 8192, 128256, kv_heads=8, head_dim=64, tied=True,
                                    max_positions=131072),
    # sentence-transformers/all-MiniLM-L6-v2 (model.reward_backbone=minilm): BERT, 6 x 384.
    "minilm": Arch("bert", 384, 6, 12, 1536, 30522, max_positions=512),
}
for _name in ("EleutherAI/pythia-1b", "EleutherAI/pythia-2.8b", "EleutherAI/pythia-6.9b"):
    KNOWN_ARCHS[_name] = KNOWN_ARCHS[_name + "-deduped"]


def arch_from_hf_config(d: dict, source: str = "config.json") -> Arch:
    """An :class:`Arch` from the dict of an HF ``config.json`` (Llama-like, GPT-NeoX, GPT-2, BERT)."""
    mt = d.get("model_type", "")
    try:
        if mt == "gpt2":
            return Arch("gpt2", d["n_embd"], d["n_layer"], d["n_head"], d.get("n_inner") or 4 * d["n_embd"],
                        d["vocab_size"], tied=d.get("tie_word_embeddings", True), max_positions=d.get("n_positions", 1024))
        if mt == "gpt_neox":
            return Arch("gpt_neox", d["hidden_size"], d["num_hidden_layers"], d["num_attention_heads"],
                        d["intermediate_size"], d["vocab_size"], tied=d.get("tie_word_embeddings", False),
                        max_positions=d.get("max_position_embeddings", 2048))
        if mt in ("bert", "roberta"):
            return Arch("bert", d["hidden_size"], d["num_hidden_layers"], d["num_attention_heads"],
                        d["intermediate_size"], d["vocab_size"], max_positions=d.get("max_position_embeddings", 512))
        # Llama and its relatives (Mistral, Qwen2 without biases, ...): the Llama layout.
        return Arch("llama", d["hidden_size"], d["num_hidden_layers"], d["num_attention_heads"],
                    d["intermediate_size"], d["vocab_size"], kv_heads=d.get("num_key_value_heads"),
                    head_dim=d.get("head_dim"), tied=d.get("tie_word_embeddings", False),
                    max_positions=d.get("max_position_embeddings", 2048))
    except KeyError as e:
        raise PlanError(f"{source}: model_type {mt!r} config has no {e}") from None


def resolve_arch(name: str, key: str) -> Arch:
    """Architecture of ``name``: a local folder with config.json, or a :data:`KNOWN_ARCHS` entry."""
    p = Path(name)
    if (p / "config.json").is_file():
        return arch_from_hf_config(json.loads((p / "config.json").read_text()), str(p / "config.json"))
    if name in KNOWN_ARCHS:
        return KNOWN_ARCHS[name]
    raise PlanError(f"{key}={name!r}: not a local model folder with config.json and not one of the architectures "
                    f"the planner knows offline ({', '.join(sorted(KNOWN_ARCHS))})")


def policy_arch(cfg) -> Arch:
    """The policy's architecture: ``model.policy`` or the from-scratch Llama of ``model.arch``."""
    if cfg.model.policy:
        return resolve_arch(cfg.model.policy, "model.policy")
    a = cfg.model.arch
    # build_policy: a Llama with tied embeddings and the tldr-synth tokenizer's vocabulary.
    return Arch("llama", a.hidden_size, a.num_layers, a.num_heads, a.intermediate_size, cfg.data.synth.vocab_size,
                tied=True, max_positions=a.max_position_embeddings)


def reward_arch(cfg) -> Arch:
    rb = cfg.model.reward_backbone
    return policy_arch(cfg) if rb == "sft" else resolve_arch(rb, "model.reward_backbone")


# ---------------------------------------------------------------------------- inputs
def _get(obj: Any, dotted: str, default: Any) -> Any:
    """``cfg.a.b`` or ``default`` when a section/key does not exist (other branches add them)."""
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return default
    return obj


@dataclass(frozen=True)
class PlanInputs:
    """Everything the planner reads from a config, flat, so that a knob is one ``replace``."""

    policy: Arch
    reward: Arch
    critic_from_policy: bool  # model.critic=policy: the critic is the policy's backbone + a head
    critic_shared: bool = False  # model.critic=shared (LoRA branch): the critic reuses the policy's trunk
    gpus: int = 1
    device: str = "cuda"  # cuda | cpu (on a CPU, "device" and "host" memory are the same RAM)
    sharding: str = "none"  # parallel.sharding
    mixed_precision: str = "no"  # parallel.mixed_precision
    cpu_offload: bool = False  # parallel.cpu_offload
    gradient_checkpointing: bool = False  # parallel.gradient_checkpointing
    dtype: str = "float32"  # model.dtype
    frozen_dtype: Optional[str] = None  # model.frozen_dtype (None: model.dtype)
    lora_rank: int = 0  # model.lora.rank when model.lora.enabled (0: full fine-tuning)
    lora_stages: tuple = ("sft", "rm", "ppo")  # model.lora.stages
    query_length: int = 512
    response_length: int = 53
    pref_response_length: int = 106
    rm_max_length: int = 512
    sft_micro_batch: int = 1
    rm_micro_batch: int = 1
    ppo_micro_batch: int = 1
    ppo_per_process_batch: int = 1
    rollout_batch: int = 1  # ppo.rollout_batch_size (rows sampled at once per process)
    forward_batch: int = 1  # ppo.forward_batch_size (rows per ref/critic/RM forward)

    @classmethod
    def from_config(cls, cfg, gpus: int = 1, device: str = "cuda") -> "PlanInputs":
        from rlhflab.config import derive_batch

        s, r, p = cfg.sft, cfg.rm, cfg.ppo
        derive_batch("sft", s.batch_size, s.micro_batch_size, gpus)  # refuses batch sizes that do not divide
        derive_batch("rm", r.batch_size, r.micro_batch_size, gpus)
        ppo_b = derive_batch("ppo", p.batch_size, p.micro_batch_size, gpus, p.num_mini_batches)
        lora = _get(cfg, "model.lora", None)  # added by the LoRA branch; absent here -> full fine-tuning
        lora_rank = int(getattr(lora, "rank", 0) or 0) if lora is not None and getattr(lora, "enabled", False) else 0
        lora_stages = tuple(getattr(lora, "stages", ("sft", "rm", "ppo"))) if lora is not None else ("sft", "rm", "ppo")
        mp = _get(cfg, "parallel.mixed_precision", "no")
        if mp == "no" and getattr(p, "bf16", False):
            mp = "bf16"  # the older ppo.bf16 switch: autocast, fp32 weights
        rollout = _get(cfg, "ppo.rollout_batch_size", None) or ppo_b.per_process_batch
        forward = _get(cfg, "ppo.forward_batch_size", None) or p.micro_batch_size
        return cls(
            policy=policy_arch(cfg), reward=reward_arch(cfg), critic_from_policy=cfg.model.critic in ("policy", "shared"),
            critic_shared=cfg.model.critic == "shared", lora_stages=lora_stages,
            gpus=gpus, device=device, sharding=_get(cfg, "parallel.sharding", "none"), mixed_precision=mp,
            cpu_offload=bool(_get(cfg, "parallel.cpu_offload", False)),
            gradient_checkpointing=bool(_get(cfg, "parallel.gradient_checkpointing", False)),
            dtype=_get(cfg, "model.dtype", "float32"), frozen_dtype=_get(cfg, "model.frozen_dtype", None),
            lora_rank=lora_rank,
            query_length=cfg.data.max_query_length, response_length=cfg.response_length,
            pref_response_length=cfg.pref_response_length,
            rm_max_length=cfg.rm_max_length,
            sft_micro_batch=s.micro_batch_size, rm_micro_batch=r.micro_batch_size, ppo_micro_batch=p.micro_batch_size,
            ppo_per_process_batch=ppo_b.per_process_batch,
            rollout_batch=min(rollout, ppo_b.per_process_batch), forward_batch=min(forward, ppo_b.per_process_batch),
        )

    # ------------------------------------------------------------------ byte sizes
    @property
    def param_bytes(self) -> int:
        return 2 if self.dtype == "bfloat16" else 4

    @property
    def act_bytes(self) -> int:
        return 2 if (self.mixed_precision == "bf16" or self.dtype == "bfloat16") else 4

    @property
    def shard(self) -> int:
        return self.gpus if self.sharding == "fsdp2" else 1


# ---------------------------------------------------------------------------- results
@dataclass
class StagePlan:
    stage: str
    peak_bytes: int  # per device
    host_bytes: int  # per process, outside the device (CPU offload)
    peak_phase: str
    terms: dict[str, int] = field(default_factory=dict)  # what the peak is made of (bytes; they add up to it)
    parts: dict[str, int] = field(default_factory=dict)  # a breakdown of the peak phase (bytes; not added again)
    params: dict[str, int] = field(default_factory=dict)  # parameter counts per model
    formulas: dict[str, str] = field(default_factory=dict)
    fits: Optional[bool] = None
    gpu_mem_bytes: Optional[int] = None
    knobs: list[str] = field(default_factory=list)  # config overrides that make it fit

    def as_dict(self) -> dict:
        d = asdict(self)
        d["peak_gib"] = round(self.peak_bytes / GiB, 3)
        d["host_gib"] = round(self.host_bytes / GiB, 3)
        d["terms_gib"] = {k: round(v / GiB, 3) for k, v in self.terms.items()}
        d["parts_gib"] = {k: round(v / GiB, 3) for k, v in self.parts.items()}
        return d


# ---------------------------------------------------------------------------- the model
def lora_params(a: Arch, rank: int) -> int:
    """Adapter parameters with rank ``rank`` on every linear layer of the decoder (peft's
    ``target_modules='all-linear'``): r * (in + out) per matrix."""
    h, i = a.hidden, a.intermediate
    if a.family == "llama":
        mats = [(h, a.q_width), (h, a.kv_width), (h, a.kv_width), (a.q_width, h), (h, i), (h, i), (i, h)]
    else:
        mats = [(h, 3 * h), (h, h), (h, i), (i, h)]
    return a.layers * sum(rank * (x + y) for x, y in mats)


def _trained(x: PlanInputs, n_params: int, arch: Arch) -> dict[str, float]:
    """Per-device bytes of one trained model: weights, grads, AdamW states; and host bytes."""
    trainable = lora_params(arch, x.lora_rank) if x.lora_rank else n_params
    frozen_base = n_params if x.lora_rank else 0
    pb = x.param_bytes
    w = trainable * pb + frozen_base * pb
    g = trainable * pb
    o = 2 * trainable * pb  # AdamW exp_avg + exp_avg_sq in the parameters' dtype
    # bf16 compute copy of fp32 weights: autocast caches one per trained weight for the backward;
    # FSDP2 all-gathers one layer at a time in bf16 (counted as the unsharded-layer term instead).
    compute_copy = n_params * 2 if (x.mixed_precision == "bf16" and pb == 4 and x.shard == 1 and not x.cpu_offload) else 0
    w, g, o = w / x.shard, g / x.shard, o / x.shard
    if x.cpu_offload:
        return {"weights": 0, "grads": 0, "optim": 0, "compute_copy": 0, "host": w + g + o}
    return {"weights": w, "grads": g, "optim": o, "compute_copy": compute_copy, "host": 0}


def _unsharded_layer_bytes(x: PlanInputs, arch: Arch) -> int:
    """FSDP2 (or offload) materialises one layer's full parameters (+ the prefetched next one) and,
    in the backward, its unsharded gradients: ~3 layers in the compute dtype. The embedding/head
    unit counts when it is larger than a layer."""
    if x.shard == 1 and not x.cpu_offload:
        return 0
    cb = 2 if x.mixed_precision == "bf16" else x.param_bytes
    unit = max(arch.layer_params(), arch.vocab * arch.hidden)
    return 3 * unit * cb


def _activations(x: PlanInputs, arch: Arch, rows: int, seq: int) -> float:
    """Bytes saved for the backward of one forward over ``rows`` x ``seq`` tokens (body only)."""
    per_layer = arch.activation_elems_per_token_layer()
    final = 3 * arch.hidden
    tokens = rows * seq
    if x.gradient_checkpointing:
        # HF gradient checkpointing per decoder layer: each layer keeps its input hidden state;
        # the backward recomputes one layer at a time.
        elems = arch.layers * arch.hidden + per_layer + final
    else:
        elems = arch.layers * per_layer + final
    return tokens * elems * x.act_bytes


def _logits(x: PlanInputs, rows: int, positions: int, vocab: int, train: bool) -> float:
    """[rows, positions, V] logits and the float32 tensors of the log-softmax: logits/T, log-softmax,
    softmax (saved for the backward) -> the logits plus 3 float32 copies (the backward's gradient
    replaces the freed log-softmax)."""
    n = rows * positions * vocab
    return n * x.act_bytes + 3 * n * 4


def _forward_transient(x: PlanInputs, arch: Arch, rows: int, seq: int) -> float:
    """Working set of one layer of a no-grad forward: its input, the attention output and the MLP's
    hidden tensors (~2h + 3i per token)."""
    return rows * seq * (2 * arch.hidden + 3 * arch.intermediate) * x.act_bytes


def plan_stage(x: PlanInputs, stage: str) -> StagePlan:
    """Predicted per-device peak of ``stage`` (sft | rm | ppo) for the inputs ``x``."""
    if x.lora_rank and stage not in x.lora_stages:
        x = replace(x, lora_rank=0)
    pa, ra = x.policy, x.reward
    fb = 2 if (x.frozen_dtype or x.dtype) == "bfloat16" else 4  # frozen models: model.frozen_dtype, replicated
    per_layer = {"policy": f"{pa.activation_elems_per_token_layer()} elements/token/layer ({pa.family})"}
    if stage == "sft":
        n = pa.lm_params()
        t = _trained(x, n, pa)
        seq = x.query_length + x.response_length
        act = _activations(x, pa, x.sft_micro_batch, seq) + _logits(x, x.sft_micro_batch, x.response_length, pa.vocab, True)
        terms = {"weights": t["weights"] + t["compute_copy"], "optim": t["optim"],
                 "grads": t["grads"], "activations": act,
                 "unsharded_layers": _unsharded_layer_bytes(x, pa)}
        return _finish("sft", terms, t["host"], "training micro-batch", {"policy": n}, per_layer)
    if stage == "rm":
        n = ra.backbone_params() + ra.hidden
        t = _trained(x, n, ra)
        rows = 2 * x.rm_micro_batch  # chosen and rejected of each comparison
        seq = min(x.rm_max_length, x.query_length + x.pref_response_length)
        act = _activations(x, ra, rows, seq)
        terms = {"weights": t["weights"] + t["compute_copy"], "optim": t["optim"],
                 "grads": t["grads"], "activations": act,
                 "unsharded_layers": _unsharded_layer_bytes(x, ra)}
        return _finish("rm", terms, t["host"], "training micro-batch", {"reward": n}, per_layer)
    if stage != "ppo":
        raise PlanError(f"unknown stage {stage!r} (sft, rm, ppo)")

    critic_arch = pa if x.critic_from_policy else ra
    n_pol, n_ref = pa.lm_params(), pa.lm_params()
    n_crit, n_rm = critic_arch.backbone_params() + critic_arch.hidden, ra.backbone_params() + ra.hidden
    if x.lora_rank:  # LoRA: the reference is the policy with its adapter disabled -- no second copy
        n_ref = 0
    tp, tc = _trained(x, n_pol, pa), _trained(x, n_crit, critic_arch)
    if x.critic_shared:  # one trunk for policy and critic: the critic adds its value head only
        n_crit = critic_arch.hidden
        tc = _trained(replace(x, lora_rank=0), n_crit, critic_arch)
    trained_w = tp["weights"] + tc["weights"]
    optim = tp["optim"] + tc["optim"]
    grads = tp["grads"] + tc["grads"]
    frozen = (n_ref + n_rm) * fb
    seq = x.query_length + x.response_length
    R, V = x.response_length, pa.vocab

    # Rollout phase: sampling rollout_batch rows with a KV cache, then ref/critic/RM forwards in chunks.
    kv = 2 * pa.layers * pa.kv_width * seq * x.rollout_batch * x.act_bytes
    gen = kv + _forward_transient(x, pa, x.rollout_batch, x.query_length)
    gen += _unsharded_layer_bytes(x, pa)  # FSDP2 gathers one block at a time in the sampler's forwards too
    fwd = _logits(x, x.forward_batch, R, V, False) + _forward_transient(x, pa, x.forward_batch, seq)
    rollout = max(gen, fwd)

    # Training phase: policy and critic forwards of one micro-batch, the policy's logits, backward.
    mb = x.ppo_micro_batch
    act = _activations(x, pa, mb, seq) + _activations(x, critic_arch, mb, seq) + _logits(x, mb, R, V, True)
    # Gradients and activations counted together (module docstring: the measured resident set holds both).
    train = act + grads + _unsharded_layer_bytes(x, pa) + tp["compute_copy"] + tc["compute_copy"]
    phase = "rollout (KV cache / frozen forwards)" if rollout > train else "training micro-batch"
    terms = {"trained_weights": trained_w, "frozen_weights (ref+RM)": frozen, "optim": optim,
             "peak_phase": max(rollout, train)}
    detail = {"kv_cache": kv, "rollout_phase": rollout, "training_phase": train,
              "activations": act - _logits(x, mb, R, V, True), "logits": _logits(x, mb, R, V, True), "grads": grads}
    sp = _finish("ppo", terms, tp["host"] + tc["host"], phase,
                 {"policy": n_pol, "ref": n_ref, "critic": n_crit, "reward": n_rm}, per_layer)
    sp.parts = {k: int(v) for k, v in detail.items()}
    return sp


def _finish(stage: str, terms: dict, host: float, phase: str, params: dict, formulas: dict) -> StagePlan:
    peak = int(sum(terms.values()))
    return StagePlan(stage, peak, int(host), phase, terms={k: int(v) for k, v in terms.items()}, params=params,
                     formulas=formulas)


# ---------------------------------------------------------------------------- knobs
def _halvings(n: int) -> list[int]:
    out, m = [], n
    while m > 1 and m % 2 == 0:
        m //= 2
        out.append(m)
    return out


def _candidates(x: PlanInputs, stage: str) -> list[tuple[str, dict]]:
    """Config overrides to try, cheapest first (in throughput cost): ``(key=value, replace kwargs)``."""
    c: list[tuple[str, dict]] = []
    if x.gpus > 1 and x.sharding != "fsdp2":
        c.append(("parallel.sharding=fsdp2", {"sharding": "fsdp2"}))
    if x.mixed_precision != "bf16" and x.dtype == "float32":
        c.append(("parallel.mixed_precision=bf16", {"mixed_precision": "bf16"}))
    if (x.frozen_dtype or x.dtype) == "float32" and stage == "ppo":
        c.append(("model.frozen_dtype=bfloat16", {"frozen_dtype": "bfloat16"}))
    if not x.gradient_checkpointing:
        c.append(("parallel.gradient_checkpointing=true", {"gradient_checkpointing": True}))
    mb_key = {"sft": "sft_micro_batch", "rm": "rm_micro_batch", "ppo": "ppo_micro_batch"}[stage]
    mb = getattr(x, mb_key)
    for m in _halvings(mb):
        c.append((f"{stage}.micro_batch_size={m}", {mb_key: m}))
    if stage == "ppo":
        for m in _halvings(x.rollout_batch):
            c.append((f"ppo.rollout_batch_size={m}", {"rollout_batch": m}))
        for m in _halvings(x.forward_batch):
            c.append((f"ppo.forward_batch_size={m}", {"forward_batch": m}))
    if x.dtype == "float32":  # pure bf16 training (AdamW states too): last before offload
        c.append(("model.dtype=bfloat16", {"dtype": "bfloat16"}))
    if not x.cpu_offload:  # config.py: offload needs FSDP2
        key = "parallel.cpu_offload=true" if x.sharding == "fsdp2" else "parallel.sharding=fsdp2 parallel.cpu_offload=true"
        c.append((key, {"cpu_offload": True, "sharding": "fsdp2"}))
    return c


def suggest_knobs(x: PlanInputs, stage: str, limit: int) -> list[str]:
    """Config overrides that bring the stage under ``limit`` bytes: every single knob that
    suffices (up to three, cheapest first), else knobs combined in the order of
    :func:`_candidates` -- for a batch-size knob the largest value that fits, else its smallest --
    until it fits; empty if even all of them together do not."""
    singles = [k for k, kw in _candidates(x, stage) if plan_stage(replace(x, **kw), stage).peak_bytes <= limit]
    if singles:
        return singles[:3]
    groups: dict[str, list[tuple[str, dict]]] = {}
    for k, kw in _candidates(x, stage):
        groups.setdefault(k.split("=")[0], []).append((k, kw))
    chosen: list[str] = []
    cur = x
    for options in groups.values():
        fitting = [(k, kw) for k, kw in options if plan_stage(replace(cur, **kw), stage).peak_bytes <= limit]
        k, kw = fitting[0] if fitting else options[-1]
        if plan_stage(replace(cur, **kw), stage).peak_bytes < plan_stage(cur, stage).peak_bytes:
            chosen.append(k)
            cur = replace(cur, **kw)
        if plan_stage(cur, stage).peak_bytes <= limit:
            return [" ".join(chosen)]
    return []


def plan(cfg, gpus: int = 1, gpu_mem_gb: Optional[float] = None, stages: tuple[str, ...] = ("sft", "rm", "ppo"),
         device: str = "cuda") -> list[StagePlan]:
    """Plan every stage in ``stages``; with ``gpu_mem_gb`` also ``fits`` and, when not, ``knobs``."""
    x = PlanInputs.from_config(cfg, gpus=gpus, device=device)
    out = []
    for st in stages:
        sp = plan_stage(x, st)
        if gpu_mem_gb is not None:
            limit = int(gpu_mem_gb * GiB * (1 - HEADROOM))
            sp.gpu_mem_bytes = int(gpu_mem_gb * GiB)
            sp.fits = sp.peak_bytes <= limit
            if not sp.fits:
                sp.knobs = suggest_knobs(x, st, limit)
        out.append(sp)
    return out


def format_table(plans: list[StagePlan], x: PlanInputs) -> str:
    """Human-readable table: one block per stage, the terms of its peak, the verdict and the knob."""
    lines = [f"policy: {x.policy.family} {x.policy.layers}x{x.policy.hidden} (vocab {x.policy.vocab}); "
             f"{x.gpus} device(s), sharding={x.sharding}, mixed_precision={x.mixed_precision}, dtype={x.dtype}, "
             f"cpu_offload={x.cpu_offload}, gradient_checkpointing={x.gradient_checkpointing}"
             + (f", LoRA r={x.lora_rank}" if x.lora_rank else "")]
    for sp in plans:
        params = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in sp.params.items())
        lines.append("")
        lines.append(f"[{sp.stage}]  params: {params}")
        width = max(len(k) for k in list(sp.terms) + [k + "xx" for k in sp.parts] + ["PEAK per device"])
        for k, v in sp.terms.items():
            lines.append(f"  {k:<{width}}  {v / GiB:9.3f} GiB")
        lines.append(f"  {'PEAK per device':<{width}}  {sp.peak_bytes / GiB:9.3f} GiB   ({sp.peak_phase})")
        for k, v in sp.parts.items():
            lines.append(f"    {'(' + k + ')':<{width - 2}}  {v / GiB:9.3f} GiB")
        if sp.host_bytes:
            lines.append(f"  {'host (offloaded)':<{width}}  {sp.host_bytes / GiB:9.3f} GiB per process")
        if sp.fits is not None:
            cap = sp.gpu_mem_bytes / GiB
            verdict = "fits" if sp.fits else "DOES NOT FIT"
            lines.append(f"  -> {verdict} in {cap:g} GiB (with {HEADROOM:.0%} headroom)")
            if not sp.fits:
                lines.append("  -> knob: " + (" | ".join(sp.knobs) if sp.knobs else
                                              "none of the combinations the planner tries fits: more devices or a smaller model"))
    if any(sp.parts for sp in plans):
        lines.append("")
        lines.append("(parenthesised rows break down the phases; they are not added again)")
    return "\n".join(lines)
