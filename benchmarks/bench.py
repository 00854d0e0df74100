"""Cost of every detector and of SAIL, side by side in one process, as ratios to one CFG forward (no timed tests).

    python benchmarks/bench.py                                   # CPU: SD v1.4's UNet, random weights, 8 x 8 latents
    python benchmarks/bench.py --device cuda --unet sd14 --dtypes bfloat16,float32      # full SD v1.4 shape (64 x 64)
    python benchmarks/bench.py --device cuda --unet sd2 --dtypes bfloat16,float32       # SD v2.0 shape (96 x 96, v)
    python benchmarks/bench.py --device cuda --unet sdxl                                # SDXL base shape (128 x 128)
    python benchmarks/bench.py --device cuda --unet sd3_medium     # SD3-medium's transformer (128 x 128, flow)
    python benchmarks/bench.py --unet sd3_tiny                     # its layout at toy widths: a CPU smoke run
    python benchmarks/bench.py --device cuda --unet flux    # Flux-dev's transformer (128 x 128 latents; flux_tiny: CPU)

The UNet has Stable Diffusion's architecture (utils.demo.model.sd_shaped_unet; SDXL base's from
benchmarks/sdxl_shape.py, 'sdxl_tiny' its layout at toy widths) with random weights, which costs what the real one
does; the prompts are random embeddings (SDXL: also random pooled embeddings and the pipeline's default time ids)
and the latents seeded noise, the same for every item. 'sd3_medium' / 'sd3_tiny' (benchmarks/flow_shape.py) run
SD3-medium's MMDiT transformer (random weights; 16-channel latents, a 333-token context of width 4096 and pooled
projections, random) through the SD3 flow denoiser (utils/models/flow.py, FlowMatchEulerDiscreteScheduler with
SD3's shift 3.0): the same items except SAIL (no SAIL alpha is published for flow models); 'generation' is 50
guided Euler steps.
Items (each the median of --repeats runs after a warm-up run; the long ones, SAIL and generation, --long_repeats
runs after a cheap warm-up of the same shapes):

  forward        one UNet call on the [uncond; cond] batch of 2n rows: the unit of every ratio
  wen            utils.detection.loop.run_detectors, detector wen at step 1 (Wen et al.): that forward and a norm
  anisotropy     the anisotropy detector (2 forwards)
  jvp            sharpness, exact: the step's forward + one forward-mode JVP (the default --hvp jvp; attention
                 by JvpMemory 'auto' with --max_memory_gb)
  jvp_chunked    the same JVP forced through the fused-forward, query-chunked attention (utils/models/jvp_memory.py)
  jvp_f32copy    (half dtypes) the JVP on a float32 copy of the UNet (detect_mem --jvp_dtype float32)
  fd             sharpness, fast: --hvp fd with the default float32 differences (a float32 copy for half dtypes)
  fd_model       --hvp fd --fd_precision model (differences in the model's dtype)
  fd_tf32        (CUDA) --hvp fd --fd_precision tf32
  sail_round     one full SAIL round for one prompt (budget candidates, max_steps Adam steps: 2 UNet calls and a
                 backward per step), threshold never met
  sail_batch     the same round for --prompt_batch prompts in each UNet call (sail_latents_batch); per prompt
  sail_search    a search of --search_rounds full rounds (threshold never met; a threshold raise and a new seed
                 after the third), one prompt: a typical search (the demo's README setting averages 3.4 rounds)
  generation     plain 50-step DDIM sampling with CFG (50 pair forwards and scheduler steps; VAE decode excluded)

Peak memory per item: on CUDA the allocator's peak (reset before the item; absolute, and the increase over what
was allocated before it); on the CPU the process's peak resident set, reset before each item through
/proc/self/clear_refs after malloc_trim, reported as the increase over the resident set before the item (glibc can
reuse memory it kept, so this can undercount). Writes --out (JSON, rewritten after every item, so a run cut short
keeps what it measured) and prints a Markdown table (also --md).
"""
import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.flow_shape import FLOW_TRANSFORMERS, flow_transformer, sd3_inputs  # noqa: E402
from benchmarks.flux_shape import FLUX_TRANSFORMERS, NATIVE_SIDE, flux_parts  # noqa: E402
from benchmarks.sdxl_shape import SDXL_UNETS, sdxl_added, sdxl_unet  # noqa: E402
from utils.demo.model import ddim_scheduler, sd_shaped_unet
from utils.detection.loop import run_detectors, settings_for
from utils.models.conditioning import Conditioning
from utils.models.jvp_memory import JvpMemory
from utils.models.autodiff import jvp_unet_copy
from utils.mitigation.sail import SailSettings, sail_latents, sail_latents_batch
from utils.models.denoisers import denoiser
from utils.models.families import SD1, SD2

