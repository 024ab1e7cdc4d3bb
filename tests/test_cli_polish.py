"""User errors are messages with exit codes, never tracebacks; --version; rlhflab env."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rlhflab import __version__
from rlhflab.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.strip() == f"rlhflab {__version__}"


def test_env_reports_versions_devices_and_cpu(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    import torch
    import transformers

    assert info["packages"]["torch"] == torch.__version__ and info["packages"]["transformers"] == transformers.__version__
    assert info["packages"]["rlhflab"] == __version__ and "accelerate" in info["packages"] and "peft" in info["packages"]
    assert info["devices"]["cuda_available"] == torch.cuda.is_available()
    assert info["cpu"]["torch_threads"] == torch.get_num_threads() and info["cpu"]["logical_cores"] >= 1
    assert isinstance(info["cpu"]["flags"], list)
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert f"torch: {torch.__version__}" in text and "torch_threads:" in text


def test_unknown_keys_get_did_you_mean(capsys, tmp_path):
    assert main(["config", "show", "ppo.kl_coeff=0.1"]) == 2
    assert "ppo.kl_coeff: unknown key (did you mean 'ppo.kl_coef'?)" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sft:\n  optim:\n    lrr: 0.1\nmodle: {}\n")
    assert main(["config", "show", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "sft.optim.lrr: unknown key (did you mean 'sft.optim.lr'?)" in err and "modle: unknown key (did you mean 'model'?)" in err
    assert main(["config", "show", "totally_unrelated_key=1"]) == 2
    assert "totally_unrelated_key: unknown key\n" in capsys.readouterr().err


def test_missing_paths_are_messages(capsys, tmp_path):
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "run directory not found" in capsys.readouterr().err
    assert main(["config", "show", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    # a stage on a missing data file: the data layer's message, exit 1
    assert main(["sft", f"out_dir={tmp_path}", "data.task=standard", f"data.sft_dataset={tmp_path / 'none.jsonl'}",
                 f"model.tokenizer={tmp_path / 'none'}"]) == 1
    assert "cannot load a tokenizer" in capsys.readouterr().err


def test_report_on_a_missing_dir_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC}
    p = subprocess.run([sys.executable, "-m", "rlhflab.cli", "report", str(tmp_path / "missing")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("rlhflab: error: run directory not found")
