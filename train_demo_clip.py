"""Train the demo CLIP: a tiny contrastive image-text model on the demo model's own training pairs.

It gives demo images a prompt-alignment score the way open_clip ViT-H-14 scores Stable Diffusion's images (cosine
of normalized image and text embeddings; utils.similarity.clip_scores). Model, data, balance, loss and metrics:
utils/demo_clip.py. Seeded and deterministic on CPU for a given --threads; the held-out images never train.

    python3 train_demo_clip.py                          # rebuild demo_clip/ (a few minutes on 2 CPU cores)
    python3 train_demo_clip.py --steps 5 --out_dir /tmp/dc   # seconds: checks the whole path
"""
import argparse
import json
import os
import time

import torch
from tqdm import tqdm

from utils.demo import clip as DC
from utils.cli import UserError, guarded, positive_float, positive_int
from utils.io import atomic_write_json, library_versions

# Hyperparameters (defaults of the command line; the committed demo_clip/ was trained with exactly these).
SEED = 0               # model init, batch order, token dropout and the held-out draw
STEPS = 2000           # optimizer steps (batches); warmup 5%, then cosine decay to 0
BATCH_SIZE = 256       # (image, caption) pairs per batch, drawn uniformly over the distinct training pairs
LR = 2e-3              # AdamW peak learning rate
WEIGHT_DECAY = 1e-4    # on conv and linear weights only (not biases, token embeddings or the temperature)
TOKEN_DROPOUT = 0.1    # probability that a content token becomes the out-of-vocabulary id (trains the OOV id)
HOLDOUT = 0.1          # fraction of all images held out (never memorized ones), with all their pairs
WIDTH = 16             # channels of the first conv layers (then 2x, 4x)
TOKEN_DIM = 64         # token embedding width
EMBED_DIM = 64         # shared image-text embedding dimension
COORDS = True          # append y, x coordinate channels to the image (position is part of an image's identity)
THREADS = 2            # torch CPU threads (results are deterministic for a given thread count)
# The data recipe of the committed demo model (train_demo.py defaults): the pairs its training set holds.
DATA = dict(seed=0, n_shared=30, generic=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one "error:" line and exit code 2 (via guarded), not a usage block
        raise UserError(message)


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default=DC.DEFAULT_DIR,
                   help="folder for config.json, model.safetensors and train_log.json")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--steps", type=positive_int, default=STEPS)
    p.add_argument("--batch_size", type=positive_int, default=BATCH_SIZE)
    p.add_argument("--lr", type=positive_float, default=LR)
    p.add_argument("--weight_decay", type=float, default=WEIGHT_DECAY)
    p.add_argument("--token_dropout", type=float, default=TOKEN_DROPOUT)
    p.add_argument("--holdout", type=positive_float, default=HOLDOUT)
    p.add_argument("--width", type=positive_int, default=WIDTH)
    p.add_argument("--token_dim", type=positive_int, default=TOKEN_DIM)
    p.add_argument("--embed_dim", type=positive_int, default=EMBED_DIM)
    p.add_argument("--coords", action=argparse.BooleanOptionalAction, default=COORDS)
    p.add_argument("--threads", type=positive_int, default=THREADS)
    a = p.parse_args(argv)
    if a.batch_size < 2:
        raise UserError("--batch_size must be at least 2 (a contrastive batch needs negatives)")
    if not 0 <= a.token_dropout < 1:
        raise UserError(f"--token_dropout must be in [0, 1), got {a.token_dropout}")
    if a.weight_decay < 0:
        raise UserError(f"--weight_decay must be >= 0, got {a.weight_decay}")
    if not 0 < a.holdout <= 0.5:
        raise UserError(f"--holdout must be in (0, 0.5], got {a.holdout}")
    if os.path.exists(a.out_dir) and not os.path.isdir(a.out_dir):
        raise UserError(f"--out_dir {a.out_dir!r} exists and is not a folder")
    return a


@guarded
def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal floats late in training slow CPU arithmetic by orders of magnitude
    try:
        return train(args)
    finally:  # leave the process as we found it (the tests call main in-process)
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def train(args):
    t0 = time.time()
    data = DC.dataset(**DATA)
    holdout = DC.holdout_indices(data, args.holdout, args.seed)
    architecture = dict(width=args.width, token_dim=args.token_dim, embed_dim=args.embed_dim, coords=args.coords)
    losses = []
    model, vocab = DC.train(data, holdout, args.steps, args.batch_size, args.lr, args.weight_decay,
                            args.token_dropout, architecture, args.seed, log=losses,
                            progress=lambda r: tqdm(r, desc="demo clip", mininterval=5))
    t_train = time.time() - t0
    tokenizer = DC.DemoClipTokenizer(DC.clip_tokenizer(), vocab)
    metrics = DC.evaluate(model, tokenizer, data, holdout, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    config = {"architecture": architecture, "data": DATA, "holdout_fraction": args.holdout, "seed": args.seed,
              "holdout": holdout, "zero_shot_template": DC.ZERO_SHOT}
    DC.save_demo_clip(model, vocab, config, args.out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log = {"args": vars(args), "versions": library_versions(), "torch_threads": torch.get_num_threads(),
           "n_parameters": n_params, "weights_bytes": os.path.getsize(os.path.join(args.out_dir, "model.safetensors")),
           "vocab_size": len(vocab) + 2, "n_training_pairs": len(DC.training_pairs(data, holdout)),
           "n_heldout_images": len(holdout), "train_seconds": round(t_train, 1),
           "total_seconds": round(time.time() - t0, 1), "metrics": metrics, "losses": losses}
    atomic_write_json(os.path.join(args.out_dir, "train_log.json"), log)
    print(report(log))
    return log


def report(log):
    """The end-of-run summary: held-out accuracies beside their chance levels."""
    m, ch = log["metrics"], log["metrics"]["chance"]
    h, z = m["heldout"], m["heldout"]["zero_shot"]
    rows = [("caption top-1 (a)", h["caption_top1"], ch["caption_top1"]),
            ("zero-shot colour (b)", z["colour"], ch["colour"]), ("zero-shot digit (b)", z["digit"], ch["digit"]),
            ("zero-shot both (b)", z["both"], ch["both"]),
            ("memorized caption -> image (c)*", m["memorized"]["caption_to_image"], ch["memorized"])]
    size = f"{log['n_parameters']:,} parameters, {log['weights_bytes'] / 1e6:.2f} MB"
    lines = [f"saved {log['args']['out_dir']} ({size}) "
             f"in {log['total_seconds']:.0f} s; last loss {log['losses'][-1]['loss'] if log['losses'] else None}",
             f"held-out images: {h['n_images']}    accuracy   chance"]
    lines += [f"  {name:<32}{acc:8.3f} {c:8.3f}" for name, acc, c in rows]
    lines.append("  (* training pairs: the memorized images are never held out)")
    lines.append("mean scores: " + json.dumps({k: round(v, 3) for k, v in m["mean_scores"].items()}))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
