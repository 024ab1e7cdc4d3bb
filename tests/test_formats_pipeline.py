"""SFT -> RM -> PPO -> eval on TRL-format files (data.task=standard), tiny models built from the
smoke config: prompt/completion + prompt/chosen/rejected files, and conversational files
rendered with a chat template. Nothing is downloaded."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhflab.config import load_config

WORDS = [f"w{i}" for i in range(24)] + ["<user>", "<assistant>"]
VOCAB = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("RLHFLAB_NO_PROGRESS", "1")
    monkeypatch.delenv("RLHFLAB_STOP_AFTER_STEP", raising=False)


def tokenizer_dir(path, template=None):
    t = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="[EOS]", pad_token="[PAD]")
    if template:
        tok.chat_template = template
    tok.save_pretrained(path)
    return path


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def words(rng, n):
    return " ".join(rng.choice(WORDS[:24]) for _ in range(n))


def datasets(root, conversational: bool):
    """train/validation files: SFT (prompt/completion or messages), preferences (explicit prompt,
    or conversational with an implicit one), prompt-only PPO prompts."""
    rng = random.Random(0)
    for split, n in (("train", 32), ("validation", 8)):
        sft, pref, prompts = [], [], []
        for i in range(n):
            p, c, r = words(rng, 4), words(rng, 2), words(rng, 3)
            if conversational:
                q = [{"role": "user", "content": p}]
                sft.append({"messages": q + [{"role": "assistant", "content": c}]})
                pref.append({"chosen": q + [{"role": "assistant", "content": c}],
                             "rejected": q + [{"role": "assistant", "content": r}]})
                prompts.append({"prompt": q})
            else:
                sft.append({"id": f"{split}-{i}", "question": p, "answer": " " + c})
                pref.append({"prompt": p, "chosen": " " + c, "rejected": " " + r})
                prompts.append({"question": p})  # data.columns applies to every file
        write(root / "sft" / f"{split}.jsonl", sft)
        write(root / "pref" / f"{split}.jsonl", pref)
        write(root / "prompts" / f"{split}.jsonl", prompts)
    return root


def run_all(cfg):
    from rlhflab.stages import evaluate, ppo, rm, sft

    return sft.main(cfg), rm.main(cfg), ppo.main(cfg), evaluate.main(cfg)


def smoke(tmp_path, tok_dir, data, *overrides):
    return load_config("smoke", [f"out_dir={tmp_path / 'runs'}", "data.task=standard", f"model.tokenizer={tok_dir}",
                                 f"data.sft_dataset={data / 'sft'}", f"data.preference_dataset={data / 'pref'}",
                                 "data.max_query_length=16", "data.response_length=8",
                                 "model.arch.max_position_embeddings=64", "eval.n_prompts=8", *overrides])


def check_outputs(cfg, out):
    s, r, p, e = out
    assert s["data/train_examples"] == 32 and s["data/validation_examples"] == 8
    assert r["data/train_pairs"] == 32 and r["data/validation_pairs"] == 8
    assert p["update"] == 2 and p["gold/score"] is None
    results = json.loads((cfg.run_dir / "eval" / "results.json").read_text())
    assert results["meta"]["judges"] == ["rm"]  # no gold judge on user data
    assert results["policies"]["ppo"]["gold_mean"] is None and results["policies"]["ppo"]["rm_score_mean"] is not None
    assert {(c["a"], c["b"]) for c in results["comparisons"]} == {("sft", "reference"), ("ppo", "reference"), ("ppo", "sft")}
    for d in ("sft/policy", "rm/reward", "ppo/policy", "ppo/value"):
        card = (cfg.run_dir / d / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers\n") and "data.task: `standard`" in card
    assert f"bias = {r['rm/bias']}" in (cfg.run_dir / "rm" / "reward" / "README.md").read_text()
    assert f"| eval/rougeL | {s['eval/rougeL']:.4g} |" in (cfg.run_dir / "sft" / "policy" / "README.md").read_text()
    # the README's helper: RewardModel.score_texts applies the bias stored with the model
    from rlhflab.models.reward import RewardModel

    rm = RewardModel.from_pretrained(cfg.run_dir / "rm" / "reward")
    assert rm.bias == pytest.approx(r["rm/bias"])
    q, resp = ["w1 w2 w3"], [" w4 w5"]
    assert rm.score_texts(q, resp).item() == pytest.approx(rm.score_texts(q, resp, normalize=False).item() - rm.bias)
    from rlhflab.report.html import render_report

    assert "<html" in render_report(cfg.run_dir).read_text()


def test_prompt_completion_and_preference_files_run_sft_rm_ppo_eval(tmp_path):
    data = datasets(tmp_path / "data", conversational=False)
    cfg = smoke(tmp_path, tokenizer_dir(tmp_path / "tok"), data, "data.columns={prompt: question, completion: answer}",
                f"data.prompt_dataset={data / 'prompts'}")
    out = run_all(cfg)
    check_outputs(cfg, out)
    sample = json.loads((cfg.run_dir / "eval" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["id"] == "validation-0" and sample["post"] and sample["reference"]


def test_conversational_files_with_a_chat_template(tmp_path):
    data = datasets(tmp_path / "data", conversational=True)
    cfg = smoke(tmp_path, tokenizer_dir(tmp_path / "tok", TEMPLATE), data, f"data.prompt_dataset={data / 'prompts'}")
    out = run_all(cfg)
    check_outputs(cfg, out)
    sample = json.loads((cfg.run_dir / "eval" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["post"] and "<user>" not in sample["post"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(cfg.run_dir / "ppo" / "policy").chat_template == TEMPLATE
