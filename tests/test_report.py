"""The HTML report on synthetic run directories: content, self-containment, escaping, partial runs."""
import base64
import json
import re
from pathlib import Path

import pytest

from rlhflab.config import load_config, save_config
from rlhflab.report.html import hacking_readings, kl_reading, render_report

EVIL = "<script>alert('x')</script> & \"quotes\""


def _jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_sft(run: Path):
    _jsonl(run / "sft" / "metrics.jsonl",
           [{"step": s, "train/loss": 3.0 - 0.1 * s, "lr": 1e-4, "epoch": s / 10} for s in range(1, 11)]
           + [{"step": 10, "eval/loss": 2.25, "eval/rougeL": 0.3125, "gold/score": 0.41, "gold/reference": 0.45}])
    _json(run / "sft" / "metrics.json", {"step": 10, "train/loss": 2.0, "eval/loss": 2.25, "eval/rougeL": 0.3125, "gold/score": 0.41})


def write_rm(run: Path):
    _jsonl(run / "rm" / "metrics.jsonl",
           [{"step": s, "train/loss": 0.69 - 0.02 * s, "train/accuracy": 0.5 + 0.02 * s} for s in range(1, 9)]
           + [{"step": 8, "eval/loss": 0.55, "eval/accuracy": 0.7125, "eval/normalized_accuracy": 0.8906}])
    # the keys of stages/rm.py evaluate_rm
    _json(run / "rm" / "metrics.json", {"eval/accuracy": 0.7125, "eval/normalized_accuracy": 0.8906,
                                        "data/bayes_accuracy": 0.8012, "eval/length_coef": 0.0456,
                                        "data/labeler_length_coef": 0.03, "eval/prefers_longer_near_tie": 0.71,
                                        "data/labels_prefer_longer_near_tie": 0.64,
                                        "eval/faithful/pairs": 27, "eval/faithful/rm_prefers_faithful": 0.2125,
                                        "eval/faithful/labels_prefer_faithful": 0.5725,
                                        "eval/on_policy/gold_agreement": 0.6625, "eval/on_policy/pairs": 1800,
                                        "eval/accuracy_lendiff_0-2": 0.6, "eval/accuracy_lendiff_0-2_n": 10,
                                        "eval/accuracy_lendiff_3-5": 0.7, "eval/accuracy_lendiff_3-5_n": 12,
                                        "eval/accuracy_lendiff_>10": None, "eval/accuracy_lendiff_>10_n": 0})


def write_ppo(run: Path, kl_final=3.5):
    rows = []
    for s in range(1, 21):
        rows.append({"step": s, "episode": 16 * s, "objective/scores": 0.1 * s, "objective/rlhf_reward": 0.1 * s - 0.05,
                     "objective/kl": kl_final * s / 20, "policy/approxkl_token_avg": 0.01, "objective/entropy": 30 - s,
                     "response/length_mean": 20 + s, "policy/clipfrac_avg": 0.1, "val/clipfrac_avg": 0.2,
                     "response/length_score_corr": 0.6, "loss/value_avg": 0.3 / s})
        if s % 5 == 0:
            rows[-1]["gold/score"] = 0.5 - 0.01 * s  # falls while the RM score rises: over-optimisation
    _jsonl(run / "ppo" / "metrics.jsonl", rows)
    _json(run / "ppo" / "metrics.json", {"objective/kl": kl_final, "objective/scores": 2.0, "gold/score": 0.3})


