"""The foreign models, in one place: Stable Diffusion pipelines (by version, id, 'demo' or 'tiny'), prompt
encoding, the forward-mode-AD policy (attention kernel, autocast, float32 JVP copy), CLIP and SSCD loaders, the
offline CLIP tokenizer, and the Hugging Face timeouts. Every other module sees models only through this one and
through utils.scores.ScoreModel.
"""
import contextlib
import copy
import gzip
import json
import os
import re

import torch

from .cli import UserError, one_line

# Short Hugging Face timeouts, so that a machine without network fails in seconds instead of hanging.
# huggingface_hub reads them once, when it is first imported; this module is imported before any code that
# imports it (diffusers, transformers and open_clip are only imported inside functions here).
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchscript.pt"


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
        from .demo_model import tiny_pipeline
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


# ------------------------------------------------------------------------------- forward-mode AD policy

@contextlib.contextmanager
def forward_ad(x):
    """What a forward-mode JVP through a diffusers UNet needs, for inputs like x (a tensor):

    1. scaled-dot-product attention on the math kernel, the only one with forward-mode AD (the CPU flash kernel
       and the CUDA flash / memory-efficient kernels raise on dual tensors);
    2. on CUDA with bfloat16/float16 tensors, autocast to that dtype: some forward-AD formulas in current torch
       hand a float32 tensor to the next layer (seen on an H200: a dtype mismatch in the cross-attention's
       linear layer); autocast casts it back, so the JVP still runs in the half dtype, as the reference's did.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    half = x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)
    with sdpa_kernel(SDPBackend.MATH), (torch.autocast("cuda", dtype=x.dtype) if half else contextlib.nullcontext()):
        yield


JVP_DTYPES = ("model", "float32")


def jvp_unet_copy(unet, jvp_dtype="model"):
    """None for JVPs in the model's own dtype; a float32 copy of the UNet (+4 bytes per parameter) for
    jvp_dtype='float32' when the model runs in another dtype."""
    if jvp_dtype not in JVP_DTYPES:
        raise ValueError(f"jvp_dtype must be one of {JVP_DTYPES}")
    if jvp_dtype == "float32" and next(unet.parameters()).dtype != torch.float32:
        return copy.deepcopy(unet).float()
    return None


# ------------------------------------------------------------------------------------------ CLIP and SSCD

def load_sscd(path, device="cpu"):
    """The SSCD TorchScript model in eval mode; a missing or unreadable file is a UserError saying where to get it."""
    if not path or not os.path.isfile(path):
        raise UserError(f"SSCD weights not found at {path!r}. Download the public TorchScript release "
                        f"(facebookresearch/sscd-copy-detection, MIT license): wget {SSCD_URL} -O "
                        f"{path or 'sscd_disc_large.torchscript.pt'}")
    import warnings
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in new torch, but it is SSCD's release format
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(path, map_location=device)
    except Exception as e:
        raise UserError(f"{path} is not a TorchScript model ({one_line(e)[:200]}); expected "
                        f"sscd_disc_large.torchscript.pt from {SSCD_URL}")
    return model.eval()


SSCD_TIMEOUT = 30  # seconds per connect/read of the SSCD download: an offline machine fails fast, never hangs


def sscd_weights(path=None, sha256=None, url=SSCD_URL, hub_dir=None, timeout=SSCD_TIMEOUT):
    """Path of the SSCD TorchScript file: `path` if given (offline use; checked against sha256 if given), else the
    copy in torch hub's checkpoint cache (hub_dir or torch.hub.get_dir(), + '/checkpoints'), downloaded on first
    use with torch.hub.download_url_to_file.

    No SHA-256 of sscd_disc_large.torchscript.pt is published, so without a pinned `sha256` the cache uses trust
    on first use: the digest observed at download is written beside the file (<file>.sha256) and every later use
    verifies the file against it. A mismatch, a wrong pinned hash or an unreachable URL is a UserError.
    """
    import socket

    import torch.hub
    from .io import atomic_write_text, sha256_file
    want = sha256.lower() if sha256 else None
    if want is not None and not re.fullmatch(r"[0-9a-f]{64}", want):
        raise UserError(f"a SHA-256 is 64 hexadecimal digits, got {sha256!r}")
    if path:
        if want is not None and os.path.isfile(path) and sha256_file(path) != want:
            raise UserError(f"{path} does not have the pinned SHA-256 {want}")
        return path
    dst = os.path.join(hub_dir or torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))
    record = dst + ".sha256"
    if not os.path.isfile(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout)  # torch.hub's urlopen takes no timeout of its own; restored below
        try:
            torch.hub.download_url_to_file(url, dst, hash_prefix=want, progress=False)
        except RuntimeError as e:  # torch.hub's hash check
            raise UserError(f"the download from {url} does not have the pinned SHA-256 {want} ({one_line(e)[:120]});"
                            " nothing was kept") from None
        except (OSError, ValueError) as e:  # URLError, timeouts and refused connections are OSErrors
            raise UserError(f"could not download the SSCD weights from {url} ({one_line(e)[:160]}); without "
                            f"internet, download them elsewhere and give the file ({dst} or any path)") from None
        finally:
            socket.setdefaulttimeout(old)
        atomic_write_text(record, sha256_file(dst) + "\n")
        return dst
    seen = sha256_file(dst)
    if not os.path.isfile(record):  # placed there by hand or by another tool: trust it now, check it from now on
        atomic_write_text(record, seen + "\n")
    recorded = open(record, encoding="utf-8").read().strip()
    if seen != recorded:
        raise UserError(f"{dst} has SHA-256 {seen}, but {recorded} was recorded when it was first fetched: the file "
                        f"changed; delete it (and {os.path.basename(record)}) to fetch it again")
    if want is not None and seen != want:
        raise UserError(f"{dst} does not have the pinned SHA-256 {want} (it has {seen})")
    return dst


def token_text(tokenizer, token_id):
    """The text of one token id as the tokenizer decodes it alone (CLIP: '</w>' as a space, then stripped)."""
    return tokenizer.decode([int(token_id)])


def load_clip(model_name, pretrained, device="cpu", cache_dir=None, offline=None):
    """(model, preprocess, tokenizer) from open_clip, failing fast with a UserError instead of hanging offline.

    pretrained: a tag of model_name (e.g. 'laion2b_s32b_b79k') or a checkpoint file path. When the tag's weights
    are already in the Hugging Face cache they are loaded from there without any network access; otherwise,
    offline (HF_HUB_OFFLINE=1 or offline=True) is an immediate UserError, online they are downloaded.
    model_name 'demo': the project's demo CLIP model (utils.demo_clip; pretrained: its folder, None = default).
    """
    if model_name == "demo":
        return _load_demo_clip(pretrained, device)
    import difflib
    try:
        import open_clip
    except ImportError:
        raise UserError("open_clip_torch is needed for the CLIP score: pip install open_clip_torch")
    if model_name not in open_clip.list_models():
        near = difflib.get_close_matches(model_name, open_clip.list_models(), n=4)
        raise UserError(f"unknown CLIP model {model_name!r}" + (f"; did you mean {', '.join(near)}?" if near else
                        "; see open_clip.list_models()"))
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    kwargs = {}
    if pretrained and os.path.isfile(pretrained):
        checkpoint = pretrained
    elif pretrained:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise UserError(f"CLIP model {model_name} has no pretrained weights {pretrained!r} (and no such file); "
                            f"known tags: {', '.join(tags) or 'none'}")
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        checkpoint = _cached_clip_weights(cfg, cache_dir)
        if checkpoint:  # reproduce what the tag would set, but from the local file: no network at all
            kwargs = dict(image_mean=cfg.get("mean"), image_std=cfg.get("std"),
                          image_interpolation=cfg.get("interpolation"), image_resize_mode=cfg.get("resize_mode"),
                          force_quick_gelu=bool(cfg.get("quick_gelu", False)))
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
        elif offline:
            raise UserError(f"CLIP weights {model_name}/{pretrained} are not in the local cache and this machine is "
                            "offline (HF_HUB_OFFLINE); download them where there is internet (`hf download "
                            f"{cfg.get('hf_hub', '').rstrip('/') or cfg.get('url')}`) and give the checkpoint file")
        else:
            checkpoint = pretrained  # a tag: open_clip downloads it
    else:
        checkpoint = None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=checkpoint, device=device, cache_dir=cache_dir, **kwargs)
    except Exception as e:
        raise UserError(f"could not load CLIP {model_name} ({pretrained}): {one_line(e)[:300]}; "
                        "without internet, download the weights elsewhere and give the checkpoint file") from None
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def _load_demo_clip(folder, device):
    """The demo CLIP model (utils.demo_clip, same interface as open_clip's), imported only when asked for."""
    try:
        from .demo_clip import DEFAULT_DIR, load_demo_clip
    except ImportError:
        raise UserError("the demo CLIP model (utils/demo_clip.py) is not in this checkout") from None
    folder = folder or DEFAULT_DIR
    if not os.path.isdir(folder):
        raise UserError(f"demo CLIP weights folder {folder!r} does not exist")
    try:
        model, preprocess, tokenizer = load_demo_clip(folder, device=device)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"could not load the demo CLIP model from {folder}: {one_line(e)[:300]}") from None
    return model.eval(), preprocess, tokenizer


def _cached_clip_weights(cfg, cache_dir=None):
    """Local path of a pretrained tag's weights if already downloaded (HF cache or open_clip's URL cache), else None."""
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for name in names:
            p = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(p, str) and os.path.isfile(p):
                return p
    url = cfg.get("url", "")
    if url:
        p = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(p):
            return p
    return None


# --------------------------------------------------------------------------------- offline CLIP tokenizer

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
