import pytest
import yaml

from rlhflab.config import ConfigError, RunConfig, derive_batch, describe, load_config, parse_overrides, save_config


def test_defaults_validate_and_builtins_load():
    cfg = load_config("default")
    assert cfg.data.task == "tldr-synth"
    assert cfg.ppo.optim.eps == 1e-5  # Huang: AdamW eps 1e-5
    assert cfg.ppo.temperature == 0.7 and cfg.ppo.gamma == 1.0 and cfg.ppo.lam == 0.95
    assert load_config("smoke").name == "smoke"


def test_overrides_are_typed_by_yaml():
    cfg = load_config("default", ["ppo.optim.lr=1e-5", "model.policy=null", "ppo.whiten_rewards=true", "name=x"])
    assert cfg.ppo.optim.lr == pytest.approx(1e-5)
    assert cfg.model.policy is None and cfg.ppo.whiten_rewards is True and cfg.name == "x"
    assert parse_overrides(["a.b.c=3"]) == {"a": {"b": {"c": 3}}}


@pytest.mark.parametrize("override,needle", [
    (["ppo.lr=1e-5"], "ppo.lr: unknown key"),
    (["sft.batch_size=abc"], "sft.batch_size"),
    (["ppo.kl_estimator=k9"], "ppo.kl_estimator"),
    (["ppo.batch_size=10"], "ppo.batch_size=10 is not divisible by ppo.micro_batch_size"),
    (["model.arch.hidden_size=100", "model.arch.num_heads=3"], "model.arch.hidden_size=100 is not divisible"),
    (["ppo.kl_monitor.drifting=1"], "kl_monitor thresholds must increase"),
    (["nonsense"], "must look like key.sub=value"),
])
def test_bad_config_is_refused_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("default", override)
    assert needle in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sft:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"sft.learning_rate: unknown key"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_resolved_config_roundtrips(tmp_path):
    cfg = load_config("default", ["ppo.kl_coef=0.1"])
    save_config(cfg, tmp_path / "config.yaml")
    again = RunConfig.model_validate(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg


def test_derive_batch_exact_division():
    b = derive_batch("ppo", 64, 8, 2, num_mini_batches=2)
    assert (b.per_process_batch, b.grad_accum) == (32, 2)
    with pytest.raises(ConfigError, match="not divisible by the number of processes"):
        derive_batch("sft", 30, 5, 4)
    with pytest.raises(ConfigError, match="sft.micro_batch_size=16"):
        derive_batch("sft", 32, 16, 4)


def test_every_field_is_documented():
    rows = describe()
    assert len(rows) > 60
    assert all(doc for _, _, _, doc in rows), [k for k, _, _, d in rows if not d]


def test_overoptimize_is_default_but_for_its_documented_keys():
    """overoptimize.yaml reuses the default run's data, SFT and RM: only name and the PPO step differ."""
    def flat(tree, prefix=""):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(load_config("default").model_dump()), flat(load_config("overoptimize").model_dump())
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"name", "ppo.total_episodes", "ppo.optim.lr", "ppo.kl_coef", "ppo.kl_monitor.catastrophic"}


def test_default_uses_the_length_debiased_rm_and_paper_configs_do_not():
    assert load_config("default").rm.length_covariate is True
    for name in ("tldr-pythia-1b", "tldr-pythia-1b-1gpu", "tldr-llama-3.2-1b-1gpu", "smoke"):
        assert load_config(name).rm.length_covariate is False, name
