"""curv_dh: Kim & Lee (ICML 2026, Gwangho99/mem-curv-diff utils/metric_utils.py compute_diag_h_diff_only and
hutchinson_diag_from_output), the map ReLU(-sum over channels of diag(d f / d x)) with f = -(eps_c - eps_u) at their
target step (the last DDIM step): diag(-H(x, c)) - diag(-H(x, empty)) up to their dropped 1/sigma, by Hutchinson's
estimator mean_k v_k * (J^T v_k) over K Rademacher probes (their K = 16), each probe one VJP through one pair
forward that keeps its graph. The detection score is the map's spatial mean; the maps are saved for localization."""
import dataclasses

import torch

from ..cli import nonneg_int, positive_int
from .base import Detector, option, positive_fields, register
from .curv_ds import CurvSettings, spatial_mean, target_step_problem
from .maps import MAPS


@dataclasses.dataclass(frozen=True)
class CurvDhSettings(CurvSettings):
    """Options of Kim & Lee's Hessian-diagonal map (and curv_step, shared with curv_ds)."""
    curv_probes: int = option(16, type=positive_int)  # curv_dh: Hutchinson's Rademacher probes K (theirs: 16)
    curv_seed: int = option(0, type=nonneg_int)  # curv_dh: probe seed; generation j's probes from curv_seed + j

    def __post_init__(self):
        super().__post_init__()
        positive_fields(self, ("curv_probes",))


def rademacher(shape, seed, device, dtype):
    """A +-1 tensor of `shape` from a CPU generator seeded with `seed` (the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(device=device, dtype=dtype)


def hutchinson_diagonal(f, x, probes):
    """Hutchinson's estimate of diag(d f / d x) (B, ...): mean over probes v (a list of tensors shaped like x) of
    v * (J^T v), one VJP each; f (B, ...) computed from x (requires grad) with its graph kept."""
    diag = torch.zeros_like(x, dtype=torch.float32)
    for v in probes:
        (jtv,) = torch.autograd.grad(f, x, grad_outputs=v.to(f.dtype), retain_graph=True)
        diag += (v * jtv).float()
    return diag / len(probes)


@register
class CurvDh(Detector):
    name = "curv_dh"
    Settings = CurvDhSettings
    description = ("spatial mean of ReLU(-sum over channels of diag(d f/d x)), f = -(eps_c - eps_u), at the target "
                   "step by Hutchinson's estimator (Kim & Lee's Hessian-diagonal map), per generation; maps saved")

    def trajectory(self):
        return self.settings.curv_step + 1

    def check(self):
        return target_step_problem(self.name, self.settings.curv_step, self.sampling.num_inference_steps)

    def probes(self, x, n):
        """K probes shaped like x (B = K prompts x n generations): row b's from curv_seed + (b mod n) and the probe
        index, so a generation's probes do not depend on the batch or the prompt."""
        st = self.settings
        return [torch.stack([rademacher(x.shape[1:], (st.curv_seed + b % n) * 10007 + k, x.device, x.dtype)
                             for b in range(x.shape[0])]) for k in range(st.curv_probes)]

    def on_step(self, p, s):
        if s.i != self.settings.curv_step:
            return
        with p.paused(), torch.enable_grad():
            x = s.xin.detach().requires_grad_(True)
            xx = torch.cat([x, x])
            with p.meter.unit("unet_forwards", [self.name], s.i):
                eps_u, eps_c = p.model.eps(p.model.output(xx, s.t, p.embeds), xx, s.t).chunk(2)
            with p.meter.unit("vjps", [self.name], s.i, count=self.settings.curv_probes):
                diag = hutchinson_diagonal(-(eps_c - eps_u), x, self.probes(x, p.n))
        p.meter.count("probes", [self.name], s.i, count=self.settings.curv_probes)
        maps = torch.relu(-diag.sum(dim=1)).cpu()  # (B, h, w)
        p.values[self.name][:, 0] = spatial_mean(maps)
        p.extras[self.name] = [{MAPS: m} for m in p.split(maps)]
