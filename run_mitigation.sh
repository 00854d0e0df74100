#!/usr/bin/env bash
# The paper's Figure 6: every mitigation method at its five settings, plus no mitigation, on the same prompts, seeds,
# scheduler and UNet calls; then the training images, the scores and the figure.
#   bash run_mitigation.sh          SD v1.4 (SD_VER=2 bash run_mitigation.sh: SD v2.0): SSCD + CLIP ViT-H-14 (GPU)
#   bash run_mitigation.sh demo     the bundled demo model: pixel cosine + the demo CLIP model, the figure and table
#                                   into examples/figures/demo_fig6.* (CPU; SIDE_EFFECTS=0: about 1 h 45 min on 2 idle
#                                   cores, han_sample's grid the longest; the default doubles it: docs/mitigation.md)
# Images: $OUT_DIR/sd<ver>/<prompt_type>_<method>_<setting>/ (none: <prompt_type>_nomiti/), each with
# manifest.jsonl and, after scoring, eval_<similarity>.json / .csv. Every step resumes when re-run.
# Side effects (SIDE_EFFECTS=1): every run is repeated on the non-memorized prompts (nmem_*/, same settings and
# seeds), scored against the unmitigated images of the same noise; the figure's second panel and PREFIX_side.csv.
set -euo pipefail
cd "$(dirname "$0")"

# ---- hyperparameters: edit here (paper, Appendix D; grids: utils/mitigation/<method>.py, utils/models/families.py) ----
SD_VER=${SD_VER:-1}      # 1 = SD v1.4, 2 = SD v2.0
METHODS="sail wen rna rta cfg_delay ren han_batch han_sample guard nemo"   # each with --grid: its five settings for the model
NEMO_STATS=""            # NeMo's activation statistics: a non-memorized prompt file (empty: prompts/<model>_nmem.txt)
AUTHOR_SETTINGS=${AUTHOR_SETTINGS:-0}   # 1: also each method that has them with its authors' sampler and guidance
GEN_NUM=5                # images per prompt (the paper: 5; the reference's script: 4)
GEN_SEED=42
PROMPT_TYPE=mem
SIDE_EFFECTS=${SIDE_EFFECTS:-1}  # 1: also every method on the non-memorized prompts (docs/mitigation.md, side effects)
MITI_ALPHA=""            # SAIL's weight of ||x_T||; empty = 0.05 (SD v1.4) / 0.01 (SD v2.0)
MITI_PROMPT_BATCH=1      # SAIL: prompts searched together in each UNet call (same results; raise it on a large GPU)
OUT_DIR=miti_outputs
TRAIN_DIR=training_images
SSCD=""                  # sscd_disc_large.torchscript.pt; empty = fetched once into torch hub's cache (SHA-256 recorded)
CLIP_MODEL=ViT-H-14      # open_clip; the paper's
CLIP_PRETRAINED=laion2b_s32b_b79k
SIMILARITY=sscd
FIGURE=""                # prefix of the figure (default: $OUT_DIR/sd<ver>_fig6)
GRID_PROMPTS="0,1,2,3"   # prompts shown under each method (the paper's Figures 7-8)
EXTRA_ARGS=""            # e.g. "--dtype float32" or "--prompt_mirror /path/to/prompt/copies"
NUM_PROCESSES=${NUM_PROCESSES:-1}  # >1: shard the prompts over this many processes, one GPU each (accelerate launch)
PYTHON=${PYTHON:-python3}

case "${1:-}" in
  demo)
    SD_VER=demo; GEN_NUM=4; MITI_ALPHA=0.02; SIMILARITY=pixel; FIGURE=examples/figures/demo_fig6
    CLIP_MODEL=demo; CLIP_PRETRAINED=""
    $PYTHON -c "import utils.demo.clip" 2>/dev/null || CLIP_MODEL=none   # not in this checkout: no CLIP axis
    # tiny UNet ops: one thread per process is as fast, and two processes share the cores without contention
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;;
  "") ;;
  *) echo "error: unknown mode '$1' (use demo, or nothing for Stable Diffusion)" >&2; exit 2 ;;
esac
case "$SD_VER" in
  1) DATA=prompts/sd1_mem.txt; NMEM=prompts/sd1_nmem.txt; JSONL=prompts/sd1_mem.jsonl; KEYWORDS=""; LABELS=prompts/memorized_laion_prompts.csv ;;
  2) DATA=prompts/sd2_mem.txt; NMEM=prompts/sd2_nmem.txt; JSONL=prompts/sd2_mem.jsonl; KEYWORDS="--shared_gt_keywords paper"; LABELS=$JSONL ;;
  demo) DATA=prompts/demo_mem.txt; NMEM=prompts/demo_nmem.txt; JSONL=prompts/demo_mem.jsonl; KEYWORDS=""; LABELS="" ;;
  *) echo "error: SD_VER must be 1, 2 or demo" >&2; exit 2 ;;
esac
FIGURE=${FIGURE:-$OUT_DIR/sd${SD_VER}_fig6}
source ./run_common.sh   # launch and together (also run_detection.sh's)
sail_args=()
[ -n "$MITI_ALPHA" ] && sail_args=(--miti_alpha "$MITI_ALPHA")
sail_args+=(--miti_prompt_batch "$MITI_PROMPT_BATCH")   # options of SAIL alone (the other methods refuse them)
common=(--sd_ver "$SD_VER" --data_path "$DATA" --prompt_type "$PROMPT_TYPE" --gen_num "$GEN_NUM"
        --gen_seed "$GEN_SEED" --out_dir "$OUT_DIR")
