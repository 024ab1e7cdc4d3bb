"""LoRA (peft) in SFT/RM/PPO and the shared-trunk critic: what trains, the adapter-disabled
reference, one forward for logits and values, resume, and loadable outputs of a LoRA pipeline."""
import json
import sys

import pytest
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ppo_fixtures import build_inputs, make_run  # noqa: E402

from rlhflab.config import ConfigError, LoraSettings, load_config  # noqa: E402
from rlhflab.errors import StageError  # noqa: E402
from rlhflab.models import lora  # noqa: E402
from rlhflab.models.critic import SharedValueHead  # noqa: E402
from rlhflab.models.policy import fuse_gelu, load_policy  # noqa: E402
from rlhflab.stages import ppo  # noqa: E402
from rlhflab.stages.common import StopRequested, make_accelerator  # noqa: E402

LORA = ("model.lora.enabled=true",)


@pytest.fixture(scope="module")
def tpl(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("lora"))


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("RLHFLAB_NO_PROGRESS", "1")
    monkeypatch.delenv("RLHFLAB_STOP_AFTER_STEP", raising=False)


def _models(cfg):
    acc = make_accelerator()
    models, kind, _ = ppo.load_ppo_models(cfg, acc.device)
    return acc, models, kind, ppo.load_prompts(cfg, models.tokenizer)[: cfg.ppo.batch_size]


def _randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)


def _batch(acc, models, prompts, cfg):
    rollout = ppo.collect_rollout(models, prompts, 0, cfg.ppo, cfg.response_length, acc)
    ids = torch.cat([rollout.query_ids, rollout.responses], 1)
    mask = torch.cat([rollout.query_mask, rollout.response_mask], 1)
    return rollout, ids, mask


