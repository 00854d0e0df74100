"""The Flux family (FluxPipeline): Flux-dev (guidance-distilled) and Flux-schnell (timestep-distilled), rectified-flow
transformers with packed 2 x 2 latents, image and text position ids, a T5 context and a CLIP pooled embedding.

What the pipeline does, reproduced here so that every method sees the same conditions as diffusers' sampling:
- the context is T5's last hidden state (text_encoder_2, max_sequence_length 512, the pipeline's default), the
  pooled projection CLIP's pooled output (text_encoder), both by the pipeline's own encode_prompt; text ids are
  zeros (L, 3), image ids (row, column) of the packed grid (the pipeline's _prepare_latent_image_ids);
- the latents are (B, C, H, W) everywhere in the harness, as for every other family; FluxDenoiser packs them into
  (B, H/2 * W/2, 4C) tokens for each transformer call and unpacks the velocity (the pipeline's _pack_latents /
  _unpack_latents). Packing is a permutation of the entries, so every norm the methods take (the sharpness
  ||J_{v_delta} v_delta||, Wen's ||v_delta||, SAIL's) is the same in either space, and the Euler step, elementwise,
  is too: the harness takes them unpacked (tests/test_flux.py checks the equality);
- guidance: Flux-dev has no unconditional branch in its sampler. Its guidance scale is an input of the model (the
  guidance embedding, transformer.config.guidance_embeds) and the sampler steps with the conditional velocity
  alone (FluxPipeline with true_cfg_scale = 1, its default). Flux-schnell has no guidance embedding: the pipeline
  ignores its guidance_scale;
- "uncond" (the methods' second branch, v_delta = v_c - v_uncond): the empty prompt through the same encoders,
  evaluated by the same model with the same guidance value. It is not a classifier-free-guidance unconditional
  branch (the model was never sampled with it), so Flux's "uncond" differs from CFG models'; the family
  description (`uncond`, in every result and manifest header) says so (docs/flow.md);
- sampling: FlowMatchEulerDiscreteScheduler with the pipeline's sigmas (np.linspace(1, 1/N, N)) and its mu =
  calculate_shift(image tokens) when the scheduler config uses dynamic shifting (dev: yes; schnell: no, shift 1);
- decoding: unpacked latents / scaling_factor + shift_factor, the VAE and the pipeline's post-processing.
Not reproduced: true CFG with a negative prompt (true_cfg_scale > 1, off by default), IP-adapters, LoRA scales.

Dev and schnell are told apart by the transformer's config (guidance_embeds); the scheduler's differences (dynamic
shifting, shift) are read from its config by the denoiser. No paper publishes the methods' hyperparameters for
Flux; the family carries none that live in the model's output space (docs/flow.md).
"""
import dataclasses
import math
import os

import numpy as np
import torch

from ..cli import UserError
from .conditioning import Conditioning
from .families import BUILDERS, Family, register
from .flow import FlowDenoiser
from .loading import load_diffusers
from .sd3 import SD3

MAX_SEQUENCE_LENGTH = 512   # FluxPipeline's default T5 length
HARNESS_GUIDANCE = 7.5      # the harness's guidance scale (detection's trajectory, mitigation's default)
MIN_DEV_GUIDANCE = 1.0      # FluxPipeline: "embedded guidance scale is enabled by setting guidance_scale > 1"


def pack(x):
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens of 2 x 2 patches (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, h, w):
    """(B, H/2 * W/2, 4C) tokens -> (B, C, H, W) latents of latent size (h, w) (FluxPipeline._unpack_latents)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h, w, device, dtype):
    """(h/2 * w/2, 3) position ids of the packed grid of (h, w) latents: (0, row, column) per token, as
    FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_sigmas(num_inference_steps):
    """FluxPipeline's sigmas for N steps: np.linspace(1, 1/N, N) (shifted by the scheduler afterwards)."""
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


