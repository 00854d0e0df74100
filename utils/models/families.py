"""Model families as profiles: what the harness needs to know about a kind of model, in one object.

A profile knows how to load its pipeline, encode prompts into a Conditioning, draw the initial noise, decode
latents, which attention layers the attention instruments use, and the papers' per-family hyperparameters
(`hparams`, each with its source). Adding a family is one file that defines a Family subclass and calls
register(); the family of a model is read from its folder's model_index.json (the diffusers pipeline class) and
its scheduler's prediction type, so `--model_id` needs no extra flag.

Registered here: Stable Diffusion 1.x (epsilon), 2.x (v-prediction) and 2.x base (epsilon, OpenCLIP-H context),
all StableDiffusionPipeline. Other families register themselves from their own modules (SDXL: utils.models.sdxl;
the bundled demo: utils.demo).
"""
import dataclasses
import os

import torch

from ..cli import UserError
from .conditioning import Conditioning
from .denoisers import PREDICTIONS, denoiser
from .loading import load_diffusers, read_model_index

FAMILIES = {}   # name -> Family
BUILDERS = {}   # model ids built in code (e.g. 'tiny') -> (family name, builder(prediction_type=...) -> pipeline)


def register(family):
    """Add a family profile to the registry (its name must be new)."""
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


def register_builder(model_id, family_name, build):
    """A model built in code instead of loaded (tests and smoke runs), reachable as --model_id MODEL_ID."""
    BUILDERS[model_id] = (family_name, build)


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family's profile. Subclasses implement load/encode; hparams holds the papers' values for it."""
    name: str                       # short name, used in result files and output folders
    title: str                      # what a person calls it
    prediction_type: str            # the scheduler prediction the family's published defaults are for
    pipeline_class: str = ""        # the diffusers pipeline class in model_index.json
    hparams: dict = dataclasses.field(default_factory=dict)  # per-family hyperparameters, with their sources
    paths: tuple = ()               # local folders that are this family whatever their config says
    by_rule: tuple = ()             # hparams keys whose values come from a documented rule, not from the authors
    refuses: dict = dataclasses.field(default_factory=dict)  # detector/method name -> why it is not defined here

    def refusal(self, names):
        """UserError naming the family for the first of `names` (detectors or methods) it does not define."""
        for name in names:
            if name in self.refuses:
                raise UserError(f"{name} is not defined for the {self.name} family ({self.title}): "
                                f"{self.refuses[name]}")

    def matches(self, pipeline_class, prediction_type, unet_config=None):
        """Whether a model with this pipeline class, prediction type and UNet config (a dict) is this family."""
        return pipeline_class == self.pipeline_class and prediction_type == self.prediction_type

    def hparam(self, key, default=None, pipe=None):
        """A hyperparameter of the family. A value that depends on the model's structure is a rule, a function of
        the pipeline, evaluated on `pipe` (ValueError without one)."""
        value = self.hparams.get(key, default)
        if callable(value):
            if pipe is None:
                raise ValueError(f"the {self.name} family's {key} is a rule on the model; it needs the pipeline")
            value = value(pipe)
        return value

    def native_size(self, pipe):
        """The (height, width) in pixels the model generates by default (its UNet's sample size times the VAE's
        downsampling factor)."""
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return (side, side)

    # ---- what a subclass provides

    def load(self, model_id, device, dtype):
        raise NotImplementedError

    def encode(self, pipe, prompts, device=None, size=None):
        """Conditioning of K prompts (K rows; the unconditional branch's rows as the pipeline builds them) for images
        of size (height, width) (None: native; only families whose conditions depend on it read it)."""
        raise NotImplementedError

    def denoiser(self, pipe, scheduler=None, size=None, **kwargs):
        """The pipeline's denoiser as a utils.models.denoisers.Denoiser (subclass by prediction type), sampling with
        the pipeline's scheduler (DDIM) or the given one (utils.models.samplers.build_scheduler), for images of
        `size` (h, w) px (None: native; only families whose schedule depends on it read it)."""
        return denoiser(pipe.unet, scheduler or pipe.scheduler, **kwargs)

    def backbone(self, pipe):
        """The network the denoiser calls (the UNet; a transformer for flow families)."""
        return pipe.unet

    def tokenizer(self, pipe):
        return pipe.tokenizer

    def tokenizers(self, pipe):
        """Every tokenizer the prompts go through (their limits are checked)."""
        return [self.tokenizer(pipe)]

    def initial_latents(self, pipe, n, seed, height=None, width=None, dtype=None, device=None):
        raise NotImplementedError

    def decode(self, pipe, latents):
        raise NotImplementedError

    def guidance_options(self, guidance_scale, given):
        """The denoiser keywords a run's guidance scale adds (`given`: set by the user, not the harness's default):
        none for families whose guidance is a combination of the sampler's branches; a family whose guidance is an
        input of the model (Flux) returns it, or a UserError for a value the model cannot use."""
        return {}


@dataclasses.dataclass(frozen=True)
class StableDiffusion(Family):
    """StableDiffusionPipeline: one CLIP text encoder, a UNet2DConditionModel, DDIM from the pipeline's own config.
    The unconditional branch is the empty prompt's embedding, as the pipeline's. context_dims: the UNet's
    cross_attention_dim values that are this family (empty: any not claimed by a sibling; SD 2.x's OpenCLIP-H
    text encoder gives 1024, SD 1.x's CLIP-L 768)."""
    pipeline_class: str = "StableDiffusionPipeline"
    context_dims: tuple = ()
    not_context_dims: tuple = ()

    def matches(self, pipeline_class, prediction_type, unet_config=None):
        dim = (unet_config or {}).get("cross_attention_dim")
        return (super().matches(pipeline_class, prediction_type)
                and (not self.context_dims or dim in self.context_dims) and dim not in self.not_context_dims)

    def load(self, model_id, device, dtype):
        """The pipeline (safety checker off) with a DDIM scheduler built from its own config (UserError if it
        cannot be loaded or its prediction type is not supported)."""
        from diffusers import StableDiffusionPipeline
        if model_id in BUILDERS:
            pipe = BUILDERS[model_id][1]().to(device, dtype)
        else:
            pipe = load_diffusers(StableDiffusionPipeline, model_id,
                                  dict(dtype=dtype, safety_checker=None, requires_safety_checker=False))
        return with_ddim(pipe, model_id, device)

    @torch.no_grad()
    def embed(self, pipe, prompts, device=None):
        """Text embeddings (K, L, D) of a prompt or list of K prompts, without classifier-free doubling."""
        return pipe.encode_prompt(prompts, device or pipe.device, 1, False)[0]

    def encode(self, pipe, prompts, device=None, size=None):
        cond = self.embed(pipe, prompts, device)
        return Conditioning.of(cond, self.embed(pipe, "", device))

    def initial_latents(self, pipe, n, seed, height=None, width=None, dtype=None, device=None):
        """Initial noise exactly as the pipeline draws it with no generator, after torch.manual_seed(seed).

        Returns (n, C, H/f, W/f) latents scaled by the scheduler's init_noise_sigma."""
        height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
        width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
        torch.manual_seed(seed)
        return pipe.prepare_latents(n, pipe.unet.config.in_channels, height, width,
                                    dtype or pipe.unet.dtype, device or pipe.unet.device, None)

    @torch.no_grad()
    def decode(self, pipe, latents):
        """PIL images of final latents (B, C, h, w), exactly as the pipeline's output_type='pil' path (VAE decode of
        latents / scaling_factor, then the pipeline's image post-processing)."""
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])


