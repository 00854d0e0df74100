"""Train the flow demo: a small SD3-shaped rectified-flow transformer on the demo's digits, memorizing on purpose.

The demo's data and memorization recipe (train_demo.py: the same captions, the same memorized duplicates and
shared pairs, the same caption dropout), the demo's committed autoencoder (frozen) and its text encoder (as the
first CLIP encoder, trained on), and an MMDiT transformer (SD3Transformer2DModel) trained with flow matching.
Everything is seeded and runs on one thread, so that a rebuild is bit-identical. The output folder loads with
StableDiffusion3Pipeline.from_pretrained(out_dir) (no T5: text_encoder_3 = None).

    python3 train_demo_flow.py --overwrite_committed        # rebuild the committed demo_flow_model/ (~25 min, 1 core)
    python3 train_demo_flow.py --smoke --out_dir /tmp/flow  # a few steps, seconds: checks the whole path

The committed demo_flow_model/ is written only with --overwrite_committed, and replaced only when the new folder
is complete (utils.io.staged_dir).
"""
import argparse
import os

import torch

from utils.cli import (ArgumentParser, UserError, bounded_float, bounded_int, guarded, nonneg_int, quiet_library_warnings,
    seed_int)
from utils.demo.flow_train import MODEL_MARKER, train_demo_flow
from utils.io import check_outputs, check_replaceable
from utils.models.loading import DEMO_FLOW_MODEL_DIR, DEMO_MODEL_DIR
MAX_STEPS = 10_000_000


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default=None,
                   help="model folder to write (required unless --overwrite_committed); an existing one must hold a "
                        "saved pipeline and is replaced only when the new one is complete")
    p.add_argument("--overwrite_committed", action="store_true",
                   help="allow writing the committed demo_flow_model/ (the default --out_dir then)")
    p.add_argument("--demo_dir", default=DEMO_MODEL_DIR,
                   help="the demo model whose autoencoder and text encoder are reused (default: the committed one)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--steps", type=bounded_int(1, MAX_STEPS), default=2000, help="steps of the lr schedule")
    p.add_argument("--stop_frac", type=bounded_float(0, 1, low_open=True), default=1.0,
                   help="stop after this fraction of the --steps schedule, in (0, 1]")
    p.add_argument("--batch_size", type=bounded_int(1, 65536), default=32,
                   help="pairs per step (each carries SD3's 256 zero T5 tokens: ~0.7 s per step at 32 on one core)")
    p.add_argument("--lr", type=bounded_float(0, 10, low_open=True), default=1e-3)
    p.add_argument("--dup", type=bounded_int(1, 100_000), default=300,
                   help="copies of each memorized (caption, image) pair (as train_demo.py)")
    p.add_argument("--shared", type=nonneg_int, default=30,
                   help="each memorized caption also captions this many other training images once (as train_demo.py)")
    p.add_argument("--generic", action=argparse.BooleanOptionalAction, default=True,
                   help="also give every image one unique web-like caption (as train_demo.py)")
    p.add_argument("--p_uncond", type=bounded_float(0, 1, high_open=True), default=0.1,
                   help="caption dropout on the ordinary pairs, in [0, 1)")
    p.add_argument("--threads", type=bounded_int(1, 1024), default=1,
                   help="torch CPU threads; 1 for a bit-identical rebuild")
    p.add_argument("--smoke", action="store_true", help="3 steps at batch 4: checks the path")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.stop_frac, args.batch_size = 3, 1.0, 4
    args.stop_after = max(1, round(args.stop_frac * args.steps))
    return args


def check_destinations(args):
    """The committed folder is written only with --overwrite_committed, never by --smoke. Fills in args.out_dir."""
    if args.out_dir is None:
        if not args.overwrite_committed:
            raise UserError("pass --out_dir DIR (the committed demo_flow_model/ is rebuilt only with "
                            "--overwrite_committed)")
        args.out_dir = DEMO_FLOW_MODEL_DIR
    if not args.out_dir.strip():
        raise UserError("--out_dir must not be empty")
    committed = os.path.realpath(args.out_dir) == os.path.realpath(DEMO_FLOW_MODEL_DIR)
    if committed and not args.overwrite_committed:
        raise UserError(f"--out_dir {args.out_dir} is the committed demo_flow_model/; pass --overwrite_committed to "
                        "replace it, or choose another folder")
    if committed and args.smoke:
        raise UserError("--smoke never writes the committed model; pass --out_dir DIR")
    if not os.path.isfile(os.path.join(args.demo_dir, MODEL_MARKER)):
        raise UserError(f"--demo_dir {args.demo_dir} holds no saved demo model ({MODEL_MARKER})")
    check_outputs({"--out_dir": args.out_dir}, {"--demo_dir": args.demo_dir})
    check_replaceable(args.out_dir, MODEL_MARKER)


@guarded(memory_hint="use a smaller --batch_size")
def main(argv=None):
    args = parse_args(argv)
    check_destinations(args)
    quiet_library_warnings()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as train_demo.py: denormals slow CPU arithmetic by orders of magnitude
    try:
        log = train_demo_flow(args.out_dir, args.demo_dir, seed=args.seed, steps=args.steps, stop_after=args.stop_after,
                              batch_size=args.batch_size, lr=args.lr, dup=args.dup, shared=args.shared,
                              generic=args.generic, p_uncond=args.p_uncond, record=vars(args))
        print(f"saved {args.out_dir} in {log['total_seconds']:.0f} s; last losses: {log['flow'][-1]}")
    finally:  # leave the process as we found it (the tests call main in-process)
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
