"""CLIP and SSCD loaders, the offline CLIP tokenizer (rebuilt from open_clip's vocabulary file)."""
import gzip
import json
import os
import re

import torch

from ..cli import UserError, one_line
from .loading import REPO_ROOT

SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchscript.pt"

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


def sscd_cache_path(url=SSCD_URL, hub_dir=None):
    """Where sscd_weights keeps the download: <hub_dir or torch.hub.get_dir()>/checkpoints/<file name of url>.

    Checked before anything is fetched or written: every part of that folder that exists must be a folder, and the
    deepest existing one writable (only readable when the weights and their recorded digest are both there
    already, so a read-only shared cache works). Otherwise a UserError naming TORCH_HOME, which sets the place.
    """
    import torch.hub
    base = hub_dir or torch.hub.get_dir()
    dst = os.path.join(base, "checkpoints", os.path.basename(url.split("?")[0]))
    cached = os.path.isfile(dst) and os.path.isfile(dst + ".sha256")
    where = f"torch hub's cache {base} (set by TORCH_HOME)"
    folder = os.path.dirname(dst)
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{where}: {folder} is not a folder; set TORCH_HOME to a writable folder")
    if not os.access(folder, os.R_OK | os.X_OK if cached else os.W_OK | os.X_OK):
        raise UserError(f"{where}: {folder} is not " + ("readable" if cached else "writable") +
                        "; set TORCH_HOME to a writable folder")
    return dst


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
    from ..io import atomic_write_text, sha256_file, writing
    want = sha256.lower() if sha256 else None
    if want is not None and not re.fullmatch(r"[0-9a-f]{64}", want):
        raise UserError(f"a SHA-256 is 64 hexadecimal digits, got {sha256!r}")
    if path:
        if want is not None and os.path.isfile(path) and sha256_file(path) != want:
            raise UserError(f"{path} does not have the pinned SHA-256 {want}")
        return path
    dst = sscd_cache_path(url, hub_dir)
    record = dst + ".sha256"
    if not os.path.isfile(dst):
        with writing(os.path.dirname(dst), "torch hub's cache folder (TORCH_HOME)"):  # root on a read-only disk
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


CLIP_LOADERS = {}  # CLIP-like models of this project: name -> loader(pretrained or None, device)


def register_clip(name, loader):
    """Make `name` loadable by load_clip: loader(pretrained, device) -> (model, preprocess, tokenizer)."""
    CLIP_LOADERS[name] = loader


def load_clip(model_name, pretrained, device="cpu", cache_dir=None, offline=None):
    """(model, preprocess, tokenizer) from open_clip, failing fast with a UserError instead of hanging offline.

    pretrained: a tag of model_name (e.g. 'laion2b_s32b_b79k') or a checkpoint file path. When the tag's weights
    are already in the Hugging Face cache they are loaded from there without any network access; otherwise,
    offline (HF_HUB_OFFLINE=1 or offline=True) is an immediate UserError, online they are downloaded.
    A model_name registered with register_clip (the demo's 'demo') is loaded by its own loader (pretrained: its
    folder, None = its default).
    """
    if model_name in CLIP_LOADERS:
        return CLIP_LOADERS[model_name](pretrained, device)
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
        from ..io import atomic_write_text
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
