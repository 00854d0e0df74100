"""The flow demo: a small SD3-shaped rectified-flow transformer trained on the demo's data (train_demo_flow.py).

Same captions, same memorized duplicates and shared pairs, same caption dropout as the demo (utils.demo.data,
make_pairs); the demo's committed autoencoder (frozen) and its text encoder, whose weights start the first CLIP
encoder of a StableDiffusion3Pipeline (CLIPTextModelWithProjection). The saved folder loads with
StableDiffusion3Pipeline.from_pretrained (text_encoder_3 = tokenizer_3 = None, as the pipeline allows).

The loss is the one of diffusers' SD3 training scripts: x_s = (1 - s) x0 + s eps, the transformer predicts
v = eps - x0 at timestep 1000 s, mean squared error. s is drawn uniformly from (0, 1) rather than logit-normal
(SD3's weighting), so that the ends of the schedule, s = 1 where the sharpness is measured above all, are trained
as much as the middle (docs/demo.md, "The flow demo").
"""
import os
import time

import torch
from tqdm import tqdm

from ..cli import UserError
from ..io import atomic_write_json, library_versions, staged_dir, writing
from .data import build_dataset
from .model import LossLog, caption_tokens, encode_latents, make_pairs, optimizer_step, warmup_cosine

MODEL_MARKER = "model_index.json"
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: zero T5 tokens when text_encoder_3 is None

# The transformer: SD3's MMDiT layout at toy size (SD3-medium: 24 layers, 24 heads of 64, joint_attention_dim 4096,
# pooled 2048, patch 2 on 128 x 128 latents). Patch 1 here: the demo's latents are only 8 x 8.
FLOW_TRANSFORMER = dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=4,
                        attention_head_dim=16, num_attention_heads=3, pos_embed_max_size=8)
TEXT2_WIDTH = 8  # the second CLIP encoder: narrow, so that the folder stays under 20 MB (its vocabulary is 49,408)


