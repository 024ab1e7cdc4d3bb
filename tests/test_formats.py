"""TRL's standard dataset formats (rlhflab.data.formats): detection, implicit prompts, column
and split mapping, chat templates, bad rows.

The tokenizer is a WordLevel model over whitespace-split words, so token counts are word
counts (hand-checkable)."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhflab.config import ConfigError, load_config
from rlhflab.data.errors import DataError
from rlhflab.data.formats import (
    PromptExample,
    extract_prompt,
    load_prompt_data,
    load_preference_data,
    load_sft_data,
    tokenize_rows,
)
from rlhflab.data.tldr import PrefExample, SFTExample

WORDS = ["the", "sky", "is", "blue.", "green.", "grass", "what", "color", "?", "it", "<user>", "<assistant>", "<system>"]
VOCAB = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")


def ids(text: str) -> list[int]:
    return [VOCAB.get(w, 2) for w in text.split()]


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    t = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="[EOS]", pad_token="[PAD]")


def cfg_for(tmp_path, *overrides):
    return load_config(None, [f"out_dir={tmp_path}", "data.task=standard", "data.max_query_length=16",
                              "data.response_length=4", *overrides])


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------- implicit prompt
def test_extract_prompt_strings_give_the_space_to_the_responses():
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert extract_prompt("abc", "abd") == ("ab", "c", "d")  # no space: plain longest common prefix
    assert extract_prompt("x", "y") == ("", "x", "y")


def test_extract_prompt_messages_shares_whole_messages():
    q = user("what color is the sky ?")
    prompt, c, r = extract_prompt(q + assistant("blue."), q + assistant("green."))
    assert prompt == q and c == assistant("blue.") and r == assistant("green.")


def test_implicit_preferences_tokenise_like_explicit_ones(tmp_path, tok):
    cfg = cfg_for(tmp_path)
    implicit = tokenize_rows([{"chosen": "the sky is blue.", "rejected": "the sky is green."}], "preference", cfg, tok, "f")[0]
    explicit = tokenize_rows([{"prompt": "the sky is", "chosen": " blue.", "rejected": " green."}], "preference", cfg, tok, "f")[0]
    assert implicit == explicit
    (e,) = implicit
    assert isinstance(e, PrefExample)
    assert e.query == "the sky is" and e.query_ids == ids("the sky is")
    assert e.chosen_ids == ids("blue.") + [1] and e.rejected_ids == ids("green.") + [1]
    # PPO reads the implicit prompt too
    (p,), _ = tokenize_rows([{"chosen": "the sky is blue.", "rejected": "the sky is green."}], "prompt", cfg, tok, "f")
    assert isinstance(p, PromptExample) and p.query_ids == ids("the sky is")


# ---------------------------------------------------------------------------- sft / prompts
def test_prompt_completion_and_prompt_only(tmp_path, tok):
    cfg = cfg_for(tmp_path)
    (e,), rep = tokenize_rows([{"id": 7, "prompt": "the sky is", "completion": " blue."}], "sft", cfg, tok, "f")
    assert isinstance(e, SFTExample) and e.id == "7" and rep.total == 0
    assert (e.query, e.query_ids, e.response, e.response_ids) == ("the sky is", ids("the sky is"), " blue.", ids("blue.") + [1])
    assert e.post == "the sky is" and e.title == ""
    (p,), _ = tokenize_rows([{"prompt": "what color"}, ], "prompt", cfg, tok, "f")
    assert p.query_ids == ids("what color") and p.id == "0"
    with pytest.raises(DataError, match=r"f: row 0: field 'completion': missing: SFT needs a completion .*has columns: prompt"):
        tokenize_rows([{"prompt": "what color"}], "sft", cfg, tok, "f")


def test_column_mapping_renames_and_errors_name_the_users_column(tmp_path, tok):
    cfg = cfg_for(tmp_path, "data.columns={prompt: question, completion: answer}")
    (e,), _ = tokenize_rows([{"question": "the sky is", "answer": " blue."}], "sft", cfg, tok, "f")
    assert e.query_ids == ids("the sky is") and e.response_ids == ids("blue.") + [1]
    with pytest.raises(DataError, match=r"row 0: field 'answer': missing"):
        tokenize_rows([{"question": "the sky is"}], "sft", cfg, tok, "f")
    with pytest.raises(DataError, match=r"row 1: field 'question': expected a string or a list of messages, got 3 \(int\)"):
        tokenize_rows([{"question": "the sky is", "answer": " blue."}, {"question": 3, "answer": "x"}], "sft", cfg, tok, "f")
    with pytest.raises(ConfigError, match=r"unknown name 'promt' \(did you mean 'prompt'\?\)"):
        cfg_for(tmp_path, "data.columns={promt: q}")


def test_bad_rows_name_file_row_field_or_are_counted(tmp_path, tok):
    f = write_jsonl(tmp_path / "d" / "train.jsonl", [
        {"prompt": "the sky is", "completion": " blue."},
        {"prompt": "the sky is", "completion": ""},                                   # empty
        {"prompt": "the sky is " * 6, "completion": " blue."},                     # 18 > 16 tokens
        {"prompt": "the sky is", "completion": " blue. blue. blue. blue."},           # 5 > 4 with EOS
        {"prompt": "the sky is", "completion": assistant("blue.")},                   # mixed kinds
    ])
    with (tmp_path / "d" / "train.jsonl").open("a") as fh:
        fh.write("{not json\n")
    cfg = cfg_for(tmp_path, f"data.sft_dataset={f.parent}")
    with pytest.raises(DataError, match=rf"{f}: row 5: invalid JSON line"):
        load_sft_data(cfg, "train", tok)
    rows = [json.loads(x) for x in f.read_text().splitlines()[:5]]
    with pytest.raises(DataError, match=r"^f: row 1: field 'completion': is empty or whitespace only$"):
        tokenize_rows(rows, "sft", cfg, tok, "f")
    cfg = cfg_for(tmp_path, f"data.sft_dataset={f.parent}", "data.skip_bad_rows=true")
    examples, rep = load_sft_data(cfg, "train", tok)
    assert len(examples) == 1 and rep.seen == 6 and rep.total == 5
    assert rep.counts == {"empty text": 1, "query too long": 1, "response too long": 1, "wrong format": 1, "bad JSON": 1}
    assert any("row 2: field 'prompt': prompt is 18 tokens, more than data.max_query_length=16" in x for x in rep.examples)


def test_splits_mapping_and_file_types(tmp_path, tok):
    rows = [{"prompt": "the sky is", "completion": " blue."}, {"prompt": "grass is", "completion": " green."}]
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows[1:]), tmp_path / "d" / "test.parquet")
    cfg = cfg_for(tmp_path, f"data.sft_dataset={tmp_path / 'd'}", "data.splits={validation: test}")
    train, _ = load_sft_data(cfg, "train", tok)
    val, rep = load_sft_data(cfg, "validation", tok)
    assert len(train) == 2 and [e.query for e in val] == ["grass is"] and rep.file.endswith("test.parquet")
    with pytest.raises(DataError, match=r"no 'validation' split"):
        load_sft_data(cfg_for(tmp_path, f"data.sft_dataset={tmp_path / 'd'}"), "validation", tok)


def test_prompt_dataset_and_preference_file(tmp_path, tok, caplog):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "what color"}, {"prompt": "the sky"}])
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "the sky is", "chosen": " blue.", "rejected": " green."}])
    cfg = cfg_for(tmp_path, f"data.prompt_dataset={prompts}", f"data.preference_dataset={prefs}")
    ps, _ = load_prompt_data(cfg, "train", tok)
    assert [p.query for p in ps] == ["what color", "the sky"]
    with caplog.at_level(logging.WARNING):
        val, _ = load_preference_data(cfg, "validation", tok)
    assert len(val) == 1 and "one file serves every split" in caplog.text
    with pytest.raises(DataError, match=r"row 0: field 'rejected': missing: preference data needs chosen and rejected"):
        tokenize_rows([{"prompt": "a", "chosen": "b"}], "preference", cfg, tok, "f")


# ---------------------------------------------------------------------------- conversational
def test_conversational_rows_use_the_chat_template(tmp_path, tok):
    cfg = cfg_for(tmp_path)
    tok.chat_template = TEMPLATE
    q = user("what color is the sky ?")
    (e,), _ = tokenize_rows([{"messages": q + assistant("blue.")}], "sft", cfg, tok, "f")
    assert e.query == "<user> what color is the sky ? <assistant> "
    assert e.response == "blue. " and e.response_ids == ids("blue.") + [1]
    assert e.post == "what color is the sky ?"
    # prompt/completion lists give the same example; preferences and prompts too
    (e2,), _ = tokenize_rows([{"prompt": q, "completion": assistant("blue.")}], "sft", cfg, tok, "f")
    assert e2 == e
    (pr,), _ = tokenize_rows([{"chosen": q + assistant("blue."), "rejected": q + assistant("green.")}], "preference", cfg, tok, "f")
    assert pr.query == e.query and pr.chosen_ids == ids("blue.") + [1] and pr.rejected_ids == ids("green.") + [1]
    (p,), _ = tokenize_rows([{"prompt": q}], "prompt", cfg, tok, "f")
    assert p.query_ids == e.query_ids
    with pytest.raises(DataError, match=r"field 'messages\[0\].role': the last message must be the assistant's"):
        tokenize_rows([{"messages": q}], "sft", cfg, tok, "f")
    with pytest.raises(DataError, match=r"field 'messages\[0\].content': missing"):
        tokenize_rows([{"messages": [{"role": "user"}]}], "sft", cfg, tok, "f")
    with pytest.raises(DataError, match=r"expected a string \(data.format=standard\), got a list"):
        tokenize_rows([{"prompt": q, "completion": assistant("x")}], "sft", cfg_for(tmp_path, "data.format=standard"), tok, "f")


def test_no_chat_template_is_a_clear_error_and_the_config_template_is_a_fallback(tmp_path, tok):
    row = {"messages": user("what color is the sky ?") + assistant("blue.")}
    with pytest.raises(DataError, match=r"row 0: field 'messages': conversational data needs a chat template.*"
                                        r"model.tokenizer.*data.chat_template"):
        tokenize_rows([row], "sft", cfg_for(tmp_path), tok, "f")
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE)
    cfg = cfg_for(tmp_path, f"data.chat_template={path}")
    (e,), _ = tokenize_rows([row], "sft", cfg, tok, "f")
    assert e.query == "<user> what color is the sky ? <assistant> "
    assert tok.chat_template == TEMPLATE  # set on the tokenizer, so the saved policy keeps it


def test_hub_dataset_names_load_the_mapped_split(tmp_path, tok, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"prompt": "the sky is", "chosen": " blue.", "rejected": " green."}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = cfg_for(tmp_path, "data.preference_dataset=someone/prefs", "data.splits={validation: test}")
    val, rep = load_preference_data(cfg, "validation", tok)
    assert calls == [("someone/prefs", None, "test")] and len(val) == 1 and rep.file == "someone/prefs[test]"
