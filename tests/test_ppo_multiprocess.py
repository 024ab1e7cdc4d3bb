"""2 processes (accelerate launch --multi_gpu --num_processes 2, on CPU) take the same PPO steps as 1 process
with the same global batch.

What is equal (see the docstring of rlhflab.stages.ppo): the prompts of each update; the
sampled tokens (per-sample Gumbel noise seeded by the global episode index, queries padded to
the global batch's width); steps 5-6 on the all-gathered global batch (so advantage whitening
uses global statistics); the micro-batches and the averaged gradient of every optimizer step.
What may differ is float summation order (batch-size-dependent kernels, the all-reduce), so
weights are compared to 1e-5 and logged metrics to 1e-4.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ppo_fixtures import build_inputs, make_run  # noqa: E402

RUNNER = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from ppo_fixtures import make_run
from pathlib import Path
from rlhflab.stages import ppo
cfg = make_run(Path({tpl!r}), Path({root!r}), {name!r}, *{over!r}, copy=False)
print(json.dumps(ppo.main(cfg)))
"""

OVERRIDES = ("ppo.total_episodes=16", "ppo.batch_size=8", "ppo.micro_batch_size=2", "ppo.num_mini_batches=2",
             "ppo.ppo_epochs=2", "ppo.optim.lr=3e-3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, tpl, name, processes, extra=()):
    make_run(tpl, tmp_path, name)  # copy the SFT policy and RM into the run folder, once
    script = tmp_path / f"run_{name}.py"
    script.write_text(RUNNER.format(tests=str(Path(__file__).parent), tpl=str(tpl), root=str(tmp_path), name=name,
                                    over=OVERRIDES + tuple(extra)))
    env = {**os.environ, "RLHFLAB_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RLHFLAB_STOP_AFTER_STEP", None)
    if processes == 1:
        cmd = [sys.executable, str(script)]
    else:
        # `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is configured
        # (accelerate 1.15's simple launcher); `--multi_gpu` uses torch's elastic launcher, and on a
        # machine without CUDA every process then runs on CPU with gloo (DistributedType.MULTI_CPU).
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(script)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    return tmp_path / name / "ppo"


# none: plain data parallel (FSDP2 on an (N, 1) mesh, rlhflab.parallel); fsdp2: sharded policy and
# critic, with the rollout sampled 2 rows at a time and the ref/critic/RM forwards 1 row at a time.
@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("parallel.sharding=fsdp2", "ppo.rollout_batch_size=2", "ppo.forward_batch_size=1")],
                         ids=["data-parallel", "fsdp2"])
def test_two_processes_match_one(tmp_path, extra):
    tpl = build_inputs(tmp_path / "inputs")
    one = _run(tmp_path, tpl, "one", 1)
    two = _run(tmp_path, tpl, "two", 2, extra)
    from safetensors.torch import load_file

    w1 = load_file(str(one / "policy" / "model.safetensors"))
    w2 = load_file(str(two / "policy" / "model.safetensors"))
    w0 = load_file(str(tpl / "sft" / "policy" / "model.safetensors"))
    moved = max(float((w1[k] - w0[k]).abs().max()) for k in w1)
    assert moved > 1e-3  # the runs did train
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-5
    v1 = load_file(str(one / "value" / "model.safetensors"))
    v2 = load_file(str(two / "value" / "model.safetensors"))
    assert max(float((v1[k] - v2[k]).abs().max()) for k in v1) <= 1e-5
    rows1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [1, 2]
    for a, b in zip(rows1, rows2):
        for k in ("objective/kl", "objective/scores", "objective/entropy", "response/length_mean", "advantages/mean",
                  "advantages/std", "returns/mean", "loss/policy_avg", "loss/value_avg", "policy/approxkl_token_avg", "val/ratio_token_avg"):
            assert a[k] == pytest.approx(b[k], abs=1e-4), k
    assert json.loads((two / "metrics.json").read_text())["num_processes"] == 2
