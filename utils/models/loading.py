"""Finding and loading models: --sd_ver short names and model ids, devices and dtypes, the diffusers loader with
its offline-first Hub access and short timeouts, and a model folder's config (model_index.json). Which pipeline
class loads a model, and everything model-specific after that, is its family's (utils.models.families).
"""
import json
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
DEMO_FLOW_MODEL_DIR = os.path.join(REPO_ROOT, "demo_flow_model")

# --sd_ver -> model; the prediction type always comes from the loaded scheduler's config.
SD_MODELS = {
    "1": "CompVis/stable-diffusion-v1-4",                      # epsilon-prediction, 512x512 (the paper's)
    "1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",      # epsilon, 512x512 (runwayml's repository, moved)
    "2": "stabilityai/stable-diffusion-2",                     # v-prediction, 768x768 (the paper's)
    "2.1": "stabilityai/stable-diffusion-2-1",                 # v-prediction, 768x768
    "xl": "stabilityai/stable-diffusion-xl-base-1.0",          # epsilon, 1024x1024, two text encoders
    "demo": DEMO_MODEL_DIR,                                    # the project's tiny digits model (CPU, offline)
    "demo_flow": DEMO_FLOW_MODEL_DIR,                          # its rectified-flow (SD3-shaped) twin (CPU, offline)
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_id(sd_ver, model_id=None):
    """A model id wins ('demo', 'demo_flow' and 'tiny' are accepted as ids); else the model that the version names."""
    if model_id:
        return SD_MODELS[model_id] if model_id in ("demo", "demo_flow") else model_id
    key = str(sd_ver)
    if key not in SD_MODELS:
        raise UserError(f"unknown Stable Diffusion version {sd_ver!r}; choose one of {', '.join(SD_MODELS)} "
                        "or give a model id")
    return SD_MODELS[key]


def model_label(sd_ver, model_id=None):
    """A short name of the model that is actually loaded, safe as a folder name: sd1, sd1.5, sd2, sd2.1, sdxl,
    sddemo (as the reference's sd<ver> folders), tiny, else the folder's base name or the Hub id with '/' as '--'."""
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


def load_diffusers(cls, model_id, kwargs):
    """cls.from_pretrained(model_id, **kwargs) for a local folder or a Hub id. Looks in the local cache first, so
    an offline machine with the weights cached never touches the network; a model that is neither local nor
    reachable, or that does not load, is a UserError."""
    local_dir = os.path.isdir(model_id)
    _check_folder(model_id)
    try:
        return cls.from_pretrained(model_id, **kwargs) if local_dir else _from_hub(cls, model_id, kwargs)
    except UserError:
        raise
    except Exception as e:  # diffusers raises many types (OSError, ValueError, HTTP errors) for the same causes
        raise UserError(f"could not load model {model_id!r}: {one_line(e)}") from None


def _check_folder(model_id):
    """UserError for an id that names a folder (a path, not owner/name) that does not exist: such an id is not a
    Hub id either, and huggingface_hub would reject it with a traceback."""
    if not os.path.isdir(model_id) and (model_id.startswith((".", "/", "~")) or model_id.count("/") > 1):
        raise UserError(f"model folder {model_id!r} does not exist")


CONFIGS = ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "transformer/config.json")


def read_model_index(model_id):
    """(pipeline class name, scheduler prediction type, UNet config dict) from a model's model_index.json,
    scheduler and UNet configs: a local folder's, or a Hub id's copies in the local cache; None when the folder
    has no model_index.json or the id is not cached (then the load itself decides). A missing scheduler config
    means epsilon; a folder with no UNet gives its transformer's config instead (flow families: Flux-dev and
    Flux-schnell differ there), with neither {}. A damaged file is a UserError."""
    if os.path.isdir(model_id):
        paths = [os.path.join(model_id, *name.split("/")) for name in CONFIGS]
    else:
        _check_folder(model_id)
        from huggingface_hub import try_to_load_from_cache
        paths = [try_to_load_from_cache(model_id, name) for name in CONFIGS]
        paths = [p if isinstance(p, str) else "" for p in paths]
    if not os.path.isfile(paths[0]):
        return None
    index = _json_object(paths[0])
    pred = _json_object(paths[1]).get("prediction_type", "epsilon") if os.path.isfile(paths[1]) else "epsilon"
    net = next((path for path in paths[2:] if os.path.isfile(path)), None)
    return index.get("_class_name"), pred, (_json_object(net) if net else {})


def _json_object(path, max_bytes=1 << 20):
    """A small JSON object file (a model config); UserError if it is not one."""
    from ..io import read_text_file  # a regular file (a FIFO is refused without blocking), capped, UTF-8
    text = read_text_file(path, "model config", max_bytes)  # (Hub cache files are links: not check_link)
    try:
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path} is not a readable model config ({one_line(e)[:160]})") from None
    return obj


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
