"""benchmarks/gpu_check.sh in its tiny mode (GPU_CHECK_TINY=1: a 2x64 Llama, CPU when there is no GPU),
so the device check is not dead code: it runs one PPO update phase by phase and reports the plan beside it."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_runs_one_update_and_reports_plan():
    env = {**os.environ, "GPU_CHECK_TINY": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["tiny"] is True and r["config"] == "tldr-llama-3.2-1b-1gpu"
    assert r["shape"] == {"batch": 4, "micro_batch": 2, "rollout_batch": 2, "forward_batch": 2, "query": 16, "response": 8}
    assert set(r["phases"]) == {"build", "rollout", "advantages", "training"}
    assert all(v["s"] >= 0 for v in r["phases"].values())
    assert r["measured_peak_gib"] > 0 and r["predicted_peak_gib"] > 0
    # The 2x64 Llama with tied embeddings: 512*64 + 2 layers + final norm (the plan's count).
    assert r["params"]["policy"] == 512 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    assert r["loss_value_avg"] == r["loss_value_avg"]  # finite, not NaN
