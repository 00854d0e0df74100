"""The exact JVP under a memory cap: plan, measured peak against the estimate, time, agreement with the uncapped JVP.

    python benchmarks/jvp_memory_check.py --device cuda --unet sd2 --gen_num 4 --cap_gb 24 --dtypes bfloat16,float32
    python benchmarks/jvp_memory_check.py --device cuda --unet sdxl --gen_num 4 --cap_gb 24 --dtypes bfloat16,float32
    python benchmarks/jvp_memory_check.py --unet tiny --size 8 --cap_gb 0.001     # CPU smoke run
    python benchmarks/jvp_memory_check.py --device cuda --unet sd3_medium --gen_num 4 --cap_gb 24 --dtypes bfloat16

For each dtype: one H_delta s_delta (Denoiser.hvp_delta at the first DDIM step, random SD-shaped UNet, random
embeddings (SDXL: with its added conditions, benchmarks/sdxl_shape.py), seeded latents; 'sd3_medium' / 'sd3_tiny':
SD3-medium's transformer through the flow denoiser at its first step, sigma = 1, benchmarks/flow_shape.py) (a)
uncapped, as detect_mem runs it on a large GPU (JvpMemory 'auto' with the free memory: the math kernel when it
fits), (b) under --cap_gb (the plan utils.models.jvp_memory chooses), (c) forced through the chunked attention with
the largest chunk that fits the free memory. Reported per run: the plan, the estimate
(utils.models.jvp_memory.estimate_bytes) and the measured CUDA allocator peak (absolute, weights included, and the
increase during the JVP), seconds (median of --repeats), and the relative difference ||a - b|| / ||a|| to the
uncapped one.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench import SD3_KINDS, SD3_SHIFT, peak_memory  # noqa: E402
from benchmarks.flow_shape import FLOW_TRANSFORMERS, flow_transformer, sd3_inputs  # noqa: E402
from benchmarks.sdxl_shape import SDXL_UNETS, sdxl_added, sdxl_unet  # noqa: E402
from utils.demo.model import ddim_scheduler, sd_shaped_unet
from utils.models.conditioning import Conditioning
from utils.models.jvp_memory import JvpMemory, estimate_bytes
from utils.models.denoisers import denoiser


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--unet", default="sd2", choices=["sd14", "sd2", "tiny", *SDXL_UNETS, *SD3_KINDS])
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--gen_num", type=int, default=4)
    p.add_argument("--cap_gb", type=float, default=24.0, help="the cap, GiB (whole process / allocator)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip_uncapped", action="store_true", help="no uncapped reference (it may not fit)")
    p.add_argument("--out", default=None)
    p.add_argument("--md", default=None)
    return p.parse_args(argv)


def build(args, dtype, device):
    if args.unet == "tiny":
        from utils.demo.model import tiny_pipeline
        unet = tiny_pipeline(sample_size=args.size).unet.to(device, dtype).eval()
        return unet, "epsilon", unet.config.cross_attention_dim
    if args.unet in SDXL_UNETS:
        return sdxl_unet(args.unet, args.size, device, dtype, seed=0)
    return sd_shaped_unet(args.unet, args.size, device, dtype, seed=0)


def one(model, x, t, cond, v, device, repeats):
    """(result, dict of seconds (median), peak_bytes, peak_increase_bytes, reserved_peak_bytes) of
    model.hvp_delta; on the CPU the peak resident set and its increase over the call."""
    cuda = device.type == "cuda"
    times, rec, out = [], dict(peak_bytes=None, peak_increase_bytes=None, reserved_peak_bytes=None), None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        if cuda:
            out = model.hvp_delta(x, t, cond, v)
        else:  # peak resident set over the call (benchmarks/bench.py's peak_memory)
            cpu = {}
            with peak_memory(device, cpu):
                out = model.hvp_delta(x, t, cond, v)
            rec.update(peak_bytes=cpu["peak_bytes"], peak_increase_bytes=cpu["peak_increase_bytes"])
        if cuda:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            rec.update(peak_bytes=peak, peak_increase_bytes=peak - before,
                       reserved_peak_bytes=torch.cuda.max_memory_reserved(device))
        times.append(time.perf_counter() - t0)
    return out, dict(rec, seconds=statistics.median(times))


def sd3_case(args, dtype, device):
    """(transformer, make(memory) -> FlowDenoiser, x, v, cond, t, context length) for SD3's transformer: random
    weights, one random prompt (context and pooled) with n generations, seeded latents (n, 16, S, S), sigma = 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from utils.models.flow import FlowDenoiser
    unet = flow_transformer(args.unet, device, dtype)
    sched = FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT)
    g = torch.Generator().manual_seed(1)
    ctx = FLOW_TRANSFORMERS[args.unet][2]
    c, u, added = sd3_inputs(unet, 1, ctx, g, device, dtype)
    x, v = (torch.randn(args.gen_num, 16, args.size, args.size, generator=g).to(device, dtype) for _ in range(2))
    cond = Conditioning.of(c, u, args.gen_num, added)

    def make(memory):
        return FlowDenoiser(unet, sched, jvp_memory=memory)
    t = make(None).timesteps(50, device)[0]
    return unet, make, x, v, cond, t, ctx


