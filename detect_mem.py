"""Memorization detection: the field's detectors on the same prompts, noise, schedule and UNet calls, per prompt.

    python detect_mem.py --sd_ver 1 --data_path prompts/sd1_mem.txt --gen_num 4
    python detect_mem.py --sd_ver 1 --data_path prompts/sd1_mem.txt --gen_num 4 --metrics sharpness,wen,anisotropy,tiled_l2

sharpness (default) writes OUT_DIR/<stem>_gen<n>.pt (float32 [prompts, steps], the mean over the n generations;
the reference's layout) and <stem>_gen<n>.json (prompts, per-generation values, arguments, versions, cost);
every other metric m writes <stem>_<m>_gen<n>.pt and .json the same way. One pass computes all requested metrics,
sharing UNet calls (utils/detectors.py). Results are flushed per prompt and metric to *.progress.jsonl, so
re-running the same command resumes an interrupted run; tiled_l2 also saves the generated images.
"""
import math
import os
import resource
import time

import torch
from tqdm import tqdm

from utils import distributed as D
from utils.cli import (ArgumentParser, UserError, bounded_int, guarded, nonneg_int, positive_float, positive_int,
                       quiet_library_warnings, raise_arg, seed_int, warn)
from utils.detection.loop import (ANISO_MODES, ANISO_SPACES, ATTENTION_METRICS, DIRECTION, FD_STEP, HVP_METHODS,
                                  METRICS, SPACES, TILED_AGGS, DetectSettings, attention_layers, run_detectors)
from utils.io import atomic_save_image, atomic_torch_save, check_outputs, prepare_dir, sha256_file, write_sidecar
from utils.models.attention import prompt_lengths
from utils.models.autodiff import JVP_DTYPES, jvp_unet_copy
from utils.models.denoisers import FD_PRECISIONS, FD_SCHEMES, V_SCORE_FORMS
from utils.models.jvp_memory import ATTENTION_MODES, JvpMemory
from utils.prompts import read_prompts, truncated_prompts
from utils.startup import add_model_arguments, load_model, model_id_of, start_process

NUM_INFERENCE_STEPS = 50  # DDIM steps of the sampling schedule whose first steps are measured (as the paper)
GUIDANCE_SCALE = 7.5      # classifier-free guidance for the DDIM steps between measured steps