def write_eval(run: Path):
    hist = {"edges": [-1.0, 0.0, 1.0, 2.0], "counts": [1, 2, 1]}
    pol = lambda g, rm: {"path": "x", "n": 4, "gold_mean": g, "gold_ci": [g - 0.05, g + 0.05], "rm_score_mean": rm,
                         "rm_score_ci": [rm - 0.1, rm + 0.1], "rm_histogram": hist, "rougeL": 0.25, "rougeL_ci": [0.2, 0.3],
                         "entropy": 1.5, "length_tokens": {"mean": 21.0}, "length_words": {"mean": 15.0}, "no_eos_rate": 0.0}
    results = {
        "meta": {"n_prompts": 4, "split": "validation", "temperature": 0.01, "judges": ["gold", "rm"], "bootstrap": 200,
                 "lc_method": "logistic regression on log length ratio", "title_copy_threshold": 0.7,
                 "entropy_definition": "mean token entropy at temperature 1"},
        "policies": {"sft": {**pol(0.4321, 0.05), "gold_hallucination_rate": 0.125, "gold_coverage_mean": 0.7},
                     "ppo": {**pol(0.3789, 1.2345), "gold_hallucination_rate": 0.4375, "gold_coverage_mean": 0.9125}},
        "reference": {"gold_mean": 0.45, "gold_ci": [0.4, 0.5], "rm_score_mean": 0.0, "rm_histogram": hist,
                      "length_words": {"mean": 12.0}},
        "comparisons": [{"a": "ppo", "b": "sft", "judge": "gold", "win_rate": 0.375, "ci": [0.25, 0.5], "lc_win_rate": 0.4,
                         "lc_ci": [0.3, 0.5], "wins": 1, "losses": 2, "ties": 1, "n": 4}],
        "signals": {"sft": {"hack/title_copy_rate": 0.03, "hack/prompt_copy_rate": 0.0, "hack/repetition_rate": 0.0,
                            "hack/no_eos_rate": 0.0, "hack/length_score_corr": 0.1, "hack/distinct_2": 0.9},
                    "ppo": {"hack/title_copy_rate": 0.12, "hack/prompt_copy_rate": 0.0, "hack/repetition_rate": 0.0,
                            "hack/no_eos_rate": 0.0, "hack/length_score_corr": 0.6, "hack/distinct_2": 0.5}},
        "judges_agreement": None,
    }
    _json(run / "eval" / "results.json", results)
    _json(run / "eval" / "metrics.json", {"eval/n_prompts": 4})
    _jsonl(run / "eval" / "samples.jsonl", [
        {"id": "p0", "subreddit": "relationships", "title": "T " + EVIL, "post": "post text " + EVIL,
         "reference": "ref " + EVIL, "reference_gold": 0.5, "reference_rm": 0.1,
         "policies": {"sft": {"summary": "sft summary", "gold": 0.4, "rm": 0.2, "has_eos": True},
                      "ppo": {"summary": "ppo summary " + EVIL, "gold": 0.3, "rm": 1.5, "has_eos": False}}}])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    cfg = load_config("smoke", [f"out_dir={tmp_path}", "name=full"])
    run = cfg.run_dir
    save_config(cfg, run / "config.yaml")
    _json(run / "data" / "stats.json", {"gold_mean": {"reference": 0.4567, "oracle": 0.9123}, "bayes_accuracy": 0.8012})
    write_sft(run)
    write_rm(run)
    write_ppo(run)
    write_eval(run)
    render_report(run)  # once for the module: rendering ~20 plots takes seconds on a shared CPU
    return run


def _text(page: str) -> str:
    """Visible text: tags and data URIs removed."""
    return re.sub(r"<[^>]+>", " ", page)


def test_full_report_has_every_section_and_numbers(full_run):
    page = (full_run / "report.html").read_text()
    for anchor in ("overview", "sft", "rm", "ppo", "eval", "hacking", "samples"):
        assert f"id={anchor}>" in page
    text = _text(page)
    # data stats, eval numbers and CIs, win rate as a percentage, RM final metrics
    for needle in ("0.457", "0.912", "0.801", "0.432", "[0.382, 0.482]", "1.234", "37.5%", "[25.0%, 50.0%]",
                   "0.891", "0.046", "12.0%", "3.0%"):
        assert needle in text, needle
    assert "not run yet" not in text
    # KL 3.5 with the default thresholds (healthy band 2..6)
    assert "healthy" in text and "3.50 nats" in text
    # over-optimisation reading: RM rose (0.2 -> 1.9 over the first/last 3) while gold fell
    assert "over-optimisation" in text
    assert "title-copy rate 12.0% vs 3.0% for SFT" in text
    assert "r=0.60" in text
    # RM length bias reading from rm/metrics.json
    assert "rises by 0.046 per extra word" in text and "length bias is 0.030 per word" in text
    assert "prefers the longer one 71.0% of the time (labels: 64.0%)" in text
    # RM faithfulness reading, and the evaluation's invented-fact rates (SFT 12.5%, PPO 43.8%)
    assert "On the 27 validation pairs where one summary states a fact or number the post does not" in text
    assert "the faithful one 21.2% of the time (labels: 57.2%)" in text and "It does not check content" in text
    assert "invented fact or number (gold judge) 43.8% vs 12.5% for SFT" in text
    # the on-policy check: 0.6625 < 0.70 warns
    assert "On 1800 pairs of the SFT policy's own samples (what PPO starts from) the RM orders 66.2% as the gold judge" in text
    assert "Below 70.0%" in text


def test_rm_on_policy_reading_warns_below_the_measured_edge():
    from rlhflab.report.html import rm_on_policy_reading

    assert rm_on_policy_reading({}) is None
    assert rm_on_policy_reading({"eval/on_policy/gold_agreement": 0.69, "eval/on_policy/pairs": 10})[0] == "warn"
    cls, text = rm_on_policy_reading({"eval/on_policy/gold_agreement": 0.74, "eval/on_policy/pairs": 10})
    assert cls == "ok" and "74.0%" in text and "Below" not in text and "not a guarantee" in text


def test_report_images_are_embedded_pngs_and_nothing_external(full_run):
    page = (full_run / "report.html").read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    # SFT 3 panels (train/loss, eval/loss, rougeL, gold) + lr in "other", RM 3 + bucket bar, PPO 9 + 1 other, histogram
    assert len(srcs) >= 15
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)
    assert "url(" not in page and "@import" not in page and "<link" not in page and "<script" not in page


