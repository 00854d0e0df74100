"""curv_ds: Kim & Lee (ICML 2026, Gwangho99/mem-curv-diff utils/metric_utils.py compute_score_diffs_only), the map
(s_c - s_u)^2 summed over latent channels at their target step (the last DDIM step), s = -eps / sigma, from the
shared pair forward (no model call of its own); the detection score is the map's spatial mean. The maps are saved
for localization (utils/detection/maps.py)."""
import dataclasses

from ..cli import nonneg_int
from .base import Detector, option, register
from .maps import MAPS


def target_step_problem(name, step, num_inference_steps):
    """The problem (a list of at most one string) of a target step index outside the schedule."""
    return [f"{name}: the target step {step} is outside the schedule's steps 0..{num_inference_steps - 1}"] \
        if step >= num_inference_steps else []


@dataclasses.dataclass(frozen=True)
class CurvSettings:
    """Options shared by Kim & Lee's two maps."""
    curv_step: int = option(49, type=nonneg_int)  # curv_ds, curv_dh: target step index (theirs: 49, the last of 50)

    def __post_init__(self):
        if not (isinstance(self.curv_step, int) and self.curv_step >= 0):
            raise ValueError("curv_step must be a non-negative integer")


def spatial_mean(maps):
    """Detection score per generation: the mean of each (h, w) map, (B, h, w) -> (B,)."""
    return maps.flatten(1).mean(dim=1)


@register
class CurvDs(Detector):
    name = "curv_ds"
    Settings = CurvSettings
    description = ("spatial mean of sum over channels of (s_c - s_u)^2 at the target step (Kim & Lee's score-difference "
                   "map), per generation; the maps are saved beside the images")

    def trajectory(self):
        return self.settings.curv_step + 1

    def check(self):
        return target_step_problem(self.name, self.settings.curv_step, self.sampling.num_inference_steps)

    def on_step(self, p, s):
        if s.i != self.settings.curv_step:
            return
        _, sigma = p.model.alpha_sigma(s.t)
        eps_u, eps_c = p.model.eps(s.out, s.xx, s.t).float().chunk(2)
        maps = ((eps_c - eps_u) / sigma.to(eps_c.device)).pow(2).sum(dim=1).cpu()  # (B, h, w); sign drops out
        p.values[self.name][:, 0] = spatial_mean(maps)
        p.extras[self.name] = [{MAPS: m} for m in p.split(maps)]
