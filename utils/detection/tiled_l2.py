"""tiled_l2: pairwise distance between the n generated images (Carlini et al., 2023, as the sharpness paper uses it):
the largest RMS pixel difference over co-located tile_px x tile_px tiles, aggregated over the n(n-1)/2 pairs;
lower = memorized (generations that all look alike). Needs the whole guided trajectory and one VAE decode."""
import dataclasses
import itertools

import torch

from ..cli import positive_int
from .base import Detector, option, positive_fields, register

TILED_AGGS = ("mean", "min")


@dataclasses.dataclass(frozen=True)
class TiledL2Settings:
    """Options of the tiled l2 distance."""
    tile_px: int = option(128, type=positive_int)  # tiled_l2: tile side in pixels (8 for the demo)
    tiled_agg: str = option("mean", choices=TILED_AGGS)  # tiled_l2: aggregate of the pair distances (min: closest pair)

    def __post_init__(self):
        positive_fields(self, ("tile_px",))
        if self.tiled_agg not in TILED_AGGS:
            raise ValueError(f"tiled_agg must be one of {TILED_AGGS}")


@register
class TiledL2(Detector):
    name = "tiled_l2"
    direction = "lower"
    Settings = TiledL2Settings
    description = ("aggregate over generation pairs of the max over tiles of the RMS pixel difference (lower = "
                   "memorized); extras: pairwise distance matrix")
    per_prompt = True
    wants_images = True
    min_generations = 2

    def check_model(self, pipe, size):
        for side in sorted(set(size)):
            if side % self.settings.tile_px:
                raise ValueError(f"tile_px {self.settings.tile_px} does not divide the image side {side} px")

    def prepare(self, p):
        if p.n < 2:
            raise ValueError("tiled_l2 compares generations: it needs n >= 2 and a decoder")

    def finish(self, p, images):
        st = self.settings
        for j, ims in enumerate(images):
            d = pairwise_tiled_l2(images_to_tensor(ims), st.tile_px)
            pairs = d[torch.triu_indices(p.n, p.n, 1).unbind()]
            p.values[self.name][j, 0] = float(pairs.mean() if st.tiled_agg == "mean" else pairs.min())
            p.extras[self.name][j] = dict(pairwise=d.tolist())


def images_to_tensor(images):
    """PIL images -> float64 tensor (N, 3, H, W) in [0, 1] (the 8-bit images as saved)."""
    import numpy as np
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0).permute(2, 0, 1)
                        for im in images])


def pairwise_tiled_l2(images, tile_px):
    """Tiled l2 distances between all pairs of images (N, C, H, W): (N, N), zero diagonal.

    d(a, b) = max over the non-overlapping tile_px x tile_px tiles of sqrt(mean((a - b)^2)) over the tile's
    pixels and channels (Carlini et al.'s tiled distance; images in [0, 1]). H and W must be multiples of tile_px.
    """
    n, c, h, w = images.shape
    if h % tile_px or w % tile_px:
        raise ValueError(f"the tile size {tile_px} px does not divide the image size {h}x{w}")
    tiles = images.reshape(n, c, h // tile_px, tile_px, w // tile_px, tile_px)
    d = torch.zeros(n, n, dtype=images.dtype)
    for i, j in itertools.combinations(range(n), 2):
        rms = (tiles[i] - tiles[j]).pow(2).mean(dim=(0, 2, 4)).sqrt()
        d[i, j] = d[j, i] = rms.max()
    return d