SETS=("${common[@]}")   # each run: the memorized prompts, then (side effects) the same run on the non-memorized ones
[ "$SIDE_EFFECTS" = 1 ] && SETS+=(";" --sd_ver "$SD_VER" --data_path "$NMEM" --prompt_type nmem --gen_num "$GEN_NUM"
                                  --gen_seed "$GEN_SEED" --out_dir "$OUT_DIR")
each() {  # each CMD...: run CMD once per prompt set of SETS (its flags appended after CMD's own)
  local set=() a
  for a in "${SETS[@]}" ";"; do
    if [ "$a" = ";" ]; then "$@" "${set[@]}"; set=(); else set+=("$a"); fi
  done
}

# 1. generation: no mitigation, then each method's grid (SAIL, the slowest, beside the others on the demo)
each launch mitigate_mem.py --method none $EXTRA_ARGS
if [ -z "$NEMO_STATS" ]; then NEMO_STATS=prompts/sd${SD_VER}_nmem.txt; [ "$SD_VER" = demo ] && NEMO_STATS=prompts/demo_nmem.txt; fi
own() { [ "$1" = nemo ] && echo "--nemo_stats_prompts $NEMO_STATS"; true; }   # a method's extra flags
others() { for m in $METHODS; do [ "$m" = sail ] || each launch mitigate_mem.py --method "$m" --grid $(own "$m") $EXTRA_ARGS; done
  # the methods that have author settings are read from their plug-ins (docs/mitigation.md: cfg_delay DPM-Solver;
  # ren Euler on SD v2.0; han_* guidance 7, Euler on SD v2.0; nemo guidance 7)
  if [ "$AUTHOR_SETTINGS" = 1 ]; then local have; have=" $(authored) "; for m in $METHODS; do case "$have" in *" $m "*)
    each launch mitigate_mem.py --method "$m" --grid --author_settings $(own "$m") $EXTRA_ARGS ;; esac; done; fi; }
authored() { $PYTHON -c "from utils.mitigation.methods import METHODS; print(*(k for k, m in METHODS.items() if m.author))"; }
if [[ " $METHODS " == *" sail "* ]]; then
  if [ "$SD_VER" = demo ]; then
    sail() { TQDM_DISABLE=1 each $PYTHON mitigate_mem.py --method sail --grid "${sail_args[@]}" $EXTRA_ARGS; }
    together sail others
  else
    each launch mitigate_mem.py --method sail --grid "${sail_args[@]}" $EXTRA_ARGS
    others
  fi
else
  others
fi

# 2. the prompts' training images (the paper's 454 of 500 for SD v1.4, 202 of 219 for SD v2.0; link rot lowers it)
$PYTHON mitigate_eval.py fetch --jsonl "$JSONL" --out "$TRAIN_DIR/sd$SD_VER"

# 3. scores of every generation folder of this prompt type, then the figure
sscd_arg=()
[ -n "$SSCD" ] && sscd_arg=(--sscd "$SSCD")
clip_arg=(--clip_model "$CLIP_MODEL")
[ -n "$CLIP_PRETRAINED" ] && clip_arg+=(--clip_pretrained "$CLIP_PRETRAINED")
dirs=()
for dir in "$OUT_DIR/sd$SD_VER/${PROMPT_TYPE}"_*/; do
  [ -f "$dir/manifest.jsonl" ] || continue
  dir=${dir%/}
  [[ "$dir" == *_gated ]] || dirs+=("$dir")   # gated runs are compared separately (README, "Comparing mitigations")
  [ "$dir/eval_$SIMILARITY.json" -nt "$dir/manifest.jsonl" ] && continue   # scored since its last image
  launch mitigate_eval.py score --images "$dir" --gt "$TRAIN_DIR/sd$SD_VER" --similarity "$SIMILARITY" \
    "${sscd_arg[@]}" "${clip_arg[@]}" $KEYWORDS
done
side=()   # the non-memorized runs (gated ones too: gating's share mitigated and cost saved), against nmem_nomiti
if [ "$SIDE_EFFECTS" = 1 ] && [ "$PROMPT_TYPE" != nmem ]; then
  side=(--side)
  for dir in "$OUT_DIR/sd$SD_VER/nmem"_*/; do
    [ -f "$dir/manifest.jsonl" ] || continue
    dir=${dir%/}
    side+=("$dir")
    [ "$dir/eval_$SIMILARITY.json" -nt "$dir/manifest.jsonl" ] && continue
    launch mitigate_eval.py score --images "$dir" --gt "$TRAIN_DIR/sd$SD_VER" --similarity "$SIMILARITY" \
      "${sscd_arg[@]}" "${clip_arg[@]}" --gt_match all --reference "$OUT_DIR/sd$SD_VER/nmem_nomiti"
  done
fi
y=clip
[ "$CLIP_MODEL" = none ] && y=not_blank
$PYTHON mitigate_eval.py plot "${dirs[@]}" --similarity "$SIMILARITY" --y "$y" --out "$FIGURE" \
  --grid_prompts "$GRID_PROMPTS" --gt "$TRAIN_DIR/sd$SD_VER" "${side[@]}"

# 4. the label report: which memorized prompts copy, beside their published labels (docs/evaluation.md)
if [ "$PROMPT_TYPE" = mem ]; then
  label_src=()
  [ -n "$LABELS" ] && label_src=(--source "$LABELS")
  $PYTHON mitigate_eval.py labels "$OUT_DIR/sd$SD_VER/mem_nomiti" --similarity "$SIMILARITY" "${label_src[@]}" \
    --out "$OUT_DIR/sd${SD_VER}_labels"
fi
