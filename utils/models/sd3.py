"""The SD3/SD3.5 family (StableDiffusion3Pipeline): a rectified-flow MMDiT transformer, three text encoders (T5
optional), pooled text embeddings, true classifier-free guidance.

What the pipeline does, reproduced here so that every method sees the same conditions as diffusers' sampling:
- the context is the two CLIP encoders' penultimate hidden states concatenated, zero-padded to T5's width, then
  T5's tokens appended along the sequence (max_sequence_length 256, the pipeline's default); with no T5
  (text_encoder_3 = None, which the pipeline allows) its tokens are zeros; the pooled projection is both CLIP
  encoders' projected pooled outputs concatenated. All of it by the pipeline's own encode_prompt;
- the unconditional branch is the empty prompt through the same encoders (the pipeline's negative prompt default);
- sampling: the pipeline's FlowMatchEulerDiscreteScheduler with its own shift (and dynamic shifting when its
  config says so), Euler steps on the guided velocity (utils.models.flow.FlowDenoiser);
- decoding: latents / scaling_factor + shift_factor, then the VAE and the pipeline's post-processing.
Not reproduced: skip-layer guidance (off by default in the pipeline) and IP-adapters.

No paper publishes the methods' hyperparameters for flow models; the family carries none that live in the model's
output space (docs/flow.md).
"""
import dataclasses
import os

import torch

from ..cli import UserError
from .conditioning import Conditioning
from .families import BUILDERS, Family, register
from .flow import FlowDenoiser
from .loading import load_diffusers

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 length


@dataclasses.dataclass(frozen=True)
class StableDiffusion3(Family):
    """StableDiffusion3Pipeline profile (see the module docstring). requires_t5: refuse a model without T5."""
    pipeline_class: str = "StableDiffusion3Pipeline"
    requires_t5: bool = False
    max_sequence_length: int = MAX_SEQUENCE_LENGTH

    def matches(self, pipeline_class, prediction_type, unet_config=None):
        return pipeline_class == self.pipeline_class  # a flow scheduler has no prediction_type in its config

    def load(self, model_id, device, dtype):
        """The pipeline with its own flow-matching scheduler, progress bar off, on `device` (UserError if it cannot be
        loaded, has another scheduler, or lacks T5 where the profile requires it)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
        if model_id in BUILDERS:
            pipe = BUILDERS[model_id][1]().to(device, dtype)
        else:
            optional = dict(image_encoder=None, feature_extractor=None)  # IP-adapter parts: not used
            if os.path.isdir(model_id) and not all(os.path.isdir(os.path.join(model_id, d))
                                                   for d in ("text_encoder_3", "tokenizer_3")):
                optional.update(text_encoder_3=None, tokenizer_3=None)  # saved without T5 (diffusers wants it said)
            pipe = load_diffusers(StableDiffusion3Pipeline, model_id, dict(dtype=dtype, **optional))
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            raise UserError(f"model {model_id} has a {type(pipe.scheduler).__name__}; the {self.name} family samples "
                            "with its FlowMatchEulerDiscreteScheduler")
        if self.requires_t5 and pipe.text_encoder_3 is None:
            raise UserError(f"model {model_id} has no T5 text encoder (text_encoder_3); the {self.name} profile needs it")
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def backbone(self, pipe):
        return pipe.transformer

    def native_size(self, pipe):
        side = pipe.default_sample_size * pipe.vae_scale_factor
        return (side, side)

    def tokenizers(self, pipe):
        """The CLIP tokenizers (their 77-token window truncates the prompt for the pooled embedding; T5 reads up to
        max_sequence_length tokens)."""
        return [pipe.tokenizer, pipe.tokenizer_2]

    def image_seq_len(self, pipe, size=None):
        """The transformer's image tokens at (height, width) px (None: native): latent side / patch size, squared."""
        h, w = size or self.native_size(pipe)
        f, p = pipe.vae_scale_factor, pipe.transformer.config.patch_size
        return (h // f // p) * (w // f // p)

    def denoiser(self, pipe, size=None, **kwargs):
        """A FlowDenoiser on the pipeline's transformer and scheduler for images of `size` (h, w) px (None: native);
        kwargs: flow_space and the Denoiser's."""
        return FlowDenoiser(pipe.transformer, pipe.scheduler, image_seq_len=self.image_seq_len(pipe, size), **kwargs)

    @torch.no_grad()
    def embed(self, pipe, prompts, device=None):
        """(context (K, L, D), pooled (K, P)) of K prompts, by the pipeline's encode_prompt."""
        out = pipe.encode_prompt(prompts, None, None, device=device or pipe.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return out[0], out[2]

    def encode(self, pipe, prompts, device=None, size=None):
        cond, pooled = self.embed(pipe, prompts, device)
        uncond, upooled = self.embed(pipe, [""], device)
        return Conditioning.of(cond, uncond, added={"pooled_projections": (upooled, pooled)})

    def initial_latents(self, pipe, n, seed, height=None, width=None, dtype=None, device=None):
        """Initial noise exactly as the pipeline draws it with no generator, after torch.manual_seed(seed):
        (n, C, H/f, W/f) (flow models start from unit-variance noise at sigma = 1)."""
        height, width = height or self.native_size(pipe)[0], width or self.native_size(pipe)[1]
        torch.manual_seed(seed)
        tr = pipe.transformer
        return pipe.prepare_latents(n, tr.config.in_channels, height, width, dtype or tr.dtype, device or tr.device,
                                    None)

    @torch.no_grad()
    def decode(self, pipe, latents):
        """PIL images of final latents (B, C, h, w), as the pipeline's output_type='pil' path."""
        vae = pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")


# The attention methods read or edit a cross-attention map whose keys are the prompt's tokens; MMDiT has none: text and
# image tokens attend jointly, and the text stream is itself updated by every block (docs/flow.md).
_JOINT = ("MMDiT has joint text-image attention, no cross-attention layer; the attention detectors and Ren et al.'s "
          "mitigation are not carried over (docs/flow.md)")
SD3 = register(StableDiffusion3(
    name="sd3", title="Stable Diffusion 3 / 3.5 (rectified flow, MMDiT, T5 optional)", prediction_type="flow",
    hparams=dict(eval_keywords=(), paper_usable=None),
    refuses={m: _JOINT for m in ("le", "ae", "be", "ren")}))
