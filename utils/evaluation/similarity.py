"""Image-copy similarity (SSCD, pixel cosine) and CLIP score; models (utils.models loads them) and their
preprocessing are arguments.

SSCD (Pizzi et al., 2022, facebookresearch/sscd-copy-detection): a copy-detection descriptor; cosine > 0.5 is the
usual "copy" threshold in the memorization literature. CLIP score: cosine of normalized image and text embeddings.
"""
import torch

from ..cli import UserError
from ..imagemath import pixel_unit_vectors, resize_square
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
BLANK_LEVEL = 0.4  # an image is nearly blank if no pixel is brighter than this (max over RGB, 1 = 255)


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
    """Pixel cosine features of PIL images: each resized to size x size in float64 on the 0-255 scale, then
    pixel_unit_vectors: float64 (N, 3*size*size)."""
    import numpy as np
    from .images import to_rgb
    vecs = [pixel_unit_vectors(resize_square(torch.from_numpy(np.asarray(to_rgb(im), dtype=np.float64))
                                             .permute(2, 0, 1)[None], size))[0] for im in images]
    return torch.stack(vecs) if vecs else torch.zeros(0, 3 * size * size, dtype=torch.float64)


def max_brightness(images):
    """Brightest value of each PIL image, max over pixels and RGB channels, in [0, 1]: list of floats. An image
    with max_brightness <= BLANK_LEVEL is 'nearly blank' (the demo's canvas is black; SD's blank outputs too)."""
    import numpy as np
    from .images import to_rgb
    return [float(np.asarray(to_rgb(im)).max()) / 255.0 for im in images]


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
