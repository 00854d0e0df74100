"""The SDXL family (StableDiffusionXLPipeline): two CLIP text encoders, pooled text embeddings and time ids as
added conditions, 1024 px (128 x 128 latents).

What the pipeline does, reproduced here so that every method sees the same conditions as diffusers' sampling:
- the context is both encoders' penultimate hidden states, concatenated (77, 768 + 1280); the pooled embedding
  (1280) is the second encoder's projected one;
- the added time ids are (original size, crop top-left, target size) = (h, w, 0, 0, h, w) on both branches;
- the unconditional branch: with `force_zeros_for_empty_prompt` in the pipeline's config (SDXL base sets it)
  zero context and zero pooled embedding, otherwise the empty prompt's; this is not SD v1/v2's empty-prompt branch;
- decoding: a float16 VAE whose config says `force_upcast` decodes in float32 (it overflows in float16), and
  latents are de-normalized with the VAE's latents_mean/std when its config has them.
Not reproduced: the invisible watermark (the harness's images are measurements) and the pipeline's default
Euler scheduler (every family samples with DDIM from its own scheduler config, as the papers do).

Hyperparameters without a published SDXL value are chosen by the rules in this module (docs/models.md).
"""
import dataclasses
import math
import os

import torch

from ..cli import UserError
from .attention import cross_attention_layers
from .conditioning import Conditioning
from .families import SD1, BUILDERS, StableDiffusion, register, with_ddim
from .loading import load_diffusers

SD14_LATENT = (4, 64, 64)     # SD v1.4's latent (C, H, W) at 512 px: the reference size of the published values
SDXL_LATENT = (4, 128, 128)   # SDXL base's latent at 1024 px


def norm_scale(latent, reference=SD14_LATENT):
    """Rule for a threshold on a norm over all latent entries: sqrt(entries / reference entries). A norm of a
    difference whose entries have the same spread as on SD v1.4 grows with the square root of their number."""
    return math.sqrt(math.prod(latent) / math.prod(reference))


def ren_layer_rule(pipe):
    """Rule for Ren et al.'s LE layer: the last cross-attention layer of the second down block that has
    cross-attention. On SD v1.4's layout this is their forward index 3 (down_blocks.1.attentions.1); on SDXL's it is
    the last transformer block of down_blocks.2.attentions.1, at the same 32 x 32 grid. ValueError if the UNet has
    fewer than two such blocks. Returns the forward index."""
    layers = cross_attention_layers(pipe.unet)
    blocks = sorted({int(l.path.split(".")[1]) for l in layers if l.path.startswith("down_blocks.")})
    if len(blocks) < 2:
        raise ValueError("the UNet has fewer than two down blocks with cross-attention, so Ren et al.'s layer is not "
                         "defined for it; choose one with --le_layer")
    prefix = f"down_blocks.{blocks[1]}."
    return [l.index for l in layers if l.path.startswith(prefix)][-1]


