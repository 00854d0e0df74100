"""The 2024-26 detectors (metric2, dsm, curv_ds, curv_dh, nemo) against independent computations written here with
plain torch/diffusers calls on the tiny pipeline and closed forms on the Gaussian model; computing them beside the
others leaves the others' values bit-identical."""
import numpy as np
import pytest
import torch

from gaussian import GaussianUNet, ddim_scheduler, gaussian_embedding
from utils.detection.curv_dh import CurvDh, CurvDhSettings
from utils.detection.loop import run_detectors, settings_for
from utils.models.conditioning import Conditioning
from utils.models.denoisers import denoiser
from utils.models.families import SD1

PROMPTS = ["a photo of a cat", "digit seven"]


@pytest.fixture(scope="module")
def setup(tiny_eps):
    pipe = tiny_eps
    lat = SD1.initial_latents(pipe, 3, 5)
    return pipe, Conditioning.of(SD1.embed(pipe, PROMPTS, "cpu"), SD1.embed(pipe, "", "cpu")), lat


def _embeds(pipe, prompt, n):
    with torch.no_grad():
        c = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        u = pipe.encode_prompt("", "cpu", 1, False)[0]
    return u.expand(n, -1, -1), c.expand(n, -1, -1)


def _guided_path(pipe, u, c, lat, steps):
    """Plain diffusers DDIM with CFG 7.5 from lat: [(t, x_t)] for the first `steps` steps."""
    sched, x, out = pipe.scheduler, lat.clone(), []
    sched.set_timesteps(50)
    for t in sched.timesteps[:steps]:
        out.append((t, x))
        with torch.no_grad():
            e_u = pipe.unet(x, t, encoder_hidden_states=u).sample
            e_c = pipe.unet(x, t, encoder_hidden_states=c).sample
        x = sched.step(e_u + 7.5 * (e_c - e_u), t, x, eta=0.0).prev_sample
    return out


def test_metric2_and_dsm_equal_the_authors_steps(setup):
    """metric2: two separate autograd.grad calls of 0.5||eps||^2 per branch (as their script); dsm: the squared
    change of the conditional prediction between steps 1 and 2 (and 0 and 1)."""
    pipe, cond, lat = setup
    model = denoiser(pipe.unet, pipe.scheduler)
    vals, _, _, meter = run_detectors(model, cond, lat, ["metric2", "dsm"], settings_for())
    alt, _, _, _ = run_detectors(model, cond, lat, ["dsm"], settings_for(dsm_step=0))
    for k, prompt in enumerate(PROMPTS):
        u, c = _embeds(pipe, prompt, 3)
        path = _guided_path(pipe, u, c, lat, 3)
        t0, x0 = path[0]
        x = x0.clone().requires_grad_(True)
        g_c = torch.autograd.grad(0.5 * pipe.unet(x, t0, encoder_hidden_states=c).sample.pow(2).sum(), x)[0]
        g_u = torch.autograd.grad(0.5 * pipe.unet(x, t0, encoder_hidden_states=u).sample.pow(2).sum(), x)[0]
        want = (g_c - g_u).flatten(1).pow(2).sum(dim=1)
        torch.testing.assert_close(vals["metric2"][k, :, 0], want, rtol=1e-4, atol=1e-8)
        with torch.no_grad():
            e = [pipe.unet(x_i, t, encoder_hidden_states=c).sample for t, x_i in path]
        torch.testing.assert_close(vals["dsm"][k, :, 0], (e[2] - e[1]).flatten(1).pow(2).sum(dim=1), rtol=1e-4,
                                   atol=1e-8)
        torch.testing.assert_close(alt["dsm"][k, :, 0], (e[1] - e[0]).flatten(1).pow(2).sum(dim=1), rtol=1e-4,
                                   atol=1e-8)
    cost = meter.summary(["metric2", "dsm"])
    # 3 trajectory forwards (dsm's steps 0..2) + metric2's own graph forward; one VJP
    assert (cost["total"]["unet_forwards"], cost["total"]["vjps"]) == (4, 1)
    assert (cost["metric2"]["unet_forwards"], cost["dsm"]["unet_forwards"]) == (2, 3) and "vjps" not in cost["dsm"]


