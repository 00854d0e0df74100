"""Sharpness-based memorization detection: ||H_delta s_delta|| at the first sampling steps, per prompt.

    python detect_mem.py --sd_ver 1 --data_path prompts/sd1_mem.txt --gen_num 4

Writes OUT_DIR/<stem>_gen<n>.pt (float32 [prompts, steps], the mean over the n generations; the reference's
layout) and <stem>_gen<n>.json (prompts, per-generation values, arguments, versions, cost). Results are flushed
per prompt to <stem>_gen<n>.progress.jsonl, so re-running the same command resumes an interrupted run.
"""
import math
import os
import time

import torch
from tqdm import tqdm

from utils.cli import ArgumentParser, UserError, add_model_arguments, guarded, positive_int, quiet_library_warnings, \
    seed_int, warn
from utils.detection import initial_latents, sharpness_scores
from utils.io import ProgressLog, atomic_torch_save, sha256_file, write_sidecar
from utils.models import JVP_DTYPES, encode_prompts, jvp_unet_copy, load_pipeline, resolve_device, resolve_dtype, \
    resolve_model_id
from utils.prompts import read_prompts, truncated_prompts
from utils.scores import V_SCORE_FORMS, ScoreModel

NUM_INFERENCE_STEPS = 50  # DDIM steps of the sampling schedule whose first steps are measured (as the paper)
GUIDANCE_SCALE = 7.5      # classifier-free guidance for the DDIM steps between measured steps


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--data_path", default="prompts/sd1_mem.txt", help="prompt file, one prompt per line")
    p.add_argument("--gen_num", type=positive_int, default=4, help="n: generations averaged per prompt")
    p.add_argument("--hvp_sampling_num", type=positive_int, default=1,
                   help=f"S: number of first sampling steps measured (at most {NUM_INFERENCE_STEPS})")
    p.add_argument("--gen_seed", type=seed_int, default=42, help="torch seed before each prompt's initial noise")
    p.add_argument("--out_dir", default="det_outputs")
    p.add_argument("--batch_size", type=positive_int, default=1, help="prompts per UNet call (same results)")
    p.add_argument("--v_score", default="correct", choices=V_SCORE_FORMS,
                   help="v-prediction score: correct -(alpha v + sigma x)/sigma, or the reference's "
                        "(alpha v - x)/sigma^2 (metric scaled by 1/sigma_t^2)")
    p.add_argument("--jvp_dtype", default="model", choices=JVP_DTYPES,
                   help="model: the JVP in the model's dtype, what the reference effectively does (its float32 "
                        "CUDA autocast is disabled by torch); float32: a float32 copy of the UNet for the JVP")
    args = p.parse_args(argv)
    if args.hvp_sampling_num > NUM_INFERENCE_STEPS:
        p.error(f"--hvp_sampling_num {args.hvp_sampling_num} exceeds the {NUM_INFERENCE_STEPS} sampling steps")
    return args


@guarded
def main(argv=None):
    args = parse_args(argv)
    quiet_library_warnings()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model_id = resolve_model_id(args.sd_ver, args.model_id)
    prompts = read_prompts(args.data_path, args.prompt_mirror)

    stem = os.path.splitext(os.path.basename(args.data_path))[0]
    base = os.path.join(args.out_dir, f"{stem}_gen{args.gen_num}")
    # Everything that changes the numbers; a resumed run must match it exactly.
    identity = dict(model_id=model_id, data_sha256=sha256_file(args.data_path), gen_num=args.gen_num,
                    hvp_sampling_num=args.hvp_sampling_num, gen_seed=args.gen_seed, dtype=str(dtype),
                    device=device.type, v_score=args.v_score, jvp_dtype=args.jvp_dtype,
                    num_inference_steps=NUM_INFERENCE_STEPS, guidance_scale=GUIDANCE_SCALE)
    log = ProgressLog(base + ".progress.jsonl", identity)
    todo = [i for i in range(len(prompts)) if i not in log.done]
    if log.done:
        print(f"resuming: {len(log.done)} of {len(prompts)} prompts already done")

    pipe = load_pipeline(model_id, device, dtype)
    long_ones = truncated_prompts(pipe.tokenizer, prompts, pipe.tokenizer.model_max_length)
    if long_ones:
        warn(f"{len(long_ones)} prompt(s) exceed {pipe.tokenizer.model_max_length} tokens and are truncated by the "
             f"text encoder, as in the reference (prompt(s) {', '.join(str(i + 1) for i in long_ones[:10])}"
             f"{', ...' if len(long_ones) > 10 else ''})")
    model = ScoreModel(pipe.unet, pipe.scheduler, v_score=args.v_score,
                       jvp_unet=jvp_unet_copy(pipe.unet, args.jvp_dtype))
    latents = initial_latents(pipe, args.gen_num, args.gen_seed)  # same noise for every prompt
    uncond = encode_prompts(pipe, "", device)

    for start in tqdm(range(0, len(todo), args.batch_size), desc=f"detect {stem}", unit="batch",
                      disable=not todo):
        idx = todo[start:start + args.batch_size]
        t0 = time.time()
        cond = encode_prompts(pipe, [prompts[i] for i in idx], device)
        vals, cost = sharpness_scores(model, cond, uncond, latents, num_inference_steps=NUM_INFERENCE_STEPS,
                                      hvp_sampling_num=args.hvp_sampling_num, guidance_scale=GUIDANCE_SCALE)
        secs = (time.time() - t0) / len(idx)
        for j, i in enumerate(idx):
            per_gen = vals[j].T.tolist()  # [steps][generations]
            if not torch.isfinite(vals[j]).all():
                warn(f"prompt {i + 1} gave a non-finite score; saved as NaN: {prompts[i][:80]!r}")
            log.add(dict(index=i, prompt=prompts[i], per_generation=per_gen, seconds=secs,
                         unet_forwards=cost["unet_forwards"], jvps=cost["jvps"], batch=len(idx)))

    records = [log.done[i] for i in range(len(prompts))]
    per_step = torch.tensor([[_mean(step) for step in r["per_generation"]] for r in records], dtype=torch.float32)
    atomic_torch_save(base + ".pt", per_step)
    write_sidecar(base + ".json", vars(args),
                  metric="||H_delta s_delta|| (mean over generations), per prompt and sampling step",
                  shape=list(per_step.shape), prompts=prompts, values=per_step.tolist(),
                  per_generation=[r["per_generation"] for r in records], model_id=model_id,
                  prediction_type=model.prediction_type, identity=identity,
                  cost=dict(seconds_per_prompt=[r["seconds"] for r in records],
                            unet_forwards_per_prompt_batch=records[0]["unet_forwards"],
                            jvps_per_prompt_batch=records[0]["jvps"], batch_size=args.batch_size))
    bad = int((~torch.isfinite(per_step)).any(dim=1).sum())
    finite = per_step[torch.isfinite(per_step)]
    print(f"saved {base}.pt {tuple(per_step.shape)}: mean {finite.mean().item() if finite.numel() else float('nan'):.4g}"
          f"{f', {bad} prompt(s) NaN' if bad else ''}")


def _mean(values):
    """Mean over generations; NaN if any generation is non-finite (never averaged away silently)."""
    return sum(values) / len(values) if all(math.isfinite(v) for v in values) else float("nan")


if __name__ == "__main__":
    main()
