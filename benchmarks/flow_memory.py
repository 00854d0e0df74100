"""The JVP memory planner at SD3-medium's and Flux-dev's sizes: estimates and plans as a Markdown table (no GPU, no
weights), and the CPU measurement of the transformer constants it uses.

    python benchmarks/flow_memory.py                   # 1024 x 1024 px; n = 1, 4; bfloat16, float32; 24, 80, 141 GiB
    python benchmarks/flow_memory.py --measure_cpu     # ACT_TOKENS / WEIGHT_COPIES_TOKENS on toy transformers

Table: for the exact forward-mode JVP of detect_mem.py's sharpness (one paired [uncond; cond] call: 2n transformer
rows) through the transformers of benchmarks/flow_shape.py (built on the meta device: shapes only) at 128 x 128 VAE
latents (4096 image tokens) with the pipelines' text lengths: utils.models.jvp_memory's estimate of the unchunked
(math-kernel) JVP and of the chunked one (1024-query chunks), and the plan plan_jvp picks under each cap. A cap is
the process's whole CUDA allocation, so the budget is the cap minus the resident weights of the whole pipeline in
the row's dtype (transformer, text encoders with T5-XXL, VAE: flow_shape.text_encoders). ESTIMATES, not measured
peaks.

--measure_cpu: peak resident set above the resting one (benchmarks/bench.py's peak_memory) of one float32 JVP with
the chunked attention (chunk 64, so the maps are small and their estimate is subtracted) on toy SD3- and Flux-shaped
transformers (width 512) at two image sizes, each in its own process with glibc's mmap threshold at 64 KiB (the
resident set then follows the live tensors); the slope over the token count gives the activation entries per row and
token x width. Then a check at a third size with 2 generations: measured peaks (math kernel, 128-query chunks)
against estimate_bytes. About 5 minutes on one core.
"""
import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.flow_shape import FLOW_TRANSFORMERS, flow_transformer, parameter_count, text_encoders  # noqa: E402
from benchmarks.sdxl_memory import GIB, describe  # noqa: E402
from utils.models.jvp_memory import CHUNK_MAPS, estimate_bytes, image_tokens, plan_jvp  # noqa: E402

CHUNK = 1024  # the table's fixed-chunk column
TITLES = {"sd3_medium": "SD3-medium (MMDiT, 2.03 B)", "flux_dev": "Flux-dev (11.9 B)"}


def table(kinds, side, gen_nums, dtypes, caps):
    """Markdown lines: one row per (model, dtype, n)."""
    out = ["| model | dtype | n (rows) | tokens (image + text) | resident weights | math-kernel JVP | chunked JVP "
           f"({CHUNK:,}-query chunks) | " + " | ".join(f"plan under {c:g} GiB" for c in caps) + " |",
           "|---" * (7 + len(caps)) + "|"]
    for kind in kinds:
        model = flow_transformer(kind, "meta")
        ctx = FLOW_TRANSFORMERS[kind][2]
        hw = (side, side)
        params = parameter_count(model) + sum(parameter_count(m) for m in text_encoders(kind))
        for dname in dtypes:
            dtype = getattr(torch, dname)
            resident = params * torch.finfo(dtype).bits // 8
            for n in gen_nums:
                whole = estimate_bytes(model, n, hw, ctx, dtype, "cuda")
                chunked = estimate_bytes(model, n, hw, ctx, dtype, "cuda", CHUNK)
                plans = [plan_jvp(model, n, hw, ctx, dtype, "cuda", int(c * GIB - resident)) for c in caps]
                out.append(f"| {TITLES.get(kind, kind)} | {dname} | {n} ({2 * n}) | "
                           f"{image_tokens(model, hw)} + {ctx} | {resident / GIB:.1f} GiB | {whole / GIB:.1f} GiB | "
                           f"{chunked / GIB:.1f} GiB | "
                           + " | ".join(describe(p) if p.budget > 0 else "weights alone exceed the cap"
                                        for p in plans) + " |")
    return out


