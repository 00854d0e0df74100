"""Train the bundled demo model: a tiny Stable-Diffusion-shaped latent text-to-image model on handwritten digits.

It memorizes on purpose: a few dozen LAION-like captions are each paired with one training image duplicated
--dup times (the paper's recipe) and also caption --shared other images once, while every digit image also has
templated captions that name it and (--generic) one unique web-like caption. Caption
dropout only ever touches the ordinary pairs, so the unconditional branch sees the data as Stable Diffusion's
does (duplicates a negligible share). Stages: AutoencoderKL (32x32 RGB -> 4x8x8 latents), then UNet and CLIP text
encoder jointly on the latents, stopped at --stop_frac of the lr schedule. Everything is seeded; the output
folder loads with StableDiffusionPipeline.from_pretrained(out_dir).

    python3 train_demo.py --prompts_dir prompts   # rebuild demo_model/ and prompts/demo_* (~30 min, 1 core)
    python3 train_demo.py --smoke --out_dir /tmp/demo   # a few steps, seconds: checks the whole path
"""
import argparse
import math
import os
import time

import torch
from tqdm import tqdm

from utils.cli import UserError, guarded, nonneg_int, positive_float, positive_int, quiet_library_warnings
from utils.demo_data import build_dataset, write_benchmark
from utils.io import atomic_write_json, library_versions
from utils.models import DEMO_MODEL_DIR, offline_clip_tokenizer

# Stable Diffusion v1.4's noise schedule (its scheduler_config.json).
SD14_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")


