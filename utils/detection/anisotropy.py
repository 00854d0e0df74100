"""anisotropy: g1 * ||D_1|| + g2 * cos_low (Asthana & Belagiannis, 2026). D_1 is the cond-minus-uncond output at the
first timestep (from the shared pair forward), cos_low the per-pixel cosine (over latent channels) between two of
the outputs at a low-noise timestep evaluated on the same initial noise x_T (one more pair forward), averaged over
pixels."""
import dataclasses
import math

import torch

from ..cli import raise_arg
from ..models.denoisers import flat_norm, score_difference
from .base import Detector, option, register

ANISO_MODES = ("x,c|x", "x,x|c", "x|c,c|x")
ANISO_SPACES = ("output", "score")


def weight_pair(text):
    """argparse type: two finite numbers 'g1,g2'."""
    try:
        g = tuple(float(v) for v in text.split(","))
    except ValueError:
        g = ()
    if len(g) != 2 or not all(math.isfinite(v) for v in g):
        raise_arg(f"expected two finite numbers 'norm_weight,cosine_weight', got {text!r}")
    return g


@dataclasses.dataclass(frozen=True)
class AnisotropySettings:
    """Options of the anisotropy detector (the authors' defaults)."""
    aniso_mode: str = option("x,c|x", choices=ANISO_MODES)  # anisotropy: pair of the cosine term
    aniso_space: str = option("output", choices=ANISO_SPACES, help=(  # anisotropy: space of both terms
        "anisotropy: output = the authors' code; score = norm of s_delta and cosine of eps"))
    aniso_low_index: int = option(-3, cli=False)  # low-noise timestep's schedule index (code: timesteps[-3], t = 41)
    aniso_weights: tuple = option(None, type=weight_pair, help=(  # (norm, cosine) weights; None: the family's
        "anisotropy: 'g_norm,g_cos' (default: the model family's aniso_weights, the authors' 1,2 for SD v1.4 / "
        "epsilon models, 1,0.1 for SD v2.0 / v-prediction models)"))

    def __post_init__(self):
        problems = [f"{k} must be one of {allowed}" for k, allowed in
                    (("aniso_mode", ANISO_MODES), ("aniso_space", ANISO_SPACES)) if getattr(self, k) not in allowed]
        if self.aniso_weights is not None and len(self.aniso_weights) != 2:
            problems.append("aniso_weights needs two numbers")
        if problems:
            raise ValueError("; ".join(problems))


@register
class Anisotropy(Detector):
    name = "anisotropy"
    Settings = AnisotropySettings
    description = ("g_norm * ||D at the first timestep|| + g_cos * mean per-pixel cos at the low-noise timestep "
                   "(mean over generations); extras: per-generation norm and cosine terms")

    @property
    def model_options(self):
        # in score space the norm term is s_delta in the denoiser's score form, which --v_score sets on
        # v-prediction models: part of the identity then (the authors' output space does not use it)
        return ("v_score",) if self.settings.aniso_space == "score" else ()

    def trajectory(self):
        return 1

    def check(self):
        n, low = self.sampling.num_inference_steps, self.settings.aniso_low_index
        problems = super().check()
        if not -n <= low < n:
            problems.append(f"the anisotropy low-noise index {low} is outside the {n}-step schedule")
        if self.settings.aniso_weights is None:
            problems.append("anisotropy needs aniso_weights (detect_mem.py takes the model family's)")
        return problems

    def on_step(self, p, s):
        st = self.settings
        with torch.no_grad(), p.paused():
            norm, cos = self._terms(p, s, p.timesteps[st.aniso_low_index])
        p.values[self.name][:, 0] = (st.aniso_weights[0] * norm + st.aniso_weights[1] * cos).cpu()
        p.extras[self.name] = [dict(norm=a.tolist(), cosine=b.tolist()) for a, b in zip(p.split(norm), p.split(cos))]

    def _terms(self, p, s, t_low):
        """Norm term at the first timestep (from the shared forward) and cosine term at t_low on the same x_T (one
        more pair forward). Returns two float32 tensors (B,)."""
        st, model = self.settings, p.model
        if st.aniso_space == "score":
            norm = flat_norm(model.score_delta(s.out, s.xx, s.t))
        else:  # the authors' code: eps models the raw output; their v branch (alpha v - x) / sigma^2
            norm = flat_norm(score_difference(model.authors_output(s.out, s.xx, s.t)))
        xl = model.scale_input(s.x, t_low)
        xxl = torch.cat([xl, xl])
        with p.meter.unit("unet_forwards", [self.name]):
            low = model.output(xxl, t_low, p.embeds)
        if st.aniso_space == "score":
            low = model.eps(low, xxl, t_low)  # the cosine of scores equals that of eps (same -1/sigma on both)
        u, c = low.float().chunk(2)
        a_vec, b_vec = {"x,c|x": (u, c - u), "x,x|c": (c, u), "x|c,c|x": (c, c - u)}[st.aniso_mode]
        cos = torch.nn.functional.cosine_similarity(a_vec, b_vec, dim=1)  # over channels, per pixel: (B, H, W)
        return norm, cos.flatten(1).mean(dim=1)
