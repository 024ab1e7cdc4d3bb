"""TL;DR loading, Huang's preprocessing and bad-input errors (rlhflab.data.tldr / errors).

The tokenizer is a WordLevel model over whitespace-split words, so token counts are word
counts and every expected length below is counted by hand.
"""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhflab.data import tldr
from rlhflab.data.errors import DataError, SkipReport
from rlhflab.data.tldr import (
    BadRow,
    build_query_ids,
    format_query,
    load_preferences,
    load_sft,
    load_split,
    tokenize_preferences,
    tokenize_sft,
)

WORDS = ["SUBREDDIT:", "TITLE:", "POST:", "TL;DR:", "r/cats", "r/dogs", "my", "cat", "dog", "one", "two",
         "three", "four", "five", "six", "seven", "eight", "nine", "a", "b", "c", "d", "e"]
PAD, EOS, UNK = 0, 1, 2
VOCAB = {"[PAD]": PAD, "[EOS]": EOS, "[UNK]": UNK, **{w: i + 3 for i, w in enumerate(WORDS)}}


def make_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", **kw)


def ids(text: str) -> list[int]:
    return [VOCAB.get(w, UNK) for w in text.split()]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def sft_row(i: int, **kw) -> dict:
    row = {"id": f"t3_{i}", "subreddit": "cats", "title": "my cat", "post": "one two three", "summary": "a b"}
    row.update(kw)
    return row


def pref_row(i: int, choice: int = 0, texts=(" a b", " c d e"), flat: bool = True, **kw) -> dict:
    # openai "comparisons" schema; summary texts carry a leading space as in the real data.
    row = {"info": {"id": f"t3_{i}", "post": "one two three", "title": "my cat", "subreddit": "cats"},
           "summaries": [{"text": texts[0], "policy": "sup1", "note": None}, {"text": texts[1], "policy": "ref"}],
           "choice": choice}
    if flat:  # tldr-synth also writes flattened texts
        row["chosen"], row["rejected"] = texts[choice], texts[1 - choice]
    row.update(kw)
    return row


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------- format
def test_format_query_exact_string():
    assert format_query("cats", "my cat", "one two") == "SUBREDDIT: r/cats\n\nTITLE: my cat\n\nPOST: one two\n\nTL;DR:"


def test_query_fits_unchanged(tok):
    # 5 fixed words (SUBREDDIT: r/cats TITLE: POST: TL;DR:) + 2 title + 3 post = 10 tokens
    q = build_query_ids(tok, "cats", "my cat", "one two three", 10)
    assert q == ids("SUBREDDIT: r/cats TITLE: my cat POST: one two three TL;DR:")
    assert len(q) == 10


def test_truncation_cuts_post_at_last_newline(tok):
    post = "one two three\n\nfour five\n\nsix seven eight nine"  # 9 words -> query of 16 tokens
    # budget 12: cut before the last newline (SFD's post[:rindex("\n")] keeps the first "\n" of
    # the blank line); "one two three\n\nfour five\n" gives 5 + 2 + 5 = 12 tokens
    [ex], rep = tokenize_sft([sft_row(0, post=post)], tok, 12, 53, "f")
    assert ex.query == "SUBREDDIT: r/cats\n\nTITLE: my cat\n\nPOST: one two three\n\nfour five\n\n\nTL;DR:"
    assert ex.query_ids == ids(ex.query) and len(ex.query_ids) == 12
    assert ex.post == post  # original post kept for evaluation
    # budget 11: the second paragraph must go too: "one two three\n", 10 tokens
    [ex], _ = tokenize_sft([sft_row(0, post=post)], tok, 11, 53, "f")
    assert ex.query == "SUBREDDIT: r/cats\n\nTITLE: my cat\n\nPOST: one two three\n\n\nTL;DR:"
    assert build_query_ids(tok, "cats", "my cat", post, 11) == ids(ex.query)
    # budget 16: fits as is
    assert build_query_ids(tok, "cats", "my cat", post, 16) == ids(format_query("cats", "my cat", post))
    # budget 9: no newline left in "one two three": SFD's fallback drops one character at a
    # time; "one two thre" is still 3 words, "one two " is the first candidate with 2 (9 tokens)
    [ex], _ = tokenize_sft([sft_row(0, post=post)], tok, 9, 53, "f")
    assert ex.query == "SUBREDDIT: r/cats\n\nTITLE: my cat\n\nPOST: one two \n\nTL;DR:" and len(ex.query_ids) == 9
    # budget 6: the format and title alone are 7 tokens -> bad row
    with pytest.raises(DataError, match=r"field 'post': post cannot fit in 6 tokens even after truncation \(at its "
                       r"newlines, then character by character\): the subreddit and title alone are too long"):
        build_query_ids(tok, "cats", "my cat", post, 6)


