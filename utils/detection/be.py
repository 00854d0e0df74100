"""be: Chen et al. (2025), Bright Ending: ||m * (out_c - out_u)|| / mean(m) averaged over all steps, m the end-token
(first EOS) attention map of the first cross-attention down block's layers at the last step (the shared attention
instrument); the output difference is the shared one of wen (same space flag). With --be_maps the mask of each
generation is also handed over as a localization map (utils/detection/maps.py)."""
import dataclasses
import math

import torch

from ..cli import raise_arg
from ..models import attention as A
from .base import DifferenceSpace, Detector, attention_layers, option, output_difference, register
from .maps import MAPS


def first_down_block(layers):
    """Forward indices of the cross-attention layers (A.CrossAttnLayer list) of the first down block that has
    any: Chen et al.'s mask layers on SD v1.4 (down_blocks.0), and by the same rule down_blocks.1 on SDXL, whose
    first down block has none (both at a 64 x 64 grid at the native size). [] if no down block has any."""
    down = [l for l in layers if l.path.startswith("down_blocks.")]
    if not down:
        return []
    block = down[0].path.split(".")[1]
    return [l.index for l in down if l.path.split(".")[1] == block]


def index_list(text):
    """argparse type: comma-separated non-negative integers, as a tuple."""
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        vals = ()
    if not vals or min(vals) < 0:
        raise_arg(f"expected comma-separated layer indices, got {text!r}")
    return vals


@dataclasses.dataclass(frozen=True)
class BeSettings(DifferenceSpace):
    """Options of Chen et al.'s Bright Ending (and wen_space, shared with wen)."""
    be_layers: tuple = option((), type=index_list, help=(  # be: mask layers; (): the first cross-attention down block's
        "be: forward indices of the end-token mask layers (default: those of the first down block with "
        "cross-attention: Chen et al.'s two 64x64 layers of SD v1.4, down_blocks.1's four 64x64 ones on SDXL)"))
    be_maps: bool = option(False)  # be: also save each generation's end-token mask as a localization map (opt-in)


@register
class Be(Detector):
    name = "be"
    Settings = BeSettings
    description = ("mean over steps of ||m * (out_c - out_u)|| / mean(m), m the end-token attention map at the last "
                   "step (Chen et al.'s Bright Ending); extras: per-step values")

    def identity(self):
        out = super().identity()
        out.pop("be_maps")  # an output option, not a setting of the numbers: a run's identity is the one before it
        return out

    def layers(self, unet):
        """Forward indices of the mask layers; ValueError if the UNet lacks them."""
        layers = attention_layers(unet)
        be = list(self.settings.be_layers) or first_down_block(layers)
        if not be:
            raise ValueError("be: no down block of the UNet has cross-attention; choose the mask layers")
        A.select_layers(layers, be)  # raises for an index the UNet does not have
        return be

    def check_model(self, pipe, size):
        self.layers(pipe.unet)

    def attention(self, unet, prompt_lengths, n):
        layers = self.layers(unet)
        if prompt_lengths is None:
            raise ValueError("ae and be need the prompts' token counts (prompt_lengths)")
        ends = torch.tensor(prompt_lengths).repeat_interleave(n) - 1  # first EOS, per cond row
        return None, A.QueryMapRequest(token_index=ends.tolist(), steps=[self.sampling.num_inference_steps - 1],
                                       layers=layers)

    def prepare(self, p):
        p.scratch[self.name] = []

    def on_step(self, p, s):  # weighted by the mask known only at the last step
        p.scratch[self.name].append(output_difference(p, s, self.settings.wen_space).float().cpu())

    def finish(self, p, images):
        mask = A.be_mask(p.instrument.query_maps, self.sampling.num_inference_steps - 1,
                         self.layers(p.instrument.unet))
        per_step = torch.stack([A.be_step_score(mask, d) for d in p.scratch[self.name]], dim=1)  # (K*n, T)
        p.values[self.name][:, 0] = per_step.mean(dim=1).float()
        p.extras[self.name] = [dict(per_step=v.tolist()) for v in p.split(per_step)]
        if self.settings.be_maps:
            for e, m in zip(p.extras[self.name], p.split(mask_maps(mask, p.scratch[self.name][0].shape[-2:]))):
                e[MAPS] = m


def mask_maps(mask, latent_hw):
    """BE's masks (B, R) as (B, h, w) float32 maps on the grid of the mask's layers: the latent grid (h, w) =
    latent_hw on SD, a k-times coarser one where the layers run at a coarser grid (SDXL: k = 2)."""
    h, w = latent_hw
    k = math.isqrt(h * w // mask.shape[1])
    return mask.reshape(mask.shape[0], h // k, w // k).float()