def metric_list(text):
    """argparse type: comma-separated metric names, each known, none twice."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names or len(set(names)) != len(names):
        raise_arg(f"expected comma-separated metrics from {', '.join(METRICS)} (each once), got {text!r}")
    return names


def index_list(text):
    """argparse type: comma-separated non-negative integers, as a tuple."""
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals or min(vals) < 0:
        raise_arg(f"expected comma-separated layer indices, got {text!r}")
    return vals


def weight_pair(text):
    """argparse type: two finite numbers 'g1,g2'."""
    try:
        g = tuple(float(v) for v in text.split(","))
    except ValueError:
        g = ()
    if len(g) != 2 or not all(math.isfinite(v) for v in g):
        raise_arg(f"expected two finite numbers 'norm_weight,cosine_weight', got {text!r}")
    return g


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--data_path", default="prompts/sd1_mem.txt", help="prompt file, one prompt per line")
    p.add_argument("--metrics", type=metric_list, default=["sharpness"], help=f"any of {', '.join(METRICS)}")
    p.add_argument("--gen_num", type=bounded_int(1, 65536), default=4, help="n: generations averaged per prompt")
    p.add_argument("--hvp_sampling_num", type=positive_int, default=1,
                   help=f"sharpness: number of first sampling steps measured (at most {NUM_INFERENCE_STEPS})")
    p.add_argument("--gen_seed", type=seed_int, default=42, help="torch seed before each prompt's initial noise")
    p.add_argument("--out_dir", default="det_outputs")
    p.add_argument("--batch_size", type=bounded_int(1, 65536), default=1, help="prompts per UNet call (same results)")
    p.add_argument("--v_score", default="correct", choices=V_SCORE_FORMS,
                   help="sharpness on v-prediction models: correct -(alpha v + sigma x)/sigma, or the reference's "
                        "(alpha v - x)/sigma^2 (metric scaled by 1/sigma_t^2)")
    p.add_argument("--jvp_dtype", default="model", choices=JVP_DTYPES,
                   help="model: the JVP in the model's dtype, what the reference effectively does (its float32 "
                        "CUDA autocast is disabled by torch); float32: a float32 copy of the UNet for the JVP")
    p.add_argument("--hvp", default="jvp", choices=HVP_METHODS,
                   help="sharpness: jvp = H_delta s_delta by one exact forward-mode JVP (default); fd = finite "
                        "differences of s_delta along itself: 1 extra forward that can use the fused attention "
                        "kernels (README 'Cost': agreement and cost)")
    p.add_argument("--fd_step", type=positive_float, default=FD_STEP,
                   help="fd: per-entry RMS of the displacement along s_delta/||s_delta||")
    p.add_argument("--fd_precision", default="float32", choices=FD_PRECISIONS,
                   help="fd: float32 = the difference forwards in float32 (a float32 UNet copy when the model runs "
                        "in bfloat16: 2 float32 forwards); model = in the model's dtype (bfloat16 fails the "
                        "agreement targets); tf32 = float32 weights with TF32 math (CUDA)")
    p.add_argument("--fd_scheme", default="forward", choices=FD_SCHEMES,
                   help="fd: forward = 1 displaced forward; central = 2 (x +- h u), second-order accurate")
    p.add_argument("--max_memory_gb", type=positive_float, default=None,
                   help="cap on the memory the exact JVP may bring the device to (CUDA: allocator; CPU: resident "
                        "set); default: the free device memory. Over the cap the JVP runs its attention tangent in "
                        "query chunks and, if needed, fewer generations per call (equal within float tolerance)")
    p.add_argument("--jvp_attention", default="auto", choices=ATTENTION_MODES,
                   help="exact JVP's attention: auto = the math kernel when it fits the memory cap, else the fused "
                        "forward with a chunked tangent; math; chunked")
    p.add_argument("--wen_steps", type=positive_int, default=NUM_INFERENCE_STEPS,
                   help="wen: first sampling steps measured (Table 1 averages the first 1, 5 or 50)")
    p.add_argument("--wen_space", default="output", choices=SPACES,
                   help="wen: output = raw model output as Wen et al.'s code (v for v-prediction models); "
                        "eps = noise prediction (README, 'Comparing detectors')")
    p.add_argument("--aniso_mode", default="x,c|x", choices=ANISO_MODES, help="anisotropy: pair of the cosine term")
    p.add_argument("--aniso_space", default="output", choices=ANISO_SPACES,
                   help="anisotropy: output = the authors' code; score = norm of s_delta and cosine of eps")
    p.add_argument("--aniso_weights", type=weight_pair, default=None,
                   help="anisotropy: 'g_norm,g_cos' (default: the authors' 1,2 for SD v1.4 / epsilon models, "
                        "1,0.1 for SD v2.0 / v-prediction models)")
    p.add_argument("--tile_px", type=positive_int, default=128, help="tiled_l2: tile side in pixels (8 for the demo)")
    p.add_argument("--tiled_agg", default="mean", choices=TILED_AGGS,
                   help="tiled_l2: aggregate of the pairwise distances (mean; min = the closest pair)")
    p.add_argument("--le_layer", type=nonneg_int, default=3,
                   help="le: forward index of the cross-attention layer (Ren et al.'s 3 = down_blocks.1.attentions.1)")
    p.add_argument("--be_layers", type=index_list, default=(),
                   help="be: forward indices of the end-token mask layers (default: the first down block's, as "
                        "Chen et al.'s two 64x64 layers of SD v1.4)")
    args = p.parse_args(argv)
    for name, v in (("--hvp_sampling_num", args.hvp_sampling_num), ("--wen_steps", args.wen_steps)):
        if v > NUM_INFERENCE_STEPS:
            p.error(f"{name} {v} exceeds the {NUM_INFERENCE_STEPS} sampling steps")
    if "tiled_l2" in args.metrics and args.gen_num < 2:
        p.error("tiled_l2 compares the n generations of a prompt: it needs --gen_num of at least 2")
    return args


def output_base(out_dir, stem, metric, n):
    """Path stem of a metric's result files (sharpness keeps the reference's name)."""
    return os.path.join(out_dir, f"{stem}_gen{n}" if metric == "sharpness" else f"{stem}_{metric}_gen{n}")


@guarded(memory_hint="use fewer generations (--gen_num), a smaller --batch_size, or a lower --max_memory_gb")
def main(argv=None):
    args = parse_args(argv)
    quiet_library_warnings()
    # several processes under accelerate launch / torchrun: prompts are sharded
    shard, device = start_process(args.device, vars(args))
    model_id = model_id_of(args.sd_ver, args.model_id)
    prompts = read_prompts(args.data_path, args.prompt_mirror)
    stem = os.path.splitext(os.path.basename(args.data_path))[0]
    bases = {m: output_base(args.out_dir, stem, m, args.gen_num) for m in args.metrics}
    prepare_dir(args.out_dir)  # an unusable output folder is an error now, not after the computing
    check_outputs({f"the {m} result": bases[m] + ext for m in args.metrics for ext in (".pt", ".json")},
                  {"--data_path": args.data_path})
    if args.hvp == "fd" and args.fd_precision == "tf32" and device.type != "cuda":
        raise UserError("--fd_precision tf32 needs CUDA; on the CPU use float32")
    loaded = load_model(args.sd_ver, args.model_id, device, args.dtype)
    pipe, dtype = loaded.pipe, loaded.dtype
    sharp = "sharpness" in args.metrics
    model = loaded.denoiser(score_form=args.v_score,
                       jvp_unet=jvp_unet_copy(pipe.unet, args.jvp_dtype) if sharp and args.hvp == "jvp" else None,
                       fd_unet=(jvp_unet_copy(pipe.unet, "float32") if sharp and args.hvp == "fd"
                                and args.fd_precision != "model" else None),
                       fd_precision=args.fd_precision if args.hvp == "fd" else "model",
                       jvp_memory=JvpMemory(None if args.max_memory_gb is None else int(args.max_memory_gb * 2 ** 30),
                                            args.jvp_attention))
    weights = args.aniso_weights or loaded.hparam("aniso_weights")
    st = DetectSettings(num_inference_steps=NUM_INFERENCE_STEPS, guidance_scale=GUIDANCE_SCALE,
                        hvp_sampling_num=args.hvp_sampling_num, wen_steps=args.wen_steps, wen_space=args.wen_space,
                        aniso_mode=args.aniso_mode, aniso_space=args.aniso_space, aniso_weights=weights,
                        tile_px=args.tile_px, tiled_agg=args.tiled_agg, le_layer=args.le_layer,
                        be_layers=args.be_layers, hvp=args.hvp, fd_step=args.fd_step, fd_precision=args.fd_precision,
                        fd_scheme=args.fd_scheme)
    if any(m in ATTENTION_METRICS for m in args.metrics):
        try:
            attention_layers(pipe.unet, st)
        except ValueError as e:
            raise UserError(f"{' '.join(str(e).split())[:400]} (--le_layer / --be_layers)") from None
    # Everything that changes a metric's numbers; a resumed run must match it exactly (sharpness: as before).
    common = dict(model_id=model_id, data_sha256=sha256_file(args.data_path), gen_num=args.gen_num,
                  gen_seed=args.gen_seed, dtype=str(dtype), device=device.type)
    identities = {m: dict(common, **st.for_metric(m)) for m in args.metrics}
    if "sharpness" in identities:
        identities["sharpness"] = dict(common, hvp_sampling_num=args.hvp_sampling_num, v_score=args.v_score,
                                       jvp_dtype=args.jvp_dtype, num_inference_steps=NUM_INFERENCE_STEPS,
                                       guidance_scale=GUIDANCE_SCALE)
        if args.hvp != "jvp":  # the exact JVP's identity is unchanged, so its old progress logs still resume
            identities["sharpness"].update(hvp=args.hvp, fd_step=args.fd_step, fd_precision=args.fd_precision,
                                           fd_scheme=args.fd_scheme)
    logs = {m: D.ShardLog(bases[m] + ".progress", identities[m], shard,
                          fields={"prompt": str, "per_generation": list}) for m in args.metrics}
    todo = [i for i in range(len(prompts)) if any(i not in logs[m].done for m in args.metrics)]
    if len(todo) < len(prompts) and shard.main:
        print(f"resuming: {len(prompts) - len(todo)} of {len(prompts)} prompts already done")
    long_ones = truncated_prompts(loaded.tokenizer, prompts, loaded.tokenizer.model_max_length)
    if long_ones:
        warn(f"{len(long_ones)} prompt(s) exceed {loaded.tokenizer.model_max_length} tokens and are truncated by the "
             f"text encoder, as in the reference (prompt(s) {', '.join(str(i + 1) for i in long_ones[:10])}"
             f"{', ...' if len(long_ones) > 10 else ''})")
    if "tiled_l2" in args.metrics:
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        if side % args.tile_px:
            raise UserError(f"--tile_px {args.tile_px} does not divide the image side {side} px")
    latents = loaded.noise(args.gen_num, args.gen_seed)  # same noise for every prompt
    image_dir = os.path.join(args.out_dir, f"{stem}_gen{args.gen_num}_images")

    mine = D.my_batches(todo, args.batch_size, shard)
    for idx in tqdm(mine, desc=f"detect {stem}" + (f" [{shard.rank}]" if shard.world > 1 else ""), unit="batch",
                    disable=not mine):
        metrics = [m for m in args.metrics if any(i not in logs[m].done for i in idx)]
        t0 = time.time()
        batch = [prompts[i] for i in idx]
        vals, extras, images, meter = run_detectors(model, loaded.encode(batch), latents, metrics, st,
                                                    decode=loaded.decode,
                                                    prompt_lengths=prompt_lengths(loaded.tokenizer, batch))
        secs = (time.time() - t0) / len(idx)
        cost = meter.summary(metrics)
        for j, i in enumerate(idx):
            if images is not None:
                for k, im in enumerate(images[j]):
                    atomic_save_image(os.path.join(image_dir, f"{i:05d}_{k}.png"), im)
            for m in metrics:
                if i in logs[m].done:
                    continue
                if not torch.isfinite(vals[m][j]).all():
                    warn(f"prompt {i + 1} gave a non-finite {m} value; saved as NaN: {prompts[i][:80]!r}")
                c = cost[m]
                logs[m].add(dict(index=i, prompt=prompts[i], per_generation=vals[m][j].T.tolist(), seconds=secs,
                                 unet_forwards=c["unet_forwards"], jvps=c["jvps"], batch=len(idx),
                                 extras=extras[m][j],
                                 cost=dict(c, seconds=c["seconds"] / len(idx),
                                           step_seconds=[v / len(idx) for v in c["step_seconds"]],
                                           forward_seconds=_forward_seconds(meter) / len(idx))))
    for m in args.metrics:  # merged only when every prompt is done, by the main process
        records = D.merged_records(logs[m], len(prompts), shard)
        if shard.main:
            _save(m, bases[m], records, prompts, args, model_id, model.prediction_type, identities[m], st)
    D.finish(shard)


def _forward_seconds(meter):
    """Mean seconds of one pair forward of this batch (K prompts; per prompt: divide by K): the unit of the
    cost ratios, one UNet forward on the [uncond; cond] batch of a prompt's 2n rows."""
    f = [u[2] for u in meter.units if u[0] == "unet_forwards"]
    return sum(f) / len(f) if f else None


