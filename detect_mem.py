"""Memorization detection: the field's detectors on the same prompts, noise, schedule and UNet calls, per prompt.

    python detect_mem.py --sd_ver 1 --data_path prompts/sd1_mem.txt --gen_num 4
    python detect_mem.py --sd_ver 1 --data_path prompts/sd1_mem.txt --gen_num 4 --metrics sharpness,wen,anisotropy,tiled_l2

sharpness (default) writes OUT_DIR/<stem>_gen<n>.pt (float32 [prompts, steps], the mean over the n generations;
the reference's layout) and <stem>_gen<n>.json (prompts, per-generation values, arguments, versions, cost);
every other metric m writes <stem>_<m>_gen<n>.pt and .json the same way. One pass computes all requested metrics,
sharing UNet calls (utils/detectors.py). Results are flushed per prompt and metric to *.progress.jsonl, so
re-running the same command resumes an interrupted run; tiled_l2 also saves the generated images.
"""
import argparse
import dataclasses
import os
import time

from tqdm import tqdm

from utils import distributed as D
from utils.cli import (CHECK_ONLY_HELP, ArgumentParser, UserError, bounded_int, checked_only, guarded, positive_float,
                       quiet_library_warnings, seed_list, settings_arguments)
from utils.detection import DETECTORS, Sampling
from utils.detection.loop import run_detectors
from utils.detection.records import forward_seconds, output_base, save_result
from utils.detection.setup import build_detectors, metric_list, save_batch
from utils.io import check_outputs, prepare_dir, sha256_file
from utils.models.attention import prompt_lengths
from utils.models.autodiff import JVP_DTYPES
from utils.models.denoisers import V_SCORE_FORMS
from utils.models.jvp_memory import ATTENTION_MODES
from utils.prompts import read_prompts
from utils.schemas import DetectionRecord
from utils.startup import (add_flow_argument, add_model_arguments, check_flow_first_step, detection_denoiser,
                           flow_options, load_companion, load_model, model_id_of, report_long_prompts, size_identity,
                           start_process, uncond_identity)

SAMPLING = Sampling()  # the paper's schedule: 50 DDIM steps, CFG 7.5 between the measured steps


def parse_args(argv=None):
    """The arguments, and {detector name: (field, dest) pairs of its flags} (every registered detector's flags
    are accepted; a field two detectors share, such as wen_space, is one flag)."""
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--data_path", default="prompts/sd1_mem.txt", help="prompt file, one prompt per line")
    p.add_argument("--metrics", type=metric_list, default=["sharpness"], help=f"any of {', '.join(DETECTORS)}")
    p.add_argument("--gen_num", type=bounded_int(1, 65536), default=4, help="n: generations averaged per prompt")
    p.add_argument("--gen_seed", type=seed_list, default=42,
                   help="torch seed before each prompt's initial noise; several (comma-separated): one result per "
                        "seed, each in <out_dir>/seed<s>/")
    p.add_argument("--out_dir", default="det_outputs")
    p.add_argument("--batch_size", type=bounded_int(1, 65536), default=1, help="prompts per UNet call (same results)")
    p.add_argument("--v_score", default="correct", choices=V_SCORE_FORMS,
                   help="sharpness on v-prediction models: correct -(alpha v + sigma x)/sigma, or the reference's "
                        "(alpha v - x)/sigma^2 (metric scaled by 1/sigma_t^2)")
    add_flow_argument(p)
    p.add_argument("--check_only", action="store_true", help=CHECK_ONLY_HELP)
    p.add_argument("--jvp_dtype", default="model", choices=JVP_DTYPES,
                   help="model: the JVP in the model's dtype, what the reference effectively does (its float32 "
                        "CUDA autocast is disabled by torch); float32: a float32 copy of the UNet for the JVP")
    p.add_argument("--max_memory_gb", type=positive_float, default=None,
                   help="cap on the memory the exact JVP may bring the device to (CUDA: allocator; CPU: resident "
                        "set); default: the free device memory. Over the cap the JVP runs its attention tangent in "
                        "query chunks and, if needed, fewer generations per call (equal within float tolerance)")
    p.add_argument("--jvp_attention", default="auto", choices=ATTENTION_MODES,
                   help="exact JVP's attention: auto = the math kernel when it fits the memory cap, else the fused "
                        "forward with a chunked tangent; math; chunked")
    flags, seen = {}, {}
    for name, cls in DETECTORS.items():
        own = [f.name for f in dataclasses.fields(cls.Settings)]
        added = settings_arguments(p, cls.Settings, title=f"{name} options", skip=set(seen))
        seen.update(added)
        flags[name] = [(f, seen[f]) for f in own if f in seen]
    args = p.parse_args(argv)
    limit = SAMPLING.num_inference_steps
    for cls in DETECTORS.values():
        for f in dataclasses.fields(cls.Settings):
            v = getattr(args, f.name, None)
            if f.metadata.get("steps") and v > limit:
                p.error(f"--{f.name} {v} exceeds the {limit} sampling steps")
    for m in args.metrics:
        if args.gen_num < DETECTORS[m].min_generations:
            p.error(f"{m} compares the n generations of a prompt: it needs --gen_num of at least "
                    f"{DETECTORS[m].min_generations}")
    return args, flags


@guarded(memory_hint="use fewer generations (--gen_num), a smaller --batch_size, or a lower --max_memory_gb")
def main(argv=None):
    args, flags = parse_args(argv)
    seeds = args.gen_seed if isinstance(args.gen_seed, list) else [args.gen_seed]
    if len(seeds) == 1:  # one seed: today's run, files and arguments exactly
        args.gen_seed = seeds[0]
        return run(args, flags)
    for seed in seeds:  # each seed its own result (and progress logs) in its own folder: resumable one by one
        run(argparse.Namespace(**dict(vars(args), gen_seed=seed, out_dir=os.path.join(args.out_dir, f"seed{seed}"))),
            flags)


