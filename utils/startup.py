"""The start-up the scripts share: the model flags, this process's device and shard, and the model as a loaded
family profile (encode, noise, decode, denoiser). The one module above both utils.models and utils.demo: importing
it registers the bundled demo family, the 'tiny' model and the demo CLIP.
"""
import dataclasses

from . import demo  # noqa: F401  (registers the demo family, the tiny models and the demo CLIP)
from . import distributed as D
from .cli import UserError, bounded_int, device_name, warn
from .models import families as F
from .models import sdxl  # noqa: F401  (registers the SDXL family)
from .models import sd3  # noqa: F401  (registers the SD3 family)
from .models import flux  # noqa: F401  (registers the Flux-dev and Flux-schnell families)
from .models.flow import FLOW_SPACES
from .models.jvp_memory import transformer_kind
from .models.samplers import DEFAULT_SAMPLER, build_scheduler
from .models.loading import DTYPES, SD_MODELS, model_label, resolve_device, resolve_dtype, resolve_model_id
from .prompts import truncated_prompts


def add_model_arguments(p, dtype_default=None, dtype_help="default bfloat16 on CUDA (as the reference), float32 on CPU"):
    """The model, device and precision options every script shares (values checked when resolved)."""
    p.add_argument("--sd_ver", default="1", choices=list(SD_MODELS),
                   help="1 (SD v1.4), 1.5, 2 (SD v2.0), 2.1, xl (SDXL base 1.0), demo (bundled tiny model) or demo_flow "
                        "(its rectified-flow twin, SD3-shaped)")
    p.add_argument("--model_id", default=None,
                   help="Hub id, local folder, 'demo', 'demo_flow', or a random CPU model ('tiny', 'tiny-xl', 'tiny-sd3', "
                        "'tiny-flux', 'tiny-flux-schnell'); "
                        "overrides --sd_ver; its family is read from its model_index.json")
    p.add_argument("--height", type=bounded_int(8, 16384), default=None,
                   help="image height in pixels (default: the model's native size); a multiple of the VAE factor")
    p.add_argument("--width", type=bounded_int(8, 16384), default=None, help="image width in pixels (as --height)")
    p.add_argument("--dtype", default=dtype_default, choices=list(DTYPES), help=dtype_help)
    p.add_argument("--device", default=None, type=device_name, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--prompt_mirror", default=None, help="folder with verified benchmark prompt files (offline)")


def start_process(device, arguments):
    """(shard, device) of this process: the device by name (default: CUDA if available); under a launcher, the
    process joins the group and every process must have the same `arguments` (JSON-able)."""
    return D.join(resolve_device(device), arguments)


@dataclasses.dataclass
class Model:
    """A loaded model: its family profile, pipeline, id, folder label, device, dtype and image size (h, w) px."""
    family: object
    pipe: object
    model_id: str
    label: str
    device: object
    dtype: object
    size: tuple = None

    def encode(self, prompts):
        """Conditioning of a list of K prompts (K rows, both branches)."""
        return self.family.encode(self.pipe, prompts, self.device, self.size)

    def noise(self, n, seed):
        """The pipeline's seeded initial noise (n, C, H/f, W/f), the same for every prompt."""
        return self.family.initial_latents(self.pipe, n, seed, *self.size)

    def decode(self, latents):
        return self.family.decode(self.pipe, latents)

    def denoiser(self, sampler=None, num_inference_steps=50, **kwargs):
        """The model's Denoiser sampling with the pipeline's own scheduler (sampler None or 'ddim': DDIM on the
        diffusion families, the flow scheduler on flow families) or another sampler built from its scheduler config
        (utils.models.samplers; UserError when that config cannot build it)."""
        if sampler in (None, DEFAULT_SAMPLER):
            return self.family.denoiser(self.pipe, size=self.size, **kwargs)
        if self.family.prediction_type == "flow":
            raise UserError(f"--sampler {sampler}: {self.family.name} is a flow model and samples with its own "
                            "flow-matching Euler scheduler; --sampler applies to the diffusion families")
        try:
            scheduler = build_scheduler(sampler, self.pipe.scheduler.config, num_inference_steps)
        except ValueError as e:
            raise UserError(f"--sampler {sampler}: {e}") from None
        return self.family.denoiser(self.pipe, scheduler=scheduler, size=self.size, **kwargs)

    @property
    def tokenizer(self):
        return self.family.tokenizer(self.pipe)

    @property
    def tokenizers(self):
        return self.family.tokenizers(self.pipe)

    def description(self):
        """The family's description for result files, with the image size (height, width) px."""
        return dict(F.describe(self.family), image_size=list(self.size))

    def hparam(self, key, default=None):
        """The family's hyperparameter; one that is a rule on the model is evaluated on this pipeline."""
        return self.family.hparam(key, default, self.pipe)


def add_flow_argument(p):
    """--flow_space: what the sharpness of a rectified-flow model probes (docs/flow.md)."""
    p.add_argument("--flow_space", default="velocity", choices=list(FLOW_SPACES),
                   help="flow models (SD3, Flux): velocity = ||J_{v_delta} v_delta|| (default, defined at sigma = 1); "
                        "score = ||H_delta s_delta||, only at steps with sigma < 1 (docs/flow.md)")


def flow_options(model, flow_space, v_score="correct", jvp_capped=False):
    """The denoiser keywords --flow_space adds: {'flow_space': ...} for a flow family, {} for the others. UserError
    for a flag of the other kind of model (a non-default --flow_space on a diffusion model, --v_score reference on
    a flow model) or a JVP memory cap on a flow model whose transformer the run-time planner does not cover
    (jvp_capped: a cap or --jvp_attention was given; UNets, SD3's MMDiT and Flux's transformer are covered,
    utils.models.jvp_memory)."""
    if model.family.prediction_type != "flow":
        if flow_space != "velocity":
            raise UserError(f"--flow_space is for rectified-flow models; {model.model_id} is a {model.family.title}")
        return {}
    if v_score != "correct":
        raise UserError("--v_score is for v-prediction models; a flow model's score form is set by --flow_space")
    backbone = model.family.backbone(model.pipe)
    if jvp_capped and transformer_kind(backbone) is None:
        raise UserError(f"--max_memory_gb / --jvp_attention: the JVP memory planner runs on UNets and SD3's and "
                        f"Flux's transformers; on this {type(backbone).__name__} the JVP runs unchunked "
                        "(docs/cost.md)")
    return {"flow_space": flow_space}


def detection_denoiser(loaded, needs, flow, *, score_form, jvp_dtype, max_memory_gb, jvp_attention):
    """The loaded model's denoiser for detection: what the detectors need of it (`needs`: a JVP UNet, or finite
    differences in a precision, from their model_needs), the --flow_space keywords `flow`, the v-score form, the
    JVP's dtype and its memory cap in GiB (None: the free memory) with its attention mode."""
    from .models.autodiff import jvp_unet_copy
    from .models.jvp_memory import JvpMemory
    net, fd = loaded.family.backbone(loaded.pipe), needs.get("fd_precision")
    return loaded.denoiser(score_form=score_form, **flow,
                           jvp_unet=jvp_unet_copy(net, jvp_dtype) if needs.get("jvp") else None,
                           fd_unet=jvp_unet_copy(net, "float32") if fd not in (None, "model") else None,
                           fd_precision=fd or "model",
                           jvp_memory=JvpMemory(None if max_memory_gb is None else int(max_memory_gb * 2 ** 30),
                                                jvp_attention))


def check_flow_first_step(denoiser, num_inference_steps):
    """UserError when the denoiser probes the score of a flow model (--flow_space score) and the schedule's first
    step, which every detector measures, has sigma = 1, where s_delta is identically 0."""
    if getattr(denoiser, "flow_space", "velocity") != "score":
        return
    sigma = float(denoiser.sigma(denoiser.timesteps(num_inference_steps)[0]))
    if sigma >= 1:
        raise UserError(f"--flow_space score: the first step has sigma = {sigma:g}, where the score difference of a "
                        "flow model is 0 for every prompt; use --flow_space velocity (docs/flow.md)")


def model_id_of(sd_ver, model_id=None):
    """The model id that --sd_ver/--model_id name (no loading): for checks before any work."""
    return resolve_model_id(sd_ver, model_id)


def size_identity(height=None, width=None):
    """What --height/--width add to a run's identity: nothing at the native size (so that runs from before the
    flags resume), else {'height': h, 'width': w} as given."""
    return {k: v for k, v in (("height", height), ("width", width)) if v is not None}


def uncond_identity(model):
    """What a run header adds about the methods' uncond branch: nothing where it is the CFG unconditional branch
    (every run from before stays the same), else {'uncond': what it is} (Flux: the empty prompt, same guidance)."""
    note = model.description().get("uncond")
    return {"uncond": note} if note else {}


def image_size(family, pipe, height=None, width=None):
    """(height, width) in pixels: the given ones, else the family's native size; UserError unless both are
    multiples of the VAE's downsampling factor."""
    native = family.native_size(pipe)
    size = (height or native[0], width or native[1])
    f = pipe.vae_scale_factor
    bad = [f"--{n} {v}" for n, v, given in (("height", size[0], height), ("width", size[1], width))
           if given and v % f]
    if bad:
        raise UserError(f"{' and '.join(bad)}: not a multiple of the VAE's downsampling factor {f}")
    return size


def load_model(sd_ver, model_id, device, dtype=None, height=None, width=None):
    """The Model that --sd_ver/--model_id name, on `device` in `dtype` (a name; default by device), for images of
    height x width pixels (None: native)."""
    mid = resolve_model_id(sd_ver, model_id)
    dt = resolve_dtype(dtype, device)
    family, pipe = F.load(mid, device, dt)
    return Model(family, pipe, mid, model_label(sd_ver, model_id), device, dt, image_size(family, pipe, height, width))


def latent_shape(model, size=None):
    """(C, h, w) of the model's latents for images of size (height, width) px (None: its native size)."""
    h, w = size or model.family.native_size(model.pipe)
    f = model.pipe.vae_scale_factor
    return (model.family.backbone(model.pipe).config.in_channels, h // f, w // f)


def load_companion(main, model_id):
    """A second model that a detector compares the loaded Model `main` with (an earlier checkpoint of it), on main's
    device, dtype and image size. UserError unless it is of main's family (its pipeline class and prediction type:
    a copy of a profile's model elsewhere, e.g. the demo's, loads under the generic profile of that class) and its
    native latent shape (channels and size) is main's: the two predictions must live on the same latents."""
    mid = resolve_model_id(None, model_id)
    family, pipe = F.load(mid, main.device, main.dtype)
    other = Model(family, pipe, mid, model_label(None, model_id), main.device, main.dtype)
    kind = lambda f: f"{f.pipeline_class}, {f.prediction_type}"  # what identifies a family's architecture
    if kind(family) != kind(main.family):
        raise UserError(f"the second model {model_id} is {family.title} ({kind(family)}); {main.model_id} is "
                        f"{main.family.title} ({kind(main.family)}): an earlier checkpoint must be of the same family")
    mine, theirs = latent_shape(main), latent_shape(other)
    if mine != theirs:
        raise UserError(f"the second model {model_id} has latents of shape {theirs} (channels, h, w); {main.model_id} "
                        f"has {mine}: an earlier checkpoint must have the same latent shape")
    return dataclasses.replace(other, size=main.size)


def report_long_prompts(tokenizers, prompts):
    """Warn (one line) about prompts longer than any of the model's tokenizers' windows: the text encoders
    truncate them, as in the papers' runs. Returns their indices."""
    long_ones = sorted({i for tok in tokenizers for i in truncated_prompts(tok, prompts, tok.model_max_length)})
    if long_ones:
        limit = min(tok.model_max_length for tok in tokenizers)
        warn(f"{len(long_ones)} prompt(s) exceed {limit} tokens and are truncated by the text encoder, as in the "
             f"reference (prompt(s) {', '.join(str(i + 1) for i in long_ones[:10])}"
             f"{', ...' if len(long_ones) > 10 else ''})")
    return long_ones
