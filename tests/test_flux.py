"""The Flux families on tiny FluxPipelines built in code: the metric against an independent JVP written with plain
diffusers calls on packed tokens, plain sampling against the pipeline's own images bit for bit, packing as a
permutation, and the bad inputs of the CLI."""
import json
import shutil

import numpy as np
import pytest
import torch
from torch.func import jvp

from utils.detection import sharpness_scores
from utils.demo.model import tiny_flux_pipeline
from utils.models import families as F
from utils.models.flux import FLUX_DEV, FLUX_SCHNELL, pack, unpack

PROMPTS = ["a photo of a cat", "an oil painting of a red house"]


@pytest.fixture(scope="module")
def dev():
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def schnell():
    return tiny_flux_pipeline(guidance_embeds=False)


def test_packing_is_a_permutation_so_norms_are_equal():
    from diffusers import FluxPipeline
    x = torch.randn(3, 4, 6, 8, dtype=torch.float64)
    p = pack(x)
    assert torch.equal(p, FluxPipeline._pack_latents(x, 3, 4, 6, 8))
    assert torch.equal(unpack(p, 6, 8), x)
    assert torch.equal(unpack(p, 6, 8), FluxPipeline._unpack_latents(p, 12, 16, 2))
    assert torch.equal(torch.sort(p.flatten(1)).values, torch.sort(x.flatten(1)).values)  # the same entries
    torch.testing.assert_close(p.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-15, atol=0)


