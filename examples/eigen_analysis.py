"""Hessian eigen-analysis: leading eigenvalues of H(x_t, c) = grad_x s(x_t, c), memorized vs non-memorized prompts.

    python examples/eigen_analysis.py --sd_ver 1 --mem_path prompts/sd1_mem.txt --nmem_path prompts/sd1_nmem.txt \
        --max_prompts 10 --k 10 --steps 0,10,25
    python examples/eigen_analysis.py --model_id tiny --mem_path a.txt --nmem_path b.txt --k 3   # CPU smoke test

For every prompt, from the same seeded initial noise, the k largest-magnitude eigenvalues of the score Jacobian are
computed by Arnoldi iteration on forward-mode JVPs (or Lanczos on its symmetric part) at the chosen DDIM steps;
between steps x advances by a classifier-free-guided DDIM step. Large negative eigenvalues = a sharp peak of the
learned density = memorization (the paper's Figure 3). When the latent is small (n <= --dense_max, e.g. the demo or
tiny model) the full spectrum of the dense Jacobian is computed too and compared with the Ritz values.
Writes OUT_DIR/eigenvalues.json (arguments, versions, eigenvalues, summary) and OUT_DIR/eigenvalues.png; per-prompt
results are flushed to OUT_DIR/eigenvalues.progress.jsonl, so re-running the same command resumes.
"""
import hashlib
import json
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.cli import (ArgumentParser, UserError, bounded_float, bounded_int, guarded, parse_int_list,
                       positive_int, quiet_library_warnings, seed_int)
from utils.eigen import leading_error, spectrum_summary
from utils.io import ProgressLog, atomic_write_bytes, figure_png, prepare_dir, write_sidecar
from utils.models.loading import resolve_device
from utils.models.operators import BRANCHES, sampling_spectra
from utils.prompts import read_prompts
from utils.startup import add_model_arguments, load_model, model_id_of, size_identity

GROUPS = ("memorized", "non-memorized")
MAX_INFERENCE_STEPS = 1000  # DDIM cannot take more steps than the training timesteps (1000 for SD)
COLOURS = {"memorized": "tab:red", "non-memorized": "tab:blue"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p, dtype_default="float32",
                        dtype_help="float32 by default, also on CUDA (in bfloat16 the tiny model's Ritz values and "
                                   "dense spectrum disagreed by up to 18%%)")
    p.add_argument("--mem_path", default=None, help="memorized prompts (default prompts/sd<ver>_mem.txt)")
    p.add_argument("--nmem_path", default=None, help="non-memorized prompts (default prompts/sd<ver>_nmem.txt)")
    p.add_argument("--max_prompts", type=positive_int, default=None, help="first N prompts of each file")
    p.add_argument("--k", type=bounded_int(1, 10_000), default=10,
                   help="number of leading (largest-magnitude) eigenvalues")
    p.add_argument("--krylov_dim", type=bounded_int(1, 100_000), default=None,
                   help="Krylov steps = JVPs per eigen-solve (default max(4k, k+60)); more = more accurate")
    p.add_argument("--steps", default="0", help="comma-separated DDIM step indices to analyse (0 = x_T)")
    p.add_argument("--num_inference_steps", type=bounded_int(1, MAX_INFERENCE_STEPS), default=50,
                   help="DDIM sampling steps (at most the model's training timesteps, 1000 for SD)")
    p.add_argument("--guidance_scale", type=bounded_float(-1000, 1000), default=7.5,
                   help="CFG scale of the DDIM steps between steps")
    p.add_argument("--which", default="cond", choices=BRANCHES,
                   help="cond: H(x_t, c); uncond: H(x_t, empty prompt); delta: their difference H_delta")
    p.add_argument("--solver", default="arnoldi", choices=["arnoldi", "lanczos"],
                   help="arnoldi on J as it is (default), lanczos on the symmetrized (J + J^T)/2")
    p.add_argument("--dense", default="auto", choices=["auto", "on", "off"],
                   help="full spectrum from the dense Jacobian too (auto: when n <= --dense_max)")
    p.add_argument("--dense_max", type=bounded_int(1, 16384), default=1024,
                   help="largest latent size n for the dense n x n Jacobian (16384: 1 GiB in float32)")
    p.add_argument("--gen_seed", type=seed_int, default=42, help="torch seed of the (shared) initial noise")
    p.add_argument("--start_seed", type=seed_int, default=0, help="seed of the Krylov start vector")
    p.add_argument("--out_dir", default="eigen_outputs")
    p.add_argument("--threads", type=bounded_int(1, 1024), default=None,
                   help="torch CPU threads (default: torch's choice; 1 avoids slow-downs on a shared CPU)")
    return p.parse_args(argv)


