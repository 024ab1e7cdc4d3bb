"""The memory planner: parameter counts against real HF models, hand-computed byte totals,
knobs that really make a stage fit, every built-in config plans, the CLI."""
import json
from dataclasses import replace

import pytest
import torch

from rlhflab.cli import main
from rlhflab.config import builtin_configs, load_config
from rlhflab.plan import Arch, PlanError, PlanInputs, arch_from_hf_config, plan, plan_stage, resolve_arch

# A small Llama: hidden 16, 2 layers, 2 heads, MLP 32, vocab 64, untied head.
SMALL = Arch("llama", hidden=16, layers=2, heads=2, intermediate=32, vocab=64, tied=False, max_positions=64)


def _meta_count(model_cls, cfg) -> int:
    with torch.device("meta"):
        m = model_cls(cfg)
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_hf_models_built_on_meta():
    from transformers import (GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPTNeoXConfig,
                              GPTNeoXForCausalLM, GPTNeoXForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                              LlamaForSequenceClassification)

    cases = [
        (LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=96, vocab_size=300, tie_word_embeddings=False, num_labels=1),
         LlamaForCausalLM, LlamaForSequenceClassification),
        (LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48, vocab_size=128,
                     tie_word_embeddings=True, num_labels=1), LlamaForCausalLM, LlamaForSequenceClassification),
        (GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                       vocab_size=300, tie_word_embeddings=False, num_labels=1),
         GPTNeoXForCausalLM, GPTNeoXForSequenceClassification),
        (GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128, num_labels=1),
         GPT2LMHeadModel, GPT2ForSequenceClassification),
    ]
    for cfg, lm, sc in cases:
        a = arch_from_hf_config(cfg.to_dict())
        assert a.lm_params() == _meta_count(lm, cfg), type(cfg).__name__
        assert a.backbone_params() + a.hidden == _meta_count(sc, cfg), type(cfg).__name__  # score head: h x 1


def test_known_pythia_1b_is_about_1b():
    a = resolve_arch("EleutherAI/pythia-1b-deduped", "model.policy")
    assert 1.00e9 < a.lm_params() < 1.02e9  # Pythia-1B: 1,011,781,632 parameters (HF model card "1.0B")


def test_hand_computed_small_llama():
    # layer: q,k,v,o 4*16*16 = 1024; MLP 3*16*32 = 1536; two RMSNorms 32 -> 2592
    assert SMALL.layer_params() == 2592
    assert SMALL.backbone_params() == 64 * 16 + 2 * 2592 + 16 == 6224
    assert SMALL.lm_params() == 6224 + 64 * 16 == 7248
    assert SMALL.activation_elems_per_token_layer() == 9 * 16 + 2 * 16 + 4 * 32 == 304


def _small_inputs(**kw) -> PlanInputs:
    base = dict(policy=SMALL, reward=SMALL, critic_from_policy=False, query_length=8, response_length=4,
                ppo_micro_batch=2, ppo_per_process_batch=2, rollout_batch=2, forward_batch=2)
    base.update(kw)
    return PlanInputs(**base)


def test_ppo_plan_hand_computed_fp32():
    sp = plan_stage(_small_inputs(), "ppo")
    trained = (7248 + 6240) * 4  # policy LM + critic (backbone + 16x1 head), fp32
    assert sp.terms["trained_weights"] == trained == 53952
    assert sp.terms["frozen_weights (ref+RM)"] == 53952
    assert sp.terms["optim"] == 2 * 53952
    # activations: 2 rows x 12 tokens x (2 layers x 304 + final norm 3 x 16) x 4 bytes, policy and critic
    act = 2 * (24 * (2 * 304 + 48) * 4)
    logits = 2 * 4 * 64 * 4 + 3 * 2 * 4 * 64 * 4  # [2, 4, 64]: logits + 3 float32 copies
    assert sp.parts["activations"] == act == 125952
    assert sp.parts["logits"] == logits == 8192
    assert sp.parts["kv_cache"] == 2 * 2 * 16 * 12 * 2 * 4 == 6144
    assert sp.parts["training_phase"] == act + logits + 53952  # activations + logits + grads
    assert sp.peak_bytes == 53952 + 53952 + 2 * 53952 + act + logits + 53952 == 403904
    assert sp.peak_phase == "training micro-batch"


def test_checkpointing_bf16_sharding_and_accumulation_change_the_right_terms():
    x = _small_inputs()
    ck = plan_stage(replace(x, gradient_checkpointing=True), "ppo")
    assert ck.parts["activations"] == 2 * (24 * (2 * 16 + 304 + 48) * 4)  # layer inputs + one recomputed layer
    bf = plan_stage(replace(x, mixed_precision="bf16"), "ppo")
    assert bf.parts["activations"] == plan_stage(x, "ppo").parts["activations"] // 2
    assert bf.terms["optim"] == plan_stage(x, "ppo").terms["optim"]  # fp32 master states
    sh = plan_stage(replace(x, gpus=2, sharding="fsdp2"), "ppo")
    assert sh.terms["optim"] == plan_stage(x, "ppo").terms["optim"] // 2
    assert sh.terms["trained_weights"] == plan_stage(x, "ppo").terms["trained_weights"] // 2
    off = plan_stage(replace(x, gpus=2, sharding="fsdp2", cpu_offload=True), "ppo")
    assert off.terms["optim"] == 0 and off.host_bytes == (53952 + 53952 + 2 * 53952) // 2


