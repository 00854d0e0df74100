"""Cost of detection and of the SAIL search, as ratios to plain UNet work (no timed assertions anywhere).

    python benchmarks/bench_cost.py                 # tiny random SD-shaped pipeline, CPU
    python benchmarks/bench_cost.py --unet sd1 --device cuda --dtype bfloat16   # full-size SD v1.4 UNet shape

--unet sd1 builds a UNet2DConditionModel from SD v1.4's published configuration with random weights (costs the
same as the real one) and skips the parts that need the VAE and text encoder. Prints a JSON line per measurement.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.demo_model import SD14_UNET, ddim_scheduler, tiny_pipeline  # noqa: E402
from utils.detection import sharpness_scores  # noqa: E402
from utils.models import jvp_unet_copy  # noqa: E402
from utils.sail import SailSettings, sail_latents  # noqa: E402
from utils.scores import ScoreModel  # noqa: E402


def timed(fn, repeats, sync):
    fn()  # warm-up (allocations, kernel selection)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--unet", default="tiny", choices=["tiny", "sd1"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--gen_num", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jvp", default="model", choices=["model", "float32"],
                   help="JVP in the model dtype (autocast on CUDA), or on a float32 UNet copy")
    p.add_argument("--sail", action="store_true", help="also time one SAIL search against plain 50-step sampling")
    args = p.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    from diffusers import UNet2DConditionModel
    sched = ddim_scheduler()
    if args.unet == "sd1":
        torch.manual_seed(0)
        unet, dim = UNet2DConditionModel(**SD14_UNET), 768
    else:
        unet = tiny_pipeline().unet
        dim = unet.config.cross_attention_dim
    unet = unet.to(dev, dtype).eval()
    n, c, s = args.gen_num, unet.config.in_channels, unet.config.sample_size
    lat = torch.randn(n, c, s, s, device=dev, dtype=dtype)
    cond = torch.randn(1, 77, dim, device=dev, dtype=dtype)
    uncond = torch.randn(1, 77, dim, device=dev, dtype=dtype)
    emb = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])
    sched.set_timesteps(50)
    t = sched.timesteps[0]

    def forward():
        with torch.no_grad():
            unet(torch.cat([lat, lat]), t, encoder_hidden_states=emb)

    model = ScoreModel(unet, sched, jvp_unet=jvp_unet_copy(unet, args.jvp))

    def detect():
        sharpness_scores(model, cond, uncond, lat, hvp_sampling_num=1)

    base = timed(forward, args.repeats, sync)
    det = timed(detect, args.repeats, sync)
    info = dict(unet=args.unet, device=str(dev), dtype=args.dtype, jvp=args.jvp, gen_num=n, unet_forward_s=round(base, 5),
                detection_s=round(det, 5), detection_over_forward=round(det / base, 2),
                note="detection = 1 UNet forward + 1 forward-mode JVP on the [uncond; cond] batch of 2n")
    print(json.dumps(info))
    if args.sail:
        def plain():  # 50 CFG steps, the denoising part of ordinary generation
            with torch.no_grad():
                for _ in range(50):
                    unet(torch.cat([lat, lat]), t, encoder_hidden_states=emb)

        gen = timed(plain, 1, sync)
        t0 = time.perf_counter()
        _, sinfo = sail_latents(model, cond, uncond, (c, s, s), SailSettings(gen_num=n, thres=1e30, max_steps=10,
                                                                             budget=8), dtype=dtype, device=dev)
        one_call = time.perf_counter() - t0
        # A search that runs all 10 steps of one round (threshold never met): the expensive case.
        t0 = time.perf_counter()
        _, sinfo2 = sail_latents(model, cond, uncond, (c, s, s), SailSettings(gen_num=n, thres=-1.0, max_steps=10,
                                                                              budget=8, max_rounds=1),
                                 dtype=dtype, device=dev)
        full_round = time.perf_counter() - t0
        print(json.dumps(dict(plain_50_step_denoising_s=round(gen, 4), sail_accept_at_once_s=round(one_call, 4),
                              sail_accept_unet_calls=sinfo["unet_calls"], sail_full_round_s=round(full_round, 4),
                              sail_full_round_unet_calls=sinfo2["unet_calls"],
                              full_round_over_plain=round(full_round / gen, 2))))


if __name__ == "__main__":
    main()
