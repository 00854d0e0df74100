"""Train the bundled demo model: a tiny Stable-Diffusion-shaped latent text-to-image model on handwritten digits.

It memorizes on purpose: a few dozen LAION-like captions are each paired with one training image duplicated
--dup times (the paper's recipe) and also caption --shared other images once, while every digit image also has
templated captions that name it and (--generic) one unique web-like caption. Caption
dropout only ever touches the ordinary pairs, so the unconditional branch sees the data as Stable Diffusion's
does (duplicates a negligible share). Stages: AutoencoderKL (32x32 RGB -> 4x8x8 latents), then UNet and CLIP text
encoder jointly on the latents, stopped at --stop_frac of the lr schedule. Everything is seeded; the output
folder loads with StableDiffusionPipeline.from_pretrained(out_dir).

    python3 train_demo.py --overwrite_committed --prompts_dir prompts   # rebuild the committed demo_model/ and
                                                                         # prompts/demo_* (~30 min, 1 core)
    python3 train_demo.py --smoke --out_dir /tmp/demo   # a few steps, seconds: checks the whole path

The committed demo_model/ and prompts/ are written only with --overwrite_committed. The model folder is written
beside --out_dir and swapped in only when complete (utils.io.staged_dir): a crash or kill during the save leaves
the previous model whole, never a new autoencoder beside an old UNet.
"""
import argparse
import os

import torch

from utils.cli import (ArgumentParser, UserError, bounded_float, bounded_int, guarded, nonneg_int, positive_float,
    positive_int, quiet_library_warnings, seed_int)
from utils.demo.train import MODEL_MARKER, train_demo
from utils.io import check_outputs, check_replaceable
from utils.models.loading import DEMO_MODEL_DIR, REPO_ROOT

COMMITTED_PROMPTS = os.path.join(REPO_ROOT, "prompts")
MAX_STEPS = 10_000_000
LR = bounded_float(0, 10, low_open=True)  # larger learning rates only diverge

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default=None,
                   help="model folder to write (required unless --overwrite_committed); an existing one must hold a "
                        "saved pipeline and is replaced only when the new one is complete")
    p.add_argument("--overwrite_committed", action="store_true",
                   help="allow writing the committed demo_model/ (the default --out_dir then) and prompts/")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--steps", type=bounded_int(1, MAX_STEPS), default=2500,
                   help="UNet + text encoder steps of the lr schedule")
    p.add_argument("--stop_frac", type=bounded_float(0, 1, low_open=True), default=0.6,
                   help="stop after this fraction of the --steps schedule, in (0, 1]. The committed model stops at "
                        "1,500 of 2,500 steps: memorization strong but not total (86%% of fresh noises copy; at "
                        "2,500 nearly all do) and a rebuild within 30 min (README, 'The demo model')")
    p.add_argument("--vae_steps", type=bounded_int(1, MAX_STEPS), default=1500)
    p.add_argument("--batch_size", type=bounded_int(1, 65536), default=128)
    p.add_argument("--vae_batch_size", type=bounded_int(1, 65536), default=32)
    p.add_argument("--lr", type=LR, default=2e-3)
    p.add_argument("--vae_lr", type=LR, default=2e-3)
    p.add_argument("--kl_weight", type=positive_float, default=1e-8,
                   help="KL weight against the per-pixel mean MSE (1e-4 gave grey blobs: colour and shape lost)")
    p.add_argument("--dup", type=bounded_int(1, 100_000), default=300,
                   help="copies of each memorized (caption, image) pair")
    p.add_argument("--shared", type=nonneg_int, default=30,
                   help="each memorized caption also captions this many other training images once (shared pairs): "
                        "memorization strong but not total")
    p.add_argument("--generic", action=argparse.BooleanOptionalAction, default=True,
                   help="also give every image one unique web-like caption (ordinary pairs): unseen web-like "
                        "prompts then lead to ordinary digits instead of the memorized images")
    p.add_argument("--p_uncond", type=bounded_float(0, 1, high_open=True), default=0.1,
                   help="caption dropout on the ordinary pairs, in [0, 1)")
    p.add_argument("--prompts_dir", default=None,
                   help="also write the demo benchmark files (demo_mem.txt, demo_nmem.txt, demo_mem.jsonl, "
                        "demo_train/*.png) into this folder, e.g. prompts")
    p.add_argument("--token_init_std", type=bounded_float(0, 10, low_open=True), default=None,
                   help="std of the initial token embedding (default: CLIP's 0.02); see build_components")
    p.add_argument("--snapshot_every", type=positive_int, default=None,
                   help="also save the pipeline every N UNet steps into OUT_DIR_stepN (memorization vs training)")
    p.add_argument("--threads", type=bounded_int(1, 1024), default=1,
                   help="torch CPU threads. Default 1: with 2 threads a run slowed from ~1 to ~6 s per step after "
                        "~200 steps (denormal floats, we believe: set_flush_denormal may not reach worker threads); "
                        "with 1 thread it kept 0.75 s per step")
    p.add_argument("--smoke", action="store_true", help="3 VAE and 3 UNet steps at batch 8: checks the path")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.stop_frac, args.vae_steps, args.batch_size, args.vae_batch_size = 3, 1.0, 3, 8, 8
    args.stop_after = max(1, round(args.stop_frac * args.steps))
    return args


