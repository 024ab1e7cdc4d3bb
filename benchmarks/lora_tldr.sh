#!/usr/bin/env bash
# LoRA PPO and shared-critic PPO against SFT on tldr-synth, beside full fine-tuning (benchmarks/RESULTS.md).
# Reuses the SFT policy + RM of the default config trained elsewhere (SRC/seed-<i>/{sft,rm}, SRC/data),
# copies them into OUT/seed-<i>/<variant>/ and runs only `rlhflab ppo` and `rlhflab eval` there.
#   SRC=/work/exp/runs/tldr-synth OUT=runs/lora-tldr SEEDS="0 1 2" EPISODES=3072 benchmarks/lora_tldr.sh
set -u
SRC=${SRC:-/work/exp/runs/tldr-synth}; OUT=${OUT:-runs/lora-tldr}; SEEDS=${SEEDS:-"0 1 2"}
EPISODES=${EPISODES:-3072}; PY=${PY:-/work/main/.venv/bin/python}; PAR=${PAR:-2}
VARIANTS=${VARIANTS:-"lora shared full"}
export PYTHONPATH=src OMP_NUM_THREADS=1 RLHFLAB_NO_PROGRESS=1
overrides() {  # per variant
  case $1 in
    full)   echo "" ;;                                                  # default: full FT, critic from the RM
    lora)   echo "model.lora.enabled=true ppo.optim.lr=4e-4" ;;         # adapters (r 8, alpha 16), 10x the lr
    shared) echo "model.critic=shared" ;;                               # full FT, value head on the policy trunk
  esac
}
mkdir -p "$OUT"
[ -d "$OUT/data" ] || cp -r "$SRC/data" "$OUT/data"
for s in $SEEDS; do
  until [ -f "$SRC/seed-$s/rm/metrics.json" ]; do sleep 20; done
  for v in $VARIANTS; do
    (
      run="$OUT/seed-$s/$v"; mkdir -p "$run"
      [ -d "$run/sft" ] || cp -r "$SRC/seed-$s/sft" "$run/sft"
      [ -d "$run/rm" ] || cp -r "$SRC/seed-$s/rm" "$run/rm"
      common="out_dir=$OUT/seed-$s name=$v data.dir=$OUT/data ppo.total_episodes=$EPISODES eval.n_prompts=${PROMPTS:-400} ppo.seed=$((3 + 1000 * s)) eval.seed=$((4 + 1000 * s))"
      start=$(date +%s)
      $PY -m rlhflab.cli ppo --config default $common $(overrides $v) > "$run/ppo.log" 2>&1 &&
      $PY -m rlhflab.cli eval --config default $common $(overrides $v) > "$run/eval.log" 2>&1
      echo "seed $s $v rc=$? $(( $(date +%s) - start )) s" >> "$OUT/done.txt"
    ) &
    while [ "$(jobs -rp | wc -l)" -ge "$PAR" ]; do sleep 5; done
  done
done
wait
