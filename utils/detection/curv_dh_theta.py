"""curv_dh_theta: Kim & Lee's Hessian-diagonal map against an earlier checkpoint (Delta h_theta~; their
utils/metric_utils.py compute_diag_h_diff_only_with_bad_model): ReLU(-sum over channels of diag(d f / d x)) with
f = -(eps_c(theta) - eps_c(theta~)) at their target step, by Hutchinson's estimator with K Rademacher probes (the
probes of curv_dh), each probe one VJP through both models' conditional forwards. Score: the map's spatial mean."""
import dataclasses

import torch

from .base import register
from .curv_dh import CurvDh, CurvDhSettings, hutchinson_diagonal
from .curv_ds import spatial_mean
from .curv_ds_theta import AgainstCheckpoint, ThetaOption, companion_of
from .maps import MAPS


@dataclasses.dataclass(frozen=True)
class ThetaDhSettings(ThetaOption, CurvDhSettings):
    """curv_dh_theta's options: curv_dh's (one flag each, shared) and the second model (shared with curv_ds_theta)."""


@register
class CurvDhTheta(AgainstCheckpoint, CurvDh):
    name = "curv_dh_theta"
    Settings = ThetaDhSettings
    description = ("spatial mean of ReLU(-sum over channels of diag(d f/d x)), f = -(eps_c(theta) - eps_c(theta~)), "
                   "theta~ an earlier checkpoint, by Hutchinson's estimator (Kim & Lee's Delta h_theta~ map); maps saved")

    def on_step(self, p, s):
        if s.i != self.settings.curv_step:
            return
        other = companion_of(p, self.name, self.settings.curv_theta)
        with p.paused(), torch.enable_grad():
            x = s.xin.detach().requires_grad_(True)
            # one conditional forward of each model (theirs: a pair forward of each, the conditional half used)
            with p.meter.unit("unet_forwards", [self.name], s.i, count=2):
                eps_c = p.model.eps(p.model.branch_output(x, s.t, p.embeds, "cond"), x, s.t)
                eps_t = other.eps(other.branch_output(x, s.t, p.embeds, "cond"), x, s.t)
            with p.meter.unit("vjps", [self.name], s.i, count=self.settings.curv_probes):
                diag = hutchinson_diagonal(-(eps_c - eps_t.to(eps_c.dtype)), x, self.probes(x, p.n))
        p.meter.count("probes", [self.name], s.i, count=self.settings.curv_probes)
        maps = torch.relu(-diag.sum(dim=1)).cpu()  # (B, h, w)
        p.values[self.name][:, 0] = spatial_mean(maps)
        p.extras[self.name] = [{MAPS: m} for m in p.split(maps)]
