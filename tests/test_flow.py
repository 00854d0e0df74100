"""The rectified-flow denoiser against the closed form of Gaussian data under rectified flow (tests/gaussian.py)."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from gaussian import GaussianFlow, gaussian_embedding
from utils.detection import sharpness_scores
from utils.models.conditioning import Conditioning
from utils.models.flow import FlowDenoiser

SHAPE = (4, 4, 4)


def _setup(k=3, n=2, seed=0, shift=3.0):
    """A flow scheduler with SD3's shift, the closed-form model, K narrow conditions and a broad N(0, I) uncond."""
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    model = GaussianFlow(sched, SHAPE)
    g = torch.Generator().manual_seed(seed)
    cond = gaussian_embedding(torch.randn(k, *SHAPE, generator=g),
                              torch.log(torch.rand(k, *SHAPE, generator=g) * 0.5 + 0.01)).double()
    uncond = gaussian_embedding(torch.zeros(1, *SHAPE), torch.zeros(1, *SHAPE)).double()
    lat = torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)
    return sched, model, cond, uncond, lat


def _analytic(model, x, t, cond, uncond, space):
    """J_{v_delta} v_delta ('velocity') or H_delta s_delta ('score') per row of x, from the closed form."""
    sigma, mu_c, var_c, k_c = model.coefficients(t, cond)
    _, mu_u, var_u, k_u = model.coefficients(t, uncond)
    if space == "velocity":
        return (k_c - k_u) * (model.velocity(x, t, cond) - model.velocity(x, t, uncond))
    s_delta = -(x - (1 - sigma) * mu_c) / var_c + (x - (1 - sigma) * mu_u) / var_u
    return (-1 / var_c + 1 / var_u) * s_delta


def _trajectory(model, sched, lat, cond, uncond, steps, guidance):
    """Latents (K*n rows) at the first `steps` steps of the guided Euler path, with the closed-form velocity."""
    k, n = cond.shape[0], lat.shape[0]
    x, c, u = lat.repeat(k, 1, 1, 1), cond.repeat_interleave(n, 0), uncond.expand(k * n, -1, -1)
    out = []
    for i in range(steps):
        t = sched.timesteps[i]
        out.append(x)
        v_u, v_c = model.velocity(x, t, u), model.velocity(x, t, c)
        x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * (v_u + guidance * (v_c - v_u))
    return out, c, u


def test_velocity_sharpness_equals_closed_form_and_vanishes_at_sigma_one():
    sched, model, cond, uncond, lat = _setup()
    fm = FlowDenoiser(model, sched)
    vals, cost = sharpness_scores(fm, Conditioning.of(cond, uncond), lat, num_inference_steps=10,
                                  hvp_sampling_num=3, guidance_scale=4.0)
    assert vals.shape == (3, 2, 3) and cost == {"unet_forwards": 3, "jvps": 3}
    xs, c, u = _trajectory(model, sched, lat, cond, uncond, 3, 4.0)
    assert float(sched.sigmas[0]) == 1.0 and float(sched.sigmas[1]) < 1
    for i in (1, 2):
        expected = _analytic(model, xs[i], sched.timesteps[i], c, u, "velocity").flatten(1).norm(dim=1)
        torch.testing.assert_close(vals[..., i].reshape(-1).double(), expected, rtol=1e-5, atol=0)
        assert expected.min() > 1e-2
    # at sigma = 1 the velocity's Jacobian is the identity for every condition: J_delta = 0 exactly
    assert vals[..., 0].abs().max() < 1e-10


def test_score_space_equals_closed_form_and_is_the_velocity_metric_times_a_step_constant():
    sched, model, cond, uncond, lat = _setup(k=2)
    fv, fs = FlowDenoiser(model, sched), FlowDenoiser(model, sched, flow_space="score")
    fv.timesteps(10)
    emb = Conditioning.of(cond, uncond, n=lat.shape[0])
    xs, c, u = _trajectory(model, sched, lat, cond, uncond, 3, 4.0)
    for i in (1, 2):
        t, x, sigma = sched.timesteps[i], xs[i], sched.sigmas[i].double()
        xx = torch.cat([x, x])
        got = fs.hvp_delta(x, t, emb, fs.score_delta(fs.output(xx, t, emb), xx, t))
        torch.testing.assert_close(got, _analytic(model, x, t, c, u, "score"), rtol=1e-9, atol=1e-12)
        vel = fv.hvp_delta(x, t, emb, fv.score_delta(fv.output(xx, t, emb), xx, t))
        torch.testing.assert_close(got, ((1 - sigma) / sigma) ** 2 * vel, rtol=1e-9, atol=1e-12)
        # the conversions: eps_hat and x0_hat reproduce x = (1 - sigma) x0_hat + sigma eps_hat
        out = fv.output(xx, t, emb)
        torch.testing.assert_close((1 - sigma) * fv.x0(out, xx, t) + sigma * fv.eps(out, xx, t), xx)
    with pytest.raises(ValueError, match="sigma = 1"):
        sharpness_scores(fs, Conditioning.of(cond, uncond), lat, num_inference_steps=10)


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_fd_hvp_equals_the_jvp_on_the_linear_closed_form(scheme):
    sched, model, cond, uncond, lat = _setup(k=2)
    fm = FlowDenoiser(model, sched)
    t = fm.timesteps(10)[1]
    emb = Conditioning.of(cond, uncond, n=lat.shape[0])
    x = lat.repeat(2, 1, 1, 1)
    v_delta = fm.pair_score_delta(x, t, emb)
    exact = fm.hvp_delta(x, t, emb, v_delta)
    torch.testing.assert_close(fm.hvp_delta_fd(x, t, emb, 0.5, scheme=scheme), exact, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dynamic", [False, True])
def test_sample_is_the_scheduler_euler_loop_bit_for_bit(dynamic):
    """The guided Euler loop equals the pipeline's loop (scheduler.step on [x; x] outputs) in float32, with the
    pipeline's own schedule: SD3's static shift, or Flux's linspace sigmas with dynamic shifting."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    sched = (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
             if dynamic else FlowMatchEulerDiscreteScheduler(shift=3.0))
    spacing = (lambda n: np.linspace(1.0, 1 / n, n)) if dynamic else None
    model = GaussianFlow(sched, SHAPE).float()
    _, _, cond, uncond, lat = _setup(k=2)
    cond, uncond, lat = cond.float(), uncond.float(), lat.float()
    fm = FlowDenoiser(model, sched, image_seq_len=1024, sigma_spacing=spacing)
    emb = Conditioning.of(cond, uncond, n=lat.shape[0])
    with torch.no_grad():
        got = fm.sample(lat.repeat(2, 1, 1, 1), emb, 6, 4.0)
        if dynamic:
            mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
        else:
            sched.set_timesteps(6)
        x = lat.repeat(2, 1, 1, 1)
        for t in sched.timesteps:
            o_u, o_c = model(torch.cat([x, x]), t.expand(2 * x.shape[0]), **emb.stacked())[0].chunk(2)
            x = sched.step(o_u + 4.0 * (o_c - o_u), t, x, return_dict=False)[0]
    assert float(sched.sigmas[0]) == 1.0
    assert torch.equal(got, x)