def check_destinations(args):
    """The committed model and prompts are written only with --overwrite_committed (never by --smoke), and the
    model folder never swallows the prompts folder (or the reverse). Fills in args.out_dir."""
    if args.out_dir is None:
        if not args.overwrite_committed:
            raise UserError("pass --out_dir DIR (the committed demo_model/ is rebuilt only with --overwrite_committed)")
        args.out_dir = DEMO_MODEL_DIR
    committed = [(flag, path) for flag, path, repo in (("--out_dir", args.out_dir, DEMO_MODEL_DIR),
                                                        ("--prompts_dir", args.prompts_dir, COMMITTED_PROMPTS))
                 if path and os.path.realpath(path) == os.path.realpath(repo)]
    if committed and not args.overwrite_committed:
        flag, path = committed[0]
        raise UserError(f"{flag} {path} is the committed {os.path.basename(path.rstrip(os.sep))}/; pass "
                        "--overwrite_committed to replace it, or choose another folder")
    if committed and args.smoke:
        raise UserError("--smoke never writes the committed model or prompts; pass --out_dir DIR")
    if not args.out_dir.strip():
        raise UserError("--out_dir must not be empty")
    check_outputs({"--out_dir": args.out_dir}, {"--prompts_dir": args.prompts_dir})
    check_replaceable(args.out_dir, MODEL_MARKER)


@guarded(memory_hint="use a smaller --batch_size or --vae_batch_size")
def main(argv=None):
    args = parse_args(argv)
    check_destinations(args)
    quiet_library_warnings()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    # As training sharpens attention, softmax and Adam statistics produce denormal floats, which slow CPU
    # arithmetic by orders of magnitude; flushing them to zero changes no result that matters.
    torch.set_flush_denormal(True)
    try:
        log = train_demo(args.out_dir, seed=args.seed, steps=args.steps, stop_after=args.stop_after,
                         vae_steps=args.vae_steps, batch_size=args.batch_size, vae_batch_size=args.vae_batch_size,
                         lr=args.lr, vae_lr=args.vae_lr, kl_weight=args.kl_weight, dup=args.dup, shared=args.shared,
                         generic=args.generic, p_uncond=args.p_uncond, prompts_dir=args.prompts_dir,
                         token_init_std=args.token_init_std, snapshot_every=args.snapshot_every, record=vars(args))
        print(f"saved {args.out_dir} in {log['total_seconds']:.0f} s; last losses: {log['unet'][-1]}")
    finally:  # leave the process as we found it (the tests call main in-process)
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
