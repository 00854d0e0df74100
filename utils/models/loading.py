"""The foreign models, in one place: Stable Diffusion pipelines (by version, id, 'demo' or 'tiny'), prompt
encoding, the forward-mode-AD policy (attention kernel, autocast, float32 JVP copy), CLIP and SSCD loaders, the
offline CLIP tokenizer, and the Hugging Face timeouts. Every other module sees models only through this one and
through utils.scores.ScoreModel.
"""
import os
import re

import torch

from ..cli import UserError, one_line

# Short Hugging Face timeouts, so that a machine without network fails in seconds instead of hanging.
# huggingface_hub reads them once, when it is first imported; this module is imported before any code that
# imports it (diffusers, transformers and open_clip are only imported inside functions here).
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_MODEL_DIR = os.path.join(REPO_ROOT, "demo_model")

# --sd_ver -> model; the prediction type always comes from the loaded scheduler's config.
SD_MODELS = {
    "1": "CompVis/stable-diffusion-v1-4",      # epsilon-prediction, 512x512
    "2": "stabilityai/stable-diffusion-2",     # v-prediction, 768x768
    "demo": DEMO_MODEL_DIR,                    # the project's tiny digits model (CPU, offline)
}
TINY = "tiny"  # model id of utils.demo_model.tiny_pipeline(): random weights, for smoke tests
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREDICTION_TYPES = ("epsilon", "v_prediction")


def resolve_model_id(sd_ver, model_id=None):
    """A model id wins ('demo' and 'tiny' are accepted as ids); else the model that the version names."""
    if model_id:
        return SD_MODELS["demo"] if model_id == "demo" else model_id
    key = str(sd_ver)
    if key not in SD_MODELS:
        raise UserError(f"unknown Stable Diffusion version {sd_ver!r}; choose one of {', '.join(SD_MODELS)} "
                        "or give a model id")
    return SD_MODELS[key]


def model_label(sd_ver, model_id=None):
    """A short name of the model that is actually loaded, safe as a folder name: sd1, sd2, sddemo (as the
    reference's sd<ver> folders), tiny, else the folder's base name or the Hub id with '/' as '--'."""
    resolved = resolve_model_id(sd_ver, model_id)
    for ver, mid in SD_MODELS.items():
        if resolved == mid or (os.path.isdir(resolved) and os.path.isdir(mid) and os.path.samefile(resolved, mid)):
            return f"sd{ver}"
    name = os.path.basename(os.path.normpath(resolved)) if os.path.isdir(resolved) else resolved.replace("/", "--")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".-") or "model"
    return name[:80]


def resolve_device(name=None):
    """'cuda' or 'cpu' (default: cuda when available). Asking for CUDA on a machine without it is a user error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA was asked for, but no CUDA device is available here; use the CPU")
    return dev


def resolve_dtype(name, device):
    """Default bfloat16 on CUDA like the reference, float32 on CPU (bfloat16 is slow there)."""
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_pipeline(model_id, device, dtype):
    """A StableDiffusionPipeline (safety checker off) with a DDIM scheduler built from its own config.

    model_id: a Hub id, a local folder, or 'tiny' (utils.demo_model.tiny_pipeline, random weights). Looks in the
    local cache first, so an offline machine with the weights cached never touches the network; a model that is
    neither local nor reachable, or whose prediction type is neither epsilon nor v_prediction, is a UserError.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    if model_id == TINY:
        from ..demo.model import tiny_pipeline
        pipe = tiny_pipeline().to(device, dtype)
    else:
        kwargs = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
        local_dir = os.path.isdir(model_id)
        if not local_dir and (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1):
            raise UserError(f"model folder {model_id!r} does not exist")
        try:
            if local_dir:
                pipe = StableDiffusionPipeline.from_pretrained(model_id, **kwargs)
            else:
                pipe = _from_hub(StableDiffusionPipeline, model_id, kwargs)
        except UserError:
            raise
        except Exception as e:  # diffusers raises many types (OSError, ValueError, HTTP errors) for the same causes
            raise UserError(f"could not load model {model_id!r}: {one_line(e)}") from None
    pred = pipe.scheduler.config.prediction_type
    if pred not in PREDICTION_TYPES:
        raise UserError(f"model {model_id} has prediction_type {pred!r}; only {' and '.join(PREDICTION_TYPES)} "
                        "are supported")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _from_hub(cls, model_id, kwargs):
    try:
        return cls.from_pretrained(model_id, local_files_only=True, **kwargs)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise UserError(f"model {model_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                        f"download it on a machine with internet (`hf download {model_id}`) and copy the cache, "
                        "or give a local folder as the model id (--model_id /path/to/folder)")
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except Exception as e:
        msg = one_line(e)
        hint = ("it is not cached locally and the Hugging Face Hub could not be reached; on an offline machine "
                f"download it elsewhere (`hf download {model_id}`) and pass --model_id /path/to/folder")
        if any(w in msg.lower() for w in ("gated", "401", "403", "restricted", "authenticat")):
            hint = "the repository is gated: accept its license on the Hub and run `hf auth login`"
        elif "404" in msg or "not found" in msg.lower():
            hint = "no such repository on the Hub; check the id or pass a local folder"
        raise UserError(f"could not load model {model_id!r}: {hint} ({msg[:300]})") from None


@torch.no_grad()
def encode_prompts(pipe, prompts, device=None):
    """Text embeddings (K, L, D) of a prompt or list of K prompts, without classifier-free doubling."""
    return pipe.encode_prompt(prompts, device or pipe.device, 1, False)[0]


@torch.no_grad()
def decode_latents(pipe, latents):
    """PIL images of final latents (B, C, h, w), exactly as StableDiffusionPipeline's output_type='pil' path
    (VAE decode of latents / scaling_factor, then the pipeline's image post-processing)."""
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])


def initial_latents(pipe, n, seed, height=None, width=None, dtype=None, device=None):
    """Initial noise exactly as the pipeline draws it with no generator, after torch.manual_seed(seed).

    Returns (n, C, H/f, W/f) latents scaled by the scheduler's init_noise_sigma.
    """
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    torch.manual_seed(seed)
    return pipe.prepare_latents(n, pipe.unet.config.in_channels, height, width,
                                dtype or pipe.unet.dtype, device or pipe.unet.device, None)