def unet_case(args, dtype, device):
    """The same for the SD-shaped UNets (SDXL: with its added conditions) at the first DDIM step."""
    unet, pred, dim = build(args, dtype, device)
    sched = ddim_scheduler(pred)
    g = torch.Generator().manual_seed(1)
    n = args.gen_num
    c = torch.randn(1, 77, dim, generator=g)  # the prompt's embedding, then the unconditional one
    u = torch.randn(1, 77, dim, generator=g)
    x = torch.randn(n, 4, args.size, args.size, generator=g).to(device, dtype)
    v = torch.randn(n, 4, args.size, args.size, generator=g).to(device, dtype)
    # SDXL's pooled embedding and time ids (drawn after x and v: the SD shapes' inputs stay as they were)
    added = sdxl_added(unet, 1, args.size, g, device, dtype) if args.unet in SDXL_UNETS else None
    cond = Conditioning.of(c.to(device, dtype), u.to(device, dtype), n, added)
    sched.set_timesteps(50)
    return unet, (lambda memory: denoiser(unet, sched, jvp_memory=memory)), x, v, cond, sched.timesteps[0], 77


def run(args):
    device = torch.device(args.device)
    args.size = args.size or {"sd14": 64, "sd2": 96, "tiny": 8, "sdxl": 128, "sdxl_tiny": 8, "sd3_medium": 128,
                              "sd3_tiny": 8}[args.unet]
    res = dict(unet=args.unet, size=args.size, gen_num=args.gen_num, cap_gb=args.cap_gb, device=str(device),
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               torch=torch.__version__, runs=[])
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        case = sd3_case if args.unet in SD3_KINDS else unet_case
        unet, make, x, v, cond, t, ctx = case(args, dtype, device)
        n = args.gen_num
        ref = None
        cases = [("uncapped (auto)", JvpMemory()), (f"cap {args.cap_gb:g} GiB", JvpMemory(int(args.cap_gb * 2 ** 30))),
                 ("chunked (auto chunk)", JvpMemory(attention="chunked"))]
        if args.skip_uncapped:
            cases = cases[1:]
        for label, mem in cases:
            model = make(mem)
            plan = model.jvp_plan(x, cond)
            rec = dict(dtype=dname, case=label, per_call=plan.per_call, query_chunk=plan.query_chunk,
                       estimate_bytes=plan.estimate, budget_bytes=plan.budget,
                       math_estimate_bytes=estimate_bytes(unet, n, (args.size, args.size), ctx, dtype, device))
            try:
                out, measured = one(model, x, t, cond, v, device, args.repeats)
            except Exception as e:  # out of memory in particular: reported, the rest still runs
                rec.update(error=" ".join(str(e).split())[:300])
                res["runs"].append(rec)
                _write(args, res)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            out = out.float()
            if ref is None:
                ref = out
            rec.update(measured, rel_diff_to_first=float((out - ref).norm() / ref.norm()),
                       finite=bool(torch.isfinite(out).all()))
            res["runs"].append(rec)
            print(f"  {dname} {label}: {rec}", file=sys.stderr, flush=True)
            _write(args, res)
        del unet, make, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def _write(args, res):
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(args.out + ".tmp", args.out)


def markdown(res):
    gb = lambda b: "–" if b is None else f"{b / 2 ** 30:.2f}"  # noqa: E731
    shape = "transformer" if res["unet"] in SD3_KINDS else "UNet"
    out = [f"JVP memory: {res['unet']} {shape} shape {res['size']}x{res['size']}, n = {res['gen_num']} "
           f"({2 * res['gen_num']} UNet rows), {res['device_name']}, torch {res['torch']}", "",
           "| dtype | case | gens/call | query chunk | estimate GiB | math estimate GiB | peak GiB (abs.) | "
           "peak increase GiB | reserved peak GiB | seconds | rel. diff to first |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        if "error" in r:
            out.append(f"| {r['dtype']} | {r['case']} | {r['per_call']} | {r['query_chunk']} | "
                       f"{gb(r['estimate_bytes'])} | {gb(r['math_estimate_bytes'])} | failed: {r['error'][:80]} "
                       "| | | | |")
            continue
        out.append(f"| {r['dtype']} | {r['case']} | {r['per_call']} | {r['query_chunk'] or 'math'} | "
                   f"{gb(r['estimate_bytes'])} | {gb(r['math_estimate_bytes'])} | {gb(r['peak_bytes'])} | "
                   f"{gb(r['peak_increase_bytes'])} | {gb(r['reserved_peak_bytes'])} | {r['seconds']:.3f} | "
                   f"{r['rel_diff_to_first']:.2e} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # see benchmarks/bench.py --threads
    res = run(args)
    md = markdown(res)
    print(md)
    if args.md:
        with open(args.md, "a") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
