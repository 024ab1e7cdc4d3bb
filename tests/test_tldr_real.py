"""Real TL;DR handled as SFD does (summarize_from_feedback_details/tldr_dataset.py):
CNN/DM comparisons filtered and counted, the 169-token RM response budget, the
one-character fallback cut of over-long posts; and the README's real-data command run end to
end on fixture files in the real schemas (tests/tldr_fixtures.py)."""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_tldr_data import EOS, make_tokenizer, pref_row, write_jsonl  # noqa: E402
from tldr_fixtures import CNNDM_BATCHES as FIXTURE_CNNDM_BATCHES  # noqa: E402
from tldr_fixtures import write_fixtures  # noqa: E402

from rlhflab.data import tldr  # noqa: E402
from rlhflab.data.errors import DataError  # noqa: E402
from rlhflab.data.tldr import (  # noqa: E402
    R_CNNDM,
    format_query,
    load_preferences,
    load_sft,
    pref_response_budget,
    tokenize_preferences,
    tokenize_sft,
)

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("tldr-real"))


@pytest.fixture(scope="module")
def fx_tok(fixtures):
    from rlhflab.models.policy import load_tokenizer

    return load_tokenizer(fixtures["policy"])  # adds <|pad|> like for GPT-2/Pythia


def sfd_post(tokenizer, subreddit: str, title: str, post: str, length: int) -> str:
    """The post SFD's ``process_query`` leaves (``truncate_field="post"``, ``truncate_text="\\n"``),
    restated for this test: while the query is too long, the post becomes everything before its
    last newline, or loses its last character when it has none; an empty post still too long
    is an error."""
    while len(tokenizer(format_query(subreddit, title, post), add_special_tokens=False)["input_ids"]) > length:
        if not post:
            raise ValueError("Could not truncate enough!")
        cut = post.rfind("\n")
        post = post[:cut] if cut >= 0 else post[:-1]
    return post


def cnndm_row(i: int, batch="cnndm0", with_batch=True) -> dict:
    row = {"info": {"id": f"cnn_{i}", "post": None, "title": "a b", "subreddit": None, "site": "cnn",
                    "article": "one two three"},
           "summaries": [{"text": " a", "policy": "ref", "note": None}, {"text": " b", "policy": "sup2", "note": None}],
           "choice": 0, "worker": "w1", "split": "valid2", "extra": {"confidence": 5}}
    if with_batch:
        row["batch"] = batch
    return row


# ----------------------------------------------------------------------------- CNN/DM
def test_sfd_cnndm_batches():
    assert tldr.CNNDM_BATCHES == ("batch0_cnndm", "cnndm0", "cnndm2") == FIXTURE_CNNDM_BATCHES


def test_cnndm_rows_are_filtered_and_counted_not_errors(tmp_path, tok, caplog):
    rows = [pref_row(0, batch="batch5"), cnndm_row(1, "batch0_cnndm"), cnndm_row(2, "cnndm0"),
            pref_row(3), cnndm_row(4, "cnndm2"), cnndm_row(5, with_batch=False),  # article, no post, no batch
            pref_row(6, choice=2, flat=False)]  # a bad row after the CNN/DM ones keeps its own row index
    path = write_jsonl(tmp_path / "validation.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{path}: row 6: field 'choice'")):
        load_preferences(path, "validation", tok, 12, 5)  # skip_bad_rows=False: CNN/DM rows are no error
    with caplog.at_level(logging.WARNING, logger="rlhflab.data.tldr"):
        examples, report = load_preferences(path, "validation", tok, 12, 5, skip_bad_rows=True)
    assert [e.id for e in examples] == ["t3_0", "t3_3"]
    assert report.filtered == {R_CNNDM: 4} and report.total == 1 and report.seen == 7
    assert report.as_dict()["filtered"] == {"CNN/DM": 4} and report.as_dict()["skipped"] == 1
    assert str(report).endswith("(1 bad choice); left out 4 CNN/DM rows")
    assert "left out 4 CNN/DM rows" in caplog.text
    # without bad rows: no error, nothing "skipped", but the filtered rows still reported
    examples, report = tokenize_preferences(rows[:6], tok, 12, 5, "f")
    assert len(examples) == 2 and report.total == 0 and report.filtered[R_CNNDM] == 4
    assert str(report) == "f: no rows skipped (6 read); left out 4 CNN/DM rows"
    # a TL;DR row whose post is null and which has no article is still a bad row ("no post")
    bad = {**pref_row(7), "info": {"id": "x", "post": None, "title": "t", "subreddit": "cats"}}
    with pytest.raises(DataError, match="field 'info.post': missing or null"):
        tokenize_preferences([bad], tok, 12, 5, "f")