@pytest.mark.parametrize("critic", ["shared", "reward"])
def test_only_adapters_and_value_head_train(tpl, tmp_path, critic):
    cfg = make_run(tpl, tmp_path, f"grad-{critic}", *LORA, f"model.critic={critic}")
    acc, models, kind, prompts = _models(cfg)
    assert kind == critic
    named = dict(models.policy.named_parameters())
    named.update({f"critic.{k}": v for k, v in models.critic.named_parameters()})
    trainable = {k for k, v in named.items() if v.requires_grad}
    head = {"critic.score.weight", "critic.score.bias"} if critic == "shared" else \
        {k for k in named if k.startswith("critic.score.modules_to_save")}
    assert head and head <= trainable
    assert all("lora_" in k for k in trainable - head), sorted(trainable - head)[:5]
    assert sum(named[k].numel() for k in trainable) < 0.5 * sum(v.numel() for v in named.values())
    before = {k: v.detach().clone() for k, v in named.items()}
    # one real PPO update (rollout -> advantages -> ppo_train with AdamW)
    params = [v for v in named.values() if v.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = ppo.compute_advantages(ppo.collect_rollout(models, prompts, 0, cfg.ppo, cfg.response_length, acc), 0.05, cfg.ppo)
    sizes = ppo.derive_batch("ppo", cfg.ppo.batch_size, cfg.ppo.micro_batch_size, 1)
    ppo.ppo_train(models, opt, batch, cfg.ppo, sizes, 1, acc)
    changed = {k for k, v in named.items() if not torch.equal(v, before[k])}
    assert changed <= trainable  # frozen base weights did not move (bit for bit)
    assert head <= changed and any("lora_B" in k for k in changed)  # the value head and the adapters did
    # the optimizer holds state for the trainable parameters only
    assert len(opt.state) == len(params)


def test_adapter_disabled_reference_equals_a_frozen_copy_bit_for_bit(tpl, tmp_path):
    cfg = make_run(tpl, tmp_path, "ref", *LORA)
    acc, models, _, prompts = _models(cfg)
    assert isinstance(models.ref_policy, lora.AdapterDisabledReference)
    # a separate frozen copy of the SFT policy, as load_ppo_models builds without LoRA
    copy = load_policy(cfg.run_dir / "sft" / "policy").eval().requires_grad_(False)
    fuse_gelu(copy)
    # at init (lora_B = 0) the whole rollout matches the non-LoRA one: same samples, same ref logprobs
    plain = make_run(tpl, tmp_path, "ref-plain")
    _, plain_models, _, _ = _models(plain)
    r_lora, ids, mask = _batch(acc, models, prompts, cfg)
    r_plain, _, _ = _batch(acc, plain_models, prompts, plain)
    assert torch.equal(r_lora.responses, r_plain.responses)
    assert torch.equal(r_lora.ref_logprobs, r_plain.ref_logprobs)
    # a trained (here: random, non-zero) adapter changes the policy but not the reference
    _randomize_adapters(models.policy)
    R = r_lora.responses.shape[1]
    with torch.no_grad():
        ref = ppo.response_logits(models.ref_policy, ids, mask, R)
        base = ppo.response_logits(copy, ids, mask, R)
        adapted = ppo.response_logits(models.policy, ids, mask, R)
    assert torch.equal(ref, base)
    assert not torch.allclose(adapted, base, atol=1e-3)
    assert all(p.requires_grad for n, p in models.policy.named_parameters() if "lora_" in n)  # adapter back on


@pytest.mark.parametrize("use_lora", [False, True])
def test_shared_critic_one_forward_equals_separate_computations(tpl, tmp_path, use_lora):
    cfg = make_run(tpl, tmp_path, f"shared-{use_lora}", "model.critic=shared", *(LORA if use_lora else ()))
    acc, models, _, prompts = _models(cfg)
    assert isinstance(models.critic, SharedValueHead)
    assert list(models.critic.children()) == [models.critic.score] and len(list(models.critic.parameters())) == 2
    if use_lora:
        _randomize_adapters(models.policy)
    rollout, ids, mask = _batch(acc, models, prompts, cfg)
    R = rollout.responses.shape[1]
    trunk_calls = []
    hook = models.policy.base_model.register_forward_hook(lambda *a: trunk_calls.append(1))
    logits, values = ppo.response_logits_and_values(models, ids, mask, R)
    assert len(trunk_calls) == 1  # the backbone ran once for both
    sep_logits = ppo.response_logits(models.policy, ids, mask, R)
    sep_values = ppo.response_values(models.critic, ids, mask, R)
    hook.remove()
    assert torch.equal(logits, sep_logits)
    assert torch.allclose(values, sep_values, rtol=0, atol=1e-6)
    # the rollout's values are those of the same forward inside the value mask (0 outside it)
    vm = rollout.value_mask
    assert values.shape == rollout.values.shape
    assert torch.allclose(values.detach()[vm], rollout.values[vm], atol=1e-5) and (rollout.values[~vm] == 0).all()
    # the value loss's gradient reaches the shared trunk (the adapters with LoRA, every layer without)
    models.policy.zero_grad(set_to_none=True)
    values.sum().backward()
    trunk = [(n, p) for n, p in models.policy.base_model.named_parameters() if p.requires_grad]
    assert trunk and all(p.grad is not None for n, p in trunk if "layers.0" in n and ("lora_B" in n or not use_lora))
    assert models.critic.score.weight.grad is not None


def test_lora_ppo_resumes_to_the_same_weights(tpl, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    over = ("ppo.total_episodes=24", *LORA, "model.critic=shared")
    a = make_run(tpl, tmp_path, "straight", *over)
    ppo.main(a)
    b = make_run(tpl, tmp_path, "interrupted", *over)
    monkeypatch.setenv("RLHFLAB_STOP_AFTER_STEP", "1")
    with pytest.raises(StopRequested):
        ppo.main(b)
    monkeypatch.delenv("RLHFLAB_STOP_AFTER_STEP")
    with pytest.raises(StageError, match="model.lora.enabled=true"):
        ppo.main(make_run(tpl, tmp_path, "interrupted", "ppo.total_episodes=24", "model.critic=shared", copy=False),
                 resume=True)
    ppo.main(b, resume=True)
    for sub, fname in (("policy_adapter", "adapter_model.safetensors"), ("policy", "model.safetensors"),
                       ("value", "value_head.safetensors")):
        wa, wb = load_file(str(a.run_dir / "ppo" / sub / fname)), load_file(str(b.run_dir / "ppo" / sub / fname))
        assert wa.keys() == wb.keys() and wa
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6, sub
    # the adapter moved: the merged policy differs from the SFT policy
    sft = load_file(str(a.run_dir / "sft" / "policy" / "model.safetensors"))
    merged = load_file(str(a.run_dir / "ppo" / "policy" / "model.safetensors"))
    assert any(not torch.equal(sft[k], merged[k]) for k in sft if "proj" in k)


def test_config_names_and_refusals(recwarn):
    with pytest.warns(FutureWarning, match="model.critic=copy"):
        assert load_config("smoke", ["model.critic=policy"]).model.critic == "copy"
    assert load_config("smoke").model.lora.enabled is False and load_config("smoke").model.critic == "reward"
    with pytest.raises(ConfigError, match="model.lora.rank"):
        load_config("smoke", ["model.lora.rank=0"])


def test_lora_refuses_sharding_when_the_key_exists():
    from rlhflab.config import ConfigError

    with pytest.raises(ConfigError, match="parallel.sharding=fsdp2"):
        load_config("smoke", list(LORA) + ["parallel.sharding=fsdp2"])
    load_config("smoke", list(LORA) + ["parallel.sharding=none"])  # the default is accepted


def test_parameter_counts_for_a_planner():
    from transformers import LlamaConfig

    c = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, tie_word_embeddings=True)
    off = lora.lora_parameter_counts(c, None)
    assert off["trainable"] == off["total"] == off["base"] == 100 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32
    on = lora.lora_parameter_counts(c, LoraSettings(enabled=True, rank=4))
    # rank 4 on q,k,v,o (32x32) and gate,up (32->64), down (64->32) per layer: r*(in+out) each
    per_layer = 4 * 4 * (32 + 32) + 2 * 4 * (32 + 64) + 4 * (64 + 32)
    assert on["trainable"] == 2 * per_layer and on["total"] == on["base"] + on["trainable"] and on["base"] == off["base"]
    rm = lora.lora_parameter_counts(c, LoraSettings(enabled=True, rank=4), task="seq_cls")
    assert rm["trainable"] == 2 * per_layer + 32  # adapters + the score head (no bias on Llama's score)


def test_lora_sft_rm_ppo_writes_loadable_adapters_and_merged_models(smoke_cfg):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhflab.stages import rm, sft

    cfg = smoke_cfg("name=lora-smoke", *LORA, "model.critic=copy", "model.lora.rank=4", "ppo.optim.lr=3e-3")
    s, r, p = sft.main(cfg), rm.main(cfg), ppo.main(cfg)
    assert s["lora"] and r["lora"] and p["lora"] and p["critic"] == "copy"
    assert s["model/trainable_parameters"] < s["model/parameters"]
    run = cfg.run_dir
    ids = torch.tensor([[5, 17, 33, 2, 9, 41]])
    mask = torch.ones_like(ids)
    for stage, name, task, base in (("sft", "policy", "causal", run / "sft" / "base"),
                                    ("rm", "reward", "seq_cls", run / "sft" / "policy"),
                                    ("ppo", "policy", "causal", run / "sft" / "policy"),
                                    ("ppo", "value", "seq_cls", run / "sft" / "policy")):
        adapter = run / stage / f"{name}_adapter"
        meta = json.loads((adapter / "adapter_config.json").read_text())
        assert meta["base_model_name_or_path"] == str(base.resolve()) and meta["r"] == 4
        Auto = AutoModelForCausalLM if task == "causal" else AutoModelForSequenceClassification
        merged = Auto.from_pretrained(str(run / stage / name)).eval()  # plain transformers
        with_adapter = lora.load_adapter_model(meta["base_model_name_or_path"], adapter, task).eval()  # plain peft
        with torch.no_grad():
            a = merged(input_ids=ids, attention_mask=mask).logits
            b = with_adapter(input_ids=ids, attention_mask=mask).logits
            with with_adapter.disable_adapter():
                c = with_adapter(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(a, b, atol=1e-4), (stage, name)
        assert not torch.allclose(b, c, atol=1e-4), (stage, name)  # the adapter (and head) did something
    assert "rlhflab_reward_bias" in json.loads((run / "rm" / "reward" / "config.json").read_text())


def test_lora_with_a_cross_tokenizer_rm(tpl, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from rlhflab.models.reward import RewardModel, build_reward_backbone, minilm_path

    cfg = make_run(tpl, tmp_path, "minilm", *LORA)  # model.critic=reward cannot read the policy's tokens
    shutil.rmtree(cfg.run_dir / "rm" / "reward")
    src = str(minilm_path())
    RewardModel(build_reward_backbone(src, seed=1), AutoTokenizer.from_pretrained(src), bias=0.0,
                max_length=128).save(cfg.run_dir / "rm" / "reward")
    result = ppo.main(cfg)
    assert result["critic"] == "copy" and "model.critic=copy" in result["critic_note"] and result["lora"]
    assert (cfg.run_dir / "ppo" / "value_adapter" / "adapter_config.json").is_file()
    assert (cfg.run_dir / "ppo" / "policy" / "config.json").is_file()