def _toy(kind, side, width=512):
    """A toy SD3- (4 blocks) or Flux-shaped (2 double- + 4 single-stream blocks) transformer of `width` for
    side x side VAE latents, float32, seeded."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    torch.manual_seed(0)
    if kind == "sd3":
        return SD3Transformer2DModel(sample_size=side, patch_size=2, in_channels=16, num_layers=4,
                                     attention_head_dim=64, num_attention_heads=width // 64, joint_attention_dim=256,
                                     caption_projection_dim=width, pooled_projection_dim=64, out_channels=16,
                                     pos_embed_max_size=side).eval()
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                  attention_head_dim=128, num_attention_heads=width // 128, joint_attention_dim=256,
                                  pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).eval()


def _jvp_peak(kind, model, side, rows, ctx, chunk):
    """Peak resident-set increase (bytes) of one JVP of `model` on `rows` random rows; chunk None: math kernel."""
    from benchmarks.bench import peak_memory
    from utils.models.autodiff import forward_ad
    from utils.models.jvp_memory import chunked_attention
    g = torch.Generator().manual_seed(0)
    kw = dict(encoder_hidden_states=torch.randn(rows, ctx, 256, generator=g),
              pooled_projections=torch.randn(rows, 64, generator=g))
    if kind == "sd3":
        x = torch.randn(rows, 16, side, side, generator=g)
        kw.update(timestep=torch.full((rows,), 500.))
    else:
        x = torch.randn(rows, image_tokens(model, (side, side)), 64, generator=g)
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side // 2.), torch.arange(side // 2.),
                                         indexing="ij"), -1).reshape(-1, 3)
        kw.update(timestep=torch.full((rows,), .5), img_ids=ids, txt_ids=torch.zeros(ctx, 3),
                  guidance=torch.full((rows,), 3.5))

    def f(z):
        return model(hidden_states=z, return_dict=False, **kw)[0]
    rec, chunked = {}, chunked_attention(model, chunk) if chunk else contextlib.nullcontext()
    with torch.no_grad(), forward_ad(x), chunked, peak_memory(torch.device("cpu"), rec):
        torch.func.jvp(f, (x,), (torch.randn_like(x),))
    return rec["peak_increase_bytes"]


def _peak_in_fresh_process(kind, side, rows, ctx, chunk):
    """_jvp_peak of the toy `kind` in a new Python process whose glibc serves every allocation of 64 KiB or more by
    mmap and returns it on free (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so the resident set follows the
    live tensors instead of undercounting memory the allocator kept from earlier calls."""
    import subprocess
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure_point",
                          f"{kind},{side},{rows},{ctx},{chunk or 0}"], capture_output=True, text=True, check=True,
                         env=env)
    return int(out.stdout.split()[-1])


def measure_cpu():
    """Print the measured peak increase of toy transformers' chunked JVPs at two sizes, the fitted constants, and
    a check at a third size with 2 generations: measured peaks against the planner's estimates. Each measurement
    runs in its own process."""
    chunk, ctx, rows, width = 64, 77, 2, 512
    for kind in ("sd3", "flux"):
        points = []
        for side in (32, 64):
            model = _toy(kind, side, width)
            tokens = image_tokens(model, (side, side))
            peak = _peak_in_fresh_process(kind, side, rows, ctx, chunk)
            maps = CHUNK_MAPS * rows * model.config.num_attention_heads * chunk * (tokens + ctx) * 4
            points.append((rows * (tokens + ctx) * width * 4, peak - maps))
            largest = max(p.numel() for p in model.parameters()) * 4
            print(f"{kind} side {side}: {tokens} + {ctx} tokens, peak increase {peak / 2**20:.1f} MiB (chunk maps "
                  f"at CHUNK_MAPS {maps / 2**20:.1f} MiB), largest weight {largest / 2**20:.1f} MiB")
        (u0, m0), (u1, m1) = points
        act = (m1 - m0) / (u1 - u0)
        print(f"{kind}: {act:.1f} activation entries per row and token x width; intercept "
              f"{(m0 - act * u0) / largest:.2f} largest-weight copies")
        model = _toy(kind, 48, width)
        for c in (None, 128):  # the check: 2 generations (4 rows) at 48 x 48, math kernel and 128-query chunks
            est = estimate_bytes(model, 2, (48, 48), ctx, torch.float32, "cpu", c)
            peak = _peak_in_fresh_process(kind, 48, 4, ctx, c)
            print(f"{kind} check, side 48, 4 rows, {'math kernel' if c is None else f'chunks of {c}'}: measured "
                  f"{peak / 2**20:.1f} MiB, estimate {est / 2**20:.1f} MiB")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="sd3_medium,flux_dev")
    p.add_argument("--size", type=int, default=128, help="VAE latent side (128: 1024 px)")
    p.add_argument("--gen_nums", default="1,4")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--caps", default="24,80,141", help="GiB, comma-separated")
    p.add_argument("--measure_cpu", action="store_true")
    p.add_argument("--measure_point", default=None, help=argparse.SUPPRESS)  # kind,side,rows,ctx,chunk (internal)
    a = p.parse_args(argv)
    if a.measure_point:
        torch.set_num_threads(1)
        kind, *nums = a.measure_point.split(",")
        side, rows, ctx, chunk = (int(v) for v in nums)
        return print(_jvp_peak(kind, _toy(kind, side), side, rows, ctx, chunk or None))
    if a.measure_cpu:
        return measure_cpu()
    lines = table(a.models.split(","), a.size, [int(x) for x in a.gen_nums.split(",")], a.dtypes.split(","),
                  [float(x) for x in a.caps.split(",")])
    print(f"{a.size} x {a.size} VAE latents ({a.size * 8} px), exact JVP on the paired call; planner ESTIMATES "
          "(utils/models/jvp_memory.py), not measured peaks\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