def test_sfd_preprocessed_chosen_with_endoftext_is_accepted(tok):
    # SFD's parquet copies store chosen/rejected as f"{summaries[choice].text}<|endoftext|>"
    row = pref_row(0, choice=1, flat=False, chosen=" c d e<|endoftext|>", rejected=" a b<|endoftext|>")
    [ex], _ = tokenize_preferences([row], tok, 12, 5, "f")
    assert (ex.chosen, ex.rejected) == (" c d e", " a b") and ex.chosen_ids == [*tok(" c d e")["input_ids"], EOS]
    with pytest.raises(DataError, match="field 'chosen': does not match"):
        tokenize_preferences([pref_row(0, flat=False, chosen=" c d<|endoftext|>")], tok, 12, 5, "f")


def test_script_dataset_error_points_to_a_parquet_copy(monkeypatch):
    import datasets

    def script(*a, **k):
        raise RuntimeError("Dataset scripts are no longer supported, but found summarize_from_feedback.py")

    monkeypatch.setattr(datasets, "load_dataset", script)
    with pytest.raises(DataError, match=r"openai/summarize_from_feedback\[train\]: cannot load .* datasets>=4 .*"
                                        r"vwxyzjn/summarize_from_feedback_oai_preprocessing_1706381144"):
        tldr.load_split("openai/summarize_from_feedback", "train", "preference")


# ----------------------------------------------------------------------------- budgets
def test_pref_response_budget_per_task():
    assert pref_response_budget("tldr", 53) == 169  # SFD max_rm_response_length for TL;DR
    assert pref_response_budget("tldr-synth", 53) == 106  # unchanged: 2 x response_length
    assert pref_response_budget("tldr-synth", 64) == 128
    assert pref_response_budget("tldr", 53, 200) == pref_response_budget("tldr-synth", 53, 200) == 200


def test_config_default_leaves_the_budget_to_the_task():
    from rlhflab.config import load_config

    for name in ("default", "smoke"):
        cfg = load_config(name)
        assert cfg.data.task == "tldr-synth" and cfg.data.max_pref_response_length is None
        assert pref_response_budget(cfg.data.task, cfg.data.response_length) == 2 * cfg.data.response_length


def test_fixture_summaries_over_106_tokens_need_the_169_budget(fixtures, fx_tok):
    src = str(fixtures["comparisons"])
    examples, rep = load_preferences(src, "train", fx_tok, 512, 53, max_response_length=pref_response_budget("tldr", 53))
    assert rep.total == 0 and len(examples) == len(fixtures["pref_rows"]["train"]) == 24
    longest = max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples)
    assert 106 < longest <= 169
    with pytest.raises(DataError, match=r"train\.parquet: row 0: field '(chosen|rejected)': .* more than the 106 "
                                        r"allowed for reward-model data \(data\.max_pref_response_length\)"):
        load_preferences(src, "train", fx_tok, 512, 53)  # the old 2 x 53 default