def test_samples_are_html_escaped(full_run):
    page = (full_run / "report.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quotes&quot;" in page
    assert "ppo summary &lt;script&gt;" in page and "no EOS" in page


def test_partial_run_only_sft(tmp_path):
    cfg = load_config("smoke", [f"out_dir={tmp_path}", "name=partial"])
    save_config(cfg, cfg.run_dir / "config.yaml")
    write_sft(cfg.run_dir)
    out = tmp_path / "elsewhere" / "r.html"
    page = render_report(cfg.run_dir, out=out).read_text()
    text = _text(page)
    assert "RM training has not run yet" in text and "PPO has not run yet" in text
    assert "Evaluation has not run yet" in text and "No evaluation samples yet" in text
    assert "0.312" in text  # SFT final eval/rougeL
    assert page.count("<img") >= 3


def test_interrupted_ppo_and_missing_keys_are_noted(tmp_path):
    run = tmp_path / "r"
    _jsonl(run / "ppo" / "metrics.jsonl", [{"step": 1, "objective/kl": 12.5, "objective/scores": 0.1}])
    (run / "ppo" / "metrics.jsonl").write_text((run / "ppo" / "metrics.jsonl").read_text() + '{"step": 2, "obj')  # torn line
    text = _text(render_report(run).read_text())
    assert "PPO is in progress or interrupted" in text
    assert "drifting" in text and "12.50 nats" in text  # default thresholds: drifting above 10
    assert "Not logged in this run" in text and "gold/score" in text
    assert "No config.yaml" in text


def test_empty_run_dir_renders_and_missing_dir_is_an_error(tmp_path):
    text = _text(render_report(tmp_path).read_text())
    assert text.count("has not run yet") == 4
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        render_report(tmp_path / "nope")


def test_kl_reading_bands_and_logged_verdict():
    t = {"barely_changed": 1, "healthy_low": 2, "healthy_high": 6, "drifting": 10, "catastrophic": 20}
    assert kl_reading(0.5, t)[0] == "warn" and "barely moved" in kl_reading(0.5, t)[1]
    assert kl_reading(2.0, t)[0] == "ok"
    assert kl_reading(8.0, t)[1].startswith("<b>elevated</b>")
    assert kl_reading(25.0, t)[0] == "bad" and "catastrophic" in kl_reading(25.0, t)[1]
    assert kl_reading(float("nan"), t)[1].startswith("<b>catastrophic</b>")
    # the run's own verdict (ppo/metrics.json kl/health) is what the report states
    assert kl_reading(3.0, t, "drifting")[1].startswith("<b>drifting</b>")
    # custom thresholds from config.yaml change the band
    assert kl_reading(3.0, {**t, "healthy_low": 4, "healthy_high": 5})[1].startswith("<b>moderate</b>")


def test_hacking_readings_numbers():
    # 3 rows: start/end windows of 1 value -> RM 0.0 -> 0.6, gold 0.5 -> 0.7
    rows = [{"step": i, "objective/scores": s, "gold/score": g} for i, (s, g) in enumerate([(0.0, 0.5), (0.3, 0.6), (0.6, 0.7)])]
    (cls, text), = hacking_readings(rows, None)
    assert cls == "ok" and "rose by 0.600" in text and "gold score by 0.200" in text
    # 10 rows: windows of 3 -> RM mean(0, .1, .2)=0.1 -> mean(.7, .8, .9)=0.8; objective/rm_scores wins over scores
    rows = [{"step": i, "objective/scores": -1.0, "objective/rm_scores": 0.1 * i, "gold/score": 0.5 - 0.01 * i} for i in range(10)]
    (cls, text), = hacking_readings(rows, None)
    assert cls == "bad" and "rose by 0.700" in text and "fell by 0.070" in text and "over-optimisation" in text
    # a single logged value is no trend
    assert hacking_readings(rows[:1], None) == []


def test_gold_change_within_sampling_noise_is_not_called_over_optimisation():
    # RM 0.1 -> 0.8 while the rollouts' gold falls 0.07 (windows of 3); each logged gold mean has
    # a standard error: 0.05 -> the window difference has SE sqrt(2 * 3 * 0.05^2) / 3 = 0.0408,
    # 2 SE = 0.082 > 0.07: noise, not a trend.
    rows = [{"step": i, "objective/rm_scores": 0.1 * i, "gold/score": 0.5 - 0.01 * i, "gold/score_se": 0.05} for i in range(10)]
    (cls, text), = hacking_readings(rows, None)
    assert cls == "info" and "within sampling noise" in text and "±0.082" in text and "over-optimisation" not in text
    # a tight standard error (0.01 -> 2 SE = 0.016) makes the same fall a real one
    rows = [{**r, "gold/score_se": 0.01} for r in rows]
    (cls, text), = hacking_readings(rows, None)
    assert cls == "bad" and "over-optimisation" in text
