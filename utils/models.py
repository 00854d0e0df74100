"""Model loading: Stable Diffusion pipelines by version or id, device and dtype choice, clear offline errors."""
import gzip
import json
import os

import torch

from .cli import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL_DIR = os.path.join(REPO_ROOT, "demo_model")

# --sd_ver -> model; the prediction type always comes from the loaded scheduler's config.
SD_MODELS = {
    "1": "CompVis/stable-diffusion-v1-4",      # epsilon-prediction, 512x512
    "2": "stabilityai/stable-diffusion-2",     # v-prediction, 768x768
    "demo": DEMO_MODEL_DIR,                    # the project's tiny digits model (CPU, offline)
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_id(sd_ver, model_id=None):
    """--model_id wins; else the model that --sd_ver names ('demo' also accepted as a model id)."""
    if model_id:
        return SD_MODELS["demo"] if model_id == "demo" else model_id
    key = str(sd_ver)
    if key not in SD_MODELS:
        raise UserError(f"unknown --sd_ver {sd_ver!r}; choose one of {', '.join(SD_MODELS)} or pass --model_id")
    return SD_MODELS[key]


def resolve_device(name=None):
    """'cuda' or 'cpu' (default: cuda when available). Asking for CUDA on a machine without it is a user error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA device is available here; use --device cpu")
    return dev


def resolve_dtype(name, device):
    """Default bfloat16 on CUDA like the reference, float32 on CPU (bfloat16 is slow there)."""
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_pipeline(model_id, device, dtype):
    """A StableDiffusionPipeline (safety checker off) with a DDIM scheduler built from its own config.

    Looks in the local cache first, so an offline machine with the weights cached never touches the network;
    a model that is neither local nor reachable gives a UserError that says what to do.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
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
        raise UserError(f"could not load model {model_id!r}: {_one_line(e)}") from None
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
                        "or pass --model_id /path/to/local/folder")
    # Short timeouts so that a machine without network fails in seconds instead of hanging.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except Exception as e:
        msg = _one_line(e)
        hint = ("it is not cached locally and the Hugging Face Hub could not be reached; on an offline machine "
                f"download it elsewhere (`hf download {model_id}`) and pass --model_id /path/to/folder")
        if any(w in msg.lower() for w in ("gated", "401", "403", "restricted", "authenticat")):
            hint = "the repository is gated: accept its license on the Hub and run `hf auth login`"
        elif "404" in msg or "not found" in msg.lower():
            hint = "no such repository on the Hub; check the id or pass a local folder"
        raise UserError(f"could not load model {model_id!r}: {hint} ({msg[:300]})") from None


def _one_line(e):
    return " ".join(str(e).split()) or type(e).__name__


def offline_clip_tokenizer(cache_dir=None, model_max_length=77):
    """The real CLIP BPE tokenizer (49,408 tokens), rebuilt without network from open_clip's vocabulary file.

    Writes vocab.json and merges.txt into cache_dir (default: a folder beside this package) once.
    """
    from transformers import CLIPTokenizer
    cache_dir = cache_dir or os.path.join(REPO_ROOT, ".cache", "clip_tokenizer")
    vocab_path, merges_path = os.path.join(cache_dir, "vocab.json"), os.path.join(cache_dir, "merges.txt")
    if not (os.path.exists(vocab_path) and os.path.exists(merges_path)):
        vocab, merges = _clip_vocab_and_merges()
        from .io import atomic_write_text
        atomic_write_text(vocab_path, json.dumps(vocab, ensure_ascii=False))
        atomic_write_text(merges_path, "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(vocab_path, merges_path, model_max_length=model_max_length)


def _clip_vocab_and_merges():
    """CLIP's vocabulary: 256 byte symbols, their end-of-word forms, 48,894 merges, and the two special tokens."""
    try:
        import open_clip
    except ImportError:
        raise UserError("open_clip_torch is needed to rebuild the CLIP tokenizer offline: pip install open_clip_torch")
    gz = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(gz, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(ln.split()) for ln in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _bytes_to_unicode():
    """GPT-2/CLIP byte-to-printable-character table, so BPE never sees whitespace or control bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs)))
