"""Stable-Diffusion-shaped models built in code: SD v1.4's noise schedule and UNet configuration, the demo model's
components and its training loops (train_demo.py calls them), and the tiny random pipeline of the tests.

All builders are seeded: two calls with the same arguments give identical weights.
"""
import math
import time

import torch
from tqdm import tqdm

# Stable Diffusion v1.4's noise schedule (its scheduler_config.json); written once, used by every builder here.
SD14_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon")


# Stable Diffusion v1.4's UNet (its unet/config.json): built with random weights it costs what the real one does.
SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)

# Stable Diffusion v2.0's UNet (stabilityai/stable-diffusion-2, unet/config.json; v-prediction at 768 x 768): in
# diffusers' naming, attention_head_dim (5, 10, 20, 20) is the number of heads per block (64 channels each).
SD2_UNET = dict(SD14_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True)
SD_UNETS = {"sd14": (SD14_UNET, "epsilon"), "sd2": (SD2_UNET, "v_prediction")}


def sd_shaped_unet(kind="sd14", sample_size=None, device="cpu", dtype=torch.float32, seed=0):
    """A UNet2DConditionModel with Stable Diffusion's architecture (kind 'sd14' or 'sd2') and random weights
    (seeded), built directly on `device` and cast to `dtype`, in eval mode; sample_size None keeps the native
    latent side (64 / 96). Returns (unet, prediction_type, cross_attention_dim). Costs what the real one does."""
    from diffusers import UNet2DConditionModel
    config, prediction_type = SD_UNETS[kind]
    config = dict(config, sample_size=sample_size or config["sample_size"])
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype).eval(), prediction_type, config["cross_attention_dim"]


def ddim_scheduler(prediction_type="epsilon"):
    """A DDIM scheduler with SD v1.4's schedule (and the given prediction type)."""
    from diffusers import DDIMScheduler
    return DDIMScheduler(**dict(SD14_SCHEDULE, prediction_type=prediction_type))


def assemble_pipeline(vae, unet, text_encoder, tokenizer, scheduler):
    """A StableDiffusionPipeline from components (no safety checker), progress bar off."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(prediction_type="epsilon", seed=0, sample_size=8, cross_attention_dim=32, tokenizer=None,
                  block_out_channels=(32, 64), latent_channels=4):
    """A StableDiffusionPipeline with the SD v1 layout at toy size (random weights, seeded), DDIM with SD's schedule.

    UNet2DConditionModel (cross-attention down/up blocks), AutoencoderKL (scale factor 2), CLIPTextModel and the
    real CLIP tokenizer rebuilt offline. For tests and smoke runs: no download.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.clip import offline_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1,
        block_out_channels=block_out_channels, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=16)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, sample_size=sample_size * 2)
    tokenizer = tokenizer or offline_clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408,
        hidden_size=cross_attention_dim, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    return assemble_pipeline(vae, unet, text_encoder, tokenizer, ddim_scheduler(prediction_type))


def tiny_xl_pipeline(seed=0, sample_size=8, force_zeros_for_empty_prompt=True, prediction_type="epsilon"):
    """A StableDiffusionXLPipeline with SDXL base's layout at toy size (random weights, seeded), DDIM with SD's
    schedule (SDXL base's scheduler config has the same betas and spacing).

    As SDXL: a first down block without cross-attention and two with it (the last one deeper), two CLIP text
    encoders (the second with a text projection, whose pooled output and 6 time ids are the UNet's added
    conditions: addition_embed_type 'text_time'), the context their penultimate hidden states concatenated
    (16 + 32 = 48 wide), and the second tokenizer padding with '!' as SDXL's does. Both tokenizers are the real
    CLIP BPE rebuilt offline. For tests and smoke runs: no download, no watermarker.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..models.clip import offline_clip_tokenizer

    time_dim, proj_dim = 8, 32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8), use_linear_projection=True, cross_attention_dim=48, norm_num_groups=16,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=proj_dim + 6 * time_dim)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=sample_size * 2, force_upcast=True)
    tokenizer = offline_clip_tokenizer()
    tokenizer_2 = offline_clip_tokenizer()
    tokenizer_2.pad_token = "!"
    text = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, pad_token_id=49407, **text))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=proj_dim,
                                                                pad_token_id=0, **text))
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=ddim_scheduler(prediction_type), add_watermarker=False,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


class LossLog:
    """Windowed training losses of a demo training loop: the mean loss, and the per-pair loss of the memorized
    (kind 1) and ordinary (kind 0) pairs of the batch, appended to `log` as one record every log_every steps and at
    the given last steps."""

    def __init__(self, log, log_every, last_steps):
        self.log, self.log_every, self.last_steps = log, log_every, last_steps
        self.window, self.t_last = {"loss": [], "mem": [], "ord": []}, time.time()

    def add(self, step, sched, loss, per, mem, ordinary):
        """Record 1-based `step`: loss (scalar), per (B,) per-pair losses, mem / ordinary (B,) masks."""
        w = self.window
        w["loss"].append(loss.item())
        if mem.any():
            w["mem"].append(per[mem].mean().item())
        if ordinary.any():
            w["ord"].append(per[ordinary].mean().item())
        if step % self.log_every == 0 or step in self.last_steps:
            self.log.append({"step": step, "lr": sched.get_last_lr()[0],
                             "sec_per_step": round((time.time() - self.t_last) / len(w["loss"]), 3),
                             **{k: round(sum(v) / len(v), 5) for k, v in w.items() if v}})
            self.t_last, self.window = time.time(), {k: [] for k in w}


def optimizer_step(opt, sched, params, loss):
    """One clipped (norm 1) optimizer step on loss, then the learning-rate schedule's step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def caption_tokens(data, tokenizer):
    """(caption_index {caption: i}, caption_ids (U, L) token ids, empty_id (L,)) of every caption of the demo's data
    (digit captions, memorized captions, generic captions), sorted, padded to the tokenizer's length."""
    captions = sorted({c for caps in data["captions"] for c in caps} | {c for c, _ in data["memorized"]}
                      | set(data["generic"]))
    tok = lambda texts: tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
    return {c: i for i, c in enumerate(captions)}, tok(captions), tok([""])[0]


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
    losses = LossLog(log, log_every, (steps, stop_after))
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
        optimizer_step(opt, sched, params, loss)
        losses.add(step + 1, sched, loss, per, mem, ordinary)
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