def test_rollout_phase_is_the_peak_with_a_huge_rollout_batch():
    sp = plan_stage(_small_inputs(query_length=60, rollout_batch=512, ppo_per_process_batch=512), "ppo")
    assert sp.peak_phase.startswith("rollout")
    assert sp.parts["kv_cache"] == 2 * 2 * 16 * 64 * 512 * 4


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.25])
def test_suggested_knob_really_makes_it_fit(fraction):
    base = ["model.arch.hidden_size=512", "model.arch.num_layers=8", "model.arch.intermediate_size=2048",
            "model.arch.num_heads=8"]
    cfg = load_config("default", base)
    full = plan(cfg, stages=("ppo",))[0].peak_bytes
    gib = full * fraction / 2**30 / 0.9  # `fraction` of what it needs, after the 10% headroom
    sp = plan(cfg, gpu_mem_gb=gib, stages=("ppo",))[0]
    assert sp.fits is False and sp.knobs
    for knob in sp.knobs:  # each suggestion is a set of config overrides that validates and fits
        again = plan(load_config("default", base + knob.split()), gpu_mem_gb=gib, stages=("ppo",))[0]
        assert again.fits, (knob, again.peak_bytes / 2**30, gib)


def test_unknown_hub_model_is_a_clear_error():
    cfg = load_config("default", ["model.policy=someone/unknown-model"])
    with pytest.raises(PlanError, match="model.policy='someone/unknown-model'"):
        plan(cfg)


def test_local_model_folder_is_read(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                tie_word_embeddings=False).save_pretrained(tmp_path)
    cfg = load_config("default", [f"model.policy={tmp_path}"])
    sp = plan(cfg, stages=("sft",))[0]
    assert sp.params["policy"] == arch_from_hf_config(json.loads((tmp_path / "config.json").read_text())).lm_params()


# Hardware each built-in config is written for (the others: one small device).
HARDWARE = {"tldr-pythia-1b": (8, 80), "tldr-pythia-1b-1gpu": (1, 80), "tldr-llama-3.2-1b-1gpu": (1, 141)}


@pytest.mark.parametrize("name", builtin_configs())
def test_every_builtin_config_validates_and_plans(name):
    cfg = load_config(name)
    gpus, mem = HARDWARE.get(name, (1, None))
    plans = plan(cfg, gpus=gpus, gpu_mem_gb=mem)
    assert [p.stage for p in plans] == ["sft", "rm", "ppo"]
    assert all(p.peak_bytes > 0 for p in plans)
    if mem is not None:
        assert all(p.fits for p in plans), [(p.stage, p.peak_bytes / 2**30) for p in plans]


def test_cli_plan_table_json_and_exit_status(capsys):
    assert main(["plan", "--config", "default", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "PEAK per device" in out and "fits in 80 GiB" in out
    assert main(["plan", "--config", "default", "--json", "--stage", "ppo"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in d["stages"]] == ["ppo"] and d["stages"][0]["peak_gib"] > 0
    assert main(["plan", "--config", "default", "--gpu-mem", "0.01", "--stage", "ppo"]) == 3
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main(["plan", "--config", "default", "model.policy=nope/nope"]) == 2
    assert "model.policy='nope/nope'" in capsys.readouterr().err


def _saved_bytes(model, ids, mask) -> int:
    """Bytes of the tensors autograd saves for the backward of one backbone forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.base_model(input_ids=ids, attention_mask=mask)
    return sum(seen.values())


def test_activation_formula_matches_the_tensors_autograd_saves():
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    from rlhflab.models.policy import disable_dropout, fuse_gelu

    torch.manual_seed(0)
    cases = [
        (LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100), LlamaForCausalLM),
        (LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=100), LlamaForCausalLM),
        (GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=100), GPTNeoXForCausalLM),
        (GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0), GPT2LMHeadModel),
    ]
    ids = torch.randint(0, 100, (2, 32))
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[0, :5] = 0  # left padding, as in PPO
    for cfg, cls in cases:
        model = disable_dropout(cls(cfg)).train()
        fuse_gelu(model)  # what prepare_ppo_models does before PPO (GPT-2's gelu_new -> one fused op)
        a = arch_from_hf_config(cfg.to_dict())
        predicted = 2 * 32 * (a.layers * a.activation_elems_per_token_layer() + 3 * a.hidden) * 4
        measured = _saved_bytes(model, ids, mask)
        assert abs(predicted - measured) / measured < 0.06, (cls.__name__, predicted, measured)


def test_lora_trains_only_adapters_and_shares_the_reference():
    full = plan_stage(_small_inputs(), "ppo")
    lora = plan_stage(_small_inputs(lora_rank=2), "ppo")
    # policy + critic, 2 layers each, rank 2, r*(in+out) for q,k,v,o (16+16) and gate, up, down (16+32)
    adapters = 2 * 2 * 2 * (4 * (16 + 16) + 3 * (16 + 32))
    assert lora.terms["optim"] == 2 * adapters * 4
    assert lora.parts["grads"] == adapters * 4
    assert lora.terms["frozen_weights (ref+RM)"] == 6240 * 4  # the RM only: the reference is the adapter-off policy
    assert lora.peak_bytes < full.peak_bytes
    # model.lora.stages without ppo: PPO fine-tunes every weight again
    assert plan_stage(_small_inputs(lora_rank=2, lora_stages=("sft",)), "ppo").peak_bytes == full.peak_bytes
