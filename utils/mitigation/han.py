"""Han et al. (NeurIPS 2025): the initial noise adjusted so that guidance can start early (hygnhan/
init_noise_diffusion_memorization, local_sd_pipeline.py). Two methods:

  han_batch   adj_init_noise_batch_wise: M sharpness-aware finite-difference updates of every image's x_T, no
              autograd, then unconditional steps up to and including step tau (their --apply_cfg_step)
  han_sample  adj_init_noise_per_sample: AdamW on each image's x_T alone until ||out_c - out_u|| <= l_target
"""
import dataclasses

import torch

from .base import Method, Plan, grid_float, hp, is_count, is_finite, problems
from ..cli import nonneg_float, nonneg_int, positive_float, bounded_int
from .sail import frozen


def _author(family):
    """Their generate_images.py: DDIM from the model's config with --guidance_scale 7; the paper's SD v2.0 runs
    use Euler (the sd2 family here)."""
    euler = family.name == "sd2"
    return dict(sampler="euler" if euler else "ddim", guidance_scale=7.0,
                source="hygnhan/init_noise_diffusion_memorization generate_images.py: guidance 7"
                       + (", Euler on SD v2.0 (their paper)" if euler else ", DDIMScheduler from the model's config"))


def _first_input(model, lat, t):
    """The doubled model input [x; x] of unit-variance latents lat (B, ...) at the sampler's first timestep t (for
    DDIM: [lat; lat] itself, as their batch-wise code feeds the UNet)."""
    return model.scale_input(model.initial(torch.cat([lat, lat])), t)


def guidance_difference(model, lat, t, cond):
    """out(x, c) - out(x, uncond) per image, (B, ...), raw model output (their eps_tilde: no v-to-eps conversion),
    at the first timestep t; cond: a Conditioning of B rows. One pair call."""
    uc, c = model.output(_first_input(model, lat, t), t, cond).chunk(2)
    return c - uc


# ------------------------------------------------------------------------------------------------ batch-wise

@dataclasses.dataclass(frozen=True)
class HanBatchSettings:
    """Their batch-wise adjustment (adj_init_noise_batch_wise and the sampling loop of local_sd_pipeline.py), with
    their README's and generate_images.py's defaults. Per image, with d(x) = out(x, c) - out(x, uncond) at the first
    timestep: x <- x - gamma * (d(x + rho * d(x)/||d(x)||) - d(x)), iters times (2 pair calls each, no gradients);
    then steps i <= cfg_step are sampled unconditionally (guidance 0), the rest with the run's guidance."""
    rho: float = hp(50.0, type=nonneg_float)    # their --rho: the length of the probe step (norm over the latent)
    gamma: float = hp(0.7, type=nonneg_float)   # their --gamma: the step size of the update
    iters: int = hp(2, type=nonneg_int)         # M, their --adj_iters
    cfg_step: int = hp(4, type=bounded_int(-1))  # tau, their --apply_cfg_step: steps i <= it unconditional; -1 none

    def __post_init__(self):
        problems([(is_finite(self.rho) and self.rho >= 0, "rho must be a number >= 0"),
                  (is_finite(self.gamma) and self.gamma >= 0, "gamma must be a number >= 0"),
                  (is_count(self.iters) and self.iters >= 0, "iters must be an integer >= 0"),
                  (is_count(self.cfg_step) and self.cfg_step >= -1, "cfg_step must be an integer >= -1")])

    def to_dict(self):
        return dataclasses.asdict(self)


def batch_adjusted(model, noise, cond, settings, num_inference_steps=50):
    """Their batch-wise update of the initial noise (n, C, H, W) for a Conditioning of n rows. Returns (latents,
    record). With iters = 0 the noise tensor itself."""
    st, lat = settings, noise
    t = model.timesteps(num_inference_steps, device=noise.device)[0]
    with torch.no_grad():
        for _ in range(st.iters):
            d = guidance_difference(model, lat, t, cond)
            mag = d.pow(2).sum(dim=tuple(range(1, d.dim())), keepdim=True).sqrt()
            d_probe = guidance_difference(model, lat + st.rho * (d / mag), t, cond)
            lat = lat - st.gamma * (d_probe - d)
    n = noise.shape[0]
    return lat, dict(search_unet_calls=2 * st.iters, search_backward_calls=0, search_batch=2 * n)


class UncondUntil:
    """Guidance 0 (their noise_pred = noise_pred_uncond) at steps i <= cfg_step, then the run's scale."""

    def __init__(self, cfg_step, scale):
        self.cfg_step, self.scale, self.uncond_steps = cfg_step, scale, 0

    def __call__(self, i, t, out):
        if i <= self.cfg_step:
            self.uncond_steps += 1
            return 0.0
        return self.scale

    def report(self):
        return dict(uncond_steps=self.uncond_steps)