def default_prompt_path(args, kind):
    ver = "demo" if args.model_id == "demo" else str(args.sd_ver)
    if args.model_id not in (None, "demo"):
        raise UserError(f"pass --{kind}_path (no default prompt file for this model)")
    return os.path.join("prompts", f"{'sd' if ver != 'demo' else ''}{ver}_{kind}.txt")


def plot(records, steps, path):
    """Figure-3-style panels: per analysed step, each prompt's leading eigenvalues (real parts, sorted ascending),
    memorized in red and non-memorized in blue; a second row with the full dense spectra when available."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    has_dense = any(s.get("dense_real") for r in records for s in r["steps"])
    rows = 2 if has_dense else 1
    fig, axes = plt.subplots(rows, len(steps), figsize=(4 * len(steps), 3.2 * rows), squeeze=False)
    for col, step in enumerate(steps):
        for row, key in enumerate(["real", "dense_real"][:rows]):
            ax = axes[row][col]
            seen = set()
            for r in records:
                s = next(s for s in r["steps"] if s["step"] == step)
                vals = sorted(s.get(key) or [])
                if vals:
                    ax.plot(range(1, len(vals) + 1), vals, "-o" if key == "real" else "-", ms=3, lw=1, alpha=0.6,
                            color=COLOURS[r["group"]], label=None if r["group"] in seen else r["group"])
                    seen.add(r["group"])
            ax.axhline(0, color="k", lw=0.5)
            t = next(s for s in records[0]["steps"] if s["step"] == step)["timestep"]
            ax.set_title(f"{'leading' if key == 'real' else 'all (dense)'} eigenvalues, step {step} (t={t})",
                         fontsize=9)
            ax.set_xlabel("rank (sorted ascending)", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("Re eigenvalue of H", fontsize=8)
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig, dpi=90))


@guarded(memory_hint="use a smaller --krylov_dim, or --dense off")
def main(argv=None):
    args = parse_args(argv)
    quiet_library_warnings()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = parse_int_list(args.steps, 0, args.num_inference_steps - 1, "--steps (DDIM step indices)")
    paths = {"memorized": args.mem_path or default_prompt_path(args, "mem"),
             "non-memorized": args.nmem_path or default_prompt_path(args, "nmem")}
    items = []  # (group, prompt)
    for group in GROUPS:
        prompts = read_prompts(paths[group], args.prompt_mirror)[:args.max_prompts]
        items += [(group, p) for p in prompts]
    device = resolve_device(args.device)
    model_id = model_id_of(args.sd_ver, args.model_id)
    prepare_dir(args.out_dir)  # an unwritable --out_dir stops now, not after loading the model
    loaded = load_model(args.sd_ver, args.model_id, device, args.dtype, args.height, args.width)
    pipe, dtype = loaded.pipe, loaded.dtype
    if args.num_inference_steps > pipe.scheduler.config.num_train_timesteps:
        raise UserError(f"--num_inference_steps {args.num_inference_steps} exceeds the model's "
                        f"{pipe.scheduler.config.num_train_timesteps} training timesteps")
    model = loaded.denoiser()
    latents = loaded.noise(1, args.gen_seed)  # identical noise for every prompt
    n = latents[0].numel()
    krylov_dim = min(n, args.krylov_dim or max(4 * args.k, args.k + 60))
    if args.k > krylov_dim:
        raise UserError(f"--k {args.k} exceeds the Krylov dimension {krylov_dim} (latent size {n})")
    dense = args.dense == "on" or (args.dense == "auto" and n <= args.dense_max)

    identity = dict(model_id=model_id, items_sha256=hashlib.sha256(json.dumps(items).encode()).hexdigest(),
                    k=args.k, krylov_dim=krylov_dim, steps=steps, num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale, which=args.which, solver=args.solver, dense=dense,
                    gen_seed=args.gen_seed, start_seed=args.start_seed, dtype=str(dtype), device=device.type,
                    **size_identity(args.height, args.width))
    log = ProgressLog(os.path.join(args.out_dir, "eigenvalues.progress.jsonl"), identity)
    print(f"model {model_id}: latent n = {n}, k = {args.k}, Krylov dimension {krylov_dim} ({args.solver} on "
          f"{'H' if args.which != 'delta' else 'H_delta'}), dense spectrum: {'yes' if dense else 'no'}")
    for index, (group, prompt) in enumerate(tqdm(items, desc="eigen-analysis", unit="prompt")):
        if index in log.done:
            continue
        out = sampling_spectra(model, loaded.encode([prompt]), latents, steps=steps, k=args.k,
                               krylov_dim=krylov_dim, num_inference_steps=args.num_inference_steps,
                               guidance_scale=args.guidance_scale, which=args.which, method=args.solver,
                               dense=dense, start_seed=args.start_seed)
        rec_steps = []
        for s in out:
            ev, res = s["eigenvalues"], s["krylov"].residuals[:args.k]
            rs = dict(step=s["step"], timestep=s["timestep"], sigma=s["sigma"], real=ev.real.tolist(),
                      imag=ev.imag.tolist(), residuals=res.tolist(), krylov_steps=int(s["krylov"].basis.shape[1]),
                      breakdown=s["krylov"].breakdown)
            if s["dense_eigenvalues"] is not None:
                full = s["dense_eigenvalues"]
                ritz = s["krylov"].eigenvalues.cpu()
                rs.update(dense_real=full.real.tolist(), dense_imag=full.imag.tolist(),
                          dense_max_abs_err=leading_error(ritz, full, args.k))
            rec_steps.append(rs)
        log.add(dict(index=index, group=group, prompt=prompt, steps=rec_steps))

    records = [log.done[i] for i in range(len(items))]
    summary = {}
    for step in steps:
        per = {}
        for group in GROUPS:
            sel = [next(s for s in r["steps"] if s["step"] == step) for r in records if r["group"] == group]
            st = spectrum_summary([torch.complex(torch.tensor(s["real"]), torch.tensor(s["imag"])) for s in sel])
            st["max_ritz_residual"] = max((max(s["residuals"], default=0.0) for s in sel), default=0.0)
            errs = [s["dense_max_abs_err"] for s in sel if "dense_max_abs_err" in s]
            if errs:
                st["dense_vs_krylov_max_abs_err"] = max(errs)
            per[group] = st
            print(f"step {step}: {group:>13} ({st['prompts']} prompts): {st['nonnegative']}/{st['eigenvalues']} "
                  f"leading eigenvalues non-negative; most negative: mean {st['most_negative_mean']:.5g} "
                  f"(std {st['most_negative_std']:.3g}); max Ritz residual {st['max_ritz_residual']:.2g}"
                  + (f"; max |Ritz - dense| over leading {args.k}: {max(errs):.3g}" if errs else ""))
        summary[str(step)] = per
    json_path = os.path.join(args.out_dir, "eigenvalues.json")
    write_sidecar(json_path, vars(args),
                  quantity=f"leading eigenvalues (largest magnitude) of the score Jacobian ({args.which}) by {args.solver}",
                  model_id=model_id, latent_dim=n, krylov_dim=krylov_dim, dense=dense,
                  prediction_type=model.prediction_type, summary=summary, results=records)
    plot(records, steps, os.path.join(args.out_dir, "eigenvalues.png"))
    print(f"saved {json_path} and eigenvalues.png")


if __name__ == "__main__":
    main()