ITEMS = ("forward", "wen", "anisotropy", "jvp", "jvp_chunked", "jvp_f32copy", "fd", "fd_model", "fd_tf32",
         "sail_round", "sail_batch", "sail_search", "generation")
LONG = ("sail_round", "sail_batch", "sail_search", "generation")
CPU_DEFAULT = ("forward", "wen", "anisotropy", "jvp", "jvp_chunked", "fd", "sail_round", "sail_batch", "generation")
# SAIL's alpha by prediction type: the reference's weights for SD v1.4 (epsilon) and SD v2.0 (v-prediction)
SAIL_ALPHA = {SD1.prediction_type: SD1.hparam("sail_alpha"), SD2.prediction_type: SD2.hparam("sail_alpha")}
SD3_KINDS = tuple(k for k, v in FLOW_TRANSFORMERS.items() if v[0] == "SD3Transformer2DModel")
SD3_SHIFT = 3.0  # SD3-medium's scheduler config (scheduler/scheduler_config.json: shift 3.0, no dynamic shifting)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--unet", default="sd14", choices=["sd14", "sd2", "tiny", *SDXL_UNETS, *SD3_KINDS,
                                                          *FLUX_TRANSFORMERS])
    p.add_argument("--size", type=int, default=None, help="latent side (default: 8 on the CPU, native on CUDA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default=None, help="comma-separated (default: float32 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--gen_num", type=int, default=None, help="n (default: 1 on the CPU, 4 on CUDA)")
    p.add_argument("--items", default=None, help=f"comma-separated subset of {','.join(ITEMS)} (default: all "
                                                 f"that apply; CPU: {','.join(CPU_DEFAULT)})")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per item (default: 5 on CUDA, 2 on CPU)")
    p.add_argument("--long_repeats", type=int, default=1, help="timed runs of the SAIL items and generation")
    p.add_argument("--long_dtypes", default=None, help="dtypes that run the long items (default: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default on the CPU: 1; on a shared 2-core machine idle OpenMP "
                        "workers spin and starve the other processes, and timings scatter 40x)")
    p.add_argument("--budget", type=int, default=8, help="SAIL candidates per prompt (the reference's 8)")
    p.add_argument("--max_steps", type=int, default=10, help="SAIL Adam steps per round (the reference's 10)")
    p.add_argument("--prompt_batch", type=int, default=None, help="sail_batch prompts (default: 4 CUDA, 2 CPU)")
    p.add_argument("--search_rounds", type=int, default=3)
    p.add_argument("--max_memory_gb", type=float, default=None, help="JVP memory cap (default: free memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results (rewritten after every item)")
    p.add_argument("--md", default=None, help="Markdown table (appended)")
    args = p.parse_args(argv)
    if args.unet == "sd3_medium" and args.device == "cpu":
        p.error("--unet sd3_medium is SD3-medium's real size (8 GB of float32 weights): GPU only; on the CPU use "
                "--unet sd3_tiny")
    return args


# ------------------------------------------------------------------------------------------------- memory

def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


@contextlib.contextmanager
def peak_memory(device, record):
    """Fill record with peak_bytes (absolute) and peak_increase_bytes for the block (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        record.update(peak_bytes=peak, peak_increase_bytes=peak - before)
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set (VmHWM) to the current one
        before = _status_bytes("VmRSS")
    except OSError:
        before = None
    yield
    peak = _status_bytes("VmHWM") if before is not None else None
    record.update(peak_bytes=peak, peak_increase_bytes=None if peak is None else peak - before)


def timed(fn, device, repeats, warmup):
    """Median seconds of `repeats` calls of fn() (after `warmup` untimed calls), device-synchronized."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# -------------------------------------------------------------------------------------------------- items

class Bench:
    """The benchmark's model, inputs and items for one dtype. Shapes: conds (K, 77, D), uncond (1, 77, D),
    latents (n, 4, S, S), added {name: (uncond (1, ...), cond (K, ...))} (SDXL's text_embeds and time_ids; empty
    otherwise); prompt 0 is used by every item (cond0: its Conditioning, one row), prompts 0..K-1 by sail_batch
    (cond_all: K rows)."""

    def __init__(self, args, dtype):
        self.args, self.dtype = args, dtype
        self.device = torch.device(args.device)
        if args.unet in FLUX_TRANSFORMERS:  # Flux-dev's transformer (benchmarks/flux_shape.py): inputs of its own
            self._flux(args, dtype)
            return
        g = torch.Generator().manual_seed(args.seed + 1)
        k = max(1, args.prompt_batch)
        if args.unet in SD3_KINDS:
            self._flow_inputs(g, k)
        else:
            self._unet_inputs(g, k)
        self.cond0 = self.conditioning(1)
        self.cond_all = self.conditioning(k)
        cap = None if args.max_memory_gb is None else int(args.max_memory_gb * 2 ** 30)
        self.memory = JvpMemory(cap)
        self.model = self.make(jvp_memory=self.memory)
        self.sail_alpha = SAIL_ALPHA.get(self.model.prediction_type)  # None: no SAIL items (flow models)
        self._f32 = None
        self.warmup = None

    def _unet_inputs(self, g, k):
        """The SD-shaped UNet (SDXL: with its added conditions), DDIM scheduler, random embeddings and latents."""
        args, dtype = self.args, self.dtype
        if args.unet == "tiny":  # the tests' toy UNet: a smoke run of this script in seconds
            from utils.demo.model import tiny_pipeline
            self.unet = tiny_pipeline(sample_size=args.size).unet.to(self.device, dtype).eval()
            pred, dim = "epsilon", self.unet.config.cross_attention_dim
        elif args.unet in SDXL_UNETS:
            self.unet, pred, dim = sdxl_unet(args.unet, args.size, self.device, dtype, seed=args.seed)
        else:
            self.unet, pred, dim = sd_shaped_unet(args.unet, args.size, self.device, dtype, seed=args.seed)
        self.sched = ddim_scheduler(pred)
        self.conds = torch.randn(k, 77, dim, generator=g).to(self.device, dtype)
        self.uncond = torch.randn(1, 77, dim, generator=g).to(self.device, dtype)
        self.latents = torch.randn(args.gen_num, 4, args.size, args.size, generator=g).to(self.device, dtype)
        self.added = (sdxl_added(self.unet, k, args.size, g, self.device, dtype) if args.unet in SDXL_UNETS
                      else {})

    def _flow_inputs(self, g, k):
        """SD3's transformer (benchmarks/flow_shape.py), SD3's flow-matching scheduler, random context (k, L, 4096),
        pooled projections (k, 2048) and latents (n, 16, S, S) (toy widths for sd3_tiny)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        args = self.args
        self.unet = flow_transformer(args.unet, self.device, self.dtype, seed=args.seed)
        self.sched = FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT)
        context_len = FLOW_TRANSFORMERS[args.unet][2]
        self.conds, self.uncond, self.added = sd3_inputs(self.unet, k, context_len, g, self.device, self.dtype)
        channels = self.unet.config.in_channels
        self.latents = torch.randn(args.gen_num, channels, args.size, args.size, generator=g).to(self.device,
                                                                                                 self.dtype)

    def _flux(self, args, dtype):
        """The same attributes for a Flux-shaped transformer; SAIL's alpha is SD v1.4's (no Flux value exists; the
        cost does not depend on it)."""
        g = torch.Generator().manual_seed(args.seed + 1)
        (self.unet, self.sched, self.flux_denoiser, self.conds, self.uncond, self.latents,
         self.added) = flux_parts(args.unet, args.size, args.gen_num, max(1, args.prompt_batch), g, self.device,
                                  dtype, seed=args.seed)
        self.cond0, self.cond_all = self.conditioning(1), self.conditioning(max(1, args.prompt_batch))
        self.memory = JvpMemory(None if args.max_memory_gb is None else int(args.max_memory_gb * 2 ** 30))
        self.model = self.make(jvp_memory=self.memory)
        self.sail_alpha, self._f32, self.warmup = SD1.hparam("sail_alpha"), None, None

    def make(self, **kwargs):
        """The denoiser of this benchmark's model with the Denoiser keywords `kwargs` (SD3: the flow denoiser;
        Flux: flux_parts' factory)."""
        if self.args.unet in FLUX_TRANSFORMERS:
            return self.flux_denoiser(**kwargs)
        if self.args.unet in SD3_KINDS:
            from utils.models.flow import FlowDenoiser
            from utils.models.jvp_memory import image_tokens
            return FlowDenoiser(self.unet, self.sched, image_seq_len=image_tokens(self.unet, self.latents.shape[-2:]),
                                **kwargs)
        return denoiser(self.unet, self.sched, **kwargs)

    def conditioning(self, k, n=1):
        """The Conditioning of prompts 0..k-1 with n generations each (k * n rows per branch)."""
        added = {name: (u, c[:k]) for name, (u, c) in self.added.items()}
        return Conditioning.of(self.conds[:k], self.uncond, n, added)

    def f32_copy(self):
        """A float32 copy of the UNet (None when it already is float32), made once."""
        if self._f32 is None and self.dtype != torch.float32:
            self._f32 = jvp_unet_copy(self.unet, "float32")
        return self._f32

    def detect(self, metric, model=None, **settings):
        return lambda: run_detectors(model or self.model, self.cond0, self.latents, [metric],
                                     settings_for(**settings))

    def item(self, name):
        """(callable, note) of a benchmark item, or None when it does not apply to this dtype/device."""
        cuda, half = self.device.type == "cuda", self.dtype != torch.float32
        n = self.latents.shape[0]
        if name == "forward":
            t = self.model.timesteps(50)[0]  # the scheduler's set_timesteps (and a flow pipeline's sigmas and shift)
            emb = self.conditioning(1, n)
            x2 = torch.cat([self.latents, self.latents])

            def forward():
                with torch.no_grad():
                    self.model.output(x2, t, emb)
            return forward, f"one pair forward, {2 * n} rows"
        if name == "wen":
            return self.detect("wen", wen_steps=1), "run_detectors wen, step 1"
        if name == "anisotropy":
            return self.detect("anisotropy", aniso_weights=(1.0, 2.0)), "run_detectors anisotropy (2 forwards)"
        if name == "jvp":
            return self.detect("sharpness"), "forward + exact JVP (JvpMemory auto)"
        if name == "jvp_chunked" and self.args.unet in FLUX_TRANSFORMERS:
            return None  # the run-time planner needs the unpacked latent grid, which Flux's packed tokens lack
        if name == "jvp_chunked":
            m = self.make(jvp_memory=JvpMemory(self.memory.max_bytes, "chunked"))
            return self.detect("sharpness", m), "forward + exact JVP, fused forward + chunked tangent"
        if name == "jvp_f32copy":
            if not half:
                return None
            m = self.make(jvp_unet=self.f32_copy(), jvp_memory=self.memory)
            return self.detect("sharpness", m), "forward + exact JVP on a float32 copy"
        if name in ("fd", "fd_model", "fd_tf32"):
            precision = {"fd": "float32", "fd_model": "model", "fd_tf32": "tf32"}[name]
            if (precision == "tf32" and not cuda) or (precision == "model" and not half):
                return None
            fd_unet = self.f32_copy() if precision != "model" else None
            m = self.make(fd_unet=fd_unet, fd_precision=precision)
            return self.detect("sharpness", m, hvp="fd", fd_precision=precision), f"forward + fd ({precision})"
        if name in ("sail_round", "sail_batch", "sail_search"):
            if self.sail_alpha is None:
                return None
            rounds = self.args.search_rounds if name == "sail_search" else 1
            st = SailSettings(gen_num=n, thres=-1e9, budget=self.args.budget, max_steps=self.args.max_steps,
                              max_rounds=rounds, alpha=self.sail_alpha)
            shape = tuple(self.latents.shape[1:])
            conds = self.cond_all if name == "sail_batch" else self.cond0

            def search(settings=st):
                return sail_latents_batch(self.model, conds, shape, settings, dtype=self.dtype, device=self.device)
            # the untimed warm-up: one step of the same shapes (the first backward selects its kernels)
            self.warmup = lambda: search(SailSettings(gen_num=n, thres=-1e9, budget=self.args.budget, max_steps=1,
                                                      max_rounds=1, alpha=self.sail_alpha))
            if name == "sail_batch":
                return search, f"{len(conds)} prompts per call (sail_latents_batch); seconds per prompt"
            return (lambda: sail_latents(self.model, conds, shape, st, dtype=self.dtype,
                                         device=self.device)), f"{rounds} round(s), 1 prompt (sail_latents)"
        if name == "generation":
            self.warmup = self.item("forward")[0]
            emb = self.conditioning(1, n)

            def generate():
                x = self.latents
                with torch.no_grad():
                    for t in self.model.timesteps(50, device=self.device):
                        xin = self.model.scale_input(x, t)
                        x = self.model.guided_step(self.model.output(torch.cat([xin, xin]), t, emb), t, x, 7.5)
            sampler = "Euler (flow)" if self.args.unet in SD3_KINDS else "DDIM"
            return generate, f"50 CFG {sampler} steps, no VAE decode"
        raise ValueError(name)


def run(args):
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.size = args.size or (8 if not cuda else {"sd14": 64, "sd2": 96, "tiny": 8, "sdxl": 128, "sdxl_tiny": 8,
                                                     "sd3_medium": 128, "sd3_tiny": 8, **NATIVE_SIDE}[
        args.unet])
    args.gen_num = args.gen_num or (4 if cuda else 1)
    args.repeats = args.repeats or (5 if cuda else 2)
    args.prompt_batch = args.prompt_batch or (4 if cuda else 2)
    dtypes = (args.dtypes or ("bfloat16" if cuda else "float32")).split(",")
    items = args.items.split(",") if args.items else list(ITEMS if cuda else CPU_DEFAULT)
    if not cuda or args.threads:
        torch.set_num_threads(args.threads or 1)
    res = dict(unet=args.unet, size=args.size, gen_num=args.gen_num, device=str(device),
               device_name=torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
               cpu_threads=torch.get_num_threads(), torch=torch.__version__, repeats=args.repeats,
               long_repeats=args.long_repeats,
               sail=dict(budget=args.budget, max_steps=args.max_steps, prompt_batch=args.prompt_batch,
                         search_rounds=args.search_rounds),
               memory_note=("CUDA allocator peak" if cuda else
                            "peak RSS increase over the item (VmHWM reset per item)"),
               runs={})
    for dname in dtypes:
        dtype = getattr(torch, dname)
        t0 = time.time()
        bench = Bench(args, dtype)
        run_res = res["runs"][dname] = dict(build_seconds=time.time() - t0, items={})
        for name in items:
            if name in LONG and args.long_dtypes and dname not in args.long_dtypes.split(","):
                continue
            made = bench.item(name)
            if made is None:
                continue
            fn, note = made
            rec = dict(note=note)
            long = name in LONG
            try:
                if long:  # long items: a cheap warm-up of the same shapes, then --long_repeats timed runs
                    bench.warmup()
                with peak_memory(device, rec):
                    secs, all_times = timed(fn, device, args.long_repeats if long else args.repeats, 0 if long else 1)
            except Exception as e:  # an item that fails (e.g. out of memory) is reported, the rest still run
                rec.update(error=" ".join(str(e).split())[:300])
                run_res["items"][name] = rec
                _write(args, res)
                continue
            if name == "sail_batch":
                secs, all_times = secs / args.prompt_batch, [x / args.prompt_batch for x in all_times]
            rec.update(seconds=secs, times=all_times)
            run_res["items"][name] = rec
            print(f"  {args.unet} {dname} {name}: {secs:.4g} s", file=sys.stderr, flush=True)
            _write(args, res)
        _ratios(run_res)
        _write(args, res)
        del bench
        if cuda:
            torch.cuda.empty_cache()
    return res


def _ratios(run_res):
    """Ratios to the forward (every item), SAIL per prompt to generation, and the issue's targets."""
    items = run_res["items"]
    fwd = items.get("forward", {}).get("seconds")
    for rec in items.values():
        if fwd and "seconds" in rec:
            rec["over_forward"] = rec["seconds"] / fwd
    gen = items.get("generation", {}).get("seconds")
    for name in ("sail_round", "sail_batch", "sail_search"):
        if gen and "seconds" in items.get(name, {}):
            items[name]["over_generation"] = items[name]["seconds"] / gen
    wen = items.get("wen", {}).get("seconds")
    if wen:
        run_res["over_wen"] = {k: v["seconds"] / wen for k, v in items.items() if "seconds" in v}


def _write(args, res):
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, args.out)


def markdown(res):
    """The results as one Markdown table per dtype."""
    shape = "transformer" if res["unet"] in (*SD3_KINDS, *FLUX_TRANSFORMERS) else "UNet"
    out = [f"{res['unet']} {shape} shape, random weights, {res['size']}x{res['size']} latents, n = {res['gen_num']}, "
           f"{res['device_name']} ({res['device']}, torch {res['torch']}, {res['cpu_threads']} CPU thread(s)), "
           f"median of "
           f"{res['repeats']} (SAIL and generation: {res['long_repeats']}); memory: {res['memory_note']}", ""]
    for dname, run_res in res["runs"].items():
        out += [f"{dname}:", "", "| item | seconds | / forward | / wen | / generation | peak memory (GiB) | note |",
                "|---|---|---|---|---|---|---|"]
        for name, rec in run_res["items"].items():
            if "error" in rec:
                out.append(f"| {name} | failed | | | | | {rec['error'][:120]} |")
                continue
            gb = rec.get("peak_bytes") if res["device"].startswith("cuda") else rec.get("peak_increase_bytes")

            def f(v, fmt):
                return "–" if v is None else format(v, fmt)
            out.append(f"| {name} | {rec['seconds']:.4g} | {f(rec.get('over_forward'), '.2f')} | "
                       f"{f(run_res.get('over_wen', {}).get(name), '.2f')} | {f(rec.get('over_generation'), '.2f')} | "
                       f"{f(None if gb is None else gb / 2 ** 30, '.2f')} | {rec['note']} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    res = run(args)
    md = markdown(res)
    print(md)
    if args.md:
        with open(args.md, "a") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