def test_metric_equals_an_independent_jvp_of_the_velocity_difference_on_packed_tokens(dev):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps
    from torch.nn.attention import SDPBackend, sdpa_kernel
    pipe, g = dev, 7.5
    emb = FLUX_DEV.encode(pipe, PROMPTS[1:])
    lat = FLUX_DEV.initial_latents(pipe, 2, seed=3)
    vals, _ = sharpness_scores(FLUX_DEV.denoiser(pipe, guidance=g), emb, lat, num_inference_steps=4,
                               hvp_sampling_num=2, guidance_scale=g)
    ctx, uctx = (t.repeat_interleave(2, 0) for t in (emb.cond, emb.uncond))
    upooled, pooled = (t.repeat_interleave(2, 0) for t in emb.added["pooled_projections"])
    # the pipeline's own packing, ids, schedule and guidance tensor
    x = FluxPipeline._pack_latents(lat, 2, 4, 8, 8)
    img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    txt_ids = torch.zeros(ctx.shape[1], 3)
    guidance = torch.full([1], g, dtype=torch.float32).expand(2)
    sched = pipe.scheduler
    c = sched.config
    mu = calculate_shift(x.shape[1], c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    timesteps, _ = retrieve_timesteps(sched, 4, "cpu", sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    tr = pipe.transformer

    def velocity(x, t, e, p):
        return tr(hidden_states=x, timestep=t.expand(2) / 1000, guidance=guidance, pooled_projections=p,
                  encoder_hidden_states=e, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    for i in range(2):
        t = timesteps[i]

        def f(x):
            return velocity(x, t, ctx, pooled) - velocity(x, t, uctx, upooled)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            d = f(x)
            _, hv = jvp(f, (x,), (d,))
        torch.testing.assert_close(vals[..., i].reshape(-1), hv.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
        assert hv.abs().max() > 0
        with torch.no_grad():  # the sampler's step: the conditional velocity alone (guidance-distilled)
            x = sched.step(velocity(x, t, ctx, pooled), t, x, return_dict=False)[0]


@pytest.mark.parametrize("which", ["dev", "schnell"])
def test_plain_sampling_equals_the_pipeline_bit_for_bit(which, request):
    pipe = request.getfixturevalue(which)
    fam, g = (FLUX_DEV, 3.5) if which == "dev" else (FLUX_SCHNELL, None)
    fm = fam.denoiser(pipe, guidance=g)
    emb = fam.encode(pipe, PROMPTS[:1])
    for seed in (0, 5):
        with torch.no_grad():
            x = fm.sample(fam.initial_latents(pipe, 1, seed), emb, 3, g)
        ours = fam.decode(pipe, x)[0]
        kwargs = dict(num_inference_steps=3, guidance_scale=3.5 if g is None else g)  # schnell ignores it
        torch.manual_seed(seed)
        ref = pipe(PROMPTS[0], output_type="latent", **kwargs).images
        torch.manual_seed(seed)
        img = pipe(PROMPTS[0], **kwargs).images[0]
        assert torch.equal(pack(x), ref)
        assert np.array_equal(np.asarray(ours), np.asarray(img))


def test_dev_and_schnell_are_read_from_the_transformer_config(schnell, tmp_path):
    assert F.family_of("x", "FluxPipeline", "epsilon", {"guidance_embeds": True}) is FLUX_DEV
    assert F.family_of("x", "FluxPipeline", "epsilon", {"guidance_embeds": False}) is FLUX_SCHNELL
    assert F.family_of("tiny-flux") is FLUX_DEV and F.family_of("tiny-flux-schnell") is FLUX_SCHNELL
    folder = tmp_path / "schnell"
    schnell.save_pretrained(str(folder))
    fam, loaded = F.load(str(folder), torch.device("cpu"), torch.float32)
    assert fam is FLUX_SCHNELL and not loaded.transformer.config.guidance_embeds
    assert not loaded.scheduler.config.use_dynamic_shifting and loaded.scheduler.config.shift == 1.0
    assert F.describe(fam)["uncond"].startswith("empty prompt, same model and guidance")
    assert "uncond" not in F.describe(F.SD1)
    from utils.cli import UserError
    with pytest.raises(UserError, match="the flux family's|guidance_embeds=False; the flux profile"):
        FLUX_DEV.load(str(folder), torch.device("cpu"), torch.float32)


def _one_error_line(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_mitigate_mem_none_equals_the_pipeline_and_bad_inputs_are_one_line(dev, schnell, tmp_path, capsys):
    import detect_mem
    import mitigate_mem
    from PIL import Image
    from cli_run import exit_code
    data = tmp_path / "p.txt"
    data.write_text(PROMPTS[0] + "\n")
    common = ["--data_path", str(data), "--gen_num", "1", "--device", "cpu", "--num_inference_steps", "2",
              "--out_dir", str(tmp_path / "o")]
    assert exit_code(mitigate_mem.main, ["--model_id", "tiny-flux", *common, "--method", "none",
                                         "--guidance_scale", "3.5"]) == 0
    folder = tmp_path / "o" / "tiny-flux" / "mem_nomiti_g3.5"
    torch.manual_seed(42)  # --gen_seed's default, before the pipeline draws its noise
    ref = dev(PROMPTS[0], num_inference_steps=2, guidance_scale=3.5).images[0]
    assert np.array_equal(np.asarray(Image.open(next(folder.glob("*.png")))), np.asarray(ref))
    header = json.loads((folder / "manifest.jsonl").read_text().splitlines()[0])["header"]
    assert header["guidance_scale"] == 3.5 and "not a CFG unconditional branch" in header["uncond"]
    capsys.readouterr()
    flux, fschnell = ["--model_id", "tiny-flux", *common], ["--model_id", "tiny-flux-schnell", *common]
    msg = _one_error_line(capsys, exit_code(mitigate_mem.main, [*fschnell, "--method", "none",
                                                                "--guidance_scale", "3.5"]))
    assert "no guidance embedding" in msg
    msg = _one_error_line(capsys, exit_code(mitigate_mem.main, [*flux, "--method", "none", "--guidance_scale", "0.5"]))
    assert "guidance embedding" in msg and ">= 1" in msg
    for method in ("cfg_delay", "han_sample", "ren", "nemo"):
        msg = _one_error_line(capsys, exit_code(mitigate_mem.main, [*flux, "--method", method]))
        assert f"{method} is not defined for the flux family" in msg
    msg = _one_error_line(capsys, exit_code(mitigate_mem.main, [*fschnell, "--method", "cfg_delay"]))
    assert "cfg_delay is not defined for the flux_schnell family" in msg and "unconditional branch" in msg
    for metric in ("le", "metric2"):
        msg = _one_error_line(capsys, exit_code(detect_mem.main, ["--model_id", "tiny-flux", "--metrics", metric,
                                                                  *common[:-4], "--out_dir", str(tmp_path / "d")]))
        assert f"{metric} is not defined for the flux family" in msg
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").glob("*.pt"))
    # a Flux folder without T5 (FluxPipeline's text_encoder_2)
    folder = tmp_path / "no_t5"
    schnell.save_pretrained(str(folder))
    shutil.rmtree(folder / "text_encoder_2")
    msg = _one_error_line(capsys, exit_code(mitigate_mem.main, ["--model_id", str(folder), *common[:-2],
                                                                "--out_dir", str(tmp_path / "o2"), "--method", "none"]))
    assert "no T5 text encoder" in msg and "text_encoder_2" in msg
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").rglob("*.png"))


def test_table_1_marks_a_flux_uncond():
    from utils.detection.tables import markdown
    row = dict(metric="sharpness", n=1, steps=1, auc=0.5, tpr_1_closest=0.1, tpr_1_strict=0.1, tpr_3_closest=0.2,
               cost=dict(unet_forwards=None, seconds=None, ratio=None), paper=None)
    assert "∅ (the uncond branch" not in markdown([row], "sd")
    text = markdown([dict(row, uncond=FLUX_DEV.uncond)], "flux")
    assert f"∅ (the uncond branch of every difference) on this model: {FLUX_DEV.uncond}." in text


def test_bench_runs_a_flux_shaped_transformer(tmp_path):
    from benchmarks import bench
    out, threads = tmp_path / "b.json", torch.get_num_threads()
    try:
        bench.main(["--unet", "flux_tiny", "--items", "forward,jvp,jvp_chunked,fd", "--repeats", "1", "--out",
                    str(out)])
    finally:
        torch.set_num_threads(threads)  # the benchmark sets one CPU thread for itself
    items = json.loads(out.read_text())["runs"]["float32"]["items"]
    assert set(items) == {"forward", "jvp", "fd"}  # jvp_chunked: the planner models UNets, skipped
    assert all("error" not in rec and rec["seconds"] > 0 for rec in items.values())


def test_detect_mem_under_a_memory_cap_equals_the_uncapped_run_on_flux(tmp_path):
    """--max_memory_gb on a Flux model: the planner sees the unpacked latent grid the denoiser keeps, plans one
    generation per call with the chunked Flux attention, and the metric equals the uncapped run's."""
    import detect_mem
    from cli_run import exit_code
    data = tmp_path / "p.txt"
    data.write_text("\n".join(PROMPTS) + "\n")
    common = ["--model_id", "tiny-flux", "--data_path", str(data), "--gen_num", "2", "--device", "cpu"]
    assert exit_code(detect_mem.main, [*common, "--out_dir", str(tmp_path / "a")]) == 0
    assert exit_code(detect_mem.main, [*common, "--out_dir", str(tmp_path / "b"), "--max_memory_gb", "1e-6"]) == 0
    a, b = (torch.load(tmp_path / d / "p_gen2.pt", weights_only=True) for d in "ab")
    assert a.abs().max() > 0
    torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
