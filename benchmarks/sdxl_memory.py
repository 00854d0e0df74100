"""The JVP memory planner at SDXL's size: estimates and plans, printed as a Markdown table (no GPU, no weights).

    python benchmarks/sdxl_memory.py                      # n = 1, 4; bfloat16, float32; caps 24, 48, 80 GiB
    python benchmarks/sdxl_memory.py --gen_nums 1,2,4,8 --caps 16,24

For the exact forward-mode JVP of detect_mem.py's sharpness (one paired [uncond; cond] call: 2n UNet rows) through
SDXL base 1.0's UNet (benchmarks/sdxl_shape.py, built on the meta device: shapes only, nothing allocated) at
128 x 128 latents with a 77-token context: utils.models.jvp_memory's working-set estimate of the unchunked
(math-kernel) JVP, and the plan plan_jvp picks under each cap. A cap is the process's whole CUDA allocation
(--max_memory_gb), so the planner's budget is the cap minus what is resident when it plans: the pipeline's
weights in the row's dtype (UNet, both text encoders, VAE, as detect_mem.py keeps them on the device; counted
from the published configs). These are the planner's estimates, not measured peaks
(benchmarks/jvp_memory_check.py measures them on a GPU).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.sdxl_shape import CONTEXT_TOKENS, sdxl_unet  # noqa: E402
from utils.models.jvp_memory import estimate_bytes, plan_jvp  # noqa: E402

GIB = 2 ** 30


def pipeline_parameters(unet):
    """Parameters of SDXL base's whole pipeline: the UNet plus the text encoders (CLIP ViT-L/14's and OpenCLIP
    ViT-bigG/14's, with projection) and the VAE from their published configs, built on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        parts = [unet,
                 CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")),
                 CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            projection_dim=1280, hidden_act="gelu")),
                 AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                               sample_size=1024)]
    return sum(p.numel() for m in parts for p in m.parameters())


def describe(plan):
    """A plan as table text: row groups x rows per call, math kernel or the query chunk, and its estimate."""
    groups = len(plan.row_slices())
    rows = f"{groups} group{'s' * (groups > 1)} of {2 * plan.per_call} rows"
    attn = "math kernel" if plan.query_chunk is None else f"chunks of {plan.query_chunk:,} queries"
    fits = "" if plan.estimate <= plan.budget else ", **does not fit**"
    return f"{rows}, {attn} ({plan.estimate / GIB:.1f} GiB{fits})"


def table(side, gen_nums, dtypes, caps):
    """Markdown lines: one row per (dtype, n)."""
    unet = sdxl_unet("sdxl", side, device="meta")[0]
    params = pipeline_parameters(unet)
    hw = (side, side)
    out = ["| dtype | n (UNet rows) | resident weights | unchunked JVP, estimate | "
           + " | ".join(f"plan under {c:g} GiB" for c in caps) + " |", "|---" * (4 + len(caps)) + "|"]
    for dname in dtypes:
        dtype = getattr(torch, dname)
        resident = params * torch.finfo(dtype).bits // 8
        for n in gen_nums:
            whole = estimate_bytes(unet, n, hw, CONTEXT_TOKENS, dtype, "cuda")
            plans = [plan_jvp(unet, n, hw, CONTEXT_TOKENS, dtype, "cuda", int(c * GIB - resident)) for c in caps]
            out.append(f"| {dname} | {n} ({2 * n}) | {resident / GIB:.1f} GiB | {whole / GIB:.1f} GiB | "
                       + " | ".join(describe(p) for p in plans) + " |")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=128, help="latent side (SDXL base: 128, i.e. 1024 px)")
    p.add_argument("--gen_nums", default="1,4")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--caps", default="24,48,80", help="GiB, comma-separated")
    a = p.parse_args(argv)
    lines = table(a.size, [int(x) for x in a.gen_nums.split(",")], a.dtypes.split(","),
                  [float(x) for x in a.caps.split(",")])
    print(f"SDXL base 1.0 UNet, {a.size} x {a.size} latents, {CONTEXT_TOKENS}-token context, exact JVP on the "
          "paired call; planner estimates (utils/models/jvp_memory.py), not measured peaks\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
