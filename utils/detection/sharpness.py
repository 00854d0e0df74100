"""sharpness: ||H_delta s_delta|| (Jeon et al., 2025) at each of the first hvp_sampling_num sampling steps, from the
step's shared pair forward plus one exact forward-mode JVP (or finite differences of s_delta along itself)."""
import dataclasses
import math

from ..cli import positive_float, positive_int
from ..models.denoisers import FD_PRECISIONS, FD_SCHEMES, flat_norm
from .base import Detector, Sampling, option, positive_fields, register

HVP_METHODS = ("jvp", "fd")  # exact forward-mode JVP, or finite differences of s_delta
FD_STEP = 1e-3  # default fd step: per-entry RMS of the displacement along s_delta (README "Cost", the frontier)


@dataclasses.dataclass(frozen=True)
class SharpnessSettings:
    """Options of the sharpness detector."""
    hvp_sampling_num: int = option(1, type=positive_int, steps=True)  # sharpness: first sampling steps measured
    hvp: str = option("jvp", choices=HVP_METHODS, help=(  # sharpness: exact JVP or finite differences
        "sharpness: jvp = H_delta s_delta by one exact forward-mode JVP (default); fd = finite differences of "
        "s_delta along itself: 1 extra forward that can use the fused attention kernels (README 'Cost')"))
    fd_step: float = option(FD_STEP, type=positive_float)  # fd: per-entry RMS of the displacement along s_delta
    fd_precision: str = option("float32", choices=FD_PRECISIONS, help=(  # fd: precision of the difference forwards
        "fd: float32 = the difference forwards in float32 (a float32 UNet copy when the model runs in bfloat16: 2 "
        "float32 forwards); model = in the model's dtype (bfloat16 fails the agreement targets); tf32 = float32 "
        "weights with TF32 math (CUDA)"))
    fd_scheme: str = option("forward", choices=FD_SCHEMES)  # fd: forward = 1 displaced forward; central = 2 (x +- h u)

    def __post_init__(self):
        positive_fields(self, ("hvp_sampling_num",))
        problems = [f"{k} must be one of {allowed}" for k, allowed in
                    (("hvp", HVP_METHODS), ("fd_precision", FD_PRECISIONS), ("fd_scheme", FD_SCHEMES))
                    if getattr(self, k) not in allowed]
        if not (isinstance(self.fd_step, (int, float)) and 0 < self.fd_step < float("inf")):
            problems.append("fd_step must be a positive finite number")
        if problems:
            raise ValueError("; ".join(problems))


@register
class Sharpness(Detector):
    name = "sharpness"
    Settings = SharpnessSettings
    description = "||H_delta s_delta|| (mean over generations), per prompt and sampling step"
    model_options = ("v_score", "jvp_dtype")

    def steps(self):
        return self.settings.hvp_sampling_num

    def trajectory(self):
        return self.settings.hvp_sampling_num

    def identity(self):
        out = super().identity()
        if self.settings.hvp == "jvp":  # the default adds nothing: old progress logs still resume
            for k in ("hvp", "fd_step", "fd_precision", "fd_scheme"):
                del out[k]
        return out

    def model_needs(self):
        return {"jvp": True} if self.settings.hvp == "jvp" else {"fd_precision": self.settings.fd_precision}

    def on_step(self, p, s):
        with p.paused():
            h = self._hvp(p, s)
        p.values[self.name][:, s.i] = flat_norm(h).cpu()

    def _hvp(self, p, s):
        """H_delta s_delta (B, ...) at step i from the step's pair forward: the exact JVP (hvp 'jvp'), or finite
        differences ('fd') that reuse the pair forward when it was computed in the fd precision (else one more pair
        forward at xin through model.fd_unet), plus one (forward) or two (central) displaced pair forwards."""
        st, model = self.settings, p.model
        if st.hvp == "jvp":
            s_delta = model.score_delta(s.out, s.xx, s.t)
            with p.meter.unit("jvps", [self.name], s.i):
                return model.hvp_delta(s.xin, s.t, p.embeds, s_delta)
        shared = model.fd_unet is None and st.fd_precision != "tf32"
        s_delta = model.score_delta(s.out, s.xx, s.t) if shared else None
        h = st.fd_step * math.sqrt(s.xin[0].numel())
        count = (0 if shared else 1) + (2 if st.fd_scheme == "central" else 1)
        with p.meter.unit("fd_forwards", [self.name], s.i, count=count):
            return model.hvp_delta_fd(s.xin, s.t, p.embeds, h, s_delta=s_delta, scheme=st.fd_scheme)


def sharpness_scores(model, cond, latents, *, num_inference_steps=50, hvp_sampling_num=1,
                     guidance_scale=7.5):
    """Detection metric ||H_delta s_delta|| for K prompts x n generations at the first S sampling steps.

    model: utils.models.denoisers.Denoiser (its scheduler's timesteps are set here); cond: Conditioning of K prompts;
    latents (n, C, H, W), the same initial noise for every prompt. At step i the UNet runs once on [x; x] for
    both branches, then one JVP gives H_delta s_delta; between measured steps x advances by a classifier-free-
    guided DDIM step. No UNet call is made after the last measured step. Returns a float32 tensor (K, n, S) and
    a dict of cost counts. (The 'sharpness' detector of run_detectors, which this calls.)
    """
    from .loop import run_detectors
    if hvp_sampling_num > num_inference_steps:
        raise ValueError("the number of measured steps must not exceed the number of sampling steps")
    sampling = Sampling(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    vals, _, _, meter = run_detectors(model, cond, latents, ["sharpness"],
                                      {"sharpness": SharpnessSettings(hvp_sampling_num=hvp_sampling_num)}, sampling)
    tally = meter.summary(["sharpness"])["sharpness"]
    return vals["sharpness"], {"unet_forwards": tally["unet_forwards"], "jvps": tally["jvps"]}