def test_reference_response_is_space_summary_eos(tok):
    [ex], _ = tokenize_sft([sft_row(0, summary="a b c")], tok, 64, 4, "f")
    assert ex.response == " a b c"
    assert ex.response_ids == ids("a b c") + [EOS]  # Huang: " {summary}<eos>", 3 words + EOS = 4 tokens
    assert ex.id == "t3_0" and (ex.subreddit, ex.title) == ("cats", "my cat")


def test_response_text_normalises_leading_space():
    # real comparison texts already start with a space; SFT summaries do not: both -> one space
    assert tldr.response_text("a b") == " a b"
    assert tldr.response_text(" a b\n") == " a b"


def test_tokenizer_without_pad_is_refused():
    with pytest.raises(ValueError, match="pad_token"):
        tokenize_sft([sft_row(0)], make_tokenizer(pad=False), 64, 53, "f")


# -------------------------------------------------------------------------- loading
def test_load_jsonl_parquet_arrow_and_folders(tmp_path, tok):
    rows = [sft_row(i, summary=["a", "a b", "c d e"][i]) for i in range(3)]
    root = tmp_path / "synth"
    (root / "sft").mkdir(parents=True)
    (root / "preference").mkdir()
    write_jsonl(root / "sft" / "train.jsonl", rows)
    write_jsonl(root / "preference" / "train.jsonl", [pref_row(0), pref_row(1, choice=1)])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "validation.parquet")
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink:  # IPC stream, as datasets.save_to_disk writes
        with pa.ipc.new_stream(sink, pa.Table.from_pylist(rows).schema) as w:
            w.write_table(pa.Table.from_pylist(rows))
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink:  # IPC file format
        with pa.ipc.new_file(sink, pa.Table.from_pylist(rows).schema) as w:
            w.write_table(pa.Table.from_pylist(rows))

    got, label = load_split(str(root), "train", "sft")  # data root: picks sft/
    assert got == rows and label == str(root / "sft" / "train.jsonl")
    for source, split in [(root / "sft" / "train.jsonl", "whatever"), (tmp_path, "validation"),
                          (tmp_path / "s.arrow", "train"), (tmp_path / "f.arrow", "train")]:
        got, _ = load_split(str(source), split, "sft")
        assert got == rows, source
    (tmp_path / "a.json").write_text(json.dumps(rows))  # .json holding one array of rows
    assert load_split(str(tmp_path / "a.json"), "train", "sft")[0] == rows
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    got, label = load_split(str(tmp_path / "saved"), "test", "sft")
    assert got == rows and label == f"{tmp_path / 'saved'}[test]"
    prefs, label = load_split(str(root), "train", "preference")
    assert label.endswith("preference/train.jsonl") and [p["choice"] for p in prefs] == [0, 1]

    examples, rep = load_sft(str(tmp_path), "validation", tok, 64, 53)
    assert [e.response_ids for e in examples] == [ids("a") + [EOS], ids("a b") + [EOS], ids("c d e") + [EOS]]
    assert rep.total == 0 and rep.seen == 3


def test_load_preferences_parquet_nested_schema(tmp_path, tok):
    # parquet round trip of the nested comparisons schema, without flattened columns (real data)
    rows = [pref_row(0, flat=False), pref_row(1, choice=1, flat=False)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    examples, rep = load_preferences(str(tmp_path), "train", tok, 64, 53)
    assert rep.total == 0
    e0, e1 = examples
    assert (e0.chosen, e0.rejected) == (" a b", " c d e")  # choice 0
    assert (e1.chosen, e1.rejected) == (" c d e", " a b")  # choice 1
    assert e0.chosen_ids == ids("a b") + [EOS] and e0.rejected_ids == ids("c d e") + [EOS]
    assert e0.query_ids == ids("SUBREDDIT: r/cats TITLE: my cat POST: one two three TL;DR:")
    assert e0.id == "t3_0"


def test_missing_sources_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: no 'test' split for sft data; looked for")):
        load_split(str(tmp_path), "test", "sft")
    with pytest.raises(DataError, match="no such file or folder"):
        load_split(str(tmp_path / "nope.jsonl"), "train", "sft")

    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"openai/summarize_from_feedback\[validation\]: cannot load from the Hugging Face hub .*offline"):
        load_split("openai/summarize_from_feedback", "validation", "preference")