def test_metric2_gaussian_closed_form():
    """Gaussian model: J_eps = diag(sigma / v_c), so metric2 = ||(sigma/v_c) eps_c - (sigma/v_u) eps_u||^2;
    on a v-prediction model too (eps from v depends on x: the gradient goes through that term)."""
    torch.manual_seed(0)
    shape = (2, 3, 3)
    mu, ls = torch.randn(2, *shape, dtype=torch.float64), 0.5 * torch.randn(2, *shape, dtype=torch.float64)
    emb = gaussian_embedding(mu, ls)
    lat = torch.randn(2, *shape, dtype=torch.float64)
    for pred in ("epsilon", "v_prediction"):
        sched = ddim_scheduler(pred)
        unet = GaussianUNet(sched.alphas_cumprod.double(), shape, pred).double()
        vals, _, _, _ = run_detectors(denoiser(unet, sched), Conditioning.of(emb[1:], emb[:1]), lat, ["metric2"],
                                      settings_for())
        t = sched.timesteps[0]
        abar = sched.alphas_cumprod[int(t)].double()
        a, s = abar.sqrt(), (1 - abar).sqrt()
        v = [a ** 2 * ls[j].exp() + s ** 2 for j in (0, 1)]  # uncond, cond
        eps = [s * (lat - a * mu[j]) / v[j] for j in (0, 1)]
        want = ((s / v[1]) * eps[1] - (s / v[0]) * eps[0]).flatten(1).pow(2).sum(dim=1)
        torch.testing.assert_close(vals["metric2"][0, :, 0].double(), want, rtol=1e-5, atol=0)


def test_new_detectors_leave_the_others_bit_identical(setup):
    pipe, cond, lat = setup
    model = denoiser(pipe.unet, pipe.scheduler)
    st = settings_for(hvp_sampling_num=2, wen_steps=3, curv_step=3, curv_probes=2, nemo_ssim="single")
    old = ["sharpness", "wen"]
    new = ["metric2", "dsm", "curv_ds", "curv_dh", "nemo"]
    alone, ex_alone, _, _ = run_detectors(model, cond, lat, old, st)
    together, ex, _, meter = run_detectors(model, cond, lat, old + new, st)
    for m in old:
        assert torch.equal(together[m], alone[m]), m
        assert ex[m] == ex_alone[m], m
    assert set(meter.summary(old)["sharpness"]) >= {"unet_forwards", "jvps"}
    assert "vjps" not in meter.summary(old)["wen"]


@pytest.mark.parametrize("metric,opts,msg", [("metric2", dict(metric2_step=50), "metric2: the target step 50"),
                                             ("dsm", dict(dsm_step=49), "dsm: the steps 49 and 50"),
                                             ("curv_dh", dict(curv_step=50), "curv_dh: the target step 50"),
                                             ("nemo", dict(nemo_step=50), "nemo: the target step 50")])
def test_target_step_outside_the_schedule(setup, metric, opts, msg):
    pipe, cond, lat = setup
    with pytest.raises(ValueError, match=msg):
        run_detectors(denoiser(pipe.unet, pipe.scheduler), cond, lat, [metric], settings_for(**opts))