# ------------------------------------------------------------------------- fallback cut
def test_fallback_cut_matches_sfd_hand_example(tok):
    # 5 format words + 2 title words + 4 post words = 11 tokens > 10; no newline in the post:
    # "one two three fou" ... "one two three " -- the first candidate of 3 words is kept, trailing space and all.
    post = "one two three four"
    assert sfd_post(tok, "cats", "my cat", post, 10) == "one two three "
    [ex], _ = tokenize_sft([{"id": "x", "subreddit": "cats", "title": "my cat", "post": post, "summary": "a"}],
                           tok, 10, 53, "f")
    assert ex.query == "SUBREDDIT: r/cats\n\nTITLE: my cat\n\nPOST: one two three \n\nTL;DR:"
    assert len(ex.query_ids) == 10 and ex.post == post
    # newlines first, then characters: "one two\nthree four five" -> "one two" fits 9
    mixed = "one two\nthree four five"
    assert sfd_post(tok, "cats", "my cat", mixed, 9) == "one two"
    assert tldr.build_query_ids(tok, "cats", "my cat", mixed, 9) == tok(format_query("cats", "my cat", "one two"))["input_ids"]
    assert sfd_post(tok, "cats", "my cat", mixed, 8) == "one "


@pytest.mark.parametrize("budget", [58, 75, 110])  # the query with an empty post is 52 tokens
def test_fallback_cut_equals_sfd_process_query_with_a_bpe(fx_tok, budget):
    # a byte-level BPE (GPT-2/Pythia style), posts with and without newlines, several chunk sizes
    posts = ["I moved in with my roommate last month and she never pays rent on time so I am worried about it.",
             "We went on a trip.\n\nThen my sister told me she lost the deposit.\nNow my mom is angry and I do not know.",
             "A\n\n\nB " + "so tired of this job and my boss " * 6,
             "Short post."]
    fields = [("relationships", "My roommate and the rent", p) for p in posts]
    for chunk in (1, 5, 32):
        ids, cut = tldr._truncated_query_ids(fx_tok, fields, budget, chunk=chunk)
        for (s, t, p), x, c in zip(fields, ids, cut):
            expected = sfd_post(fx_tok, s, t, p, budget)
            assert c == expected, (budget, chunk, p)
            assert x == fx_tok(format_query(s, t, expected), add_special_tokens=False)["input_ids"]
            assert len(x) <= budget
        # the newline-free first post was cut character by character, inside a word or sentence
        if budget <= 75:
            assert cut[0] != posts[0] and not cut[0].endswith(".")


def test_title_too_long_is_a_clear_error_or_skipped(tok):
    row = {"id": "x", "subreddit": "cats", "title": "my cat one two three four five six", "post": "a b c", "summary": "a"}
    with pytest.raises(DataError, match=r"f: row 0: field 'post': post cannot fit in 12 tokens even after truncation"):
        tokenize_sft([row], tok, 12, 53, "f")
    examples, rep = tokenize_sft([row], tok, 12, 53, "f", skip_bad_rows=True)
    assert examples == [] and rep.counts == {"query too long": 1}


def test_fixture_posts_cut_at_newlines_and_by_characters(fixtures, fx_tok):
    examples, rep = load_sft(str(fixtures["sft"]), "train", fx_tok, 512, 53)
    rows = fixtures["sft_rows"]["train"]
    assert rep.total == 0 and len(examples) == len(rows)
    for ex, row in zip(examples[:2], rows[:2]):  # the two over-long posts
        assert len(fx_tok(format_query(row["subreddit"], row["title"], row["post"]))["input_ids"]) > 512
        assert len(ex.query_ids) <= 512 and ex.post == row["post"]
        kept = ex.query[ex.query.index("POST: ") + 6: -len("\n\nTL;DR:")]
        assert kept == sfd_post(fx_tok, row["subreddit"], row["title"], row["post"], 512)
        assert row["post"].startswith(kept) and len(kept) < len(row["post"])
    assert "\n" in rows[0]["post"] and "\n" not in rows[1]["post"]  # row 1 needs the character fallback
    assert not examples[1].query.endswith(".\n\nTL;DR:")  # cut inside a sentence


# ------------------------------------------------------------------------- end to end
def readme_command(marker: str) -> list[str]:
    """The ``rlhflab ...`` command of the README's code block that contains ``marker``, as argv."""
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        if marker in block:
            joined = block.replace("\\\n", " ")
            [line] = [ln for ln in joined.splitlines() if ln.startswith("rlhflab ")]
            return shlex.split(line)[1:]
    raise AssertionError(f"no README code block with {marker!r}")


