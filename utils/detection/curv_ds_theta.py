"""curv_ds_theta: Kim & Lee's score-difference map against an earlier checkpoint (Delta s_theta~; their
utils/metric_utils.py compute_score_diffs_only_with_bad_model, --use_bad_model: SD v1-1 for v1.4): the map
(s_c(theta) - s_c(theta~))^2 summed over latent channels at their target step, both conditional, theta~'s
prediction on the same model input with the run's text conditioning (their code hands the bad UNet the current
model's embeddings). The trajectory is the run's model's (CFG), as theirs; the score is the map's spatial mean."""
import dataclasses

import torch

from .base import option, register
from .curv_ds import CurvDs, CurvSettings, spatial_mean
from .maps import MAPS


def theta_problems(name, model_id):
    """The problem (a list of at most one string) of a missing second model id."""
    return [] if model_id else [f"{name} compares the model with an earlier checkpoint: give its id with "
                                "--curv_theta MODEL_ID (Kim & Lee: CompVis/stable-diffusion-v1-1 for v1.4)"]


def companion_of(p, name, model_id):
    """The Denoiser of the second model from the pass; ValueError if the caller did not load it."""
    if model_id not in p.companions:
        raise ValueError(f"{name}: the second model {model_id!r} was not loaded (run_detectors' companions)")
    return p.companions[model_id]


class AgainstCheckpoint:
    """What both curv_*_theta detectors add to their curv_* base: the second model (settings.curv_theta) named as
    the pass's companion, checked when the settings are, and required in the pass."""

    def companion(self):
        return self.settings.curv_theta or None

    def check(self):
        return super().check() + theta_problems(self.name, self.settings.curv_theta)

    def prepare(self, p):
        companion_of(p, self.name, self.settings.curv_theta)


@dataclasses.dataclass(frozen=True)
class ThetaOption:
    """The second model's option, declared once for both curv_*_theta detectors' settings: put it first among the
    bases (ThetaOption, <curv settings>), so that its check runs after theirs."""
    curv_theta: str = option("", metavar="MODEL_ID")  # curv_*_theta: earlier checkpoint (theirs: SD v1-1 for v1.4)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.curv_theta, str):
            raise ValueError("curv_theta must be a model id (a string)")


@dataclasses.dataclass(frozen=True)
class ThetaSettings(ThetaOption, CurvSettings):
    """curv_ds_theta's options: the second model (and curv_step, shared with curv_ds)."""


@register
class CurvDsTheta(AgainstCheckpoint, CurvDs):
    name = "curv_ds_theta"
    Settings = ThetaSettings
    description = ("spatial mean of sum over channels of (s_c(theta) - s_c(theta~))^2 at the target step, theta~ "
                   "an earlier checkpoint (Kim & Lee's Delta s_theta~ map), per generation; maps saved")

    def on_step(self, p, s):
        if s.i != self.settings.curv_step:
            return
        other = companion_of(p, self.name, self.settings.curv_theta)
        _, sigma = p.model.alpha_sigma(s.t)
        eps_c = p.model.eps(s.out, s.xx, s.t).chunk(2)[1].float()
        with p.paused(), torch.no_grad(), p.meter.unit("unet_forwards", [self.name], s.i):
            eps_t = other.eps(other.branch_output(s.xin, s.t, p.embeds, "cond"), s.xin, s.t).float()
        maps = ((eps_c - eps_t) / sigma.to(eps_c.device)).pow(2).sum(dim=1).cpu()  # (B, h, w)
        p.values[self.name][:, 0] = spatial_mean(maps)
        p.extras[self.name] = [{MAPS: m} for m in p.split(maps)]
