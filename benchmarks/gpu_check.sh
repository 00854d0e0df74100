#!/usr/bin/env bash
# Issues #14's, #21's and #22's GPU checks in one run (each part has its own time limit; the first seven parts'
# limits add up to 470 s, the two SD3 parts' and the Flux part's to 300 s; on an H200 with torch 2.11 the two SDXL parts took 43 s,
# and 41 s with 2 repeats; the SD3 and Flux parts have not run on a GPU yet).
# Writes, as it goes, under $OUT (default ./gpu_check_out):
#   gpu_check.md    every table (Markdown), and a line for each part that failed or ran out of time
#   gpu_check.log   everything the parts printed
#   jvp_memory.json the exact JVP at SD v2.0's shape, n = 4, under a 24 GiB cap: plan, peak, time, agreement
#   fd_study.json   fd vs the exact float32 JVP at SD v1.4's (64 x 64) and SD v2.0's (96 x 96) shapes
#   bench_sd14.json bench_sd2.json   benchmarks/bench.py: every item, bfloat16 and float32, ratios and peaks
#   jvp_memory_sdxl.json  the exact JVP at SDXL base's shape (128 x 128), n = 4, under the same cap
#   bench_sdxl.json       benchmarks/bench.py at SDXL base's shape: forward, wen, the JVPs and fd, bfloat16
#   jvp_memory_sd3.json   the exact JVP through SD3-medium's transformer (128 x 128 latents, 4096 + 333 tokens), n = 4:
#                         the planner's estimate against the measured peak, uncapped, capped, chunked (issue 22)
#   bench_sd3.json        benchmarks/bench.py at SD3-medium's shape through the flow denoiser, bfloat16
#   bench_flux.json       benchmarks/bench.py at Flux-dev's shape (packed 128 x 128 latents, 512 T5 tokens), bfloat16, n = 1
# PARTS="name ..." runs only the named parts (e.g. PARTS="jvp_memory_sdxl bench_sdxl"), in the order below.
# Run from anywhere; needs torch with CUDA and diffusers. A machine without diffusers (the workplace's GPU image)
# gets it from .gpu_site/*.zip in the repository root (benchmarks/pack_gpu_site.sh makes it; carry .gpu_site).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
MD=$OUT/gpu_check.md
LOG=$OUT/gpu_check.log
for z in .gpu_site/*.zip; do
  if [ -f "$z" ]; then export PYTHONPATH="$PWD/$z${PYTHONPATH:+:$PYTHONPATH}"; fi
done
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
START=$(date +%s)
# SMOKE=1: the same commands on the CPU at toy sizes (8 x 8 latents, 2 prompts, short SAIL), to test the script.
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu S14=8 S2=8 P14=2 P2=2 N=1 CAP=0.001 REP=1 SAIL="--budget 2 --max_steps 1 --search_rounds 2" X=20
  XL=sdxl_tiny SXL=8  # SDXL's layout at toy widths: the real UNet's 10 GB of weights are no smoke test
  S3=sd3_tiny SS3=8   # likewise SD3's transformer
  FX=flux_tiny SFX=8  # and Flux's
else
  DEV=cuda S14=64 S2=96 P14=32 P2=16 N=4 CAP=24 REP=0 SAIL="" X=1
  XL=sdxl SXL=128
  S3=sd3_medium SS3=128
  FX=flux SFX=128
fi

part() {  # part NAME LIMIT_SECONDS COMMAND...: run it, log it, note a failure in the table file, never stop
  local name=$1 limit=$2 rc=0
  shift 2
  if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then return 0; fi
  echo "== $name: limit ${limit}s, started at +$(( $(date +%s) - START ))s" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "**part $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (time limit; partial results above and in its JSON)')**" >>"$MD"
    echo >>"$MD"
  fi
  echo "   $name: exit $rc at +$(( $(date +%s) - START ))s" | tee -a "$LOG"
}

{
  echo "# memsharp issues 14, 21 and 22: GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  python3 -c "import sys, torch, diffusers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 || true
  echo '```'
  echo
} >>"$MD"

# 1. The exact JVP in bounded memory: SD v2.0's shape at n = 4 under 24 GiB (target), against the uncapped JVP.
part jvp_memory $((60 * X)) python3 benchmarks/jvp_memory_check.py --device $DEV --unet sd2 --size $S2 --gen_num $N \
  --cap_gb $CAP --dtypes bfloat16,float32 --repeats 2 --out "$OUT/jvp_memory.json" --md "$MD"

# 2. fd agreement at SD v1.4's full shape (64 x 64), first and middle step, vs the exact float32 JVP.
part fd_sd14 $((75 * X)) python3 benchmarks/fd_study.py --device $DEV --model sd14 --size $S14 --prompts $P14 \
  --gen_num 1 --steps 0,25 --precisions float32,tf32,bfloat16 --schemes forward,central --h_unit rms \
  --hs 1e-4,3e-4,1e-3,3e-3,1e-2 --bf16_hs 1e-2,3e-2,1e-1,3e-1 --batch 8 --out "$OUT/fd_study.json" --md "$MD"

# 3. The side-by-side table at SD v1.4's shape (bfloat16: everything; float32: detection and generation).
part bench_sd14 $((95 * X)) python3 benchmarks/bench.py --device $DEV --unet sd14 --size $S14 --gen_num $N \
  --dtypes bfloat16,float32 --long_dtypes bfloat16 --repeats $((REP > 0 ? REP : 5)) --prompt_batch 4 $SAIL \
  --out "$OUT/bench_sd14.json" --md "$MD"

# 4. The same at SD v2.0's shape (768 x 768, v-prediction); no 3-round search (3 x the round).
part bench_sd2 $((100 * X)) python3 benchmarks/bench.py --device $DEV --unet sd2 --size $S2 --gen_num $N \
  --dtypes bfloat16,float32 --long_dtypes bfloat16 --repeats $((REP > 0 ? REP : 3)) --prompt_batch 4 $SAIL \
  --items forward,wen,anisotropy,jvp,jvp_chunked,jvp_f32copy,fd,fd_model,fd_tf32,generation,sail_round,sail_batch \
  --out "$OUT/bench_sd2.json" --md "$MD"

# 5. fd agreement at SD v2.0's shape.
part fd_sd2 $((45 * X)) python3 benchmarks/fd_study.py --device $DEV --model sd2 --size $S2 --prompts $P2 --gen_num 1 \
  --steps 0,25 --precisions float32,tf32 --schemes forward --h_unit rms --hs 3e-4,1e-3,3e-3 --batch 8 \
  --out "$OUT/fd_study.json" --md "$MD"

# 6. The exact JVP at SDXL base's shape (128 x 128 latents, 77 x 2048 context, added conditions), n = 4: the
# planner's estimate against the measured peak, uncapped and under the cap (the estimates: benchmarks/sdxl_memory.py).
part jvp_memory_sdxl $((50 * X)) python3 benchmarks/jvp_memory_check.py --device $DEV --unet $XL --size $SXL \
  --gen_num $N --cap_gb $CAP --dtypes bfloat16,float32 --repeats 1 --out "$OUT/jvp_memory_sdxl.json" --md "$MD"

# 7. Detection's costs at SDXL base's shape, bfloat16, one repeat: SAIL and generation are left out to keep the part
# short (generation is 50 of the forward item's pair calls).
part bench_sdxl $((45 * X)) python3 benchmarks/bench.py --device $DEV --unet $XL --size $SXL --gen_num $N \
  --dtypes bfloat16 --items forward,wen,jvp,jvp_chunked,fd --repeats 1 \
  --out "$OUT/bench_sdxl.json" --md "$MD"

# 8. The exact JVP through SD3-medium's MMDiT (random weights, 128 x 128 latents: 4096 image + 333 text tokens), n = 4:
# the planner's estimate (benchmarks/flow_memory.py prints the table) against the measured peak; not yet measured.
part jvp_memory_sd3 $((120 * X)) python3 benchmarks/jvp_memory_check.py --device $DEV --unet $S3 --size $SS3 \
  --gen_num $N --cap_gb $CAP --dtypes bfloat16,float32 --repeats 1 --out "$OUT/jvp_memory_sd3.json" --md "$MD"

# 9. Detection's costs at SD3-medium's shape through the SD3 flow denoiser, bfloat16, one repeat (no SAIL: no alpha
# is published for flow models).
part bench_sd3 $((60 * X)) python3 benchmarks/bench.py --device $DEV --unet $S3 --size $SS3 --gen_num $N \
  --dtypes bfloat16 --items forward,wen,jvp,jvp_chunked,fd --repeats 1 --out "$OUT/bench_sd3.json" --md "$MD"

# 10. The same at Flux-dev's shape (11.9 B parameters, random weights; its own paired call: the empty prompt with the
# same guidance embedding as "uncond"), one generation: the planner estimates 26 GiB for the bfloat16 JVP at n = 1
# (docs/cost.md) on top of 24 GB of weights; the run-time planner does not cover packed latents (no jvp_chunked).
part bench_flux $((120 * X)) python3 benchmarks/bench.py --device $DEV --unet $FX --size $SFX --gen_num 1 \
  --dtypes bfloat16 --items forward,wen,jvp,fd --repeats 1 --out "$OUT/bench_flux.json" --md "$MD"

echo "total: $(( $(date +%s) - START ))s" | tee -a "$LOG" >>"$MD"
