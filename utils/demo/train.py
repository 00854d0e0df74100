"""The demo model's training run: data, autoencoder, then UNet + text encoder, saved as one pipeline folder."""
import os
import time

import torch

from ..cli import UserError
from ..io import atomic_write_json, library_versions, staged_dir, writing
from ..models.clip import offline_clip_tokenizer
from .data import build_dataset, write_benchmark
from .model import (assemble_pipeline, build_components, caption_tokens, ddim_scheduler, encode_latents, make_pairs,
                    train_unet, train_vae)

MODEL_MARKER = "model_index.json"  # an existing model folder is replaced only if it holds a saved pipeline


def train_demo(out_dir, *, seed, steps, stop_after, vae_steps, batch_size, vae_batch_size, lr, vae_lr, kl_weight,
               dup, shared, generic, p_uncond, prompts_dir=None, token_init_std=None, snapshot_every=None,
               record=None):
    """Train the demo model and save it to `out_dir` (and, with `prompts_dir`, its benchmark files there).

    The keywords are train_demo.py's flags; `record` (a dict, e.g. the parsed flags) is stored as the training
    log's "args". With `snapshot_every`, the pipeline is also saved every that many UNet steps into
    `<out_dir>_step<N>`. Returns the training log (also written as train_log.json in the folder)."""
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    try:
        data = build_dataset(seed=seed, n_shared=shared, generic=generic)
    except ValueError as e:  # --shared too large for 1,797 images
        raise UserError(f"--shared {shared}: {e}") from None
    if prompts_dir:
        write_benchmark(prompts_dir, data, seed=seed)
    tokenizer = offline_clip_tokenizer()
    vae, unet, text_encoder = build_components(seed, tokenizer, token_init_std)

    log = {"args": record or {}, "versions": library_versions(), "vae": [], "unet": []}
    train_vae(vae, data["images"], vae_steps, vae_batch_size, vae_lr, kl_weight, gen, log["vae"])
    raw = encode_latents(vae, data["images"])
    # SD's convention: latents are scaled to unit variance by the VAE config's scaling_factor.
    scaling = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = raw * scaling
    t_vae = time.time() - t0

    caption_index, caption_ids, empty_id = caption_tokens(data, tokenizer)
    pairs = make_pairs(data, caption_index, dup)

    def pipeline():
        return assemble_pipeline(vae, unet, text_encoder, tokenizer, ddim_scheduler())

    def snapshot(step):
        if snapshot_every and step % snapshot_every == 0 and step < stop_after:
            save_model(pipeline(), log, f"{out_dir.rstrip(os.sep)}_step{step}", step)

    train_unet(unet, text_encoder, latents, pairs, caption_ids, empty_id, steps, batch_size, lr, p_uncond, gen,
               log["unet"], on_step=snapshot, stop_after=stop_after)
    with torch.no_grad():
        rec = vae.decode(raw[:256]).sample
    log.update(
        vae_scaling_factor=scaling, vae_recon_mse=torch.nn.functional.mse_loss(rec, data["images"][:256]).item(),
        n_pairs=len(pairs), n_memorized_pairs=int((pairs[:, 2] == 1).sum()), memorized=data["memorized"],
        shared=data["shared"],
        vae_seconds=round(t_vae, 1), total_seconds=round(time.time() - t0, 1), torch_threads=torch.get_num_threads())
    save_model(pipeline(), log, out_dir, stop_after)
    return log


def save_model(pipe, log, folder, step):
    """Save the pipeline and its training log as one folder, replaced only when complete (staged_dir); diverged
    (non-finite) weights are refused instead of saved."""
    for name in ("vae", "unet", "text_encoder"):
        if not all(torch.isfinite(t).all() for t in getattr(pipe, name).state_dict().values()):
            raise UserError(f"training diverged by step {step}: the {name} has non-finite weights; nothing saved "
                            "(lower --lr or --vae_lr)")
    with staged_dir(folder, marker=MODEL_MARKER) as tmp:
        with writing(folder, "model folder"):
            pipe.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(os.path.join(tmp, "train_log.json"), log)