def test_hub_name_asks_for_comparisons_config(monkeypatch):
    import datasets

    calls = []

    def fake(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([sft_row(0)])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    load_split("openai/summarize_from_feedback", "validation", "preference")
    rows, label = load_split("vwxyzjn/summarize_from_feedback_tldr_3_filtered", "train", "sft")
    assert calls == [("openai/summarize_from_feedback", "comparisons", "validation"),
                     ("vwxyzjn/summarize_from_feedback_tldr_3_filtered", None, "train")]
    assert rows == [sft_row(0)] and label == "vwxyzjn/summarize_from_feedback_tldr_3_filtered[train]"


# ------------------------------------------------------------------------ bad input
LONG_TITLE = "my cat one two three four five six"  # 5 + 8 title words = 13 tokens > 12 with any post

SFT_BAD = {  # case: (bad row, field, reason)
    "missing column": (lambda: {k: v for k, v in sft_row(1).items() if k != "summary"}, "summary", "missing field"),
    "wrong type": (lambda: sft_row(1, post=123), "post", "wrong type"),
    "empty post": (lambda: sft_row(1, post="  \n "), "post", "empty text"),
    "empty summary": (lambda: sft_row(1, summary=""), "summary", "empty text"),
    "post cannot fit": (lambda: sft_row(1, title=LONG_TITLE), "post", "query too long"),
    "summary too long": (lambda: sft_row(1, summary="a b c d e"), "summary", "response too long"),  # 6 > 5
}


@pytest.mark.parametrize("case", list(SFT_BAD))
def test_bad_sft_row_names_file_row_field(tmp_path, tok, case):
    bad, field, _ = SFT_BAD[case]
    path = write_jsonl(tmp_path / "train.jsonl", [sft_row(0), bad(), sft_row(2)])
    rows, label = load_split(path, "train", "sft")
    with pytest.raises(DataError) as ei:
        tokenize_sft(rows, tok, 12, 5, label)
    assert str(ei.value).startswith(f"{path}: row 1: field '{field}': ")
    assert (ei.value.file, ei.value.row, ei.value.field) == (path, 1, field)


def test_bad_json_line_names_line(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(sft_row(0)) + "\n" + '{"id": "t3_1", "post": \n' + json.dumps(sft_row(2)) + "\n\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: row 1: invalid JSON line")):
        load_split(str(path), "train", "sft")
    path.write_text(json.dumps(sft_row(0)) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: row 1: invalid JSON line (expected a JSON object, got list)")):
        load_split(str(path), "train", "sft")


def test_skip_bad_sft_rows_counts_each_reason(tmp_path, tok):
    rows = [sft_row(0)] + [bad() for bad, _, _ in SFT_BAD.values()] + [sft_row(99)]
    path = tmp_path / "train.jsonl"
    write_jsonl(path, rows)
    with path.open("a") as f:
        f.write("not json\n")
        f.write(json.dumps(sft_row(100)) + "\n")
    examples, report = load_sft(str(path), "train", tok, 12, 5, skip_bad_rows=True)
    assert [e.id for e in examples] == ["t3_0", "t3_99", "t3_100"]
    assert isinstance(report, SkipReport)
    assert report.as_dict()["reasons"] == {"bad JSON": 1, "empty text": 2, "missing field": 1, "query too long": 1,
                                           "response too long": 1, "wrong type": 1}
    assert report.total == 7 and report.seen == 10
    assert str(report) == (f"{path}: skipped 7 of 10 rows (2 empty text, 1 bad JSON, 1 missing field, "
                           "1 query too long, 1 response too long, 1 wrong type)")
    assert report.examples[0].startswith(f"{path}: row 1: field 'summary': missing")


PREF_BAD = {  # case: (bad row, field, reason)
    "choice 2": (lambda: pref_row(1, flat=False, choice=2), "choice", "bad choice"),
    "choice '1'": (lambda: pref_row(1, flat=False, choice="1"), "choice", "bad choice"),
    "choice True": (lambda: pref_row(1, flat=False, choice=True), "choice", "bad choice"),
    "one summary": (lambda: {**pref_row(1), "summaries": [{"text": " a", "policy": "p"}]}, "summaries", "bad summaries"),
    "chosen disagrees": (lambda: {**pref_row(1), "chosen": " c d e"}, "chosen", "chosen/rejected disagree with summaries"),
    "empty text": (lambda: pref_row(1, texts=(" a b", "  ")), "summaries[1].text", "empty text"),
    "null post": (lambda: {**pref_row(1), "info": {"id": "x", "post": None, "title": "t", "subreddit": "cats"}},
                  "info.post", "no post"),  # CNN/DM rows (info.article) are filtered instead: test_tldr_real.py
    "missing info": (lambda: {k: v for k, v in pref_row(1).items() if k != "info"}, "info", "missing field"),
    "title not str": (lambda: {**pref_row(1), "info": {**pref_row(1)["info"], "title": 5}}, "info.title", "wrong type"),
    "post cannot fit": (lambda: {**pref_row(1), "info": {**pref_row(1)["info"], "title": LONG_TITLE}}, "info.post",
                        "query too long"),
    "rejected too long": (lambda: pref_row(1, texts=(" a", " a b c d e a b c d e a")), "rejected",
                          "response too long"),  # 11 words + EOS = 12 > 2 x 5
}


@pytest.mark.parametrize("case", list(PREF_BAD))
def test_bad_preference_row_names_file_row_field(tmp_path, tok, case):
    bad, field, _ = PREF_BAD[case]
    path = write_jsonl(tmp_path / "train.jsonl", [pref_row(0), bad(), pref_row(2)])
    rows, label = load_split(path, "train", "preference")
    with pytest.raises(DataError) as ei:
        tokenize_preferences(rows, tok, 12, 5, label)
    assert str(ei.value).startswith(f"{path}: row 1: field '{field}': ")
    assert (ei.value.row, ei.value.field) == (1, field)


def test_bad_choice_messages_show_the_value(tok):
    for choice, shown in [(2, "2 (int)"), ("1", "'1' (str)"), (True, "True (bool)")]:
        with pytest.raises(DataError, match=re.escape(f"f: row 0: field 'choice': must be the integer 0 or 1, got {shown}")):
            tokenize_preferences([pref_row(0, flat=False, choice=choice)], tok, 12, 5, "f")


def test_preference_length_limit_is_configurable(tok):
    row = pref_row(0, texts=(" a", " a b c d e a b c d e a"))  # rejected: 12 tokens with EOS
    [ex], _ = tokenize_preferences([row], tok, 12, 5, "f", max_response_length=12)
    assert len(ex.rejected_ids) == 12 and ex.rejected_ids[-1] == EOS


def test_skip_bad_preference_rows_counts_each_reason(tmp_path, tok):
    rows = [pref_row(0)] + [bad() for bad, _, _ in PREF_BAD.values()] + [pref_row(99, choice=1)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    examples, report = load_preferences(path, "train", tok, 12, 5, skip_bad_rows=True)
    assert [(e.id, e.chosen) for e in examples] == [("t3_0", " a b"), ("t3_99", " c d e")]
    expected: dict[str, int] = {}
    for _, _, reason in PREF_BAD.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert report.as_dict()["reasons"] == dict(sorted(expected.items()))
    assert report.total == len(PREF_BAD) == 11 and report.seen == 13
    assert expected["bad choice"] == 3


def test_bad_row_placeholder_keeps_row_indices(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_text("{oops\n" + json.dumps(sft_row(1, post=7)) + "\n")
    rows, label = load_split(str(path), "train", "sft", skip_bad_rows=True)
    assert isinstance(rows[0], BadRow) and rows[0].error.row == 0
    _, report = tokenize_sft(rows, tok, 12, 5, label, skip_bad_rows=True)
    assert report.examples[1].startswith(f"{path}: row 1: field 'post': expected a string, got 7 (int)")


def test_data_error_format_and_pickle():
    import pickle

    e = DataError("a.jsonl", 3, "info.post", "is null", "no post")
    assert str(e) == "a.jsonl: row 3: field 'info.post': is null"
    assert isinstance(e, ValueError)
    e2 = pickle.loads(pickle.dumps(e))
    assert (str(e2), e2.reason) == (str(e), "no post")
    assert str(DataError("a.jsonl", None, None, "no such file or folder")) == "a.jsonl: no such file or folder"