def with_ddim(pipe, model_id, device):
    """A loaded pipeline made ready for the harness: DDIM built from its own scheduler config, progress bar off, on
    `device` (UserError for a prediction type no denoiser supports)."""
    from diffusers import DDIMScheduler
    pred = pipe.scheduler.config.prediction_type
    if pred not in PREDICTIONS:
        raise UserError(f"model {model_id} has prediction_type {pred!r}; only {' and '.join(PREDICTIONS)} "
                        "are supported")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# Hyperparameters shared by the SD families; each family below overrides what its papers publish for it.
_SD_COMMON = {
    "le_layer": 3,                 # Ren et al.'s layer: forward index 3 = down_blocks.1.attentions.1 (SD v1.4)
    "sail_thres": 8.2,             # SAIL's l_thres in the sharpness paper's code (its default for every SD run)
    "wen_target_loss": 3.0,        # Wen et al.'s README and code default l_target
}
_SD1_VALUES = dict(_SD_COMMON,
                   aniso_weights=(1.0, 2.0),   # Asthana & Belagiannis's evaluation script, SD v1.4
                   sail_alpha=0.05,            # the sharpness paper's code, SD v1.4
                   grids={"sail": [{"thres": v} for v in (7.6, 7.8, 8.2, 8.6, 9.0)],        # paper, App. D
                          "wen": [{"target_loss": v} for v in (1.0, 2.0, 3.0, 4.0, 5.0)]},  # paper, App. D
                   eval_keywords=(),           # SSCD against the prompt's own training image
                   paper_usable=("sd1_mem.jsonl", 454, 500))  # records with a training image in the paper