def test_curv_ds_equals_plain_score_difference(setup):
    """curv_ds at a target step: the map sum_channels ((eps_c - eps_u) / sigma)^2 from plain diffusers calls along
    the guided path, the score its spatial mean; the maps handed over per prompt as (n, h, w)."""
    pipe, cond, lat = setup
    vals, ex, _, _ = run_detectors(denoiser(pipe.unet, pipe.scheduler), cond, lat, ["curv_ds"],
                                   settings_for(curv_step=3))
    for k, prompt in enumerate(PROMPTS):
        u, c = _embeds(pipe, prompt, 3)
        t, x = _guided_path(pipe, u, c, lat, 4)[3]
        with torch.no_grad():
            d = pipe.unet(x, t, encoder_hidden_states=c).sample - pipe.unet(x, t, encoder_hidden_states=u).sample
        want = (d / (1 - pipe.scheduler.alphas_cumprod[int(t)]).sqrt()).pow(2).sum(dim=1)
        torch.testing.assert_close(ex["curv_ds"][k]["maps"], want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(vals["curv_ds"][k, :, 0], want.flatten(1).mean(dim=1), rtol=1e-4, atol=1e-6)


def test_curv_dh_hutchinson_against_the_dense_jacobian(setup):
    """curv_dh's map against the exact diagonal of d f / d x, f = -(eps_c - eps_u), from a dense Jacobian (one
    VJP per latent entry): within 6 standard deviations of Hutchinson's estimator with K probes (per entry the
    variance is sum_{j != i} J_ji^2 / K for Rademacher probes; the channel sum and the ReLU add at most the sum)."""
    pipe, cond, lat = setup
    K, lat = 64, lat[:, :, :4, :4]  # 4 x 4 latents: a 64 x 64 dense Jacobian
    one = Conditioning.of(SD1.embed(pipe, PROMPTS[:1], "cpu"), SD1.embed(pipe, "", "cpu"))
    vals, ex, _, meter = run_detectors(denoiser(pipe.unet, pipe.scheduler), one, lat[:1], ["curv_dh"],
                                       settings_for(curv_step=1, curv_probes=K))
    u, c = _embeds(pipe, PROMPTS[0], 1)
    t, x = _guided_path(pipe, u, c, lat[:1], 2)[1]

    def f(z):
        z = z.view(1, *x.shape[1:])
        return -(pipe.unet(z, t, encoder_hidden_states=c).sample - pipe.unet(z, t, encoder_hidden_states=u).sample)

    J = torch.autograd.functional.jacobian(lambda z: f(z).flatten(), x.flatten())  # (D, D): J[i, j] = df_i/dx_j
    diag = J.diagonal()
    sd = ((J.pow(2).sum(dim=0) - diag.pow(2)) / K).sqrt()  # per entry i: sum_{j != i} J_ji^2 / K
    exact = torch.relu(-diag.view(x.shape[1:]).sum(dim=0))
    bound = 6 * sd.view(x.shape[1:]).sum(dim=0)
    got = ex["curv_dh"][0]["maps"][0]
    assert (got - exact).abs().le(bound).all()
    # and exactly Hutchinson's sum with the detector's own probes, each v * (J^T v) from the dense J
    probes = CurvDh(CurvDhSettings(curv_step=1, curv_probes=K)).probes(x, 1)
    est = torch.stack([v.flatten() * (J.T @ v.flatten()) for v in probes]).mean(dim=0)
    torch.testing.assert_close(got, torch.relu(-est.view(x.shape[1:]).sum(dim=0)), rtol=1e-4, atol=1e-6)
    assert vals["curv_dh"][0, 0, 0].item() == pytest.approx(got.mean().item(), rel=1e-6)
    cost = meter.summary(["curv_dh"])["curv_dh"]
    assert (cost["unet_forwards"], cost["vjps"], cost["probes"]) == (3, K, K)


def test_curv_maps_gaussian_closed_form():
    """Gaussian model: the Jacobian of eps is diag(sigma / v_c), so Hutchinson is exact with any K and
    dh = ReLU(sum_channels sigma (1/v_c - 1/v_u)); ds = sum_channels (s_c - s_u)^2 with s = -(x - alpha mu)/v."""
    torch.manual_seed(1)
    shape = (2, 3, 3)
    mu, ls = torch.randn(2, *shape, dtype=torch.float64), 0.5 * torch.randn(2, *shape, dtype=torch.float64)
    emb = gaussian_embedding(mu, ls)
    lat = torch.randn(2, *shape, dtype=torch.float64)
    sched = ddim_scheduler("epsilon")
    unet = GaussianUNet(sched.alphas_cumprod.double(), shape).double()
    vals, ex, _, _ = run_detectors(denoiser(unet, sched), Conditioning.of(emb[1:], emb[:1]), lat,
                                   ["curv_ds", "curv_dh"], settings_for(curv_step=0, curv_probes=2))
    abar = sched.alphas_cumprod[int(sched.timesteps[0])].double()
    a, s = abar.sqrt(), (1 - abar).sqrt()
    v = [a ** 2 * ls[j].exp() + s ** 2 for j in (0, 1)]  # uncond, cond
    score = [-(lat - a * mu[j]) / v[j] for j in (0, 1)]
    ds = (score[1] - score[0]).pow(2).sum(dim=1)
    dh = torch.relu((s / v[1] - s / v[0]).sum(dim=0)).expand(2, -1, -1)
    torch.testing.assert_close(ex["curv_ds"][0]["maps"].double(), ds, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ex["curv_dh"][0]["maps"].double(), dh, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(vals["curv_dh"][0, :, 0].double(), dh.flatten(1).mean(dim=1), rtol=1e-5, atol=1e-9)


def _nemo_plain(pipe, prompt, lat, guidance=0.0):
    """Their compute_noise_diff with plain calls: the prediction at the schedule's step 1 on x_T, minus x_T, min-max
    scaled per generation and channel."""
    u, c = _embeds(pipe, prompt, lat.shape[0])
    pipe.scheduler.set_timesteps(50)
    t = pipe.scheduler.timesteps[1]
    with torch.no_grad():
        e_c = pipe.unet(lat, t, encoder_hidden_states=c).sample
        e_u = pipe.unet(lat, t, encoder_hidden_states=u).sample
    eps = e_c if guidance == 0 else e_c + guidance * (e_u - e_c)
    d = eps - lat
    lo, hi = d.amin(dim=(2, 3), keepdim=True), d.amax(dim=(2, 3), keepdim=True)
    return (d - lo) / (hi - lo)


def test_nemo_equals_pairwise_ssim_of_the_noise_difference(setup):
    """Tiny pipeline (8 x 8 latents: the single-scale SSIM): the max over pairs of torchmetrics' SSIM module, pair by
    pair; the guided variant with their threshold script's branch order; a copied generation gives 1."""
    from torchmetrics.image import StructuralSimilarityIndexMeasure
    pipe, cond, lat = setup
    model = denoiser(pipe.unet, pipe.scheduler)
    for guidance in (0.0, 7.0):
        vals, ex, _, _ = run_detectors(model, cond, lat, ["nemo"], settings_for(nemo_guidance=guidance,
                                                                                nemo_ssim="single"))
        assert vals["nemo"].shape == (2, 1, 1)
        for k, prompt in enumerate(PROMPTS):
            d = _nemo_plain(pipe, prompt, lat, guidance)
            want = [StructuralSimilarityIndexMeasure(kernel_size=11)(d[a:a + 1], d[b:b + 1]).item()
                    for a, b in ((0, 1), (0, 2), (1, 2))]
            assert ex["nemo"][k]["pairwise"] == pytest.approx(want, rel=1e-4, abs=1e-6)
            assert vals["nemo"][k, 0, 0].item() == pytest.approx(max(want), rel=1e-4, abs=1e-6)
    same, _, _, _ = run_detectors(model, cond, torch.cat([lat[:1], lat[:1]]), ["nemo"],
                                  settings_for(nemo_ssim="single"))
    assert same["nemo"][:, 0, 0].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        run_detectors(model, cond, lat[:1], ["nemo"], settings_for())


def test_nemo_ms_ssim_on_the_gaussian_model():
    """Gaussian model at 4 x 48 x 48 (their MS-SSIM needs > 40 px): eps - x_T = x_T (sigma/v - 1) - sigma alpha
    mu / v in closed form, MS-SSIM pair by pair with torchmetrics' module; a condition whose mean dominates that
    difference (small variance, a structured mean: 'memorized') scores higher than one that does not."""
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure
    shape = (4, 48, 48)
    g = torch.Generator().manual_seed(4)
    ramp = torch.linspace(-3, 3, 48).view(1, 1, 48).expand(*shape).contiguous()
    mu = torch.stack([ramp, torch.zeros(shape)])           # memorized: a structured mean; other: none
    ls = torch.stack([torch.full(shape, -6.0), torch.zeros(shape)])
    emb = gaussian_embedding(mu, ls)
    lat = torch.randn(3, *shape, generator=g)
    sched = ddim_scheduler("epsilon")
    unet = GaussianUNet(sched.alphas_cumprod, shape)
    cond = Conditioning.of(emb, gaussian_embedding(torch.zeros(1, *shape), torch.zeros(1, *shape)))
    vals, ex, _, _ = run_detectors(denoiser(unet, sched), cond, lat, ["nemo"], settings_for())
    t = sched.timesteps[1]
    abar = sched.alphas_cumprod[int(t)]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    for k in range(2):
        v = a ** 2 * ls[k].exp() + s ** 2
        d = s * (lat - a * mu[k]) / v - lat
        lo, hi = d.amin(dim=(2, 3), keepdim=True), d.amax(dim=(2, 3), keepdim=True)
        d = (d - lo) / (hi - lo)
        want = [MultiScaleStructuralSimilarityIndexMeasure(kernel_size=11, betas=(0.33, 0.33, 0.33))(
            d[i:i + 1], d[j:j + 1]).item() for i, j in ((0, 1), (0, 2), (1, 2))]
        # abs 1e-3: for the noise-like condition eps - x_T = x_T (s/v - 1) cancels in float32 (s/v - 1 ~ -0.004)
        assert ex["nemo"][k]["pairwise"] == pytest.approx(want, rel=1e-4, abs=1e-3)
    assert vals["nemo"][0, 0, 0] > 0.9 > 0.2 > vals["nemo"][1, 0, 0]


def _map_result(folder, maps):
    """A result sidecar naming curv_dh maps, with the maps saved beside it (utils/detection/maps.py's format)."""
    import json
    from utils.detection.maps import map_dir, save_maps
    side = folder / "x_mem_curv_dh_gen1.json"
    side.write_text(json.dumps(dict(metric=dict(name="curv_dh", stem="x_mem", gen_num=1))))
    for i, m in enumerate(maps):
        save_maps(map_dir(str(folder), "x_mem", 1, "curv_dh"), i, np.asarray(m, dtype=np.float32)[None])
    return str(side)


def test_localization_scores_kim_and_lee_rule(tmp_path, capsys):
    """Quadrant map (0, 1, 3, 7) against the mask of quadrants {1, 7}: the predictions map > threshold are nested
    ({7}, {3, 7}, {1, 3, 7}, all, none), so the best IoU is 2/3 ({1, 3, 7}) and the best accuracy 3/4; a map equal
    to its mask scores 1. Missing masks and masks of the wrong size: one error line, exit 2."""
    from PIL import Image
    import detect_eval
    from cli_run import exit_code
    quad = np.zeros((256, 256))
    quad[:128, 128:], quad[128:, :128], quad[128:, 128:] = 1, 3, 7
    mask = ((quad == 1) | (quad == 7)).astype(np.uint8) * 255
    side = _map_result(tmp_path, [quad, mask / 255.0 * 5])
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(mask).save(masks / "00000_0.png")
    Image.fromarray(mask).save(masks / "00001.png")
    assert exit_code(detect_eval.main, ["--localization", str(masks), "--mem", side, "--out",
                                        str(tmp_path / "loc.json")]) == 0
    import json
    got = json.loads((tmp_path / "loc.json").read_text())
    # mean IoU over the two maps: (2/3 + 1) / 2 at the threshold where the quadrant map predicts {1, 3, 7}
    assert (got["iou"], got["accuracy"], got["maps"]) == (pytest.approx(0.8), pytest.approx(7 / 8), 2)
    assert got["miou"] == pytest.approx((2 / 3 + 1) / 2)
    Image.fromarray(mask[:100, :100]).save(masks / "00001.png")
    assert exit_code(detect_eval.main, ["--localization", str(masks), "--mem", side]) == 2
    assert "integer multiple" in capsys.readouterr().err
    (masks / "00001.png").unlink()
    assert exit_code(detect_eval.main, ["--localization", str(masks), "--mem", side]) == 2
    assert "1 missing" in capsys.readouterr().err


def test_detect_mem_saves_maps_and_refuses_bad_steps(tiny_eps_dir, tmp_path, capsys):
    """Through detect_mem.py: curv_ds's maps land beside the results as (n, h, w) arrays whose spatial means are the
    saved values, with a grid image, and not in the result files; a target step outside the schedule and nemo with
    one generation are one error line each, exit 2."""
    import json
    import detect_mem
    from cli_run import exit_code
    data = tmp_path / "p.txt"
    data.write_text("\n".join(PROMPTS))
    out = tmp_path / "o"
    base = ["--model_id", tiny_eps_dir, "--data_path", str(data), "--device", "cpu", "--out_dir", str(out)]
    assert exit_code(detect_mem.main, base + ["--gen_num", "2", "--metrics", "curv_ds", "--curv_step", "2"]) == 0
    side = json.loads((out / "p_curv_ds_gen2.json").read_text())
    assert side["extras"] == [None, None]
    for i in range(2):
        maps = np.load(out / "p_gen2_maps" / "curv_ds" / f"{i:05d}.npy")
        assert maps.shape == (2, 8, 8) and (out / "p_gen2_maps" / "curv_ds" / f"{i:05d}.png").is_file()
        np.testing.assert_allclose(np.array(side["per_generation"][i][0]), maps.mean(axis=(1, 2)), rtol=1e-6)
    capsys.readouterr()
    assert exit_code(detect_mem.main, base + ["--gen_num", "2", "--metrics", "curv_dh", "--curv_step", "50"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: curv_dh: the target step 50")
    assert exit_code(detect_mem.main, base + ["--gen_num", "1", "--metrics", "nemo"]) == 2
    assert "error:" in capsys.readouterr().err


def test_curv_theta_maps_against_plain_calls_of_two_checkpoints(setup):
    """curv_ds_theta / curv_dh_theta with a second tiny pipeline (another seed) as the "earlier checkpoint": the
    maps from plain diffusers calls along the run model's guided path, ((eps_c(A) - eps_c(B)) / sigma)^2 summed over
    channels, and Hutchinson's sum with the detector's probes of the dense Jacobian of f = -(eps_c(A) - eps_c(B))
    (within 6 sd of the exact diagonal); curv_ds beside them is bit-identical to curv_ds alone."""
    from utils.demo.model import tiny_pipeline
    pipe, _, lat = setup
    other = tiny_pipeline(seed=1)
    K, lat = 32, lat[:1, :, :4, :4]
    one = Conditioning.of(SD1.embed(pipe, PROMPTS[:1], "cpu"), SD1.embed(pipe, "", "cpu"))
    st = settings_for(curv_step=1, curv_probes=K, curv_theta="B")
    model = denoiser(pipe.unet, pipe.scheduler)
    comp = {"B": denoiser(other.unet, other.scheduler)}
    vals, ex, _, meter = run_detectors(model, one, lat, ["curv_ds", "curv_ds_theta", "curv_dh_theta"], st,
                                       companions=comp)
    alone, _, _, _ = run_detectors(model, one, lat, ["curv_ds"], st)
    assert torch.equal(vals["curv_ds"], alone["curv_ds"])
    u, c = _embeds(pipe, PROMPTS[0], 1)
    t, x = _guided_path(pipe, u, c, lat, 2)[1]

    def f(z):
        z = z.view(1, *x.shape[1:])
        return -(pipe.unet(z, t, encoder_hidden_states=c).sample - other.unet(z, t, encoder_hidden_states=c).sample)

    sigma = (1 - pipe.scheduler.alphas_cumprod[int(t)]).sqrt()
    with torch.no_grad():
        want = (f(x) / sigma).pow(2).sum(dim=1)
    assert want.abs().max() > 0  # the two checkpoints differ
    torch.testing.assert_close(ex["curv_ds_theta"][0]["maps"], want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(vals["curv_ds_theta"][0, :, 0], want.flatten(1).mean(dim=1), rtol=1e-4, atol=1e-6)
    J = torch.autograd.functional.jacobian(lambda z: f(z).flatten(), x.flatten())
    diag = J.diagonal()
    bound = 6 * ((J.pow(2).sum(dim=0) - diag.pow(2)) / K).sqrt().view(x.shape[1:]).sum(dim=0)
    got = ex["curv_dh_theta"][0]["maps"][0]
    assert (got - torch.relu(-diag.view(x.shape[1:]).sum(dim=0))).abs().le(bound).all()
    probes = CurvDh(CurvDhSettings(curv_step=1, curv_probes=K)).probes(x, 1)
    est = torch.stack([v.flatten() * (J.T @ v.flatten()) for v in probes]).mean(dim=0)
    torch.testing.assert_close(got, torch.relu(-est.view(x.shape[1:]).sum(dim=0)), rtol=1e-4, atol=1e-6)
    cost = meter.summary(["curv_ds_theta", "curv_dh_theta"])
    # 2 trajectory forwards + B's conditional forward; 2 + one conditional forward of each model, K VJPs
    assert cost["curv_ds_theta"]["unet_forwards"] == 3 and "vjps" not in cost["curv_ds_theta"]
    assert (cost["curv_dh_theta"]["unet_forwards"], cost["curv_dh_theta"]["vjps"]) == (4, K)
    with pytest.raises(ValueError, match="curv_ds_theta: the second model 'B' was not loaded"):
        run_detectors(model, one, lat, ["curv_ds_theta"], st)
    with pytest.raises(ValueError, match="--curv_theta MODEL_ID"):
        run_detectors(model, one, lat, ["curv_dh_theta"], settings_for(curv_step=1))


def test_detect_mem_curv_theta_checks_the_second_model_first(tiny_eps_dir, tmp_path, capsys):
    """Through detect_mem.py: a second model of another family (tiny-xl, tiny-sd3) or another latent shape (a
    tiny SD pipeline of 16 x 16 latents), or none, is one error line, exit 2, before any file is written; a second
    tiny SD pipeline (another seed) runs, its id in the result's identity and its maps saved."""
    import json
    import detect_mem
    from cli_run import exit_code
    from utils.demo.model import tiny_pipeline
    data = tmp_path / "p.txt"
    data.write_text(PROMPTS[0])
    big, other = tmp_path / "big", tmp_path / "other"
    tiny_pipeline(seed=1, sample_size=16).save_pretrained(str(big))
    tiny_pipeline(seed=1).save_pretrained(str(other))
    out = tmp_path / "o"
    base = ["--model_id", tiny_eps_dir, "--data_path", str(data), "--device", "cpu", "--out_dir", str(out),
            "--gen_num", "1", "--curv_step", "1", "--curv_probes", "2"]
    for metric, theta, msg in [("curv_ds_theta", "tiny-xl", "same family"), ("curv_dh_theta", "tiny-sd3", "same family"),
                               ("curv_ds_theta", str(big), "same latent shape"), ("curv_dh_theta", None, "--curv_theta")]:
        extra = ["--curv_theta", theta] if theta else []
        assert exit_code(detect_mem.main, base + ["--metrics", metric] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: {metric}") and msg in err[-1] and not any("Traceback" in e for e in err)
        assert not out.exists() or not any(out.iterdir())
    assert exit_code(detect_mem.main, base + ["--metrics", "curv_ds_theta", "--curv_theta", str(other)]) == 0
    side = json.loads((out / "p_curv_ds_theta_gen1.json").read_text())
    assert side["metric"]["settings"]["curv_theta"] == str(other)
    maps = np.load(out / "p_gen1_maps" / "curv_ds_theta" / "00000.npy")
    np.testing.assert_allclose(np.array(side["per_generation"][0][0]), maps.mean(axis=(1, 2)), rtol=1e-6)