def plan_han_batch(ctx, index, prompt, settings):
    n = ctx.noise.shape[0]
    cond = ctx.encode([prompt])
    with frozen(ctx.model.unet):
        lat, rec = batch_adjusted(ctx.model, ctx.noise, cond.expand(n), settings, ctx.num_inference_steps)
    return Plan(lat, cond, UncondUntil(settings.cfg_step, ctx.guidance_scale), [prompt] * n, rec)


def _grid_rho(text):
    v = grid_float(text)
    if v < 0:
        raise ValueError("negative")
    return {"rho": v}


# Their README's setting is rho = 50, gamma = 0.7, M = 2, tau = 4. The grid is this project's (their code and README
# give one setting): the probe length rho around theirs, the rest fixed (docs/mitigation.md).
BATCH = Method("han_batch", HanBatchSettings, plan_han_batch, "rho", _grid_rho,
               [{"rho": v} for v in (10.0, 25.0, 50.0, 75.0, 100.0)],
               lambda s: f"rho={s['rho']:g}", flag_prefix="han_",
               title="han_batch (Han et al., NeurIPS 2025: batch-wise initial-noise adjustment)", author=_author)


# ------------------------------------------------------------------------------------------------ per-sample

@dataclasses.dataclass(frozen=True)
class HanSampleSettings:
    """Their per-sample adjustment (adj_init_noise_per_sample, generate_images.py defaults): each image's x_T alone
    is optimized by AdamW on ||out(x, c) - out(x, uncond)|| at the first timestep (one norm over the image's latent,
    raw model output); the loss is evaluated before each update and the search stops when it is <= target_loss, or
    after max_iters updates (the last latents then used without evaluating them). Sampling: the run's guidance at
    every step."""
    target_loss: float = hp(0.9, type=positive_float)  # l_target, their --target_loss
    lr: float = hp(0.01, type=positive_float)          # their --lr
    max_iters: int = hp(1000, type=nonneg_int)         # their --optim_iters
    weight_decay: float = hp(0.01, type=nonneg_float)  # AdamW's default, which their code keeps

    def __post_init__(self):
        problems([(is_finite(self.target_loss) and self.target_loss > 0, "target_loss must be a number > 0"),
                  (is_finite(self.lr) and self.lr > 0, "lr must be a number > 0"),
                  (is_count(self.max_iters) and self.max_iters >= 0, "max_iters must be an integer >= 0"),
                  (is_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be a number >= 0")])

    def to_dict(self):
        return dataclasses.asdict(self)


def sample_adjusted(model, noise, cond, settings, num_inference_steps=50):
    """Their per-sample search for each row of noise (n, C, H, W), cond a Conditioning of one row. Returns
    (latents (n, ...) detached, record with each image's losses, updates and whether it reached the target)."""
    st = settings
    t = model.timesteps(num_inference_steps, device=noise.device)[0]
    out, losses, updates, reached = [], [], [], []
    with frozen(model.unet), torch.enable_grad():
        for k in range(noise.shape[0]):
            lat = noise[k:k + 1].detach().clone().requires_grad_(True)
            opt = torch.optim.AdamW([lat], lr=st.lr, weight_decay=st.weight_decay)
            trace, done = [], False
            for _ in range(st.max_iters):
                loss = guidance_difference(model, lat, t, cond).float().norm()
                trace.append(float(loss.detach()))
                if trace[-1] <= st.target_loss:
                    done = True
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
            out.append(lat.detach())
            losses.append(trace)
            updates.append(len(trace) - int(done))
            reached.append(done)
    rec = dict(han_losses=losses, han_updates=updates, han_reached=reached, reached_target=all(reached),
               search_unet_calls=sum(len(x) for x in losses), search_backward_calls=sum(updates), search_batch=2)
    return torch.cat(out), rec


def plan_han_sample(ctx, index, prompt, settings):
    n = ctx.noise.shape[0]
    cond = ctx.encode([prompt])
    lat, rec = sample_adjusted(ctx.model, ctx.noise, cond, settings, ctx.num_inference_steps)
    return Plan(lat, cond, ctx.guidance_scale, [prompt] * n, rec)


def _grid_target(text):
    v = grid_float(text)
    if v <= 0:
        raise ValueError("not positive")
    return {"target_loss": v}


# Their code's default l_target is 0.9; the five values around it are this project's (docs/mitigation.md: the
# paper's appendix was not available to check them).
SAMPLE = Method("han_sample", HanSampleSettings, plan_han_sample, "target_loss", _grid_target,
                [{"target_loss": v} for v in (0.7, 0.8, 0.9, 1.0, 1.1)],
                lambda s: f"l_target={s['target_loss']:g}", flag_prefix="hans_",
                title="han_sample (Han et al., NeurIPS 2025: per-sample initial-noise adjustment)", author=_author)
