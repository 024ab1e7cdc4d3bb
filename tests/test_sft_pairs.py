"""rm.sft_pairs: train comparisons relabelled on pairs of the SFT policy's own samples (tldr-synth)."""

import json
import shutil

import pytest

from rlhflab.data.sft_pairs import relabel
from rlhflab.data.tldr import load_preferences, load_split
from rlhflab.data.tldr_synth import gold_scores
from rlhflab.models.policy import load_policy, load_tokenizer


@pytest.fixture(scope="module")
def pieces(smoke_sft_run):
    cfg = smoke_sft_run
    sft_dir = cfg.run_dir / "sft" / "policy"
    tok = load_tokenizer(sft_dir, padding_side="left")
    rows, _ = load_split(str(cfg.data.dir), "train", "preference")
    examples, _ = load_preferences(str(cfg.data.dir), "train", tok, cfg.data.max_query_length, cfg.data.response_length,
                                   False, cfg.pref_response_length)
    return cfg, load_policy(sft_dir).eval(), tok, rows, examples


def _relabel(pieces, fraction=0.5, seed=0, tau=0.15, beta=0.03):
    cfg, policy, tok, rows, examples = pieces
    return relabel(rows, examples, policy, tok, fraction, seed, cfg.response_length, cfg.ppo.temperature, True, tau, beta,
                   batch_size=16)


def test_relabel_replaces_whole_posts_with_sft_samples(pieces):
    _, _, _, rows, _ = pieces
    new, counts = _relabel(pieces)
    assert len(new) == len(rows) == counts["train_comparisons"]
    posts = {r["info"]["id"] for r in rows}
    assert counts["posts"] == len(posts) and counts["posts_relabelled"] == round(0.5 * len(posts))
    changed = [i for i, (a, b) in enumerate(zip(rows, new)) if a is not b]
    assert len(changed) == counts["replaced"] > 0
    changed_posts = {rows[i]["info"]["id"] for i in changed}
    assert len(changed_posts) <= counts["posts_relabelled"]
    for i in changed:
        r = new[i]
        assert r["info"] == rows[i]["info"]
        assert [s["policy"] for s in r["summaries"]] == ["sft", "sft"]
        assert r["chosen"] == r["summaries"][r["choice"]]["text"] and r["rejected"] == r["summaries"][1 - r["choice"]]["text"]
        assert r["chosen"].startswith(" ") and r["chosen"].strip() != r["rejected"].strip()
    # every comparison of an untouched post is the original object
    for i, r in enumerate(rows):
        if r["info"]["id"] not in changed_posts:
            assert new[i] is r
    # the same inputs give the same rows; another seed picks other posts
    again, _ = _relabel(pieces)
    assert again == new
    other, _ = _relabel(pieces, seed=1)
    assert other != new


def test_labels_follow_the_simulated_labelers(pieces):
    # tau -> 0 with no length preference: the labelers always pick the higher-gold sample
    new, counts = _relabel(pieces, tau=1e-6, beta=0.0)
    assert counts["labels_pick_higher_gold"] == 1.0
    for r in new:
        if r["summaries"][0]["policy"] != "sft":
            continue
        post = r["info"]["post"]
        gc, gr = gold_scores([post, post], [r["chosen"].strip(), r["rejected"].strip()])
        assert gc >= gr
    # a huge length preference: the longer sample wins
    new, _ = _relabel(pieces, tau=1e6, beta=50.0)
    for r in new:
        if r["summaries"][0]["policy"] == "sft":
            assert len(r["chosen"].split()) >= len(r["rejected"].split())


def test_relabel_checks_its_inputs(pieces):
    cfg, policy, tok, rows, examples = pieces
    with pytest.raises(ValueError, match="fraction"):
        relabel(rows, examples, policy, tok, 0.0, 0, 8, 0.7, True, 0.15, 0.03)
    with pytest.raises(ValueError, match="line up"):
        relabel(rows[1:], examples, policy, tok, 0.5, 0, 8, 0.7, True, 0.15, 0.03)


def test_rm_stage_trains_on_the_relabelled_comparisons(smoke_sft_run, tmp_path):
    from rlhflab.config import load_config
    from rlhflab.stages import rm

    base = smoke_sft_run
    cfg = load_config(base.run_dir / "config.yaml", [f"out_dir={tmp_path}", "rm.sft_pairs=0.5"])
    (cfg.run_dir / "sft").parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base.run_dir / "sft", cfg.run_dir / "sft")
    out = rm.main(cfg)
    assert out["data/sft_pairs/replaced"] > 0 and out["data/train_pairs"] == out["data/sft_pairs/train_comparisons"]
    written = [json.loads(line) for line in (cfg.run_dir / "rm" / "sft_pairs.jsonl").open()]
    assert sum(r["summaries"][0]["policy"] == "sft" for r in written) == out["data/sft_pairs/replaced"]
    meta = json.loads((cfg.run_dir / "rm" / "sft_pairs.json").read_text())
    assert meta["key"]["fraction"] == 0.5 and meta["key"]["seed"] == cfg.rm.seed
    # a resume with the same settings reads the pairs back instead of sampling again
    stamp = (cfg.run_dir / "rm" / "sft_pairs.jsonl").stat().st_mtime_ns
    (cfg.run_dir / "rm" / "metrics.json").unlink()
    again = rm.main(cfg, resume=True)
    assert (cfg.run_dir / "rm" / "sft_pairs.jsonl").stat().st_mtime_ns == stamp
    assert again["data/sft_pairs/replaced"] == out["data/sft_pairs/replaced"]


def test_sft_pairs_needs_the_gold_labelers_and_an_sft_policy(smoke_cfg, tmp_path):
    from rlhflab.config import load_config
    from rlhflab.errors import StageError
    from rlhflab.stages import rm

    with pytest.raises(Exception, match="rm.sft_pairs=0.5 relabels comparisons"):
        load_config("tldr-pythia-1b", ["rm.sft_pairs=0.5"])
    cfg = smoke_cfg("rm.sft_pairs=0.5", "model.reward_backbone=minilm")
    with pytest.raises(StageError, match="samples the SFT policy, but there is none"):
        rm.main(cfg)
