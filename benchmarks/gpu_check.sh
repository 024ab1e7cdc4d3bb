#!/usr/bin/env bash
# One PPO update of a 1B-parameter Llama (random weights, bf16) on one GPU at the 1-GPU config's shape:
# time + peak memory per phase and `rlhflab plan`'s prediction, as one JSON line (benchmarks/gpu_check.py).
#   bash benchmarks/gpu_check.sh                     # on a GPU machine: torch + transformers, no network
#   GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh    # tiny shape, CPU if no GPU (tests/test_gpu_check.py)
#   CONFIG=tldr-pythia-1b-1gpu bash benchmarks/gpu_check.sh   # another config's shape (Llama layout only)
# Needs: torch, transformers, tokenizers, numpy, pyyaml, pydantic (rlhflab's own imports on this path;
# accelerate is not used). rlhflab is this checkout's src/ (PYTHONPATH; the same as `pip install -e . --no-deps`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - <<'PYEOF'
import importlib.util
print(" ".join(m for m in ("torch", "transformers", "tokenizers", "numpy", "yaml", "pydantic") if importlib.util.find_spec(m) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "{\"error\": \"missing packages: $missing (pip install them; GPU_CHECK_WHEELS=DIR installs from a wheel folder)\"}"
  if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" ${missing/yaml/pyyaml} || exit 2
  else
    exit 2
  fi
fi
exec timeout "${GPU_CHECK_TIMEOUT:-540}" "$PY" -W ignore benchmarks/gpu_check.py
