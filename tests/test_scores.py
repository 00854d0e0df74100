"""Score, HVP and detection math against closed forms, finite differences and dense Jacobians."""
import pytest
import torch

from gaussian import GaussianUNet, ddim_scheduler, gaussian_embedding
from utils.detection import sharpness_scores
from utils.models.denoisers import alpha_sigma, score_difference
from utils.models.denoisers import denoiser
from utils.models.conditioning import Conditioning

SHAPE = (4, 4, 4)


def _conditions(k, seed=0):
    """Uncond: broad N(0, I); K conds: narrow Gaussians (small variance = sharp peak) with random means."""
    g = torch.Generator().manual_seed(seed)
    uncond = gaussian_embedding(torch.zeros(1, *SHAPE), torch.zeros(1, *SHAPE))
    mu = torch.randn(k, *SHAPE, generator=g)
    log_s2 = torch.log(torch.rand(k, *SHAPE, generator=g) * 0.5 + 0.01)
    return gaussian_embedding(mu, log_s2), uncond


def _analytic_metric(model, x, t, cond, uncond):
    """||H_delta s_delta|| per (prompt, generation) from the closed form: H = -diag(1/v)."""
    k, n = cond.shape[0], x.shape[0]
    xs = x.repeat(k, 1, 1, 1)
    c = cond.repeat_interleave(n, 0)
    u = uncond.expand(k * n, -1, -1)
    s_d = model.score(xs, t, c) - model.score(xs, t, u)
    _, _, _, v_c = model.marginal(t, c)
    _, _, _, v_u = model.marginal(t, u)
    h = (-1 / v_c + 1 / v_u) * s_d
    return h.flatten(1).norm(dim=1).view(k, n)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_score_from_output_matches_closed_form(pred):
    sched = ddim_scheduler(pred)
    model = GaussianUNet(sched.alphas_cumprod, SHAPE, pred).double()
    cond, uncond = _conditions(2)
    x = torch.randn(2, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for t in (981, 500, 21):
        alpha, sigma, _, _ = model.marginal(t, cond.double())  # float64 alpha_t, sigma_t of the same schedule
        torch.testing.assert_close(torch.stack([alpha, sigma]).float(), torch.stack(alpha_sigma(sched, t)))
        out = model(x, t, cond.double())[0]
        got = denoiser(model, sched).score_at(out, x, alpha, sigma)
        torch.testing.assert_close(got, model.score(x, t, cond.double()), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_detection_step1_equals_analytic_value(pred):
    sched = ddim_scheduler(pred)
    model = GaussianUNet(sched.alphas_cumprod, SHAPE, pred)
    cond, uncond = _conditions(3)
    lat = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    vals, cost = sharpness_scores(denoiser(model, sched), Conditioning.of(cond, uncond), lat, hvp_sampling_num=1)
    assert vals.shape == (3, 4, 1) and cost == {"unet_forwards": 1, "jvps": 1}
    expected = _analytic_metric(model, lat, sched.timesteps[0], cond, uncond)
    torch.testing.assert_close(vals[..., 0], expected, rtol=1e-4, atol=0)


def test_sharper_condition_gives_larger_metric():
    """The paper's premise in the closed form: the same condition mean with a smaller data variance (a sharper
    peak of log p) gives a larger ||H_delta s_delta|| at every generation, and the order follows the variance."""
    sched = ddim_scheduler()
    model = GaussianUNet(sched.alphas_cumprod, SHAPE).double()
    mu = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64).expand(4, *SHAPE)
    variances = torch.tensor([1.0, 0.3, 0.1, 0.01], dtype=torch.float64)  # decreasing: ever sharper
    cond = gaussian_embedding(mu, variances.log().view(4, 1, 1, 1).expand(4, *SHAPE))
    uncond = gaussian_embedding(torch.zeros(1, *SHAPE, dtype=torch.float64), torch.zeros(1, *SHAPE, dtype=torch.float64))
    lat = torch.randn(3, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    vals, _ = sharpness_scores(denoiser(model, sched), Conditioning.of(cond, uncond), lat)
    vals = vals[..., 0]  # (4 conditions, 3 generations)
    assert (vals[1:] > vals[:-1]).all(), vals


def test_detection_later_steps_follow_ddim_cfg_path_and_make_no_extra_call():
    sched = ddim_scheduler()
    model = GaussianUNet(sched.alphas_cumprod, SHAPE).double()
    cond, uncond = _conditions(2)
    cond, uncond = cond.double(), uncond.double()
    lat = torch.randn(3, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    steps, g = 3, 7.5
    model.calls = 0
    vals, cost = sharpness_scores(denoiser(model, sched), Conditioning.of(cond, uncond), lat, hvp_sampling_num=steps,
                                  guidance_scale=g)
    # One forward + one JVP (which calls the function once) per measured step, nothing after the last one.
    assert cost == {"unet_forwards": steps, "jvps": steps} and model.calls == 2 * steps
    # Independent DDIM (eta=0) with CFG on the closed-form model, written out here.
    ts = sched.timesteps
    x = lat.repeat(2, 1, 1, 1)
    c, u = cond.repeat_interleave(3, 0), uncond.expand(6, -1, -1)
    for i in range(steps):
        t = int(ts[i])
        expected = _analytic_metric(model, x[:3], t, cond[:1], uncond)[0], _analytic_metric(model, x[3:], t, cond[1:], uncond)[0]
        torch.testing.assert_close(vals[0, :, i], expected[0].float(), rtol=1e-5, atol=0)
        torch.testing.assert_close(vals[1, :, i], expected[1].float(), rtol=1e-5, atol=0)
        abar = sched.alphas_cumprod[t].double()
        abar_prev = sched.alphas_cumprod[t - 20].double()
        eps = model(x, t, u)[0] + g * (model(x, t, c)[0] - model(x, t, u)[0])
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps


def test_reference_v_score_scales_metric_by_inverse_sigma_squared():
    sched = ddim_scheduler("v_prediction")
    model = GaussianUNet(sched.alphas_cumprod, SHAPE, "v_prediction").double()
    cond, uncond = _conditions(2)
    lat = torch.randn(2, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    a, _ = sharpness_scores(denoiser(model, sched, score_form="correct"), Conditioning.of(cond.double(), uncond.double()), lat)
    b, _ = sharpness_scores(denoiser(model, sched, score_form="reference"), Conditioning.of(cond.double(), uncond.double()), lat)
    _, sigma = alpha_sigma(sched, sched.timesteps[0])
    torch.testing.assert_close(b, a / sigma.item() ** 2, rtol=1e-5, atol=0)


def test_hvp_matches_dense_jacobian_and_finite_differences(tiny_eps):
    import copy
    pipe = tiny_eps
    unet = copy.deepcopy(pipe.unet).double()  # float64 so that finite differences are accurate
    sched = pipe.scheduler
    sched.set_timesteps(50)
    t = sched.timesteps[0]
    with torch.no_grad():
        cond = pipe.encode_prompt(["a red square"], "cpu", 1, False)[0]
        uncond = pipe.encode_prompt("", "cpu", 1, False)[0]
    embeds = Conditioning.of(cond, uncond, 1).to(torch.float64)
    model = denoiser(unet, sched)
    fn = model.pair_score_fn(t, embeds)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    v = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        h = model.hvp_delta(x, t, embeds, v)
        # Central finite difference of s_delta along v.
        eps = 1e-5
        fd = (score_difference(fn(x + eps * v)) - score_difference(fn(x - eps * v))) / (2 * eps)
    torch.testing.assert_close(h, fd, rtol=1e-5, atol=1e-7 * fd.abs().max().item())
    # Dense Jacobian of x -> s_delta(x) (reverse mode, independent of the JVP path).
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        jac = torch.autograd.functional.jacobian(lambda z: score_difference(fn(z.view_as(x))).flatten(), x.flatten())
    torch.testing.assert_close(h.flatten(), jac @ v.flatten(), rtol=1e-9, atol=1e-12 * jac.abs().max().item())


def test_separate_jvp_unet_runs_the_jvp_in_its_dtype(tiny_eps):
    """--jvp_dtype float32 path: a higher-precision copy for the JVP gives the same metric (here float64 vs 32)."""
    import copy
    pipe = tiny_eps
    with torch.no_grad():
        cond = pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, False)[0]
        uncond = pipe.encode_prompt("", "cpu", 1, False)[0]
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    a, _ = sharpness_scores(denoiser(pipe.unet, pipe.scheduler), Conditioning.of(cond, uncond), lat)
    calls = {"n": 0}
    hi = copy.deepcopy(pipe.unet).double()
    hi.register_forward_hook(lambda m, i, o: calls.__setitem__("n", calls["n"] + 1))
    b, _ = sharpness_scores(denoiser(pipe.unet, pipe.scheduler, jvp_unet=hi), Conditioning.of(cond, uncond), lat)
    assert calls["n"] == 1
    torch.testing.assert_close(a, b, rtol=1e-4, atol=0)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_fd_hvp_equals_analytic_value_on_gaussian(pred, scheme):
    """The Gaussian score is linear in x, so a difference quotient has no truncation error at any step: the fd
    estimate must equal -diag(1/v_c - 1/v_u) s_delta (the closed form), also with the shared first forward."""
    sched = ddim_scheduler(pred)
    model = GaussianUNet(sched.alphas_cumprod, SHAPE, pred).double()
    cond, uncond = _conditions(3)
    cond, uncond = cond.double(), uncond.double()
    lat = torch.randn(2, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    sm = denoiser(model, sched)
    t = sm.timesteps(50)[0]
    emb = Conditioning.of(cond, uncond, 2)
    x = lat.repeat(3, 1, 1, 1)
    want = _analytic_metric(model, lat, t, cond, uncond).flatten()
    for h in (1e-3, 0.5, 20.0):
        got = sm.hvp_delta_fd(x, t, emb, h, scheme=scheme)
        torch.testing.assert_close(got.flatten(1).norm(dim=1), want, rtol=1e-6, atol=0)  # float32 sigma_t
    shared = sm.hvp_delta_fd(x, t, emb, 0.5, s_delta=sm.pair_score_delta(x, t, emb), scheme=scheme)
    torch.testing.assert_close(shared, got, rtol=1e-7, atol=0)
    zero = sm.hvp_delta_fd(x, t, Conditioning.of(uncond.expand(3, -1, -1), uncond, 2), 0.5, scheme=scheme)
    assert torch.equal(zero, torch.zeros_like(zero))  # s_delta = 0 (cond = uncond): 0, not NaN


def test_fd_hvp_error_shrinks_with_the_step_at_its_order(tiny_eps):
    """On a nonlinear UNet (float64, no rounding to speak of) the forward difference's error against the exact
    JVP falls ~10x per 10x smaller step (first order), the central one ~100x (second order)."""
    import copy
    pipe = tiny_eps
    unet = copy.deepcopy(pipe.unet).double()
    with torch.no_grad():
        cond = pipe.encode_prompt(["a red square", "digit seven"], "cpu", 1, False)[0].double()
        uncond = pipe.encode_prompt("", "cpu", 1, False)[0].double()
    sm = denoiser(unet, pipe.scheduler)
    t = sm.timesteps(50)[0]
    emb = Conditioning.of(cond, uncond, 1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    s_delta = sm.pair_score_delta(x, t, emb)
    exact = sm.hvp_delta(x, t, emb, s_delta)

    def err(h, scheme):
        got = sm.hvp_delta_fd(x, t, emb, h, s_delta=s_delta, scheme=scheme)
        return ((got.double() - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)).max().item()

    assert 5 < err(1.0, "forward") / err(0.1, "forward") < 20
    assert 50 < err(1.0, "central") / err(0.1, "central") < 200
    assert err(1e-3, "central") < 1e-5  # and it converges to the JVP's value
    # a separate fd UNet (here float64 while the model is float32) is the one the differences run through
    calls = {"n": 0}
    hook = unet.register_forward_hook(lambda m, i, o: calls.__setitem__("n", calls["n"] + 1))
    lo = denoiser(pipe.unet, pipe.scheduler, fd_unet=unet)
    got = lo.hvp_delta_fd(x.float(), t, emb.to(torch.float32), 1e-3, scheme="central")
    hook.remove()
    assert calls["n"] == 3 and got.dtype == torch.float64  # s_delta at x, then x + h u and x - h u, in float64
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-6 * exact.abs().max().item())
