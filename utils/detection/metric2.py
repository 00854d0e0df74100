"""metric2: the early-detection submission's 'Metric 2' (anonymous ICML 2026, randomnameforicml/icml-2026
src/detect_all_metrics.py), ||J_c^T eps_c - J_u^T eps_u||^2 at one sampling step, J the Jacobian of the noise
prediction in the latents: the gradient of 0.5 ||eps_c||^2 - 0.5 ||eps_u||^2, one VJP through one pair forward that
keeps its graph. Their code squares the norm (monotone: the AUC is that of the norm)."""
import contextlib
import dataclasses

import torch

from ..cli import nonneg_int
from .base import Detector, option, register


@dataclasses.dataclass(frozen=True)
class Metric2Settings:
    """Options of the early-detection Metric 2."""
    metric2_step: int = option(0, type=nonneg_int)  # metric2: the sampling step (their code: 0, the first)

    def __post_init__(self):
        if not (isinstance(self.metric2_step, int) and self.metric2_step >= 0):
            raise ValueError("metric2_step must be a non-negative integer")


def decoupled_gradient(model, x, t, cond, meter=None, metrics=(), step=None):
    """J_c^T eps_c - J_u^T eps_u (B, C, H, W) at model input x (B, C, H, W): the gradient in x of
    0.5 ||eps(x, c)||^2 - 0.5 ||eps(x, empty)||^2 summed over the rows (rows are independent, so row b of the
    gradient is row b's own). One pair forward with its graph, one backward (counted in `meter` if given)."""
    count = meter.unit if meter is not None else (lambda *a, **k: contextlib.nullcontext())
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        xx = torch.cat([x, x])
        with count("unet_forwards", metrics, step):
            eps_u, eps_c = model.eps(model.output(xx, t, cond), xx, t).chunk(2)
        with count("vjps", metrics, step):
            energy = 0.5 * (eps_c.float().pow(2).sum() - eps_u.float().pow(2).sum())
            (grad,) = torch.autograd.grad(energy, x)
    return grad.detach()


@register
class Metric2(Detector):
    name = "metric2"
    Settings = Metric2Settings
    description = ("||J_c^T eps_c - J_u^T eps_u||^2 at one early step (the early-detection submission's Metric 2, "
                   "squared as their code), per generation")

    def trajectory(self):
        return self.settings.metric2_step + 1

    def check(self):
        n = self.sampling.num_inference_steps
        return [f"metric2: the target step {self.settings.metric2_step} is outside the schedule's steps 0..{n - 1}"] \
            if self.settings.metric2_step >= n else []

    def on_step(self, p, s):
        if s.i != self.settings.metric2_step:
            return
        with p.paused():
            g = decoupled_gradient(p.model, s.xin, s.t, p.embeds, p.meter, [self.name], s.i)
        p.values[self.name][:, 0] = g.flatten(1).float().pow(2).sum(dim=1).cpu()
