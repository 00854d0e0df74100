"""Finite-difference H_delta s_delta against the exact float32 JVP: error against the step size, per precision.

    python benchmarks/fd_study.py --model demo --steps 0,25                     # the demo's 64 prompts, CPU
    python benchmarks/fd_study.py --model sd14 --size 16 --prompts 16 --gen_num 2 --steps 0,25   # random SD v1.4 UNet
    python benchmarks/fd_study.py --model sd14 --size 64 --device cuda ...     # full size (benchmarks/gpu_check.sh)

For every measured sampling step it computes, on the same latents and embeddings, the exact metric
||H_delta s_delta|| (one forward-mode JVP through a float32 UNet) and the finite-difference estimates of
utils.models.denoisers.Denoiser.hvp_delta_fd for each precision (float32, bfloat16, tf32 on CUDA), scheme (forward,
central) and step h (the displacement's norm along u = s_delta/||s_delta||; `--h_unit rms` reads the listed steps
as per-entry RMS, h = step * sqrt(C*H*W)). Reported per setting: Spearman's rho of the per-generation metric and of
the per-prompt mean against the exact one, the AUC of the per-prompt mean (demo: memorized vs non-memorized;
the exact metric's AUC beside it), and the relative error of the metric (median, max over generations).

--model demo: the bundled model, prompts/demo_mem.txt + prompts/demo_nmem.txt, the seeded pipeline noise, the real
classifier-free-guided DDIM trajectory to each step. --model sd14 / sd2: SD v1.4's (SD v2.0's) UNet architecture
with random weights (seeded) at --size x --size latents, random embeddings (seeded, N(0, 1)), and x_t = alpha_t x0
+ sigma_t eps with x0 and eps seeded N(0, I) (a random UNet's own trajectory means nothing). Writes --out (JSON)
and prints a Markdown table. No timings here: see benchmarks/bench.py.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.models.jvp_memory import JvpMemory
from utils.metrics import detection_metrics
from utils.models.conditioning import Conditioning
from utils.models.denoisers import FD_SCHEMES, denoiser, flat_norm

PRECISIONS = ("float32", "bfloat16", "tf32")


def float_list(text):
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", choices=["demo", "sd14", "sd2"])
    p.add_argument("--size", type=int, default=16, help="sd14/sd2: latent side")
    p.add_argument("--prompts", type=int, default=16, help="sd14/sd2: random embeddings (demo: its 64 prompts)")
    p.add_argument("--gen_num", type=int, default=1)
    p.add_argument("--steps", default="0", help="sampling-step indices of the 50-step DDIM schedule")
    p.add_argument("--precisions", default="float32,bfloat16")
    p.add_argument("--schemes", default="forward")
    p.add_argument("--hs", type=float_list, default=float_list("1e-4,1e-3,1e-2,1e-1,1"))
    p.add_argument("--bf16_hs", type=float_list, default=None, help="steps for bfloat16 (default: --hs)")
    p.add_argument("--h_unit", default="norm", choices=["norm", "rms"])
    p.add_argument("--batch", type=int, default=8, help="generations per UNet call")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default on the CPU: 1)")
    p.add_argument("--out", default=None, help="JSON: a list of runs; an existing file's runs are kept")
    p.add_argument("--md", default=None, help="Markdown table (appended)")
    return p.parse_args(argv)


def build(args, device):
    """(float32 UNet, scheduler, cond (K, L, D), uncond (1, L, D), labels (K,) or None, latents (n, C, H, W))."""
    from utils.demo.model import ddim_scheduler
    if args.model == "demo":
        import utils.demo  # noqa: F401  (registers the demo model's family)
        from utils.models.families import load
        from utils.models.loading import DEMO_MODEL_DIR
        from utils.prompts import read_prompts
        family, pipe = load(DEMO_MODEL_DIR, device, torch.float32)
        root = os.path.dirname(DEMO_MODEL_DIR)
        mem = read_prompts(os.path.join(root, "prompts", "demo_mem.txt"))
        nmem = read_prompts(os.path.join(root, "prompts", "demo_nmem.txt"))
        cond = family.embed(pipe, mem + nmem, device)
        labels = torch.tensor([1] * len(mem) + [0] * len(nmem))
        return (pipe.unet, pipe.scheduler, cond, family.embed(pipe, "", device), labels,
                family.initial_latents(pipe, args.gen_num, 42))
    from utils.demo.model import sd_shaped_unet
    unet, pred, dim = sd_shaped_unet(args.model, args.size, device, torch.float32, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    cond = torch.randn(args.prompts, 77, dim, generator=g).to(device)
    uncond = torch.randn(1, 77, dim, generator=g).to(device)
    lat = torch.randn(args.gen_num, 4, args.size, args.size, generator=g).to(device)
    return unet, ddim_scheduler(pred), cond, uncond, None, lat


def auc(labels, scores):
    """ROC AUC of per-prompt scores (K,) with labels (K,) 1 = memorized."""
    return detection_metrics(scores[labels == 1].tolist(), scores[labels == 0].tolist())["auc"]


def spearman(a, b):
    """Spearman's rho of two 1-D sequences (average ranks for ties)."""
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).correlation)


