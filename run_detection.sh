#!/usr/bin/env bash
# Memorization detection grid of the paper (Table 1), then its evaluation.
#   bash run_detection.sh          SD v1.4 and v2.0 x memorized / non-memorized prompts x n = 1, 4 (GPU)
#   bash run_detection.sh demo     the bundled demo model on its own prompt sets (CPU, offline, minutes)
# Results: $OUT_DIR/<prompt file stem>_gen<n>.pt/.json, and <mem>_vs_<nmem>.eval.json/.roc.png per pair.
set -euo pipefail
cd "$(dirname "$0")"

# ---- hyperparameters: edit here ----
GEN_NUMS="1 4"          # n: generations averaged per prompt (Table 1 reports n = 1 and n = 4)
HVP_SAMPLING_NUM=1      # number of first sampling steps measured (Table 1's "steps")
GEN_SEED=42             # torch seed of the shared initial noise
SD_VERS="1 2"           # Stable Diffusion versions: 1 = v1.4 (epsilon), 2 = v2.0 (v-prediction)
BATCH_SIZE=1            # prompts per UNet call (same results; raise it on a large GPU)
OUT_DIR=det_outputs
EXTRA_ARGS=""           # e.g. "--dtype float32" or "--prompt_mirror /path/to/prompt/copies"
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "demo" ]; then
  SD_VERS="demo"
  BATCH_SIZE=8
fi

for ver in $SD_VERS; do
  if [ "$ver" = "demo" ]; then mem=prompts/demo_mem.txt; nmem=prompts/demo_nmem.txt
  else mem=prompts/sd${ver}_mem.txt; nmem=prompts/sd${ver}_nmem.txt; fi
  for n in $GEN_NUMS; do
    for data in "$mem" "$nmem"; do
      $PYTHON detect_mem.py --sd_ver "$ver" --data_path "$data" --gen_num "$n" \
        --hvp_sampling_num "$HVP_SAMPLING_NUM" --gen_seed "$GEN_SEED" --batch_size "$BATCH_SIZE" \
        --out_dir "$OUT_DIR" $EXTRA_ARGS
    done
    echo "== sd_ver $ver, n = $n, steps = $HVP_SAMPLING_NUM"
    $PYTHON detect_eval.py --mem "$OUT_DIR/$(basename "${mem%.*}")_gen$n.pt" \
      --nmem "$OUT_DIR/$(basename "${nmem%.*}")_gen$n.pt"
  done
done