def offline_t5_tokenizer(model_max_length=32):
    """A T5-style tokenizer (T5TokenizerFast: SentencePiece-like Unigram over whitespace-marked pieces, '</s>' appended,
    '<pad>' = 0) with a small vocabulary built in code by the `tokenizers` package: single letters and digits, so
    every prompt tokenizes without an '<unk>'. For tiny test pipelines only (no download)."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase + string.digits]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=model_max_length)


def tiny_sd3_pipeline(seed=0, sample_size=8, with_t5=True):
    """A StableDiffusion3Pipeline with SD3's layout at toy size (random weights, seeded), its own flow-matching
    scheduler with SD3's shift (3.0).

    As SD3: an SD3Transformer2DModel (joint attention, 2 x 2 patches, 16 latent channels), two CLIP text encoders
    with projections (pooled 16 + 16 = the transformer's pooled_projection_dim 32; their penultimate hidden states
    concatenated, 32 wide, zero-padded to the T5 width 48) and a T5 encoder (d_model 48 = joint_attention_dim),
    or no T5 (with_t5=False: text_encoder_3 = None, as the pipeline allows; its tokens are then zeros). Both CLIP
    tokenizers are the real CLIP BPE rebuilt offline; the T5 tokenizer is offline_t5_tokenizer. For tests and
    smoke runs: no download.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from ..models.clip import offline_clip_tokenizer

    t5_dim = 48
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=t5_dim, caption_projection_dim=16, pooled_projection_dim=32,
        out_channels=16, pos_embed_max_size=sample_size)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=sample_size * 2, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)
    text = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, projection_dim=16)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(pad_token_id=49407, **text))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(pad_token_id=49407, **text))
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        tokenizer_3 = offline_t5_tokenizer()
        torch.manual_seed(seed + 4)
        text_encoder_3 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=t5_dim, d_kv=8, d_ff=32,
                                                 num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=offline_clip_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=offline_clip_tokenizer(), text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        if module is not None:
            module.eval()  # as from_pretrained leaves them: no dropout (T5's would draw from the global RNG)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed=0, sample_size=8, guidance_embeds=True):
    """A FluxPipeline with Flux's layout at toy size (random weights, seeded): Flux-dev's (guidance_embeds=True:
    guidance embedding, its dynamically shifted scheduler) or Flux-schnell's (False: no guidance embedding, shift 1,
    no dynamic shifting), the two schedulers as in the released scheduler configs.

    As Flux: a FluxTransformer2DModel (one double-stream and one single-stream block, rotary position ids over
    (0, row, column) with axes 2 + 2 + 4 = the head width 8) on packed 2 x 2 patches of 4-channel latents (16 per
    token), a VAE without quant convs with Flux's scaling and shift factors, a CLIP text encoder whose pooled output
    (16) is the pooled projection and a T5 encoder (d_model 32 = joint_attention_dim). The CLIP tokenizer is the real
    CLIP BPE rebuilt offline; the T5 tokenizer is offline_t5_tokenizer. default_sample_size is set to sample_size
    (native images of 2 * sample_size px; FluxPipeline's constructor sets 128). For tests and smoke runs: no download.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ..models.clip import offline_clip_tokenizer

    t5_dim, clip_dim = 32, 16
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=t5_dim, pooled_projection_dim=clip_dim, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=sample_size * 2, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=clip_dim, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    tokenizer_2 = offline_t5_tokenizer()
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=t5_dim, d_kv=8, d_ff=32,
                                             num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1))
    if guidance_embeds:  # black-forest-labs/FLUX.1-dev scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:  # black-forest-labs/FLUX.1-schnell scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=offline_clip_tokenizer(), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe.default_sample_size = sample_size
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()  # as from_pretrained leaves them: no dropout (T5's would draw from the global RNG)
    pipe.set_progress_bar_config(disable=True)
    return pipe