@dataclasses.dataclass(frozen=True)
class StableDiffusionXL(StableDiffusion):
    """StableDiffusionXLPipeline profile (see the module docstring)."""
    pipeline_class: str = "StableDiffusionXLPipeline"

    def matches(self, pipeline_class, prediction_type, unet_config=None):
        return pipeline_class == self.pipeline_class and prediction_type == self.prediction_type

    def load(self, model_id, device, dtype):
        """The pipeline with a DDIM scheduler from its own config and no watermarker (UserError if it cannot be
        loaded, lacks its second text encoder, or has an unsupported prediction type)."""
        from diffusers import StableDiffusionXLPipeline
        if model_id in BUILDERS:
            pipe = BUILDERS[model_id][1]().to(device, dtype)
        else:
            if os.path.isdir(model_id):
                missing = [d for d in ("text_encoder_2", "tokenizer_2") if not os.path.isdir(os.path.join(model_id, d))]
                if missing:
                    raise UserError(f"SDXL folder {model_id} has no {' or '.join(m + '/' for m in missing)}; SDXL "
                                    "needs both text encoders and tokenizers")
            pipe = load_diffusers(StableDiffusionXLPipeline, model_id, dict(dtype=dtype, add_watermarker=False))
        if pipe.text_encoder_2 is None or pipe.tokenizer_2 is None:
            raise UserError(f"SDXL model {model_id} has no second text encoder or tokenizer; SDXL needs both")
        return with_ddim(pipe, model_id, device)

    def native_size(self, pipe):
        side = pipe.default_sample_size * pipe.vae_scale_factor
        return (side, side)

    def tokenizers(self, pipe):
        return [pipe.tokenizer, pipe.tokenizer_2]

    @torch.no_grad()
    def embed(self, pipe, prompts, device=None):
        """(context (K, 77, D1 + D2), pooled (K, P)) of K prompts, by the pipeline's encode_prompt."""
        out = pipe.encode_prompt(prompts, device=device or pipe.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
        return out[0], out[2]

    @torch.no_grad()
    def unconditional(self, pipe, like, pooled, device=None):
        """The unconditional branch's (context (1, L, D), pooled (1, P)) as the pipeline builds it with no
        negative prompt: zeros when its config forces them, else the empty prompt's embeddings."""
        if pipe.config.force_zeros_for_empty_prompt:
            return torch.zeros_like(like[:1]), torch.zeros_like(pooled[:1])
        return self.embed(pipe, [""], device)

    def time_ids(self, pipe, size, dtype):
        """(1, 6) added time ids (original size, crop (0, 0), target size), as the pipeline's defaults."""
        size = tuple(size or self.native_size(pipe))
        proj = pipe.text_encoder_2.config.projection_dim
        return pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=proj)

    def encode(self, pipe, prompts, device=None, size=None):
        device = device or pipe.device
        cond, pooled = self.embed(pipe, prompts, device)
        uncond, upooled = self.unconditional(pipe, cond, pooled, device)
        ids = self.time_ids(pipe, size, cond.dtype).to(device)
        return Conditioning.of(cond, uncond, added={"text_embeds": (upooled, pooled),
                                                    "time_ids": (ids, ids.expand(cond.shape[0], -1))})

    @torch.no_grad()
    def decode(self, pipe, latents):
        """PIL images of final latents (B, C, h, w) as the pipeline's output_type='pil' path (float32 decoding of a
        float16 VAE with force_upcast; de-normalized with latents_mean/std when the VAE has them)."""
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(torch.float32)
        try:
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                shape = (1, latents.shape[1], 1, 1)
                mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)
        return pipe.image_processor.postprocess(image, output_type="pil")


# SDXL base: nobody publishes these methods' values for it. Rules (docs/models.md), none of them the authors':
# - thresholds on norms over the latent (SAIL's l_thres, Wen's l_target) are SD v1.4's times norm_scale, i.e. x2
#   at 128 x 128 latents; SAIL's alpha is SD v1.4's (epsilon-prediction; alpha*||x_T|| scales like the threshold);
# - anisotropy: its norm term is a latent norm, its cosine term is scale-free: SD v1.4's weights with the norm
#   weight divided by norm_scale;
# - attention layers: Ren's LE layer by ren_layer_rule; Chen's BE mask layers are the first down block that has
#   cross-attention (down_blocks.1, 64 x 64, as SD v1.4's down_blocks.0), the detector's own rule.
_K = norm_scale(SDXL_LATENT)
_SD14 = SD1.hparams
SDXL = register(StableDiffusionXL(
    name="sdxl", title="Stable Diffusion XL (epsilon, 1024 px, two text encoders)", prediction_type="epsilon",
    hparams=dict(
        le_layer=ren_layer_rule,
        aniso_weights=(_SD14["aniso_weights"][0] / _K, _SD14["aniso_weights"][1]),
        sail_alpha=_SD14["sail_alpha"],
        sail_thres=round(_SD14["sail_thres"] * _K, 6),
        wen_target_loss=round(_SD14["wen_target_loss"] * _K, 6),
        grids={m: [{k: round(v * _K, 6) for k, v in g.items()} for g in grid]
               for m, grid in _SD14["grids"].items()},
        eval_keywords=(), paper_usable=None),
    by_rule=("le_layer", "aniso_weights", "sail_alpha", "sail_thres", "wen_target_loss", "grids")))
