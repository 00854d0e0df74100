"""Localization maps: the one map format of the detectors that produce one (curv_ds, curv_dh, their _theta
variants, and be with --be_maps: its end-token mask), how a pass hands
them to the script, how they are saved, and Kim & Lee's evaluation of maps against binary masks.

Format: per prompt and detector one float32 array (n, h, w), one (h, w) map per generation on the latent grid,
saved as <out_dir>/<stem>_gen<n>_maps/<metric>/<prompt index:05d>.npy with a grid image of the n maps beside it
(.png, each map min-max scaled on its own). A detector puts the (n, h, w) tensor under the key MAPS of its
per-prompt extras; detect_mem.py takes it out before the record is written (the result files never hold maps).
"""
import io
import os

import numpy as np
import torch

from ..io import atomic_save_image, atomic_write_bytes

MAPS = "maps"  # the extras key a pass hands maps under


def map_dir(out_dir, stem, n, metric):
    """The folder of a metric's maps (beside the generated images' <stem>_gen<n>_images)."""
    return os.path.join(out_dir, f"{stem}_gen{n}_maps", metric)


def take_maps(extras):
    """Pop the maps from one prompt's extras (a dict or None): the (n, h, w) float32 array, or None."""
    if not isinstance(extras, dict) or MAPS not in extras:
        return None
    return np.asarray(torch.as_tensor(extras.pop(MAPS)).float().cpu().numpy(), dtype=np.float32)


def map_grid(maps):
    """A grayscale PIL image of the (n, h, w) maps side by side, each scaled to 0..255 by its own min and max."""
    from PIL import Image
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    scaled = np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 0.0)
    return Image.fromarray((np.concatenate(list(scaled), axis=1) * 255).round().astype(np.uint8), mode="L")


def save_maps(folder, index, maps):
    """Write one prompt's (n, h, w) maps as <index:05d>.npy and its grid as <index:05d>.png (atomically)."""
    buf = io.BytesIO()
    np.save(buf, maps.astype(np.float32))
    atomic_write_bytes(os.path.join(folder, f"{index:05d}.npy"), buf.getvalue())
    atomic_save_image(os.path.join(folder, f"{index:05d}.png"), map_grid(maps))


# ----------------------------------------------------------------------------- localization against masks

EVAL_SIDE = 256          # Kim & Lee's evaluation grid: maps (bilinear) and masks (nearest) resized to 256 x 256
THRESHOLDS = 101         # their threshold scan: 101 values from -1e-6 to 1 + 1e-6 on the normalized maps


def result_maps(result_path):
    """The maps of a detect_mem.py result (its .pt or .json): {prompt index: (n, h, w) float32}, read from the
    folder beside it that its sidecar names (stem, gen_num, metric). UserError if the result has none."""
    import json
    from ..cli import UserError
    side_path = os.path.splitext(result_path)[0] + ".json"
    try:
        with open(side_path, encoding="utf-8") as f:
            meta = json.load(f).get("metric") or {}
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{side_path}: not a readable detection result sidecar") from None
    folder = map_dir(os.path.dirname(side_path), meta.get("stem", ""), meta.get("gen_num", 0), meta.get("name", ""))
    if not os.path.isdir(folder):
        raise UserError(f"{result_path}: no maps beside it ({folder}); maps come from curv_ds, curv_dh "
                        "(and _theta) runs and from be runs with --be_maps")
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".npy") and name[:-4].isdigit():
            out[int(name[:-4])] = np.load(os.path.join(folder, name))
    if not out:
        raise UserError(f"{folder} holds no maps")
    return out


def load_masks(masks_dir, maps):
    """Binary masks (bool, EVAL_SIDE x EVAL_SIDE) for every map: MASKS_DIR/<index:05d>_<k>.png for generation k of
    prompt index (the generated images' names), or <index:05d>.png for all of a prompt's generations; grayscale,
    foreground > 0.5. Returns a list in the order of (index, k). UserError for a missing or extra mask, or one
    whose size is not an integer multiple of its map's size (same aspect ratio, at least the map's size)."""
    from PIL import Image
    from ..cli import UserError
    if not os.path.isdir(masks_dir):
        raise UserError(f"--localization {masks_dir} is not a folder")
    files = {f for f in os.listdir(masks_dir) if f.lower().endswith(".png")}
    used, out, missing = set(), [], []
    for index, m in sorted(maps.items()):
        for k in range(m.shape[0]):
            name = next((f for f in (f"{index:05d}_{k}.png", f"{index:05d}.png") if f in files), None)
            if name is None:
                missing.append(f"{index:05d}_{k}.png")
                continue
            used.add(name)
            with Image.open(os.path.join(masks_dir, name)) as im:
                mask = im.convert("L")
            (w, h), (mh, mw) = mask.size, m.shape[1:]
            if h % mh or w % mw or h // mh != w // mw:
                raise UserError(f"mask {name} is {w} x {h} px; its map is {mw} x {mh}: the mask's size must be an "
                                "integer multiple of the map's")
            mask = mask.resize((EVAL_SIDE, EVAL_SIDE), Image.NEAREST)
            out.append(np.asarray(mask, dtype=np.float32) / 255.0 > 0.5)
    extra = sorted(files - used)
    if missing or extra:
        raise UserError(f"the masks do not match the {sum(m.shape[0] for m in maps.values())} maps: "
                        f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} without a map (e.g. {extra[:3]})")
    return out


def resized_maps(maps):
    """The (n, h, w) maps of every prompt, in (index, k) order, resized bilinearly to EVAL_SIDE (as their loader)."""
    from PIL import Image
    return [np.asarray(Image.fromarray(g.astype(np.float32), mode="F").resize((EVAL_SIDE, EVAL_SIDE), Image.BILINEAR))
            for _, m in sorted(maps.items()) for g in m]


def localization_scores(maps, masks):
    """Kim & Lee's evaluate_metrics.py scan_thresholds: maps (N, H, W) >= 0 go through log1p, are min-max normalized
    over ALL maps together and clipped to [0, 1]; at each of THRESHOLDS thresholds pred = map > threshold against
    masks (N, H, W) bool gives the global IoU (all intersections over all unions), the mean IoU (per map; a map
    whose union is empty counts 1) and the pixel accuracy. Each is reported at its own best threshold (their rule:
    an oracle threshold per score). Returns dict(iou, miou, accuracy, thresholds of each)."""
    x = np.log1p(np.asarray(maps, dtype=np.float64))
    x = np.clip((x - x.min()) / (x.max() - x.min() + 1e-8), 0, 1)
    gt = np.asarray(masks, dtype=bool)
    best = dict(iou=(0.0, None), miou=(0.0, None), accuracy=(0.0, None))
    for th in np.linspace(-1e-6, 1 + 1e-6, THRESHOLDS):
        pred = x > th
        inter = np.logical_and(pred, gt).sum(axis=(1, 2))
        union = np.logical_or(pred, gt).sum(axis=(1, 2))
        per = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        vals = dict(iou=inter.sum() / union.sum() if union.sum() > 0 else 1.0, miou=per.mean(),
                    accuracy=(pred == gt).mean())
        for k, v in vals.items():
            if v > best[k][0]:  # strictly better, as theirs: the first threshold reaching the best value
                best[k] = (float(v), float(th))
    return dict({k: v for k, (v, _) in best.items()}, thresholds={k: t for k, (_, t) in best.items()},
                maps=len(gt))
