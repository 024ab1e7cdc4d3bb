"""The Python API: README's example runs as written (extracted from README.md), and in-memory
datasets, models and callables reach the stages."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ppo_fixtures import build_inputs, make_tokenizer, sft_rows  # noqa: E402

import rlhflab  # noqa: E402
from rlhflab.config import ConfigError, RunConfig  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("RLHFLAB_NO_PROGRESS", "1")
    monkeypatch.delenv("RLHFLAB_STOP_AFTER_STEP", raising=False)


def test_lazy_api_and_make_config(tmp_path):
    assert set(rlhflab.__all__) >= {"make_config", "sft", "train_reward_model", "ppo", "evaluate", "run"}
    cfg = rlhflab.make_config("smoke", {"ppo.kl_coef": 0.5, "reward.sources": [{"kind": "gold"}]})
    assert cfg.ppo.kl_coef == 0.5 and cfg.reward.sources[0].kind == "gold"
    assert rlhflab.make_config({"ppo": {"kl_coef": 0.2}}).ppo.kl_coef == 0.2
    assert rlhflab.make_config(cfg, ["name=x"]).name == "x" and rlhflab.make_config(cfg) is cfg
    with pytest.raises(ConfigError, match="ppo.kl_coeff: unknown key"):
        rlhflab.make_config(RunConfig(), {"ppo.kl_coeff": 1})


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md[Python API]", "exec"), namespace)
    ppo, mixed, results = namespace["ppo"], namespace["mixed"], namespace["results"]
    assert ppo["critic"] == "policy" and ppo["update"] == 2 and Path(ppo["policy_dir"]).is_dir()
    assert mixed["update"] == 2 and "eval/gold/mixed_vs_sft/win_rate" in results
    # the in-memory policy was saved where the config names it; the run can be read back by the CLI
    saved = yaml_config(tmp_path / "runs" / "notebook-mixed" / "config.yaml")
    assert saved["model"]["sft_policy"] == "runs/notebook-mixed/inputs/sft_policy"
    assert (tmp_path / saved["model"]["sft_policy"] / "config.json").is_file()
    assert saved["reward"]["sources"] == []  # the callables replaced the default RM reward
    # concise() really was the reward: objective/scores is its mean over rollouts with an EOS
    rows = [json.loads(x) for x in (tmp_path / "runs" / "notebook" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(-10 < r["objective/scores"] <= 0 for r in rows)
    assert str(ppo["objective/scores"]) in capsys.readouterr().out


def yaml_config(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())


def test_in_memory_prompts_model_and_reward(tmp_path):
    from transformers import AutoModelForCausalLM

    tpl = build_inputs(tmp_path / "tpl")
    policy = AutoModelForCausalLM.from_pretrained(tpl / "sft" / "policy")
    rows = sft_rows(16, seed=5)
    seen = []

    def reward(prompts, completions, **columns):
        seen.append(list(columns["id"]))
        return [0.1 * len(c) for c in completions]

    result = rlhflab.ppo("smoke", {"out_dir": str(tmp_path), "name": "mem", "data.max_query_length": 64,
                                   "data.response_length": 6, "ppo.gold_eval_every": 0},
                         policy=policy, tokenizer=make_tokenizer(), prompts=rows, reward=reward)
    assert result["update"] == 2 and result["critic"] == "policy"
    ids = {r["id"] for r in rows}
    assert len(seen) == 2 and all(len(b) == 16 and set(b) <= ids for b in seen)  # the rows given, not tldr-synth's
    assert (tmp_path / "mem" / "inputs" / "sft.jsonl").read_text().count("\n") == 16
    with pytest.raises(ValueError, match="needs its tokenizer"):
        rlhflab.ppo("smoke", {"out_dir": str(tmp_path), "name": "mem2"}, policy=policy)


def pref_rows(rows):
    """Comparisons (openai/summarize_from_feedback schema) on the SFT posts: reference vs a reversed copy."""
    out = []
    for i, r in enumerate(rows):
        good, bad = r["summary"], " ".join(reversed(r["summary"].split())) + " sorry"
        summaries = [{"text": good}, {"text": bad}] if i % 2 else [{"text": bad}, {"text": good}]
        out.append({"info": {"id": r["id"], "subreddit": r["subreddit"], "title": r["title"], "post": r["post"]},
                    "summaries": summaries, "choice": i % 2})
    return out


def test_every_stage_from_in_memory_models_and_datasets(tmp_path):
    """SFT from an in-memory causal LM, the RM from a saved HF folder, PPO from the run's outputs --
    all on in-memory rows in the TL;DR schemas."""
    from rlhflab.config import ArchConfig
    from rlhflab.models.policy import build_policy

    tok = make_tokenizer()
    model = build_policy(tok, arch=ArchConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                              max_position_embeddings=128), seed=0)
    rows = sft_rows(32, seed=1)
    base = {"out_dir": str(tmp_path), "name": "mem", "data.max_query_length": 64, "data.response_length": 6,
            "sft.batch_size": 8, "sft.micro_batch_size": 8, "sft.epochs": 1, "sft.eval_samples": 2,
            "rm.batch_size": 8, "rm.micro_batch_size": 8, "rm.epochs": 1, "rm.max_length": 128,
            "ppo.total_episodes": 16, "ppo.batch_size": 8, "ppo.micro_batch_size": 8, "ppo.gold_eval_every": 0}
    sft = rlhflab.sft("smoke", base, model=model, tokenizer=tok, dataset={"train": rows, "validation": rows[:8]})
    saved = tmp_path / "mem" / "inputs" / "policy"
    assert (saved / "config.json").is_file() and (tmp_path / "mem" / "inputs" / "sft" / "validation.jsonl").is_file()
    # data.task=tldr: the policy's tokenizer (which cuts the queries) is named like any other model
    rm = rlhflab.train_reward_model("smoke", {**base, "model.tokenizer": sft["policy_dir"]}, model=sft["policy_dir"],
                                    dataset=pref_rows(rows), prompts=rows)
    assert rm["rm/backbone_source"] == sft["policy_dir"]
    result = rlhflab.ppo("smoke", base, prompts=rows)
    assert result["update"] == 2 and result["critic"] == "reward"
