"""Mitigation: sample each prompt with a mitigation method (SAIL, Wen, RNA/RTA, CFG delay, Ren, Han, GUARD, NeMo, none).

    python mitigate_mem.py --sd_ver 1 --data_path prompts/sd1_mem.txt --gen_num 5                  # SAIL
    python mitigate_mem.py --sd_ver 1 --data_path prompts/sd1_mem.txt --gen_num 5 --method none    # "before"
    python mitigate_mem.py --sd_ver 1 --data_path prompts/sd1_mem.txt --gen_num 5 --method wen --grid
    python mitigate_mem.py ... --method sail --flagged_by det_outputs/x_gen4.pt --flag_fpr 0.01 \
        --flag_nmem det_outputs/y_gen4.pt                                                       # detect, then mitigate

Every method samples with the same DDIM schedule, guidance and UNet calls, from the seeded initial noise of plain
sampling unless it changes the noise (SAIL). Images go to OUT_DIR/<model>/<folder>/: SAIL <prompt_type>/, none
<prompt_type>_nomiti/, others <prompt_type>_<method>/; with --grid <prompt_type>_<method>_<setting>/; gated runs
end in _gated. Each folder holds <index>_<cleaned prompt>_<k>.png, manifest.jsonl (header: the run's settings; one
record per finished prompt, flushed at once, so a re-run resumes) and run.json (arguments, versions).
"""
import dataclasses
import os

from utils import distributed as D
from utils.cli import (CHECK_ONLY_HELP, ArgumentParser, UserError, bounded_int, checked_only, finite_float, guarded,
                       positive_int, quiet_library_warnings, seed_int, settings_arguments, settings_values)
from utils.io import check_outputs, prepare_dir, safe_join, sha256_file, write_run_log, write_sidecar
from utils.mitigation import gating, methods as MI
from utils.mitigation.runner import run_folder
from utils.models.loading import model_label
from utils.prompts import read_prompts
from utils.startup import (add_model_arguments, load_model, model_id_of, report_long_prompts, size_identity,
                           start_process, uncond_identity)

NUM_INFERENCE_STEPS = 50  # DDIM steps, for every method (as the reference)
GUIDANCE_SCALE = 7.5      # classifier-free guidance of the final sampling (Jain's w_post)


