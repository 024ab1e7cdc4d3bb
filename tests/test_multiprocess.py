"""SFT and RM under 2 processes (accelerate + gloo on CPU) match one process with the same global batch.

Launch command: ``accelerate launch --multi_gpu --num_processes 2 -m rlhflab.cli <stage> ...``.
On a machine without CUDA this starts 2 CPU processes with the gloo backend (make_accelerator
picks the CPU); note that ``accelerate launch --cpu --num_processes 2`` would start ONE process.
The one-process runs are the session fixtures (global batch 16 = 2 micro-batches of 8 on one
process; here 1 micro-batch of 8 on each of 2 processes).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhflab.runtime import read_jsonl

ACCELERATE = Path(sys.executable).parent / "accelerate"


def _free_port() -> int:
    with socket.socket() as s:  # parallel test runs must not share the default port 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(stage: str, out_dir: Path, data_dir: Path, overrides: tuple[str, ...], stop_after: int = 0,
            resume: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLHFLAB_NO_PROGRESS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RLHFLAB_STOP_AFTER_STEP", None)
    if stop_after:
        env["RLHFLAB_STOP_AFTER_STEP"] = str(stop_after)
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "rlhflab.cli", stage, "--config", "smoke", f"out_dir={out_dir}", f"data.dir={data_dir}",
           *overrides, *(["--resume"] if resume else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if stop_after:
        assert proc.returncode != 0 and "RLHFLAB_STOP_AFTER_STEP" in proc.stderr, proc.stderr[-3000:]
        return {}
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out_dir / "smoke" / stage / "metrics.json").read_text())


def _losses(stage_dir: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_jsonl(stage_dir / "metrics.jsonl") if key in r]


def _assert_close_runs(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    for key in keys:
        a, b = _losses(one, key), _losses(two, key)
        assert [s for s, _ in a] == [s for s, _ in b] and a, key
        for (step, x), (_, y) in zip(a, b):
            assert y == pytest.approx(x, rel=1e-4, abs=1e-6), f"{key} at step {step}: 1 process {x}, 2 processes {y}"


def test_sft_and_rm_with_two_processes_match_one(smoke_rm_run, synth_data_dir, smoke_data_overrides, tmp_path):
    from safetensors.torch import load_file

    one = smoke_rm_run.run_dir
    # SFT: same global batches, loss normalised by the global token count -> the same trajectory.
    sft_metrics = _launch("sft", tmp_path, synth_data_dir, smoke_data_overrides)
    two = tmp_path / "smoke"
    assert sft_metrics["num_processes"] == 2 and sft_metrics["batch/grad_accum"] == 1
    _assert_close_runs(one / "sft", two / "sft", ("train/loss", "train/grad_norm", "eval/loss"))
    a = load_file(one / "sft" / "policy" / "model.safetensors")
    b = load_file(two / "sft" / "policy" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)

    # RM on the one-process SFT policy, so both RMs start from the same backbone.
    shutil.rmtree(two / "sft")
    shutil.copytree(one / "sft", two / "sft")
    rm_metrics = _launch("rm", tmp_path, synth_data_dir, smoke_data_overrides)
    assert rm_metrics["num_processes"] == 2
    _assert_close_runs(one / "rm", two / "rm", ("train/loss", "train/accuracy", "train/margin"))
    ref = json.loads((one / "rm" / "metrics.json").read_text())
    assert rm_metrics["eval/accuracy"] == pytest.approx(ref["eval/accuracy"], abs=1 / 32 + 1e-9)
    assert rm_metrics["rm/bias"] == pytest.approx(ref["rm/bias"], rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_fsdp2_sft_and_rm_on_two_processes_follow_one_and_resume(smoke_rm_run, synth_data_dir, smoke_data_overrides,
                                                                  tmp_path):
    """parallel.sharding=fsdp2 on 2 processes: SFT (interrupted after step 4 and resumed from its
    sharded checkpoint) and RM follow the unsharded 1-process runs (same tolerances as above)."""
    from safetensors.torch import load_file

    one = smoke_rm_run.run_dir
    over = (*smoke_data_overrides, "parallel.sharding=fsdp2")
    _launch("sft", tmp_path, synth_data_dir, over, stop_after=4)
    two = tmp_path / "smoke"
    assert (two / "sft" / "state" / "ckpt-00000004" / "shards" / ".metadata").is_file()
    _launch("sft", tmp_path, synth_data_dir, over, resume=True)
    _assert_close_runs(one / "sft", two / "sft", ("train/loss", "train/grad_norm", "eval/loss"))
    a = load_file(one / "sft" / "policy" / "model.safetensors")
    b = load_file(two / "sft" / "policy" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)

    shutil.rmtree(two / "sft")
    shutil.copytree(one / "sft", two / "sft")
    rm_metrics = _launch("rm", tmp_path, synth_data_dir, over)
    assert rm_metrics["num_processes"] == 2
    _assert_close_runs(one / "rm", two / "rm", ("train/loss", "train/accuracy", "train/margin"))
    ref = json.loads((one / "rm" / "metrics.json").read_text())
    assert rm_metrics["rm/bias"] == pytest.approx(ref["rm/bias"], rel=1e-3, abs=1e-4)
