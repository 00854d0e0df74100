"""Image-copy similarity (SSCD, pixel cosine) and CLIP score; models and their preprocessing are arguments.

SSCD (Pizzi et al., 2022, facebookresearch/sscd-copy-detection): a copy-detection descriptor; cosine > 0.5 is the
usual "copy" threshold in the memorization literature. CLIP score: cosine of normalized image and text embeddings.
"""
import os

import torch

from .cli import UserError

SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_large.torchscript.pt"
# Preprocessing presets for SSCD. "center224" (default) is the one this project's evaluation issue fixes:
# Resize(256), CenterCrop(224), mean/std 0.5. The SSCD README itself recommends ImageNet mean/std with either
# Resize(288) on the short side ("sscd288") or Resize([320, 320]) ("sscd320"); numbers differ slightly between
# presets, so the preset is saved with every result.
SSCD_PRESETS = {
    "center224": dict(resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "sscd288": dict(resize=288, crop=None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "sscd320": dict(resize=(320, 320), crop=None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}
PIXEL_NAME = "pixel cosine"


def sscd_transform(preset="center224"):
    """torchvision transform PIL image -> float tensor (3, H, W) for an SSCD preset name."""
    from torchvision import transforms as T
    if preset not in SSCD_PRESETS:
        raise UserError(f"unknown SSCD preprocessing {preset!r}; choose one of {', '.join(SSCD_PRESETS)}")
    p = SSCD_PRESETS[preset]
    steps = [T.Resize(p["resize"], interpolation=T.InterpolationMode.BILINEAR)]
    if p["crop"]:
        steps.append(T.CenterCrop(p["crop"]))
    steps += [T.ToTensor(), T.Normalize(mean=p["mean"], std=p["std"])]
    return T.Compose(steps)


def load_sscd(path, device="cpu"):
    """The SSCD TorchScript model in eval mode; a missing or unreadable file is a UserError saying where to get it."""
    if not path or not os.path.isfile(path):
        raise UserError(f"SSCD weights not found at {path!r}. Download the public TorchScript release "
                        f"(facebookresearch/sscd-copy-detection, MIT license): wget {SSCD_URL} -O "
                        f"{path or 'sscd_disc_large.torchscript.pt'} ; then pass --sscd PATH "
                        "(or use --similarity pixel for the offline demo)")
    import warnings
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in new torch, but it is SSCD's release format
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(path, map_location=device)
    except Exception as e:
        raise UserError(f"{path} is not a TorchScript model ({' '.join(str(e).split())[:200]}); expected "
                        f"sscd_disc_large.torchscript.pt from {SSCD_URL}")
    return model.eval()


@torch.no_grad()
def embed(forward, preprocess, images, device="cpu", batch_size=32):
    """L2-normalized embeddings of PIL images: forward(batch (B,3,H,W)) -> (B,D); returns float32 (N, D) on CPU.

    Images whose preprocessed shapes differ (aspect-preserving presets) are run one by one.
    """
    tensors = [preprocess(im) for im in images]
    if not tensors:
        return torch.zeros(0, 0)
    out = []
    same = all(t.shape == tensors[0].shape for t in tensors)
    step = batch_size if same else 1
    for i in range(0, len(tensors), step):
        x = torch.stack(tensors[i:i + step]).to(device)
        y = forward(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        out.append(y.float().reshape(y.shape[0], -1).cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


def sscd_descriptors(model, preprocess, images, device="cpu", batch_size=32):
    """SSCD descriptors (N, D), L2-normalized (the model's raw output is normalized again, harmlessly)."""
    return embed(model, preprocess, images, device, batch_size)


def max_similarity(query, reference):
    """Cosine of each query row with its most similar reference row: (N,) from (N, D) and (M, D), both unit-norm."""
    if reference.shape[0] == 0:
        raise ValueError("no reference embeddings")
    return (query.double() @ reference.double().T).max(dim=1).values


def pixel_vectors(images, size=32):
    """Pixel cosine features: each image resized to size x size (bilinear, antialiased, in float), flattened,
    mean-centred and L2-normalized: float64 (N, 3*size*size). A single-colour image gives the zero vector
    (cosine 0 with everything), so it never counts as a copy.
    """
    import numpy as np
    from .fetch import to_rgb
    vecs = []
    for im in images:
        x = torch.from_numpy(np.asarray(to_rgb(im), dtype=np.float64)).permute(2, 0, 1)[None]
        if x.shape[-2:] != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
        v = x.reshape(-1)
        v = v - v.mean()
        n = v.norm()
        vecs.append(v / n if n > 1e-6 else torch.zeros_like(v))  # pixel values are on the 0-255 scale
    return torch.stack(vecs) if vecs else torch.zeros(0, 3 * size * size, dtype=torch.float64)


@torch.no_grad()
def clip_scores(model, preprocess, tokenizer, images, texts, device="cpu", batch_size=32):
    """CLIP score of each (image, text) pair: cosine of normalized embeddings, (N,) float64.

    model: an open_clip model (encode_image, encode_text); preprocess: its image transform; tokenizer: its
    tokenizer (list of str -> (N, L) token ids). texts has one entry per image.
    """
    if len(images) != len(texts):
        raise ValueError("one text per image is needed")
    if not images:
        return torch.zeros(0, dtype=torch.float64)
    img = embed(model.encode_image, preprocess, images, device, batch_size)
    uniq = sorted(set(texts))
    tok = tokenizer(uniq).to(device)
    txt = torch.nn.functional.normalize(model.encode_text(tok).float().cpu(), dim=1)
    rows = torch.stack([txt[uniq.index(t)] for t in texts])
    return (img.double() * rows.double()).sum(dim=1)


def load_clip(model_name, pretrained, device="cpu", cache_dir=None, offline=None):
    """(model, preprocess, tokenizer) from open_clip, failing fast with a UserError instead of hanging offline.

    pretrained: a tag of model_name (e.g. 'laion2b_s32b_b79k') or a checkpoint file path. When the tag's weights
    are already in the Hugging Face cache they are loaded from there without any network access; otherwise,
    offline (HF_HUB_OFFLINE=1 or offline=True) is an immediate UserError, online they are downloaded.
    """
    import difflib
    try:
        import open_clip
    except ImportError:
        raise UserError("open_clip_torch is needed for the CLIP score: pip install open_clip_torch "
                        "(or pass --clip_model none)")
    if model_name not in open_clip.list_models():
        near = difflib.get_close_matches(model_name, open_clip.list_models(), n=4)
        raise UserError(f"unknown CLIP model {model_name!r}" + (f"; did you mean {', '.join(near)}?" if near else
                        "; see open_clip.list_models()") + " (or --clip_model none to skip CLIP)")
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
                            f"{cfg.get('hf_hub', '').rstrip('/') or cfg.get('url')}`), pass --clip_pretrained "
                            "/path/to/checkpoint, or use --clip_model none")
        else:
            checkpoint = pretrained  # a tag: open_clip downloads it
    else:
        checkpoint = None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=checkpoint, device=device, cache_dir=cache_dir, **kwargs)
    except Exception as e:
        raise UserError(f"could not load CLIP {model_name} ({pretrained}): {' '.join(str(e).split())[:300]}; "
                        "without internet, download the weights elsewhere and pass --clip_pretrained FILE, or use "
                        "--clip_model none") from None
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


def summarize(per_image_sim, per_prompt_sim, per_prompt_clip, thresholds=(0.5, 0.7)):
    """Summary numbers: mean similarity over prompts (each the mean over its images), fraction of images above
    each threshold, mean CLIP over prompts. Inputs are lists of floats (NaN-free); empty lists give None.
    """
    def mean(xs):
        return float(sum(xs) / len(xs)) if xs else None
    out = {"mean_similarity": mean(per_prompt_sim), "mean_similarity_over_images": mean(per_image_sim),
           "n_images_with_gt": len(per_image_sim)}
    for t in thresholds:
        out[f"frac_above_{t:g}"] = (sum(s > t for s in per_image_sim) / len(per_image_sim)) if per_image_sim else None
    out["mean_clip"] = mean(per_prompt_clip)
    return out
