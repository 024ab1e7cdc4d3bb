#!/usr/bin/env bash
# Issue 12's table: ONE PPO update of a ~150M-parameter Llama (LAYERS x WIDTH, vocab VOCAB,
# policy + reference + critic + RM) per memory mode, on this machine, beside `rlhflab plan`,
# then TRL 0.29.1's PPO at the same shape (../shared/bench). One JSON line per run in OUT.
#   benchmarks/memory_table.sh              # LAYERS=14 WIDTH=768 VOCAB=8192 BATCH=4 PROMPT_LEN=64 RESP_LEN=53
# 1-process rows use 2 torch threads, 2-process rows 1 thread per process: both use the 2 cores.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}; TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}; OUT=${OUT:-runs/memory_table.jsonl}
export LAYERS=${LAYERS:-14} WIDTH=${WIDTH:-768} VOCAB=${VOCAB:-8192} BATCH=${BATCH:-4} PROMPT_LEN=${PROMPT_LEN:-64} RESP_LEN=${RESP_LEN:-53}
export PYTHONPATH=src RLHFLAB_NO_PROGRESS=1
mkdir -p "$(dirname "$OUT")"
for mode in fp32 bf16_ckpt; do
  MODE=$mode THREADS=2 OMP_NUM_THREADS=2 $PY benchmarks/memory_ppo.py | tail -1 >> "$OUT"
done
for mode in fsdp2 offload; do
  MODE=$mode THREADS=1 OMP_NUM_THREADS=1 $TORCHRUN --nproc_per_node 2 benchmarks/memory_ppo.py 2>/dev/null | grep '"rank": 0' >> "$OUT"
done
# TRL: the peer venv (../shared/bench/setup_peer.sh); peak RSS of the whole process from GNU time.
if peer=$(../shared/bench/setup_peer.sh 2>/dev/null); then
  log=$(mktemp)
  line=$(ARCH=llama UPDATES=2 OMP_NUM_THREADS=2 /usr/bin/time -v "$peer" ../shared/bench/trl_ppo_peer.py 2>"$log" | tail -1)
  kib=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
  $PY -c "import json,sys; d=json.loads(sys.argv[1]); d['peak_rss_gib']=round(int(sys.argv[2])/2**20,3); print(json.dumps(d))" "$line" "$kib" >> "$OUT"
fi
cat "$OUT"