def parse_args(argv=None):
    """The parsed flags, and {method: [(settings field, flag dest)]} of every registered method's flags."""
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--data_path", default="prompts/sample_mitigation.txt")
    p.add_argument("--prompt_type", default="mem", help="first part of the output folder name (e.g. mem, nmem)")
    p.add_argument("--method", default="sail", choices=list(MI.METHODS))
    p.add_argument("--no_mitigation", action="store_true", help="same as --method none")
    p.add_argument("--grid", nargs="?", const="paper", default=None, metavar="V1,V2,...",
                   help="one run per setting: the paper's five (no value) or these values of the method's main "
                        "hyperparameter (sail: thres, wen: l_target, rna/rta: count, cfg_delay: transition or "
                        "'dynamic', ren: C, han_batch: rho, han_sample: l_target, guard: r, nemo: SSIM "
                        "threshold)")
    p.add_argument("--gen_num", type=positive_int, default=4, help="images per prompt (the paper: 5)")
    p.add_argument("--gen_seed", type=seed_int, default=42, help="seed of the initial noise, SAIL's search, RNA/RTA")
    p.add_argument("--num_inference_steps", type=positive_int, default=NUM_INFERENCE_STEPS,
                   help="DDIM steps of every method (the paper: 50)")
    p.add_argument("--sampler", default=None, choices=list(MI.SAMPLERS),
                   help="the scheduler of every method, built from the model's scheduler config (default ddim)")
    p.add_argument("--guidance_scale", type=finite_float, default=None,
                   help=f"guidance scale of every method's sampling (default {GUIDANCE_SCALE:g}, the reference's); on "
                        "Flux-dev the value of its guidance embedding, refused on Flux-schnell (docs/flow.md)")
    p.add_argument("--author_settings", action="store_true",
                   help="the method's authors' own sampler and guidance scale for this model (docs/mitigation.md)")
    p.add_argument("--miti_prompt_batch", type=bounded_int(1, 256), default=1, metavar="K",
                   help="sail: prompts whose SAIL searches share each UNet call (each prompt's search as alone; "
                        "results equal within float tolerance; 1 = one prompt at a time, the reference)")
    flags, by_class = {}, {}  # each method's (field, dest) pairs; rna and rta share one dataclass, one set
    for name, m in MI.METHODS.items():
        if m.settings not in by_class:
            by_class[m.settings] = settings_arguments(p, m.settings, m.flag_prefix, m.title or None)
        flags[name] = by_class[m.settings]
    g = p.add_argument_group("gating: mitigate only the prompts a detector flags; the rest are sampled normally")
    g.add_argument("--flagged_by", default=None, metavar="DET.pt", help="detect_mem.py result on --data_path")
    g.add_argument("--flag_threshold", type=finite_float, default=None, help="flag prompts scoring above this")
    g.add_argument("--flag_fpr", type=finite_float, default=None, help="or: the threshold at this FPR on --flag_nmem")
    g.add_argument("--flag_nmem", default=None, metavar="NMEM.pt", help="detect_mem.py result on non-memorized prompts")
    p.add_argument("--save_latents", action="store_true", help="also save each prompt's initial latents (float32)")
    p.add_argument("--check_only", action="store_true", help=CHECK_ONLY_HELP)
    p.add_argument("--out_dir", default="miti_outputs")
    a = p.parse_args(argv)
    if a.no_mitigation:
        a.method = "none"
    problem = MI.flag_problem(a.method, flagged_by=a.flagged_by, flag_threshold=a.flag_threshold,
                              flag_fpr=a.flag_fpr, flag_nmem=a.flag_nmem, prompt_batch=a.miti_prompt_batch,
                              grid=a.grid, sampler=a.sampler, author_settings=a.author_settings,
                              guidance_scale=a.guidance_scale)
    if problem:
        p.error(problem)
    mine = {dest for _, dest in flags[a.method]}
    others = {d for added in flags.values() for _, d in added if d not in mine}
    unset = object()
    p.set_defaults(**dict.fromkeys(others, unset))  # parsed again: a flag given replaces this default
    again = vars(p.parse_args(argv))
    given = sorted(d for d in others if again[d] is not unset)
    if given:  # another method's hyperparameter would be silently ignored
        p.error(f"--{given[0]} is not an option of --method {a.method}")
    return a, flags[a.method]


def method_settings(a, added):
    """The chosen method's settings from its flags; a field kept off the command line (SAIL's gen_num, seed,
    num_inference_steps) is the run's own flag of that name (a ValueError names an invalid value)."""
    cls = MI.METHODS[a.method].settings
    run = dict(gen_num=a.gen_num, seed=a.gen_seed, num_inference_steps=a.num_inference_steps)
    fields = {f.name for f in dataclasses.fields(cls)} - {name for name, _ in added}
    return cls(**settings_values(cls, vars(a), added), **{k: v for k, v in run.items() if k in fields})


def gate(a, prompts, model_id):
    """(flags per prompt, scores, manifest description) of --flagged_by, or (None, None, None) without gating."""
    if not a.flagged_by:
        return None, None, None
    return gating.gate_prompts(prompts, a.flagged_by, model_id, threshold=a.flag_threshold, fpr=a.flag_fpr,
                           nmem=a.flag_nmem)