def build_components(seed, tokenizer, token_init_std=None):
    """Seeded, untrained (vae, unet, text_encoder) in the SD v1 layout at toy size (about 15 MB in float32).

    token_init_std: re-initialize the token embedding with this std (None keeps CLIP's 0.02, under which all
    captions start out almost identical after the text encoder, and the UNet learns to use them only slowly).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=16, sample_size=32)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=16)
    # The full 49,408-token CLIP vocabulary at width 32: 6.3 MB; only the tokens our captions use get trained.
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    if token_init_std is not None:
        torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=token_init_std)
    return vae, unet, text_encoder


def warmup_cosine(opt, steps, floor=0.0):
    """Linear warmup over min(100, steps/10) steps, then cosine decay from 1 to floor (fractions of the lr)."""
    warmup = max(1, min(100, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))


def train_vae(vae, images, steps, batch_size, lr, kl_weight, gen, log):
    """Reconstruction MSE (mean over pixels) + kl_weight * KL (summed over latent entries, mean over the batch)
    on random batches of images (N, 3, 32, 32); appends losses to log."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    # The decay matters: at a constant lr the autoencoder stalls at grey blobs in the right place (no colour,
    # no shape: pixel cosine ~0.64 to the input); the detail comes in the low-lr phase.
    sched = warmup_cosine(opt, steps)
    vae.train()
    for step in tqdm(range(steps), desc="vae", mininterval=5):
        x = images[torch.randint(len(images), (batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        loss = mse + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.append({"step": step, "mse": round(mse.item(), 6)})
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images, batch=256):
    """Posterior means (N, 4, 8, 8), unscaled: the duplicated image is then exactly one point in latent space."""
    return torch.cat([vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


def train_unet(unet, text_encoder, latents, pairs, caption_ids, empty_id, steps, batch_size, lr, p_uncond, gen, log,
               log_every=25, on_step=None, stop_after=None):
    """Joint UNet + text-encoder training with the epsilon loss of SD's schedule.

    latents (N, 4, 8, 8) already scaled; pairs: (P, 3) int tensor of (image index, caption index, kind) with kind
    0 = ordinary, 1 = memorized (duplicated), 2 = shared (see make_pairs); caption_ids (U, 77) token ids; empty_id
    (77,) the empty caption. Captions of ordinary pairs are replaced by the empty caption with probability p_uncond
    (classifier-free guidance); memorized and shared pairs never are, so the unconditional branch sees the
    ordinary data only, as Stable Diffusion's sees a web-scale set in which duplicates are a negligible share.
    on_step(step) is called after every step (snapshots). stop_after: stop after this many of the `steps` steps of
    the learning-rate schedule (the weights equal a snapshot taken at that step of the full run).
    """
    from diffusers import DDPMScheduler
    noise_sched = DDPMScheduler(**{k: v for k, v in SD14_SCHEDULE.items() if k != "set_alpha_to_one"})
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    # Linear warmup, then cosine decay to 10%: stable start, and a late low-lr phase that sharpens the fit.
    sched = warmup_cosine(opt, steps, floor=0.1)
    unet.train()
    text_encoder.train()
    window = {"loss": [], "mem": [], "ord": []}
    t_last = time.time()
    for step in tqdm(range(steps if stop_after is None else min(steps, stop_after)), desc="unet", mininterval=5):
        batch = pairs[torch.randint(len(pairs), (batch_size,), generator=gen)]
        img, cap, kind = batch[:, 0], batch[:, 1], batch[:, 2]
        mem, ordinary = kind == 1, kind == 0
        ids = caption_ids[cap]
        drop = (torch.rand(batch_size, generator=gen) < p_uncond) & ordinary
        ids = torch.where(drop[:, None], empty_id[None], ids)
        x0 = latents[img]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        emb = text_encoder(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=emb, return_dict=False)[0]
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        window["loss"].append(loss.item())
        if mem.any():
            window["mem"].append(per[mem].mean().item())
        if ordinary.any():
            window["ord"].append(per[ordinary].mean().item())
        if (step + 1) % log_every == 0 or step + 1 in (steps, stop_after):
            log.append({"step": step + 1, "lr": sched.get_last_lr()[0],
                        "sec_per_step": round((time.time() - t_last) / len(window["loss"]), 3),
                        **{k: round(sum(v) / len(v), 5) for k, v in window.items() if v}})
            t_last = time.time()
            window = {k: [] for k in window}
        if on_step is not None:
            on_step(step + 1)
    unet.eval()
    text_encoder.eval()


def make_pairs(data, caption_index, dup):
    """(P, 3) int64 rows (image, caption, kind): every image with each of its captions (kind 0), each memorized
    (caption, image) pair repeated dup times (kind 1), each shared (caption, image) pair once (kind 2), and each
    image with its generic caption, if any (kind 0)."""
    rows = [(i, caption_index[c], 0) for i, caps in enumerate(data["captions"]) for c in caps]
    rows += [(i, caption_index[c], 1) for c, i in data["memorized"] for _ in range(dup)]
    rows += [(i, caption_index[c], 2) for c, i in data["shared"]]
    rows += [(i, caption_index[c], 0) for i, c in enumerate(data["generic"])]
    return torch.tensor(rows, dtype=torch.int64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default=DEMO_MODEL_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int, default=2500, help="UNet + text encoder steps of the lr schedule")
    p.add_argument("--stop_frac", type=positive_float, default=0.6,
                   help="stop after this fraction of the --steps schedule, in (0, 1]. The committed model stops at "
                        "1,500 of 2,500 steps: memorization strong but not total (86%% of fresh noises copy; at "
                        "2,500 nearly all do) and a rebuild within 30 min (README, 'The demo model')")
    p.add_argument("--vae_steps", type=positive_int, default=1500)
    p.add_argument("--batch_size", type=positive_int, default=128)
    p.add_argument("--vae_batch_size", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=2e-3)
    p.add_argument("--vae_lr", type=positive_float, default=2e-3)
    p.add_argument("--kl_weight", type=positive_float, default=1e-8,
                   help="KL weight against the per-pixel mean MSE (1e-4 gave grey blobs: colour and shape lost)")
    p.add_argument("--dup", type=positive_int, default=300, help="copies of each memorized (caption, image) pair")
    p.add_argument("--shared", type=nonneg_int, default=30,
                   help="each memorized caption also captions this many other training images once (shared pairs): "
                        "memorization strong but not total")
    p.add_argument("--generic", action=argparse.BooleanOptionalAction, default=True,
                   help="also give every image one unique web-like caption (ordinary pairs): unseen web-like "
                        "prompts then lead to ordinary digits instead of the memorized images")
    p.add_argument("--p_uncond", type=float, default=0.1, help="caption dropout on the ordinary pairs")
    p.add_argument("--prompts_dir", default=None,
                   help="also write the demo benchmark files (demo_mem.txt, demo_nmem.txt, demo_mem.jsonl, "
                        "demo_train/*.png) into this folder, e.g. prompts")
    p.add_argument("--token_init_std", type=positive_float, default=None,
                   help="std of the initial token embedding (default: CLIP's 0.02); see build_components")
    p.add_argument("--snapshot_every", type=positive_int, default=None,
                   help="also save the pipeline every N UNet steps into OUT_DIR_stepN (memorization vs training)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads. Default 1: with 2 threads a run slowed from ~1 to ~6 s per step after "
                        "~200 steps (denormal floats, we believe: set_flush_denormal may not reach worker threads); "
                        "with 1 thread it kept 0.75 s per step")
    p.add_argument("--smoke", action="store_true", help="3 VAE and 3 UNet steps at batch 8: checks the path")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.stop_frac, args.vae_steps, args.batch_size, args.vae_batch_size = 3, 1.0, 3, 8, 8
    if args.stop_frac > 1:
        raise UserError(f"--stop_frac must be in (0, 1], got {args.stop_frac}")
    args.stop_after = max(1, round(args.stop_frac * args.steps))
    if not 0 <= args.p_uncond < 1:
        raise UserError("--p_uncond must be in [0, 1)")
    return args


@guarded
def main(argv=None):
    args = parse_args(argv)
    quiet_library_warnings()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    # As training sharpens attention, softmax and Adam statistics produce denormal floats, which slow CPU
    # arithmetic by orders of magnitude; flushing them to zero changes no result that matters.
    torch.set_flush_denormal(True)
    try:
        train(args)
    finally:  # leave the process as we found it (the tests call main in-process)
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def train(args):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    t0 = time.time()
    gen = torch.Generator().manual_seed(args.seed)
    try:
        data = build_dataset(seed=args.seed, n_shared=args.shared, generic=args.generic)
    except ValueError as e:  # --shared too large for 1,797 images
        raise UserError(f"--shared {args.shared}: {e}") from None
    if args.prompts_dir:
        write_benchmark(args.prompts_dir, data, seed=args.seed)
    tokenizer = offline_clip_tokenizer()
    vae, unet, text_encoder = build_components(args.seed, tokenizer, args.token_init_std)

    log = {"args": vars(args), "versions": library_versions(), "vae": [], "unet": []}
    train_vae(vae, data["images"], args.vae_steps, args.vae_batch_size, args.vae_lr, args.kl_weight, gen, log["vae"])
    raw = encode_latents(vae, data["images"])
    # SD's convention: latents are scaled to unit variance by the VAE config's scaling_factor.
    scaling = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = raw * scaling
    t_vae = time.time() - t0

    captions = sorted({c for caps in data["captions"] for c in caps} | {c for c, _ in data["memorized"]}
                      | set(data["generic"]))
    caption_index = {c: i for i, c in enumerate(captions)}
    tok = lambda texts: tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
    caption_ids, empty_id = tok(captions), tok([""])[0]
    pairs = make_pairs(data, caption_index, args.dup)

    def pipeline():
        return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler(**SD14_SCHEDULE), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def snapshot(step):
        if args.snapshot_every and step % args.snapshot_every == 0 and step < args.stop_after:
            folder = f"{args.out_dir.rstrip('/')}_step{step}"
            pipeline().save_pretrained(folder, safe_serialization=True)
            atomic_write_json(os.path.join(folder, "train_log.json"), log)

    train_unet(unet, text_encoder, latents, pairs, caption_ids, empty_id, args.steps, args.batch_size, args.lr,
               args.p_uncond, gen, log["unet"], on_step=snapshot, stop_after=args.stop_after)
    pipeline().save_pretrained(args.out_dir, safe_serialization=True)
    with torch.no_grad():
        rec = vae.decode(raw[:256]).sample
    log.update(
        vae_scaling_factor=scaling, vae_recon_mse=torch.nn.functional.mse_loss(rec, data["images"][:256]).item(),
        n_pairs=len(pairs), n_memorized_pairs=int((pairs[:, 2] == 1).sum()), memorized=data["memorized"],
        shared=data["shared"],
        vae_seconds=round(t_vae, 1), total_seconds=round(time.time() - t0, 1), torch_threads=torch.get_num_threads())
    atomic_write_json(os.path.join(args.out_dir, "train_log.json"), log)
    print(f"saved {args.out_dir} in {log['total_seconds']:.0f} s; last losses: {log['unet'][-1]}")


if __name__ == "__main__":
    main()