def run(args):
    device = torch.device(args.device)
    unet, sched, cond, uncond, labels, lat = build(args, device)
    steps = [int(s) for s in args.steps.split(",")]
    precisions = args.precisions.split(",")
    schemes = args.schemes.split(",")
    for s in schemes:
        assert s in FD_SCHEMES, s
    copies = {"float32": None}
    if "bfloat16" in precisions:
        import copy
        copies["bfloat16"] = copy.deepcopy(unet).to(torch.bfloat16)
    if "tf32" in precisions:
        copies["tf32"] = unet  # float32 weights, TF32 math
    base = denoiser(unet, sched, jvp_memory=JvpMemory())  # the exact JVP within the free memory
    models = {p: denoiser(unet, sched, fd_unet=copies.get(p), fd_precision="tf32" if p == "tf32" else "model")
              for p in precisions}
    timesteps = base.timesteps(50, device=device)
    k, n = cond.shape[0], lat.shape[0]
    d = lat[0].numel()
    hs = {p: (args.bf16_hs if p == "bfloat16" and args.bf16_hs else args.hs) for p in precisions}
    exact = {i: [] for i in steps}
    fd = {(i, p, s, h): [] for i in steps for p in precisions for s in schemes for h in hs[p]}
    if "bfloat16" in precisions:  # context: the exact JVP itself in bfloat16 (the reference's default on CUDA)
        bf16 = denoiser(copies["bfloat16"], sched, jvp_memory=JvpMemory())
        hs["bfloat16 jvp"] = [0.0]
        fd.update({(i, "bfloat16 jvp", "jvp", 0.0): [] for i in steps})
    rows = [(j, g) for j in range(k) for g in range(n)]
    conds = Conditioning.of(cond, uncond)  # one row per prompt
    t0 = time.time()
    for start in range(0, len(rows), args.batch):
        chunk = rows[start:start + args.batch]
        emb = conds.rows(torch.tensor([j for j, _ in chunk]))
        x = lat[torch.tensor([g for _, g in chunk])]
        x0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(args.seed + 2)).to(device)
        for i, t in enumerate(timesteps[:max(steps) + 1]):
            if args.model != "demo":  # random UNet: x_t from the forward process, not its own trajectory
                a, s = base.alpha_sigma(t)
                x = a * x0 + s * lat[torch.tensor([g for _, g in chunk])]
            xin = base.scale_input(x, t)
            xx = torch.cat([xin, xin])
            with torch.no_grad():
                out = base.output(xx, t, emb)
            if i in steps:
                s_delta = base.score_delta(out, xx, t)
                exact[i].append(flat_norm(base.hvp_delta(xin, t, emb, s_delta)).cpu())
                for p in precisions:
                    for sch in schemes:
                        for h in hs[p]:
                            hh = h * math.sqrt(d) if args.h_unit == "rms" else h
                            v = models[p].hvp_delta_fd(xin, t, emb, hh, s_delta=s_delta if p == "float32" else None,
                                                       scheme=sch)
                            fd[(i, p, sch, h)].append(flat_norm(v).cpu())
                if "bfloat16" in precisions:
                    xb, eb = xin.to(torch.bfloat16), emb.to(torch.bfloat16)
                    with torch.no_grad():
                        sb = bf16.score_delta(bf16.output(torch.cat([xb, xb]), t, eb), torch.cat([xb, xb]), t)
                    fd[(i, "bfloat16 jvp", "jvp", 0.0)].append(flat_norm(bf16.hvp_delta(xb, t, eb, sb)).cpu())
            if args.model == "demo" and i < max(steps):
                with torch.no_grad():
                    x = base.guided_step(out, t, x, 7.5)
        print(f"  {start + len(chunk)}/{len(rows)} generations, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return summarize(args, steps, precisions, schemes, hs, exact, fd, labels, k, n, timesteps, d)


def summarize(args, steps, precisions, schemes, hs, exact, fd, labels, k, n, timesteps, d):
    res = dict(model=args.model, size=args.size if args.model != "demo" else 8, latent_entries=d, prompts=k,
               gen_num=n, h_unit=args.h_unit, device=args.device, torch=torch.__version__, rows=[])
    for i in steps:
        ex = torch.cat(exact[i]).double()
        ex_prompt = ex.view(k, n).mean(1)
        auc_ex = auc(labels, ex_prompt) if labels is not None else None
        settings = [(p, sch, h) for p in precisions for sch in schemes for h in hs[p]]
        if "bfloat16" in precisions:
            settings.append(("bfloat16 jvp", "jvp", 0.0))
        for p, sch, h in settings:
            v = torch.cat(fd[(i, p, sch, h)]).double()
            rel = ((v - ex).abs() / ex).numpy()
            vp = v.view(k, n).mean(1)
            row = dict(step=i, t=int(timesteps[i]), precision=p, scheme=sch, h=h,
                       rms_step=(h if args.h_unit == "rms" else h / math.sqrt(d)),
                       spearman_gen=spearman(v.tolist(), ex.tolist()),
                       spearman_prompt=spearman(vp.tolist(), ex_prompt.tolist()),
                       rel_err_median=float(sorted(rel)[len(rel) // 2]), rel_err_max=float(rel.max()),
                       finite=bool(torch.isfinite(v).all()))
            if labels is not None:
                row.update(auc=auc(labels, vp), auc_exact=auc_ex)
            res["rows"].append(row)
    return res


def markdown(res):
    lines = [f"fd vs exact float32 JVP: {res['model']} ({res['latent_entries']} latent entries), {res['prompts']} "
             f"prompts x n={res['gen_num']}, {res['device']}", "",
             "| step (t) | precision | scheme | h (norm) | per-entry RMS | Spearman (gen) | Spearman (prompt) | "
             "rel. err median | rel. err max | AUC (exact) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        h_norm = r["rms_step"] * math.sqrt(res["latent_entries"])
        auc = f"{r['auc']:.4f} ({r['auc_exact']:.4f})" if "auc" in r else "-"
        lines.append(f"| {r['step']} ({r['t']}) | {r['precision']} | {r['scheme']} | {h_norm:.3g} | "
                     f"{r['rms_step']:.3g} | {r['spearman_gen']:.5f} | {r['spearman_prompt']:.5f} | "
                     f"{r['rel_err_median']:.2e} | {r['rel_err_max']:.2e} | {auc} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    res = run(args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        runs = json.load(open(args.out)) if os.path.exists(args.out) else []
        with open(args.out + ".tmp", "w") as f:
            json.dump((runs if isinstance(runs, list) else [runs]) + [res], f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    md = markdown(res)
    print(md)
    if args.md:
        with open(args.md, "a") as f:
            f.write(md + "\n\n")


if __name__ == "__main__":
    main()