@guarded(memory_hint="use a smaller --gen_num or --miti_budget")
def main(argv=None):
    a, added = parse_args(argv)
    quiet_library_warnings()
    # several processes under accelerate launch / torchrun: prompts are sharded
    shard, device = start_process(a.device, vars(a))
    model_id = model_id_of(a.sd_ver, a.model_id)
    label = model_label(a.sd_ver, a.model_id)
    prompts = read_prompts(a.data_path, a.prompt_mirror)
    try:
        base = method_settings(a, added)
        values = None if a.grid in (None, "paper") else [v for v in a.grid.split(",") if v.strip()]
        if values == []:
            raise ValueError("--grid got no value")
        runs = [base] if a.grid is None else None if values is None else MI.grid_settings(a.method, base, values)
    except ValueError as e:
        raise UserError(f"{a.method}: {e}") from None
    flags, scores, gate_info = gate(a, prompts, model_id)  # every check before anything is loaded or written
    if checked_only(a.check_only):
        return
    loaded = load_model(a.sd_ver, a.model_id, device, a.dtype, a.height, a.width)
    loaded.family.refusal([a.method])  # e.g. Ren et al.'s cross-attention edit on a joint-attention model
    run_guidance = GUIDANCE_SCALE if a.guidance_scale is None else a.guidance_scale
    sampler, guidance, author = MI.sampling(a.method, loaded.family, a.sampler, a.author_settings, run_guidance)
    model = loaded.denoiser(sampler, a.num_inference_steps,  # Flux-dev: the guidance is an input of the model
                            **loaded.family.guidance_options(guidance, a.guidance_scale is not None))
    dtype = loaded.dtype
    try:
        if runs is None:  # the paper's grid for this model
            runs = MI.grid_settings(a.method, base, None, loaded.family)
        runs = [MI.with_family_defaults(a.method, st, loaded.family) for st in runs]  # e.g. SAIL's l_thres
        if MI.METHODS[a.method].prepare:  # e.g. NeMo's activation statistics, cached per model
            for st in runs:
                MI.METHODS[a.method].prepare(loaded, st, safe_join(a.out_dir, label, "cache", what="model name"))
    except ValueError as e:
        raise UserError(f"{a.method}: {e} (--grid V1,V2,... or its flag)") from None
    common = dict(model=label, model_id=model_id, data_sha256=sha256_file(a.data_path), gen_num=a.gen_num,
                  gen_seed=a.gen_seed, dtype=str(dtype), device=device.type, method=a.method,
                  num_inference_steps=a.num_inference_steps, guidance_scale=guidance,
                  **size_identity(a.height, a.width), **MI.sampling_identity(sampler, guidance, author),
                  **uncond_identity(loaded))
    jobs = []
    for st in runs:
        setting = MI.setting_label(a.method, st.to_dict())
        # every write stays under --out_dir: the model label and --prompt_type must be plain folder names
        folder = safe_join(a.out_dir, label, MI.folder_name(a.prompt_type, a.method, setting, a.grid is not None,
                                                            gate_info is not None,
                                                            MI.sampling_tag(sampler, guidance, GUIDANCE_SCALE)),
                          what="--prompt_type / model name")
        prepare_dir(folder, inside=a.out_dir)  # no link below --out_dir takes the writes elsewhere
        check_outputs({"the output folder": folder}, {"--data_path": a.data_path, "--flagged_by": a.flagged_by,
                                                     "--flag_nmem": a.flag_nmem})
        identity = dict(common, settings=st.to_dict(), setting=setting, **({"gate": gate_info} if gate_info else {}))
        log = D.ShardLog(os.path.join(folder, "manifest"), identity, shard, fields={"prompt": str, "images": list})
        jobs.append((st, setting, folder, identity, log))
    tok = loaded.tokenizer
    report_long_prompts(loaded.tokenizers, prompts)
    ctx = MI.Context(model=model, family=loaded.family, encode=loaded.encode,
                     noise=loaded.noise(a.gen_num, a.gen_seed), seed=a.gen_seed, tokenizer=tok,
                     num_inference_steps=a.num_inference_steps, guidance_scale=guidance,
                  **size_identity(a.height, a.width))
    for st, setting, folder, identity, log in jobs:
        if shard.main:
            write_sidecar(os.path.join(folder, "run.json"), vars(a), model_id=model_id, model=label,
                          prediction_type=model.prediction_type, identity=identity, family=loaded.description(),
                          prompts=len(prompts))  # the count `score` checks the manifest against
        run_folder(ctx, loaded.decode, prompts, a.method, st, setting, folder, log, shard, flags=flags, scores=scores,
                   gen_seed=a.gen_seed, prompt_batch=a.miti_prompt_batch, save_latents=a.save_latents)
        records = D.merged_records(log, len(prompts), shard)
        if shard.main and len(log.paths()) > 1:  # several processes' logs: one manifest, as one process writes
            write_run_log(os.path.join(folder, "manifest.jsonl"), identity, records)
        log.close()
    D.finish(shard)


if __name__ == "__main__":
    main()