class FluxDenoiser(FlowDenoiser):
    """A FluxTransformer2DModel and its FlowMatchEulerDiscreteScheduler as a FlowDenoiser on (B, C, H, W) latents.

    guidance: the guidance-embedding value of every call (Flux-dev), None for a model without guidance embedding
    (Flux-schnell). The sampler's velocity is the conditional branch's (guided_step ignores the uncond rows): a
    guidance-distilled model is not combined with an unconditional branch. A trajectory with another guidance
    scale than the calls' (guided_step / sample with a different number, or a per-step schedule) is a ValueError
    on Flux-dev, since the model's calls already used this one; on schnell the number is ignored, as by the
    pipeline."""

    def __init__(self, unet, scheduler, *, guidance=None, **kwargs):
        if guidance is not None and not unet.config.guidance_embeds:
            raise ValueError("this Flux transformer has no guidance embedding (Flux-schnell): guidance must be None")
        if guidance is None and unet.config.guidance_embeds:
            raise ValueError("this Flux transformer has a guidance embedding (Flux-dev): give its guidance value")
        kwargs.setdefault("sigma_spacing", None if scheduler.config.get("use_flow_sigmas", False) else flux_sigmas)
        super().__init__(unet, scheduler, **kwargs)
        self.guidance = None if guidance is None else float(guidance)

    def call(self, model, x, t, kwargs):
        """One transformer call on x (N, C, H, W) with the conditioning keywords of N rows, as FluxPipeline's: packed
        tokens, timestep / 1000 in the latents' dtype, the guidance embedding's float32 value, zero text ids and the
        grid's image ids. Returns the velocity unpacked, (N, C, H, W)."""
        added = kwargs.pop("added_cond_kwargs", {})
        ctx = kwargs.pop("encoder_hidden_states")
        n, _, h, w = x.shape
        guidance = (None if self.guidance is None
                    else torch.full([1], self.guidance, device=x.device, dtype=torch.float32).expand(n))
        out = model(hidden_states=pack(x), timestep=t.expand(n).to(x.dtype) / 1000, guidance=guidance,
                    pooled_projections=added["pooled_projections"], encoder_hidden_states=ctx,
                    txt_ids=torch.zeros(ctx.shape[1], 3, device=x.device, dtype=ctx.dtype),
                    img_ids=image_ids(h, w, x.device, x.dtype), return_dict=False, **kwargs)[0]
        return unpack(out, h, w)

    def _check_guidance(self, guidance_scale):
        if self.guidance is None:
            return  # schnell: no guidance embedding; the pipeline ignores guidance_scale too
        if callable(guidance_scale) or torch.is_tensor(guidance_scale) or float(guidance_scale) != self.guidance:
            raise ValueError(f"Flux-dev's guidance is an input of every model call ({self.guidance:g} here); a "
                             "trajectory with another or a per-step/per-row guidance scale is not defined")

    def guided_step(self, out, t, x, guidance_scale):
        """One Euler step with the conditional branch's velocity of pair outputs out (2B, ...) (the uncond rows are
        the methods' ∅, not a guidance term)."""
        self._check_guidance(guidance_scale)
        return self._euler(out.chunk(2)[1], t, x)

    def _euler(self, v, t, x):
        i = self.index(t)
        dt = self.scheduler.sigmas[i + 1] - self.scheduler.sigmas[i]
        return (x.to(torch.float32) + dt * v).to(v.dtype)

    def sample(self, x, cond, num_inference_steps, guidance):
        """FluxPipeline's denoising loop (true_cfg_scale = 1): one conditional call of B rows per step and the Euler
        step, from unit-variance initial latents x (B, C, H, W). Returns the final latents (B, C, H, W); call it
        under torch.no_grad()."""
        self._check_guidance(guidance)
        for t in self.timesteps(num_inference_steps, device=x.device):
            x = self._euler(self.branch_output(x, t, cond, "cond"), t, x)
        return x


