#!/usr/bin/env bash
# SAIL mitigation, as the reference runs it, and its "before" baseline.
#   bash run_mitigation.sh          SD v1.4 on prompts/sample_mitigation.txt, n = 4 (GPU)
#   bash run_mitigation.sh demo     the bundled demo model: baseline, SAIL, then the before/after evaluation (CPU)
# Images: $OUT_DIR/sd<ver>/<prompt_type>/ (SAIL) and .../<prompt_type>_nomiti/ (baseline), each with manifest.jsonl.
set -euo pipefail
cd "$(dirname "$0")"

# ---- hyperparameters: edit here (paper, Appendix D) ----
SD_VER=1                 # 1 = SD v1.4, 2 = SD v2.0
DATA=prompts/sample_mitigation.txt
PROMPT_TYPE=mem
GEN_NUM=4                # images per prompt
GEN_SEED=42
MITI_THRES=8.2           # l_thres; SD v1.4 grid {7.6, 7.8, 8.2, 8.6, 9}, SD v2.0 grid {4, 4.5, 5, 5.5, 6}
MITI_LR=0.05             # Adam learning rate on x_T
MITI_BUDGET=8            # candidates optimized together
MITI_MAX_STEPS=10        # Adam steps per round
MITI_ALPHA=""            # weight of ||x_T||; empty = 0.05 (epsilon models) / 0.01 (v-prediction models)
OUT_DIR=miti_outputs
EXTRA_ARGS=""            # e.g. "--miti_form clean" or "--dtype float32"
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "demo" ]; then
  SD_VER=demo
  DATA=prompts/demo_mem.txt
  MITI_THRES=${DEMO_THRES:-0.6}   # for the demo's 4x8x8 latent (README, "The demo model")
  MITI_ALPHA=${DEMO_ALPHA:-0.02}
fi

alpha_arg=()
[ -n "$MITI_ALPHA" ] && alpha_arg=(--miti_alpha "$MITI_ALPHA")
common=(--sd_ver "$SD_VER" --data_path "$DATA" --prompt_type "$PROMPT_TYPE" --gen_num "$GEN_NUM"
        --gen_seed "$GEN_SEED" --out_dir "$OUT_DIR")

$PYTHON mitigate_mem.py "${common[@]}" --no_mitigation $EXTRA_ARGS
$PYTHON mitigate_mem.py "${common[@]}" --miti_thres "$MITI_THRES" --miti_lr "$MITI_LR" \
  --miti_budget "$MITI_BUDGET" --miti_max_steps "$MITI_MAX_STEPS" "${alpha_arg[@]}" $EXTRA_ARGS

# The paper's threshold grids (uncomment to sweep; each run gets its own folder via --prompt_type):
# for th in 7.6 7.8 8.2 8.6 9; do $PYTHON mitigate_mem.py --sd_ver 1 --data_path prompts/sd1_mem.txt \
#   --prompt_type mem_th$th --miti_thres $th --gen_num 4; done
# for th in 4 4.5 5 5.5 6; do $PYTHON mitigate_mem.py --sd_ver 2 --data_path prompts/sd2_mem.txt \
#   --prompt_type mem_th$th --miti_thres $th --gen_num 4; done

if [ "$SD_VER" = "demo" ]; then
  # Offline evaluation: the demo's training images ship with the project; pixel cosine needs no weights.
  $PYTHON mitigate_eval.py fetch --jsonl prompts/demo_mem.jsonl --out "$OUT_DIR/demo_training_images"
  base="$OUT_DIR/sd$SD_VER/${PROMPT_TYPE}_nomiti"
  $PYTHON mitigate_eval.py score --images "$base" --gt "$OUT_DIR/demo_training_images" --similarity pixel \
    --clip_model none
  $PYTHON mitigate_eval.py score --images "$OUT_DIR/sd$SD_VER/$PROMPT_TYPE" --gt "$OUT_DIR/demo_training_images" \
    --similarity pixel --clip_model none --compare "$base/eval_pixel.json"
fi
