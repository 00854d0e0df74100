"""dsm: the early-detection submission's DSM (anonymous ICML 2026, randomnameforicml/icml-2026
src/detect_all_metrics.py), ||eps_c(x_{i+1}) - eps_c(x_i)||^2: the change of the conditional noise prediction between
sampling steps i and i+1 along the guided trajectory, from the shared pair forwards (no model call of its own).
Their headline DSM is steps 1 -> 2 (dsm_sq_12; dsm_step 0 gives their dsm_sq_01); squared as their code."""
import dataclasses

from ..cli import nonneg_int
from .base import Detector, option, register


@dataclasses.dataclass(frozen=True)
class DsmSettings:
    """Options of the early-detection DSM."""
    dsm_step: int = option(1, type=nonneg_int)  # dsm: the first of the two steps (their headline: 1, i.e. 1 -> 2)

    def __post_init__(self):
        if not (isinstance(self.dsm_step, int) and self.dsm_step >= 0):
            raise ValueError("dsm_step must be a non-negative integer")


@register
class Dsm(Detector):
    name = "dsm"
    Settings = DsmSettings
    description = ("||eps_c(x_{i+1}) - eps_c(x_i)||^2 between sampling steps dsm_step and dsm_step + 1 of the guided "
                   "trajectory (the early-detection submission's DSM, squared as their code), per generation")

    def trajectory(self):
        return self.settings.dsm_step + 2

    def check(self):
        n = self.sampling.num_inference_steps
        return [f"dsm: the steps {self.settings.dsm_step} and {self.settings.dsm_step + 1} are not both in the "
                f"schedule's steps 0..{n - 1}"] if self.trajectory() > n else []

    def on_step(self, p, s):
        if s.i < self.settings.dsm_step:
            return
        eps_c = p.model.eps(s.out, s.xx, s.t).chunk(2)[1].float()
        if s.i == self.settings.dsm_step:
            p.scratch[self.name] = eps_c
        else:
            p.values[self.name][:, 0] = (eps_c - p.scratch.pop(self.name)).flatten(1).pow(2).sum(dim=1).cpu()