def _save(metric, base, records, prompts, args, model_id, prediction_type, identity, st):
    """The metric's [prompts, steps] tensor (.pt) and its self-describing sidecar (.json) from its records."""
    per_step = torch.tensor([[_mean(step) for step in r["per_generation"]] for r in records], dtype=torch.float32)
    atomic_torch_save(base + ".pt", per_step)
    costs = [r.get("cost") or {} for r in records]
    write_sidecar(base + ".json", vars(args),
                  metric=dict(name=metric, direction=DIRECTION.get(metric, "higher"), settings=st.for_metric(metric),
                              stem=os.path.splitext(os.path.basename(args.data_path))[0], gen_num=args.gen_num,
                              description=_DESCRIPTIONS[metric]),
                  shape=list(per_step.shape), prompts=prompts, values=per_step.tolist(),
                  per_generation=[r["per_generation"] for r in records], extras=[r.get("extras") for r in records],
                  model_id=model_id, prediction_type=prediction_type, identity=identity,
                  cost=dict(seconds_per_prompt=[r["seconds"] for r in records],
                            unet_forwards_per_prompt_batch=records[0]["unet_forwards"],
                            jvps_per_prompt_batch=records[0]["jvps"], batch_size=args.batch_size,
                            per_prompt=costs, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                            note="unet_forwards, jvps, vae_decodes, seconds and peak_bytes (CUDA allocator peak; "
                                 "None on CPU) count every unit of work this metric used; units shared with the "
                                 "metrics in shared_with ran once and are counted in full for each of them"))
    bad = int((~torch.isfinite(per_step)).any(dim=1).sum())
    finite = per_step[torch.isfinite(per_step)]
    print(f"saved {base}.pt {tuple(per_step.shape)}: mean {finite.mean().item() if finite.numel() else float('nan'):.4g}"
          f"{f', {bad} prompt(s) NaN' if bad else ''}")


_DESCRIPTIONS = {
    "sharpness": "||H_delta s_delta|| (mean over generations), per prompt and sampling step",
    "wen": "||out(x_t, c) - out(x_t, empty)|| (mean over generations), per prompt and sampling step",
    "anisotropy": "g_norm * ||D at the first timestep|| + g_cos * mean per-pixel cos at the low-noise timestep "
                  "(mean over generations); extras: per-generation norm and cosine terms",
    "tiled_l2": "aggregate over generation pairs of the max over tiles of the RMS pixel difference (lower = "
                "memorized); extras: pairwise distance matrix",
    "le": "entropy of the head- and query-averaged cross-attention of one layer at the first step (Ren et al.)",
    "ae": "mean entropy over the last T/5 steps of the layer-averaged cross-attention plus the change of the "
          "summary-token entropy from the first step (Ren et al.)",
    "be": "mean over steps of ||m * (out_c - out_u)|| / mean(m), m the end-token attention map at the last step "
          "(Chen et al.'s Bright Ending); extras: per-step values",
}


def _mean(values):
    """Mean over generations; NaN if any generation is non-finite (never averaged away silently)."""
    return sum(values) / len(values) if all(math.isfinite(v) for v in values) else float("nan")


if __name__ == "__main__":
    main()
