"""Localization maps: the one map format of the detectors that produce one (curv_ds, curv_dh), how a pass hands
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