def run(args, flags):
    """One detection run (one seed) of the parsed arguments."""
    quiet_library_warnings()
    # several processes under accelerate launch / torchrun: prompts are sharded
    shard, device = start_process(args.device, vars(args))
    model_id = model_id_of(args.sd_ver, args.model_id)
    prompts = read_prompts(args.data_path, args.prompt_mirror)
    stem = os.path.splitext(os.path.basename(args.data_path))[0]
    bases = {m: output_base(args.out_dir, stem, m, args.gen_num) for m in args.metrics}
    if not args.check_only:  # --check_only writes nothing, not even the folder
        prepare_dir(args.out_dir)  # an unusable output folder is an error now, not after the computing
    check_outputs({f"the {m} result": bases[m] + ext for m in args.metrics for ext in (".pt", ".json")},
                  {"--data_path": args.data_path})
    needs = {}  # what the detectors need of the denoiser: a JVP UNet, or finite differences in a precision
    for det in build_detectors(args.metrics, vars(args), flags, SAMPLING).values():
        needs.update(det.model_needs())
    fd = needs.get("fd_precision")
    if fd == "tf32" and device.type != "cuda":
        raise UserError("--fd_precision tf32 needs CUDA; on the CPU use float32")
    if checked_only(args.check_only):
        return
    loaded = load_model(args.sd_ver, args.model_id, device, args.dtype, args.height, args.width)
    pipe, dtype = loaded.pipe, loaded.dtype
    loaded.family.refusal(args.metrics)
    flow = flow_options(loaded, args.flow_space, args.v_score,
                        args.max_memory_gb is not None or args.jvp_attention != "auto")
    model = detection_denoiser(loaded, needs, flow, score_form=args.v_score, jvp_dtype=args.jvp_dtype,
                               max_memory_gb=args.max_memory_gb, jvp_attention=args.jvp_attention)
    check_flow_first_step(model, SAMPLING.num_inference_steps)
    dets = build_detectors(args.metrics, vars(args), flags, SAMPLING, loaded.hparam)
    for m, det in dets.items():
        try:
            det.check_model(pipe, loaded.size)
        except ValueError as e:
            raise UserError(f"{' '.join(str(e).split())[:400]} ({' / '.join('--' + d for _, d in flags[m])})") \
                from None
    companions = {}  # second models (curv_*_theta's earlier checkpoint), checked before anything is written
    for m, mid in ((m, det.companion()) for m, det in dets.items()):
        try:
            if mid and mid not in companions:
                companions[mid] = load_companion(loaded, mid).denoiser()
        except UserError as e:
            raise UserError(f"{m}: {e}") from None
    # Everything that changes a metric's numbers; a resumed run must match it exactly.
    common = dict(model_id=model_id, data_sha256=sha256_file(args.data_path), gen_num=args.gen_num,
                  gen_seed=args.gen_seed, dtype=str(dtype), device=device.type, **size_identity(args.height, args.width),
                  **flow, **uncond_identity(loaded))  # flow models only: other runs' identities are unchanged
    identities = {m: dict(common, **{o: getattr(args, o) for o in det.model_options}, **det.identity())
                  for m, det in dets.items()}
    logs = {m: D.ShardLog(bases[m] + ".progress", identities[m], shard,
                          fields=DetectionRecord) for m in args.metrics}
    todo = [i for i in range(len(prompts)) if any(i not in logs[m].done for m in args.metrics)]
    if len(todo) < len(prompts) and shard.main:
        print(f"resuming: {len(prompts) - len(todo)} of {len(prompts)} prompts already done")
    report_long_prompts(loaded.tokenizers, prompts)
    latents = loaded.noise(args.gen_num, args.gen_seed)  # same noise for every prompt

    mine = D.my_batches(todo, args.batch_size, shard)
    for idx in tqdm(mine, desc=f"detect {stem}" + (f" [{shard.rank}]" if shard.world > 1 else ""), unit="batch",
                    disable=not mine):
        metrics = [m for m in args.metrics if any(i not in logs[m].done for i in idx)]
        t0 = time.time()
        batch = [prompts[i] for i in idx]
        vals, extras, images, meter = run_detectors(model, loaded.encode(batch), latents, metrics,
                                                    {m: dets[m].settings for m in metrics}, SAMPLING,
                                                    decode=loaded.decode,
                                                    prompt_lengths=prompt_lengths(loaded.tokenizer, batch),
                                                    companions=companions)
        save_batch(idx, prompts, metrics, logs, vals, extras, images, cost=meter.summary(metrics),
                   seconds=(time.time() - t0) / len(idx), forward_seconds=forward_seconds(meter),
                   out_dir=args.out_dir, stem=stem, gen_num=args.gen_num)
    for m in args.metrics:  # merged only when every prompt is done, by the main process
        records = D.merged_records(logs[m], len(prompts), shard)
        if shard.main:
            det = dets[m]
            save_result(bases[m], records, prompts, vars(args), model_id=model_id,
                        prediction_type=model.prediction_type, identity=identities[m], batch_size=args.batch_size,
                        family=loaded.description(),
                        metric=dict(name=m, direction=det.direction, settings=det.identity(), stem=stem,
                                    gen_num=args.gen_num, description=det.description))
    D.finish(shard)


if __name__ == "__main__":
    main()