@dataclasses.dataclass(frozen=True)
class Flux(Family):
    """FluxPipeline profile (module docstring). guidance_embeds: whether the transformer takes a guidance value
    (dev: True, schnell: False); the folder's transformer config decides which profile a model is."""
    pipeline_class: str = "FluxPipeline"
    guidance_embeds: bool = True
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    uncond: str = ""  # what the methods' second branch is here (recorded in every result and manifest header)

    def matches(self, pipeline_class, prediction_type, unet_config=None):
        # a flow scheduler has no prediction_type; a folder's transformer config without the key is diffusers'
        # default (guidance_embeds=False)
        return (pipeline_class == self.pipeline_class
                and bool((unet_config or {}).get("guidance_embeds", False)) == self.guidance_embeds)

    def load(self, model_id, device, dtype):
        """The pipeline with its own flow-matching scheduler, progress bar off, on `device` (UserError if it cannot be
        loaded, lacks T5, has another scheduler, or its transformer is the other profile's)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
        if model_id in BUILDERS:
            pipe = BUILDERS[model_id][1]().to(device, dtype)
        else:
            if os.path.isdir(model_id) and not all(os.path.isdir(os.path.join(model_id, d))
                                                   for d in ("text_encoder_2", "tokenizer_2")):
                raise self._no_t5(model_id)
            pipe = load_diffusers(FluxPipeline, model_id,
                                  dict(dtype=dtype, image_encoder=None, feature_extractor=None))  # IP-adapter parts
        if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "tokenizer_2", None) is None:
            raise self._no_t5(model_id)
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            raise UserError(f"model {model_id} has a {type(pipe.scheduler).__name__}; the {self.name} family samples "
                            "with its FlowMatchEulerDiscreteScheduler")
        if bool(pipe.transformer.config.guidance_embeds) != self.guidance_embeds:
            raise UserError(f"model {model_id}'s transformer has guidance_embeds={pipe.transformer.config.guidance_embeds}"
                            f"; the {self.name} profile is for guidance_embeds={self.guidance_embeds}")
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def _no_t5(self, model_id):
        return UserError(f"model {model_id} has no T5 text encoder (text_encoder_2, tokenizer_2); the {self.name} "
                         "profile needs it: FluxPipeline's context is T5's")

    def backbone(self, pipe):
        return pipe.transformer

    def native_size(self, pipe):
        side = pipe.default_sample_size * pipe.vae_scale_factor
        return (side, side)

    def tokenizers(self, pipe):
        """The CLIP tokenizer (its 77-token window truncates the prompt for the pooled embedding; T5 reads up to
        max_sequence_length tokens)."""
        return [pipe.tokenizer]

    def image_seq_len(self, pipe, size=None):
        """The transformer's image tokens at (height, width) px (None: native): packed 2 x 2 latent patches."""
        h, w = size or self.native_size(pipe)
        f = pipe.vae_scale_factor * 2
        return (h // f) * (w // f)

    def guidance_options(self, guidance_scale, given):
        """The denoiser keyword of a run's guidance scale (`given`: set by the user rather than the harness's
        default). UserError for a guidance the model cannot use: any given value on a model without a guidance
        embedding (schnell), a value below MIN_DEV_GUIDANCE or not finite on dev (docs/flow.md)."""
        if not self.guidance_embeds:
            if given:
                raise UserError(f"--guidance_scale {guidance_scale:g}: the {self.name} model has no guidance embedding "
                                "(guidance_embeds=False, timestep-distilled); it samples with its conditional velocity "
                                "alone and cannot use a guidance scale (docs/flow.md)")
            return {"guidance": None}
        if not (math.isfinite(guidance_scale) and guidance_scale >= MIN_DEV_GUIDANCE):
            raise UserError(f"--guidance_scale {guidance_scale:g}: {self.name}'s guidance is the value of its guidance "
                            f"embedding, distilled for scales >= {MIN_DEV_GUIDANCE:g} (docs/flow.md)")
        return {"guidance": guidance_scale}

    def denoiser(self, pipe, scheduler=None, size=None, guidance=HARNESS_GUIDANCE, **kwargs):
        """A FluxDenoiser on the pipeline's transformer and scheduler for images of `size` (h, w) px (None: native).
        guidance: the guidance-embedding value (dev; default the harness's 7.5), ignored on schnell; kwargs:
        flow_space and the Denoiser's."""
        return FluxDenoiser(pipe.transformer, scheduler or pipe.scheduler,
                            guidance=guidance if self.guidance_embeds else None,
                            image_seq_len=self.image_seq_len(pipe, size), **kwargs)

    @torch.no_grad()
    def embed(self, pipe, prompts, device=None):
        """(context (K, L, D), pooled (K, P)) of K prompts, by the pipeline's encode_prompt (T5, CLIP pooled)."""
        out = pipe.encode_prompt(prompts, None, device=device or pipe.device, num_images_per_prompt=1,
                                 max_sequence_length=self.max_sequence_length)
        return out[0], out[1]

    def encode(self, pipe, prompts, device=None, size=None):
        cond, pooled = self.embed(pipe, prompts, device)
        uncond, upooled = self.embed(pipe, [""], device)
        return Conditioning.of(cond, uncond, added={"pooled_projections": (upooled, pooled)})

    def initial_latents(self, pipe, n, seed, height=None, width=None, dtype=None, device=None):
        """Initial noise exactly as the pipeline draws it with no generator, after torch.manual_seed(seed), left
        unpacked: (n, C, H/f, W/f) with C = the transformer's in_channels / 4."""
        height, width = height or self.native_size(pipe)[0], width or self.native_size(pipe)[1]
        torch.manual_seed(seed)
        tr = pipe.transformer
        packed, _ = pipe.prepare_latents(n, tr.config.in_channels // 4, height, width, dtype or tr.dtype,
                                         device or tr.device, None)
        f = pipe.vae_scale_factor * 2
        return unpack(packed, 2 * (height // f), 2 * (width // f))

    @torch.no_grad()
    def decode(self, pipe, latents):
        """PIL images of final latents (B, C, h, w), as the pipeline's output_type='pil' path."""
        vae = pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")


# Refused as on SD3 (joint attention; first-step eps), and the methods that need a true unconditional branch of the
# sampler: Flux's guidance is an embedded input, there is no v_uncond + w (v_c - v_uncond) to delay or start late.
_NO_CFG = ("it changes the classifier-free-guidance combination of the sampler; Flux is guidance-distilled and "
           "samples with its conditional velocity alone (the guidance is an input of the model), so there is no "
           "unconditional branch to sample with (docs/flow.md)")
_REFUSES = {**SD3.refuses, "cfg_delay": _NO_CFG, "han_batch": _NO_CFG, "han_sample": _NO_CFG}
_UNCOND = ("empty prompt, same model and guidance value (Flux is guidance-distilled: not a CFG unconditional "
           "branch; docs/flow.md)")
FLUX_DEV = register(Flux(
    name="flux", title="Flux-dev (rectified flow, guidance-distilled, T5 + CLIP pooled)", prediction_type="flow",
    hparams=dict(eval_keywords=(), paper_usable=None), refuses=_REFUSES, uncond=_UNCOND))
FLUX_SCHNELL = register(Flux(
    name="flux_schnell", title="Flux-schnell (rectified flow, timestep-distilled, no guidance embedding)",
    prediction_type="flow", guidance_embeds=False, hparams=dict(eval_keywords=(), paper_usable=None),
    refuses=_REFUSES, uncond=_UNCOND))
