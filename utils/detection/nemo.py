"""nemo: Hintersdorf et al. (NeurIPS 2024, NeMo; ml-research/localizing_memorization_in_diffusion_models
utils/activation_detection.py compute_noise_diff and calculate_max_pairwise_ssim), the memorization strength of a
prompt as the largest pairwise MS-SSIM over its n generations of the noise difference d = eps - x_T: the noise
prediction at the schedule's step nemo_step (their early_stopping = 1) on the initial noise x_T itself (their loop
never advances the latents before it stops), min-max scaled per generation and channel. Their detection script
predicts with the conditional branch only (guidance 0); the SSIM is torchmetrics' (MS-SSIM, kernel 11, three scales
with betas 0.33). Per prompt: the max over pairs (their rule flags a prompt when any generation's max pairwise SSIM
exceeds the threshold); extras: every pair's value. Their published threshold 0.428 (docs/detection.md) is a fact,
not the flag rule: the table calibrates at a false-positive rate as for every detector."""
import dataclasses
import itertools

import torch

from ..cli import nonneg_float, nonneg_int
from ..imagemath import minmax_per_channel, ssim_pairs
from .base import Detector, option, register

SSIM_KINDS = ("ms", "single")  # torchmetrics' MS-SSIM (theirs) or single-scale SSIM (latents too small for MS-SSIM)
BETAS = (0.33, 0.33, 0.33)     # their MS-SSIM scale weights (three scales)
KERNEL = 11                    # their kernel size


@dataclasses.dataclass(frozen=True)
class NemoSettings:
    """Options of NeMo's noise-difference SSIM."""
    nemo_step: int = option(1, type=nonneg_int)  # nemo: schedule step of the prediction on x_T (theirs: 1)
    nemo_guidance: float = option(0.0, type=nonneg_float, help=(  # nemo: 0 = conditional prediction only (theirs)
        "nemo: 0 = the conditional noise prediction, as their detection script (default); g > 0 = their threshold "
        "script's guided prediction with its branch order, eps_c + g (eps_u - eps_c) (docs/detection.md)"))
    nemo_ssim: str = option("ms", choices=SSIM_KINDS, help=(  # nemo: ms = their MS-SSIM; single = one scale
        "nemo: ms = torchmetrics' MS-SSIM with their kernel 11 and three scales (latents larger than 40 px); "
        "single = single-scale SSIM, same kernel (smaller latents, e.g. the demo)"))

    def __post_init__(self):
        problems = []
        if not (isinstance(self.nemo_step, int) and self.nemo_step >= 0):
            problems.append("nemo_step must be a non-negative integer")
        if not (isinstance(self.nemo_guidance, (int, float)) and 0 <= self.nemo_guidance < float("inf")):
            problems.append("nemo_guidance must be a non-negative finite number")
        if self.nemo_ssim not in SSIM_KINDS:
            problems.append(f"nemo_ssim must be one of {SSIM_KINDS}")
        if problems:
            raise ValueError("; ".join(problems))


def scaled_noise_difference(eps, x):
    """(eps - x) min-max scaled to [0, 1] per row and channel: (n, C, h, w) -> (n, C, h, w) float32."""
    return minmax_per_channel(eps - x)


def pairwise_ssim(d, kind="ms"):
    """SSIM of every pair (a, b), a < b, of the n rows of d (n, C, h, w), in itertools.combinations order: (n(n-1)/2,).
    torchmetrics' MS-SSIM with kernel 11 and betas BETAS, or its single-scale SSIM; data range from the pair's
    values (torchmetrics' default, as theirs)."""
    a, b = zip(*itertools.combinations(range(d.shape[0]), 2))
    return ssim_pairs(d[list(a)], d[list(b)], kind, KERNEL, BETAS)


@register
class Nemo(Detector):
    name = "nemo"
    Settings = NemoSettings
    description = ("max over generation pairs of the MS-SSIM of the scaled noise difference eps(x_T) - x_T at an "
                   "early step (Hintersdorf et al.'s NeMo memorization strength), per prompt; extras: every pair")
    per_prompt = True
    min_generations = 2

    def trajectory(self):
        return 1  # only x_T, seen at step 0

    def check(self):
        n, st = self.sampling.num_inference_steps, self.settings.nemo_step
        return [f"nemo: the target step {st} is outside the schedule's steps 0..{n - 1}"] if st >= n else []

    def check_model(self, pipe, size):
        side = min(size) // getattr(pipe, "vae_scale_factor", 8)
        probe = torch.rand(2, 1, side, side)
        try:
            pairwise_ssim(probe, self.settings.nemo_ssim)
        except ValueError as e:
            raise ValueError(f"nemo: {e} (latents are {side} px; use the single-scale SSIM)") from None

    def prepare(self, p):
        if p.n < 2:
            raise ValueError(f"nemo compares the generations of a prompt: it needs at least 2, got {p.n}")

    def on_step(self, p, s):
        st = self.settings
        t = p.timesteps[st.nemo_step]
        with p.paused(), torch.no_grad(), p.meter.unit("unet_forwards", [self.name], s.i):
            xin = p.model.scale_input(s.x, t)
            if st.nemo_guidance == 0:
                eps = p.model.eps(p.model.branch_output(xin, t, p.embeds, "cond"), xin, t)
            else:
                xx = torch.cat([xin, xin])
                eps_u, eps_c = p.model.eps(p.model.output(xx, t, p.embeds), xx, t).chunk(2)
                eps = eps_c + st.nemo_guidance * (eps_u - eps_c)  # their threshold script's branch order
        d = scaled_noise_difference(eps, s.x)
        p.scratch[self.name] = [pairwise_ssim(rows, st.nemo_ssim).float().cpu() for rows in p.split(d)]

    def finish(self, p, images):
        pairs = p.scratch.pop(self.name)
        p.values[self.name][:, 0] = torch.stack([v.max() for v in pairs])
        p.extras[self.name] = [dict(pairwise=v.tolist()) for v in pairs]
