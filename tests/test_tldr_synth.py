"""tldr-synth: world consistency, generator determinism, file schemas, tokenizer, labelers and
the statistics the rest of the pipeline relies on (reference < oracle, noisy but informative
labels, length bias)."""

import hashlib
import json
import math
import random
import re
from pathlib import Path

import pytest

from rlhflab.config import SynthConfig
from rlhflab.data import synth_world as W
from rlhflab.data import tldr_synth as T
from rlhflab.judges import gold

SMALL = dict(n_sft_train=60, n_sft_validation=20, n_sft_test=20, n_pref_train=80, n_pref_validation=40)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "a"
    stats = T.synthesize(root, SynthConfig(seed=11, **SMALL), progress=False)
    return root, stats


@pytest.fixture(scope="module")
def moderate(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("synth_moderate")
    cfg = SynthConfig(seed=0, n_sft_train=100, n_sft_validation=300, n_sft_test=50, n_pref_train=2500, n_pref_validation=800)
    return T.synthesize(root, cfg, progress=False)


# ----------------------------------------------------------------------------- the world
def _ctx(gender: str) -> dict:
    return {**T._pronouns(gender), "amt": "$800", "n": 3, "month": "May", "day": "Friday", "state": "Ohio", "pet": "Max",
            "R": "my boyfriend", "Rc": "My boyfriend", "S": "she", "rel": "boyfriend", "nage": "25F", "rage": "27M"}


@pytest.mark.parametrize("gender", ["M", "F"])
def test_every_template_is_recognised_as_exactly_its_own_fact(gender):
    ctx = _ctx(gender)
    for f in W.FACTS:
        for t in f.post + f.summary:
            assert W.detect(t.format(**ctx)) - {"who:boyfriend"} == {f.id}, (f.id, t)
        for t in f.details:  # follow-up sentences carry no fact
            assert W.detect(t.format(**ctx)) == set(), (f.id, t)
    for t in W.INTROS + W.FEELINGS + W.CLOSERS + W.FEELING_CLAUSES + W.USELESS_TITLES + W.VAGUE_SUMMARIES + W.WHO_ONLY:
        assert W.detect(t.format(**ctx)) - {"who:boyfriend"} == set(), t
    for rel in W.RELATIONS:
        for noun in list(rel.nouns.values()) + list(rel.short):
            assert W.detect(f"my {noun} did it") == {f"who:{rel.name}"}


def test_summary_details_always_exist_in_the_post():
    # A summary template may only use a detail (amount, number, month) every post template of
    # the same fact states; otherwise a faithful summary would read as a hallucination.
    details = {"amt", "n", "month", "day", "state", "pet"}
    for f in W.EVENTS + W.SECONDARY + W.ASKS:
        for s in f.summary:
            need = set(re.findall(r"\{(\w+)\}", s)) & details
            for t in f.post:
                assert need <= set(re.findall(r"\{(\w+)\}", t)), (f.id, s, t)


def test_world_is_rich_and_every_option_has_an_ask():
    assert len(W.SUBREDDITS) >= 12 and len(W.RELATIONS) >= 15 and len(W.EVENTS) >= 25 and len(W.ASKS) >= 15
    for sub, opts in T._OPTIONS.items():
        assert opts, sub
        for event, rel in opts:
            assert T._asks_for(event, rel), (sub, event.id, rel)
    # Paraphrases: several per event and ask.
    assert all(len(e.post) >= 2 and len(e.summary) >= 2 for e in W.EVENTS)
    assert all(len(a.post) >= 2 and len(a.summary) >= 2 for a in W.ASKS)


def test_posts_judge_reads_exactly_the_written_facts_and_lengths():
    rng, ids = random.Random(5), T._Ids()
    kinds = set()
    for _ in range(300):
        p = ids.new_post(rng)
        assert gold.post_facts(p.post) == {f"who:{p.rel}", p.event, p.ask, *p.secondary, *p.distractors}
        assert 40 <= len(p.post.split()) <= 110
        kinds.add(p.title_kind)
    assert kinds == {"descriptive", "partial", "useless"}


def test_writers_quality_order_and_oracle_length():
    rng, ids = random.Random(6), T._Ids()
    totals = {name: [] for name in T.WRITERS}
    for _ in range(150):
        p = ids.new_post(rng)
        for name, write in T.WRITERS.items():
            s = write(p, rng)
            g = gold.score(p.post, s)
            totals[name].append(g.total)
            if name == "halluc":
                assert g.hallucinated == 1, s
            if name == "oracle":
                assert 5 <= len(s.split()) <= 20, s  # all key facts, concise
    mean = {k: sum(v) / len(v) for k, v in totals.items()}
    assert min(totals["oracle"]) >= 0.88  # all key facts; at most a rounding of length/secondary terms
    assert mean["oracle"] - mean["ref"] >= 0.15
    assert mean["ref"] > mean["vague"] and mean["oracle"] > max(mean["verbose"], mean["short"], mean["halluc"], mean["title"])


# ---------------------------------------------------------------------------- labelers
def test_labeler_probability_hand_values():
    assert T.labeler_prob(0.9, 0.75, 10, 10, 0.15, 0.03) == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert T.labeler_prob(0.9, 0.75, 20, 10, 0.15, 0.03) == pytest.approx(1 / (1 + math.exp(-1.3)))
    assert T.labeler_prob(0.5, 0.5, 10, 20, 0.15, 0.03) == pytest.approx(1 / (1 + math.exp(0.3)))
    assert T.labeler_prob(0.2, 0.9, 7, 3, 0.15, 0.03) + T.labeler_prob(0.9, 0.2, 3, 7, 0.15, 0.03) == pytest.approx(1.0)
    assert T.labeler_prob(1.0, -1.0, 0, 0, 1e-4, 0.0) == 1.0 and T.labeler_prob(-1.0, 1.0, 0, 0, 1e-4, 0.0) == 0.0


def test_gold_scores_wrapper():
    p = "My sister (30F) forgot my birthday. Should I cut her off?"
    assert T.gold_scores([p, p], ["My sister forgot my birthday, should I cut her off?", ""]) == [pytest.approx(0.9), -1.0]


# ------------------------------------------------------------------------------- files
def test_same_seed_is_byte_identical_other_seed_differs(small, tmp_path):
    root, _ = small
    again = tmp_path / "b"
    T.synthesize(again, SynthConfig(seed=11, **SMALL), progress=False)
    assert _digest(root) == _digest(again)
    other = tmp_path / "c"
    T.synthesize(other, SynthConfig(seed=12, **SMALL), progress=False)
    d1, d3 = _digest(root), _digest(other)
    assert set(d1) == set(d3)
    for f in ("sft/train.jsonl", "sft/validation.jsonl", "preference/train.jsonl", "preference/validation.jsonl"):
        assert d1[f] != d3[f], f


def test_larger_validation_split_keeps_train_data_tokenizer_and_first_pairs(small, tmp_path):
    """A larger n_pref_validation (the default's 16000, for a sharper RM accuracy) must not change
    anything the models are trained on: the train files and the tokenizer (trained on the train
    splits only) stay byte-identical, and the validation split only grows at its end."""
    root, _ = small
    big = tmp_path / "big"
    T.synthesize(big, SynthConfig(seed=11, **{**SMALL, "n_pref_validation": 3 * SMALL["n_pref_validation"]}), progress=False)
    d1, d2 = _digest(root), _digest(big)
    for f in d1:
        if f.startswith("tokenizer/") or f.endswith("train.jsonl"):
            assert d1[f] == d2[f], f
    assert d1["preference/validation.jsonl"] != d2["preference/validation.jsonl"]
    small_val, big_val = (_jsonl(r / "preference" / "validation.jsonl") for r in (root, big))
    assert len(big_val) == 3 * len(small_val) and big_val[: len(small_val)] == small_val
    # ... while the tokenizer does depend on the train text:
    other = tmp_path / "more_train"
    T.synthesize(other, SynthConfig(seed=11, **{**SMALL, "n_pref_train": 2 * SMALL["n_pref_train"]}), progress=False)
    assert _digest(other)["tokenizer/tokenizer.json"] != d1["tokenizer/tokenizer.json"]


def test_pair_writer_mix_is_configurable_and_validated(small, tmp_path):
    """data.synth.pair_writers reweights the writers of the preference pairs (more invented facts,
    say); the SFT data is untouched, an empty mix is the built-in one, and bad mixes are refused."""
    from pydantic import ValidationError

    root, _ = small
    assert SynthConfig(seed=11, **SMALL, pair_writers={}) == SynthConfig(seed=11, **SMALL)
    big = {**SMALL, "n_pref_train": 400}
    base, more = tmp_path / "base", tmp_path / "more"
    T.synthesize(base, SynthConfig(seed=11, **big), progress=False)
    T.synthesize(more, SynthConfig(seed=11, **big, pair_writers={"halluc": 0.5, "vague": 0}), progress=False)
    d1, d2 = _digest(base), _digest(more)
    for f in ("sft/train.jsonl", "sft/validation.jsonl", "sft/test.jsonl"):
        assert d1[f] == d2[f], f

    def count(r: Path, policy: str) -> int:
        return sum(s["policy"] == policy for row in _jsonl(r / "preference" / "train.jsonl") for s in row["summaries"])

    # 800 summaries: the built-in 8% gives ~64, weight 0.5 of a total 1.40 gives ~286 (binomial sd ~14)
    assert count(base, "halluc") < 110 and count(more, "halluc") > 200
    assert count(base, "vague") > 0 and count(more, "vague") == 0
    # The validation comparisons keep the built-in mix whatever the train mix: same writers, same rates.
    def val_policies(r: Path) -> list[str]:
        return [s["policy"] for row in _jsonl(r / "preference" / "validation.jsonl") for s in row["summaries"]]

    assert val_policies(base) == val_policies(more)
    with pytest.raises(ValidationError, match="did you mean 'halluc'"):
        SynthConfig(pair_writers={"hallucinated": 0.3})
    with pytest.raises(ValidationError, match=">= 0"):
        SynthConfig(pair_writers={"ref": -1.0})
    with pytest.raises(ValidationError, match="weight 0"):
        SynthConfig(pair_writers={k: 0.0 for k in T.PAIR_POLICIES})


def test_sft_schema(small):
    root, _ = small
    ids = set()
    for split, n in (("train", 60), ("validation", 20), ("test", 20)):
        rows = _jsonl(root / "sft" / f"{split}.jsonl")
        assert len(rows) == n
        for r in rows:
            assert list(r) == ["id", "subreddit", "title", "post", "summary"]
            assert all(isinstance(v, str) and v for v in r.values())
            assert r["id"].startswith("t3_") and not r["subreddit"].startswith("r/") and r["subreddit"] in W.SUBREDDITS
            assert r["summary"] == r["summary"].strip()  # like tldr_3_filtered: no leading space
            assert len(r["summary"].split()) <= T.REFERENCE_MAX_WORDS
        ids |= {r["id"] for r in rows}
    assert len(ids) == 100


def test_preference_schema(small):
    root, _ = small
    for split, n in (("train", 80), ("validation", 40)):
        rows = _jsonl(root / "preference" / f"{split}.jsonl")
        assert len(rows) == n
        for r in rows:
            assert list(r) == ["info", "summaries", "choice", "chosen", "rejected"]
            assert list(r["info"]) == ["id", "post", "title", "subreddit"] and all(isinstance(v, str) for v in r["info"].values())
            assert len(r["summaries"]) == 2 and all(list(s) == ["text", "policy"] for s in r["summaries"])
            assert all(s["policy"] in T.WRITERS and s["text"].startswith(" ") for s in r["summaries"])
            assert type(r["choice"]) is int and r["choice"] in (0, 1)
            assert r["chosen"] == r["summaries"][r["choice"]]["text"]
            assert r["rejected"] == r["summaries"][1 - r["choice"]]["text"]
            assert r["chosen"].strip() != r["rejected"].strip()


def test_posts_are_distinct_across_all_splits(small):
    root, _ = small
    sft = {s: {r["post"] for r in _jsonl(root / "sft" / f"{s}.jsonl")} for s in T.SFT_SPLITS}
    pref = {s: {r["info"]["post"] for r in _jsonl(root / "preference" / f"{s}.jsonl")} for s in T.PREF_SPLITS}
    groups = list(sft.values()) + list(pref.values())
    assert sum(len(g) for g in groups) == len(set().union(*groups))
    assert pref["validation"].isdisjoint(pref["train"])


def test_tokenizer_loads_and_round_trips(small):
    from transformers import AutoTokenizer

    root, _ = small
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    assert (tok.pad_token, tok.eos_token) == ("<|pad|>", "<|endoftext|>")
    # Even 100 posts fill the vocabulary: the world's own wording is part of the BPE corpus.
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and len(tok) == 2048
    for text in (" some text", " My boyfriend (27M) forgot my birthday. Should I break up with him?",
                 "SUBREDDIT: r/relationships\n\nTITLE: need advice!!\n\nPOST: ñ 漢字\n\nTL;DR:"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.encode(" hi", add_special_tokens=False)[-1] != tok.eos_token_id  # EOS is appended by the collators


def test_files_load_through_the_tldr_pipeline(small):
    from transformers import AutoTokenizer

    from rlhflab.data.tldr import load_split, tokenize_preferences, tokenize_sft

    root, _ = small
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    rows, label = load_split(str(root), "train", "sft")
    examples, report = tokenize_sft(rows, tok, max_query_length=512, response_length=53, file_label=label)
    assert len(examples) == 60 and report.seen == 60 and report.total == 0
    rows, label = load_split(str(root), "validation", "preference")
    examples, report = tokenize_preferences(rows, tok, max_query_length=512, response_length=53, file_label=label)
    assert len(examples) == 40 and report.total == 0


def test_stats_file_matches_return_value(small):
    root, stats = small
    on_disk = json.loads((root / "stats.json").read_text())
    assert on_disk == {k: v for k, v in stats.items() if k != "seconds"}
    assert stats["rows"] == {"sft": {"train": 60, "validation": 20, "test": 20}, "preference": {"train": 80, "validation": 40}}
    assert stats["config"]["seed"] == 11 and stats["seed"] == 11
    for k in ("query", "reference", "oracle"):
        assert set(stats["tokens"][k]) == {"p50", "p95", "max"}


# ------------------------------------------------------------------------- stats bands
def test_stats_bands_on_a_moderate_run(moderate):
    s = moderate
    g = s["gold_mean"]
    assert g["oracle"] - g["reference"] >= 0.15
    assert g["title"] < g["reference"]
    for split in ("train", "validation"):
        assert 0.65 <= s["labeler"][split]["agreement"] <= 0.8, s["labeler"]
    assert 0.6 < s["bayes_accuracy"] < 0.9
    lb = s["length_bias"]["train"]
    assert lb["pairs"] >= 150
    assert lb["longer_chosen_prob"] > 0.5 and lb["longer_chosen_rate"] > 0.5
    # Sizes a 2-layer model on CPU can handle.
    assert s["tokens"]["query"]["max"] <= 200
    assert s["tokens"]["oracle"]["max"] <= 32
    assert s["tokens"]["reference"]["max"] <= 53