def build_flow_components(seed, demo_dir, tokenizer):
    """(vae, text_encoder, text_encoder_2, transformer, scheduler), seeded.

    vae: the demo's AutoencoderKL (frozen; shift_factor 0 added to its config, which SD3's pipeline reads);
    text_encoder: CLIPTextModelWithProjection holding the demo's CLIPTextModel weights (width 32) and a seeded
    32 x 32 projection; text_encoder_2: a seeded 2-layer CLIP encoder of width TEXT2_WIDTH; transformer:
    SD3Transformer2DModel (FLOW_TRANSFORMER) reading the concatenated 40-wide context and 40-wide pooled vector;
    scheduler: FlowMatchEulerDiscreteScheduler with shift 1 (SD3 uses 3 at 1024 px; a tiny latent needs none).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    vae = AutoencoderKL.from_pretrained(os.path.join(demo_dir, "vae"))
    # shift_factor: read by SD3's pipeline; the source name is the project's relative path, not this machine's,
    # so that a rebuild anywhere writes the committed config byte for byte
    vae.register_to_config(shift_factor=0.0, _name_or_path="demo_model/vae")
    demo_text = CLIPTextModel.from_pretrained(os.path.join(demo_dir, "text_encoder"))
    width = demo_text.config.hidden_size
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**dict(demo_text.config.to_dict(), projection_dim=width)))
    try:  # strict: a changed demo encoder must not load silently
        text_encoder.text_model.load_state_dict(getattr(demo_text, "text_model", demo_text).state_dict())
    except RuntimeError as e:
        raise UserError(f"the demo text encoder in {demo_dir} does not fit a CLIPTextModelWithProjection: "
                        f"{str(e).splitlines()[0]}") from None
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=TEXT2_WIDTH, intermediate_size=4 * TEXT2_WIDTH,
        projection_dim=TEXT2_WIDTH, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    context = width + TEXT2_WIDTH
    torch.manual_seed(seed + 2)
    heads = FLOW_TRANSFORMER["num_attention_heads"] * FLOW_TRANSFORMER["attention_head_dim"]
    transformer = SD3Transformer2DModel(**FLOW_TRANSFORMER, joint_attention_dim=context,
                                        caption_projection_dim=heads, pooled_projection_dim=context)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return vae, text_encoder, text_encoder_2, transformer, scheduler


def encode_context(text_encoder, text_encoder_2, ids, joint_dim, t5_tokens=T5_TOKENS):
    """What StableDiffusion3Pipeline.encode_prompt computes without T5, for token ids (B, 77) of both (identical)
    CLIP tokenizers: (context (B, 77 + t5_tokens, joint_dim), pooled (B, 2 widths)). Each encoder's penultimate
    hidden states, concatenated and padded to joint_dim, then t5_tokens zero tokens; pooled: their projections."""
    out1 = text_encoder(ids, output_hidden_states=True)
    out2 = text_encoder_2(ids, output_hidden_states=True)
    clip = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
    zeros = clip.new_zeros(len(ids), t5_tokens, joint_dim)
    return torch.cat([clip, zeros], dim=1), torch.cat([out1.text_embeds, out2.text_embeds], dim=-1)


def train_flow(transformer, text_encoder, text_encoder_2, latents, pairs, caption_ids, empty_id, steps, batch_size,
               lr, p_uncond, gen, log, log_every=25, stop_after=None):
    """Joint transformer + text-encoder training with the rectified-flow loss (module docstring).

    latents (N, 4, 8, 8) scaled; pairs (P, 3) rows (image, caption, kind) as in make_pairs; caption_ids (U, 77);
    empty_id (77,). Caption dropout with probability p_uncond on the ordinary pairs only (kind 0), as the demo.
    stop_after: stop after this many of the `steps` of the learning-rate schedule. Appends windowed losses to log.
    """
    params = [p for m in (transformer, text_encoder, text_encoder_2) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = warmup_cosine(opt, steps, floor=0.1)
    joint_dim = transformer.config.joint_attention_dim
    for m in (transformer, text_encoder, text_encoder_2):
        m.train()
    losses = LossLog(log, log_every, (steps, stop_after))
    for step in tqdm(range(steps if stop_after is None else min(steps, stop_after)), desc="flow", mininterval=5):
        batch = pairs[torch.randint(len(pairs), (batch_size,), generator=gen)]
        img, cap, kind = batch[:, 0], batch[:, 1], batch[:, 2]
        mem, ordinary = kind == 1, kind == 0
        drop = (torch.rand(batch_size, generator=gen) < p_uncond) & ordinary
        ids = torch.where(drop[:, None], empty_id[None], caption_ids[cap])
        x0 = latents[img]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(batch_size, generator=gen)
        s = sigma[:, None, None, None]
        xs = (1 - s) * x0 + s * noise
        context, pooled = encode_context(text_encoder, text_encoder_2, ids, joint_dim)
        pred = transformer(hidden_states=xs, encoder_hidden_states=context, pooled_projections=pooled,
                           timestep=sigma * 1000, return_dict=False)[0]
        per = (pred - (noise - x0)).pow(2).mean(dim=(1, 2, 3))
        loss = per.mean()
        optimizer_step(opt, sched, params, loss)
        losses.add(step + 1, sched, loss, per, mem, ordinary)
    for m in (transformer, text_encoder, text_encoder_2):
        m.eval()


def assemble_flow_pipeline(vae, text_encoder, text_encoder_2, tokenizer, transformer, scheduler):
    """A StableDiffusion3Pipeline without T5 (both CLIP slots use the same tokenizer), progress bar off."""
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_demo_flow(out_dir, demo_dir, *, seed, steps, stop_after, batch_size, lr, dup, shared, generic, p_uncond,
                    record=None):
    """Train the flow demo on the demo's data and save it to out_dir (replaced only when complete).

    The keywords are train_demo_flow.py's flags (dup, shared, generic, p_uncond as train_demo.py's, which must
    match the committed demo's for its prompt files to describe this model too); record is stored as the log's
    "args". Returns the training log (also written as train_log.json in the folder)."""
    from ..models.clip import offline_clip_tokenizer
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    try:
        data = build_dataset(seed=seed, n_shared=shared, generic=generic)
    except ValueError as e:
        raise UserError(f"--shared {shared}: {e}") from None
    tokenizer = offline_clip_tokenizer()
    vae, text_encoder, text_encoder_2, transformer, scheduler = build_flow_components(seed, demo_dir, tokenizer)
    latents = encode_latents(vae, data["images"]) * vae.config.scaling_factor

    caption_index, caption_ids, empty_id = caption_tokens(data, tokenizer)
    pairs = make_pairs(data, caption_index, dup)
    n_params = {name: sum(p.numel() for p in m.parameters())
                for name, m in (("transformer", transformer), ("text_encoder", text_encoder),
                                ("text_encoder_2", text_encoder_2))}
    log = {"args": record or {}, "versions": library_versions(), "n_params": n_params, "flow": []}
    train_flow(transformer, text_encoder, text_encoder_2, latents, pairs, caption_ids, empty_id, steps, batch_size,
               lr, p_uncond, gen, log["flow"], stop_after=stop_after)
    log.update(n_pairs=len(pairs), n_memorized_pairs=int((pairs[:, 2] == 1).sum()), memorized=data["memorized"],
               shared=data["shared"], total_seconds=round(time.time() - t0, 1),
               torch_threads=torch.get_num_threads())
    pipe = assemble_flow_pipeline(vae, text_encoder, text_encoder_2, tokenizer, transformer, scheduler)
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        if not all(torch.isfinite(t).all() for t in getattr(pipe, name).state_dict().values()):
            raise UserError(f"training diverged: the {name} has non-finite weights; nothing saved (lower --lr)")
    with staged_dir(out_dir, marker=MODEL_MARKER) as tmp:
        with writing(out_dir, "model folder"):
            pipe.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(os.path.join(tmp, "train_log.json"), log)
    return log
