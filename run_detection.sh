#!/usr/bin/env bash
# The paper's Table 1: every detector on memorized and non-memorized prompts, then one table per model.
#   bash run_detection.sh          SD v1.4 and v2.0, the Table 1 grid (GPU)
#   bash run_detection.sh demo     the bundled demo model on its own prompt sets, n = 1 and 4 (CPU, offline, minutes)
#   bash run_detection.sh demo16   the demo with n = 16 added (longer)
#   bash run_detection.sh demo_flow   the flow demo (SD3-shaped, rectified flow) on the demo's prompt sets, n = 1 and 4,
#                                     the detectors defined on flow models; results in det_outputs/demo_flow
# Results: $OUT_DIR/<prompt file stem>[_<metric>]_gen<n>.pt/.json, generated images of tiled_l2 runs, and
# <mem>_vs_<nmem>.table.md/.json/.roc.png per model (detect_eval.py --table).
set -euo pipefail
cd "$(dirname "$0")"

# ---- hyperparameters: edit here ----
GEN_NUMS="1 4 16"       # n: generations per prompt (Table 1 reports n = 1, 4, 16)
NEW="metric2,dsm,curv_ds,curv_dh"                         # the 2024-26 detectors (docs/detection.md); nemo needs n >= 2
METRICS_N1="sharpness,wen,anisotropy,le,ae,be,$NEW"       # metrics run at n = 1 (tiled_l2 needs two generations)
METRICS_N4="sharpness,wen,anisotropy,tiled_l2,le,ae,be,$NEW,nemo"   # at n = 4
METRICS_N16="wen,anisotropy,tiled_l2,le,ae,be,$NEW,nemo"            # at n = 16 (the paper has no sharpness row for n = 16)
HVP_SAMPLING_NUM=1      # sharpness: first sampling steps measured (Table 1: 1)
WEN_STEPS=50            # wen: first steps measured; the table averages the first 1, 5 and 50 (Table 1)
TILE_PX=128             # tiled_l2: tile side in pixels (the sharpness paper's 128)
GEN_SEED=42             # torch seed of the shared initial noise ("42,0,1": one result per seed in seed<s>/, pooled)
NEMO_SSIM=ms            # nemo: ms = Hintersdorf et al.'s MS-SSIM (latents > 40 px); single = one scale (the demo's 8 px)
SD_VERS="1 2"           # Stable Diffusion versions: 1 = v1.4 (epsilon), 2 = v2.0 (v-prediction); also 1.5, 2.1, xl
                        # (SDXL: no published prompt set; build prompts/sdxl_mem.txt and sdxl_nmem.txt, docs/families.md)
BATCH_SIZE=1            # prompts per UNet call (same results; raise it on a large GPU)
OUT_DIR=det_outputs
EXTRA_ARGS=""           # e.g. "--dtype float32", "--hvp fd" (fast sharpness), "--max_memory_gb 22" (a 24 GB GPU)
SIDE_BY_SIDE=0          # 1: run the memorized and non-memorized sets at once (the demo: one CPU thread each)
NUM_PROCESSES=${NUM_PROCESSES:-1}  # >1: shard the prompts over this many processes, one GPU each (accelerate launch)
PYTHON=${PYTHON:-python3}

case "${1:-}" in
  demo|demo16)
    SD_VERS=demo; TILE_PX=8; BATCH_SIZE=8; SIDE_BY_SIDE=1   # 32x32 images: a 4x4 grid of 8-pixel tiles
    NEMO_SSIM=single                                        # 8x8 latents: too small for the three-scale MS-SSIM
    GEN_NUMS="1 4"; [ "$1" = demo16 ] && GEN_NUMS="1 4 16"
    # tiny UNet ops: one thread per process is as fast and two processes share the cores without contention
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;;
  demo_flow)
    SD_VERS=demo_flow; TILE_PX=8; BATCH_SIZE=8; SIDE_BY_SIDE=1; GEN_NUMS="1 4"
    OUT_DIR=det_outputs/demo_flow   # the same prompt files as the demo: a folder of its own keeps the tables apart
    # every detector defined on flow models (le/ae/be are refused on joint attention, nemo and metric2 vanish at
    # sigma = 1: docs/flow.md); anisotropy with the flow demo's weights chosen by rule (utils/demo/__init__.py)
    METRICS_N1="sharpness,wen,anisotropy,dsm,curv_ds,curv_dh"; METRICS_N4="$METRICS_N1,tiled_l2"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;;
  "") ;;
  *) echo "error: unknown mode '$1' (use demo, demo16, demo_flow, or nothing for Stable Diffusion)" >&2; exit 2 ;;
esac

source ./run_common.sh   # launch and together (also run_mitigation.sh's)

run() {  # run() SET N METRICS: one detect_mem.py call
  launch detect_mem.py --sd_ver "$ver" --data_path "$1" --gen_num "$2" --metrics "$3" \
    --hvp_sampling_num "$HVP_SAMPLING_NUM" --wen_steps "$WEN_STEPS" --tile_px "$TILE_PX" \
    --nemo_ssim "$NEMO_SSIM" --gen_seed "$GEN_SEED" --batch_size "$BATCH_SIZE" --out_dir "$OUT_DIR" $EXTRA_ARGS
}

for ver in $SD_VERS; do
  if [ "$ver" = "demo" ] || [ "$ver" = "demo_flow" ]; then mem=prompts/demo_mem.txt; nmem=prompts/demo_nmem.txt
  else mem=prompts/sd${ver}_mem.txt; nmem=prompts/sd${ver}_nmem.txt; fi
  for n in $GEN_NUMS; do
    case "$n" in 1) metrics=$METRICS_N1 ;; 4) metrics=$METRICS_N4 ;; *) metrics=$METRICS_N16 ;; esac
    if [ "$SIDE_BY_SIDE" = 1 ]; then
      run_mem() { run "$mem" "$n" "$metrics"; }
      run_nmem() { TQDM_DISABLE=1 run "$nmem" "$n" "$metrics"; }   # one progress bar on the screen
      together run_mem run_nmem
    else
      run "$mem" "$n" "$metrics"
      run "$nmem" "$n" "$metrics"
    fi
  done
  echo "== sd_ver $ver"
  $PYTHON detect_eval.py --table "$OUT_DIR" --sets "$(basename "${mem%.*}")" "$(basename "${nmem%.*}")"
done