SD1 = register(StableDiffusion(
    name="sd1", title="Stable Diffusion 1.x (epsilon, 512 px)", prediction_type="epsilon",
    not_context_dims=(1024,), hparams=_SD1_VALUES))
SD2 = register(StableDiffusion(
    name="sd2", title="Stable Diffusion 2.x (v-prediction, 768 px)", prediction_type="v_prediction",
    hparams=dict(_SD_COMMON,
                 aniso_weights=(1.0, 0.1),   # Asthana & Belagiannis's evaluation script, SD v2.0
                 sail_alpha=0.01,            # the sharpness paper's code, SD v2.0
                 grids={"sail": [{"thres": v} for v in (4.0, 4.5, 5.0, 5.5, 6.0)],            # paper, App. D
                        "wen": [{"target_loss": v} for v in (1.0, 1.25, 1.5, 1.75, 2.0)]},    # paper, App. D
                 eval_keywords=("paper",),   # the reference's keyword rule for template-like prompts
                 paper_usable=("sd2_mem.jsonl", 202, 219))))
# SD 2.0/2.1 base: no paper publishes values for it. Rule: it has SD v1.4's prediction (epsilon), latent size
# (64 x 64) and UNet layout, so every value that lives in the model's output space or depends on the layout is
# SD v1.4's (the text encoder differs; no hyperparameter here depends on it). Not the authors' numbers.
SD2_BASE = register(StableDiffusion(
    name="sd2base", title="Stable Diffusion 2.x base (epsilon, 512 px)", prediction_type="epsilon",
    context_dims=(1024,), hparams=dict(_SD1_VALUES, paper_usable=None),
    by_rule=("le_layer", "aniso_weights", "sail_alpha", "sail_thres", "wen_target_loss", "grids")))


def family_names():
    return ", ".join(f"{f.name} ({f.pipeline_class}, {f.prediction_type})" for f in FAMILIES.values())


def _for_path(model_id):
    if not os.path.isdir(model_id):
        return None
    for f in FAMILIES.values():
        if any(os.path.isdir(p) and os.path.samefile(model_id, p) for p in f.paths):
            return f
    return None


def family_of(model_id, pipeline_class=None, prediction_type=None, unet_config=None):
    """The family of a model id: a registered builder or folder, else the pipeline class, prediction type and UNet
    config (read from the folder's configs when not given). UserError for a class no family has; None when nothing
    can be read yet (a Hub id not in the cache: the load decides)."""
    if model_id in BUILDERS:
        return FAMILIES[BUILDERS[model_id][0]]
    fam = _for_path(model_id)
    if fam is not None:
        return fam
    if pipeline_class is None:
        index = read_model_index(model_id)
        if index is None:
            return None
        pipeline_class, prediction_type, unet_config = index
    known = [f for f in FAMILIES.values() if f.pipeline_class == pipeline_class and not f.paths]
    if not known:
        raise UserError(f"{model_id} is a {pipeline_class}; supported families: {family_names()}")
    fam = next((f for f in known if f.matches(pipeline_class, prediction_type, unet_config)), None)
    if fam is None:
        preds = " and ".join(sorted({f.prediction_type for f in known}))
        raise UserError(f"model {model_id} has prediction_type {prediction_type!r}; only {preds} are supported for "
                        f"{pipeline_class}")
    return fam


def load(model_id, device, dtype):
    """(family, pipeline) of a model id: the family from its config, then that family's loader. A model whose
    config cannot be read before loading (a Hub id not cached yet) loads as a StableDiffusionPipeline, and its
    family is then taken from the loaded pipeline."""
    fam = family_of(model_id)
    pipe = (fam or SD1).load(model_id, device, dtype)
    if fam is None:
        fam = family_of(model_id, type(pipe).__name__, pipe.scheduler.config.prediction_type, dict(pipe.unet.config))
    return fam, pipe


def describe(family):
    """A JSON-safe description of a family for result files."""
    out = dict(name=family.name, title=family.title, pipeline_class=family.pipeline_class,
               prediction_type=family.prediction_type)
    if family.by_rule:  # the values that are the project's rule, not the authors' (docs/models.md)
        out["by_rule"] = list(family.by_rule)
    if getattr(family, "uncond", ""):  # the methods' second branch where it is not a CFG unconditional one (Flux)
        out["uncond"] = family.uncond
    return out


def load_pipeline(model_id, device, dtype):
    """The pipeline of a model id, loaded by its family (see load)."""
    return load(model_id, device, dtype)[1]