def test_readme_network_command_is_a_valid_real_data_config():
    from rlhflab.config import load_config

    argv = readme_command("vwxyzjn/summarize_from_feedback_tldr_3_filtered \\")
    assert argv[:3] == ["run", "--config", "default"]
    cfg = load_config("default", argv[3:])
    assert cfg.data.task == "tldr" and cfg.model.policy == "EleutherAI/pythia-1b-deduped"
    assert (cfg.data.max_query_length, cfg.data.response_length) == (512, 53)
    assert pref_response_budget(cfg.data.task, cfg.data.response_length, cfg.data.max_pref_response_length) == 169


def test_rm_stage_on_fixture_comparisons_reports_cnndm_rows(fixtures, tmp_path):
    """The stage the real-data command stopped in: the RM alone (backbone = the fixture policy,
    no SFT run), with the README's 512-token query budget (a shorter one would make the
    newline-free posts cost thousands of one-character cuts)."""
    from rlhflab.config import load_config
    from rlhflab.stages import rm

    cfg = load_config("default", [
        "data.task=tldr", f"data.sft_dataset={fixtures['sft']}", f"data.preference_dataset={fixtures['comparisons']}",
        f"model.policy={fixtures['policy']}", f"model.reward_backbone={fixtures['policy']}", "data.max_query_length=512",
        f"out_dir={tmp_path}", "name=rm-only", "rm.batch_size=8", "rm.micro_batch_size=8", "rm.max_length=704"])
    m = rm.main(cfg, bias_samples=8)
    assert m["data/cnndm_rows_skipped"] == fixtures["cnndm_validation_rows"] == 3
    assert (m["data/train_pairs"], m["data/validation_pairs"]) == (24, 12)  # every TL;DR row kept, CNN/DM left out
    assert m["data/train_skipped"] == m["data/validation_skipped"] == 0
    assert m["data/max_pref_response_length"] == 169
    assert json.loads((tmp_path / "rm-only" / "rm" / "metrics.json").read_text())["data/cnndm_rows_skipped"] == 3
    assert len((tmp_path / "rm-only" / "rm" / "eval_pairs.jsonl").read_text().splitlines()) == 12


@pytest.mark.slow
def test_readme_fixture_command_runs_end_to_end(tmp_path):
    """``python tests/tldr_fixtures.py /tmp/tldr-fixtures`` + the README's ``rlhflab run``
    (there with /tmp/tldr-fixtures, here with tmp_path): SFT -> RM -> PPO -> eval -> report."""
    from rlhflab import cli

    info = write_fixtures(tmp_path / "fx")
    argv = [a.replace("/tmp/tldr-fixtures", str(tmp_path / "fx")) for a in readme_command("tests/tldr_fixtures.py")]
    assert argv[0] == "run" and "data.task=tldr" in argv
    assert cli.main(argv + [f"out_dir={tmp_path / 'runs'}"]) == 0

    run = tmp_path / "runs" / "tldr-fixtures"
    sft = json.loads((run / "sft" / "metrics.json").read_text())
    assert sft["data/train_examples"] == 24 and sft["data/train_skipped"] == 0  # both over-long posts kept
    rm = json.loads((run / "rm" / "metrics.json").read_text())
    assert rm["data/cnndm_rows_skipped"] == info["cnndm_validation_rows"] == 3
    assert rm["data/validation_pairs"] == 12 and rm["data/train_pairs"] == 24
    assert rm["data/validation_skipped"] == 0 and rm["data/max_pref_response_length"] == 169
    ppo = json.loads((run / "ppo" / "metrics.json").read_text())
    assert ppo  # a finished PPO stage
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["policies"]) >= {"sft", "ppo"}
    assert (run / "report.html").is_file() and (run / "summary.json").is_file()
    assert (run / "ppo" / "policy" / "config.json").is_file()
