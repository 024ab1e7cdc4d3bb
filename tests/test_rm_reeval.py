"""benchmarks/rm_reeval.py: a finished RM scored again on a (larger) validation split."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from rlhflab.config import load_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rm_reeval.py"


def _reeval(monkeypatch, capsys, data_dir: Path, run_dir: Path) -> dict:
    monkeypatch.setattr(sys, "argv", ["rm_reeval.py", str(data_dir), str(run_dir)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    assert torch.is_grad_enabled()  # the script must not switch autograd off for the rest of the process
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_same_split_reproduces_the_stage_metrics(smoke_rm_run, monkeypatch, capsys):
    cfg = smoke_rm_run
    stage = json.loads((cfg.run_dir / "rm" / "metrics.json").read_text())
    before = (cfg.run_dir / "rm" / "metrics.json").read_text()
    out = _reeval(monkeypatch, capsys, cfg.data.dir, cfg.run_dir)
    assert out["pairs"] == stage["data/validation_pairs"]
    for key in ("eval/accuracy", "eval/normalized_accuracy", "eval/expected_normalized_accuracy",
                "eval/length_term/normalized_accuracy"):
        if key in stage:
            assert out[key] == pytest.approx(stage[key], abs=1e-9), key
    assert (cfg.run_dir / "rm" / f"reeval-{out['pairs']}.json").exists()
    assert (cfg.run_dir / "rm" / "metrics.json").read_text() == before  # never rewritten


def test_larger_split_keeps_train_pairs_and_extends_validation(smoke_rm_run, smoke_data_overrides, tmp_path,
                                                               monkeypatch, capsys):
    from rlhflab.data.tldr_synth import synthesize

    cfg = smoke_rm_run
    n = cfg.data.synth.n_pref_validation
    big = tmp_path / "data"
    synthesize(big, load_config("smoke", [*smoke_data_overrides, f"data.synth.n_pref_validation={3 * n}"]).data.synth,
               progress=False)
    small = Path(cfg.data.dir)
    assert (big / "preference" / "train.jsonl").read_text() == (small / "preference" / "train.jsonl").read_text()
    small_val = (small / "preference" / "validation.jsonl").read_text().splitlines()
    big_val = (big / "preference" / "validation.jsonl").read_text().splitlines()
    assert len(big_val) == 3 * n and big_val[:n] == small_val
    out = _reeval(monkeypatch, capsys, big, cfg.run_dir)
    assert out["pairs"] == 3 * n and 0.0 <= out["eval/accuracy"] <= 1.0
    acc, bayes = out["eval/accuracy"], out["data/bayes_accuracy"]  # the SE is over all 3n pairs
    assert out["eval/normalized_accuracy_se"] == pytest.approx((acc * (1 - acc) / (3 * n)) ** 0.5 / (bayes - 0.5))
