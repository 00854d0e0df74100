"""The SD3 family on a tiny StableDiffusion3Pipeline built in code: the metric against an independent JVP written
with plain diffusers calls, and plain sampling against the pipeline's own images, bit for bit."""
import numpy as np
import pytest
import torch
from torch.func import jvp

from utils.detection import sharpness_scores
from utils.demo.model import tiny_sd3_pipeline
from utils.models import families as F
from utils.models.sd3 import SD3

PROMPTS = ["a photo of a cat", "an oil painting of a red house"]


@pytest.fixture(scope="module")
def t5_pipe():
    return tiny_sd3_pipeline()


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "no_t5"])
def pipe(request, t5_pipe):
    return t5_pipe if request.param else tiny_sd3_pipeline(with_t5=False)


def _velocity_difference(pipe, t, ctx, pooled, uctx, upooled):
    """x -> v(x, c) - v(x, uncond) by two plain transformer calls (the pipeline's keywords)."""
    tr = pipe.transformer

    def f(x):
        ts = t.expand(x.shape[0])
        v_c = tr(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, pooled_projections=pooled,
                 return_dict=False)[0]
        v_u = tr(hidden_states=x, timestep=ts, encoder_hidden_states=uctx, pooled_projections=upooled,
                 return_dict=False)[0]
        return v_c - v_u
    return f


def test_metric_equals_an_independent_jvp_of_the_velocity_difference(t5_pipe):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    pipe = t5_pipe
    emb = SD3.encode(pipe, PROMPTS)
    lat = SD3.initial_latents(pipe, 2, seed=3)
    vals, _ = sharpness_scores(SD3.denoiser(pipe), emb, lat, num_inference_steps=4, hvp_sampling_num=2,
                               guidance_scale=5.0)
    ctx, uctx = (t.repeat_interleave(2, 0) for t in (emb.cond, emb.uncond))
    upooled, pooled = (t.repeat_interleave(2, 0) for t in emb.added["pooled_projections"])
    sched = pipe.scheduler
    sched.set_timesteps(4)
    x = lat.repeat(2, 1, 1, 1)
    for i in range(2):
        t = sched.timesteps[i]
        f = _velocity_difference(pipe, t, ctx, pooled, uctx, upooled)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            d = f(x)
            _, hv = jvp(f, (x,), (d,))
        torch.testing.assert_close(vals[..., i].reshape(-1), hv.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
        assert hv.abs().max() > 0
        with torch.no_grad():
            o_u = pipe.transformer(hidden_states=x, timestep=t.expand(4), encoder_hidden_states=uctx,
                                   pooled_projections=upooled, return_dict=False)[0]
            x = sched.step(o_u + 5.0 * d, t, x, return_dict=False)[0]


def test_plain_sampling_equals_the_pipeline_bit_for_bit(pipe):
    fm = SD3.denoiser(pipe)
    for seed in (0, 5):
        emb = SD3.encode(pipe, PROMPTS[:1])
        with torch.no_grad():
            x = fm.sample(SD3.initial_latents(pipe, 1, seed), emb, 3, 5.0)
        ours = SD3.decode(pipe, x)[0]
        torch.manual_seed(seed)
        ref = pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=5.0, output_type="latent").images
        torch.manual_seed(seed)
        img = pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=5.0).images[0]
        assert torch.equal(x, ref)
        assert np.array_equal(np.asarray(ours), np.asarray(img))


def test_family_read_from_a_saved_folder_without_t5(tmp_path):
    folder = tmp_path / "sd3"
    tiny_sd3_pipeline(with_t5=False).save_pretrained(str(folder))
    fam, loaded = F.load(str(folder), torch.device("cpu"), torch.float32)
    assert fam is SD3 and loaded.text_encoder_3 is None and F.family_of("tiny-sd3") is SD3


def _one_error_line(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_detect_mem_on_flow_models_bad_inputs_are_one_line(tmp_path, capsys):
    import detect_mem
    from cli_run import exit_code
    data = tmp_path / "p.txt"
    data.write_text("a photo of a cat\n")
    common = ["--data_path", str(data), "--gen_num", "1", "--device", "cpu", "--out_dir", str(tmp_path / "o")]
    msg = _one_error_line(capsys, exit_code(detect_mem.main, ["--model_id", "tiny-sd3", "--metrics", "le", *common]))
    assert "le is not defined for the sd3 family" in msg
    msg = _one_error_line(capsys, exit_code(detect_mem.main, ["--model_id", "tiny-sd3", "--metrics", "metric2",
                                                              *common]))
    assert "metric2 is not defined for the sd3 family" in msg and "identically 0" in msg
    msg = _one_error_line(capsys, exit_code(detect_mem.main, ["--model_id", "tiny-sd3", "--flow_space", "score",
                                                              *common]))
    assert "sigma = 1" in msg
    msg = _one_error_line(capsys, exit_code(detect_mem.main, ["--model_id", "tiny", "--flow_space", "score", *common]))
    assert "rectified-flow" in msg
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.pt"))


def test_mitigate_mem_none_equals_the_pipeline_and_undefined_methods_are_one_line(t5_pipe, tmp_path, capsys):
    import mitigate_mem
    from PIL import Image
    from cli_run import exit_code
    data = tmp_path / "p.txt"
    data.write_text(PROMPTS[0] + "\n")
    common = ["--model_id", "tiny-sd3", "--data_path", str(data), "--gen_num", "1", "--device", "cpu",
              "--num_inference_steps", "3", "--out_dir", str(tmp_path / "o")]
    assert exit_code(mitigate_mem.main, [*common, "--method", "none"]) == 0
    png = next((tmp_path / "o" / "tiny-sd3" / "mem_nomiti").glob("*.png"))
    torch.manual_seed(42)  # --gen_seed's default, before the pipeline draws its noise
    ref = t5_pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=7.5).images[0]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(ref))
    capsys.readouterr()
    msg = _one_error_line(capsys, exit_code(mitigate_mem.main, [*common, "--method", "ren"]))
    assert "ren is not defined for the sd3 family" in msg
    msg = _one_error_line(capsys, exit_code(mitigate_mem.main, [*common, "--method", "guard"]))
    assert "guard is not defined for the sd3 family" in msg
    msg = _one_error_line(capsys, exit_code(mitigate_mem.main, [*common, "--method", "none", "--sampler", "euler"]))
    assert "flow model" in msg
    msg = _one_error_line(capsys, exit_code(mitigate_mem.main, [*common, "--method", "sail", "--miti_thres", "1"]))
    assert "no value for alpha" in msg


@pytest.mark.parametrize("memory", [dict(attention="chunked", query_chunk=5), dict(max_bytes=1)],
                         ids=["chunked", "rows"])
def test_capped_jvp_equals_the_unchunked_jvp(t5_pipe, memory):
    """The JVP memory planner on SD3's transformer: the joint attention's chunked tangent (5-query chunks over the 16
    image + 333 text tokens) and one generation per call give the unchunked JVP, float64."""
    import copy
    from utils.models.flow import FlowDenoiser
    from utils.models.jvp_memory import JvpMemory
    pipe = t5_pipe
    tr = copy.deepcopy(pipe.transformer).double()
    cond = SD3.encode(pipe, PROMPTS).map(torch.Tensor.double).repeat_each(2)  # 2 prompts x 2 generations
    g = torch.Generator().manual_seed(6)
    x, v = (torch.randn(4, 16, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    plain = FlowDenoiser(tr, pipe.scheduler)
    t = plain.timesteps(4)[1]
    want = plain.hvp_delta(x, t, cond, v)
    capped = FlowDenoiser(tr, pipe.scheduler, jvp_memory=JvpMemory(**memory))
    assert not capped.jvp_plan(x, cond).unchanged
    torch.testing.assert_close(capped.hvp_delta(x, t, cond, v), want, rtol=1e-10, atol=1e-12 * want.abs().max().item())


def test_detect_mem_under_a_memory_cap_equals_the_uncapped_run(tmp_path):
    """detect_mem.py --max_memory_gb on an SD3 model: below the resident set the plan is one generation per call
    with the chunked joint attention; the metric equals the uncapped (math-kernel) run's within float32 tolerance."""
    import detect_mem
    from cli_run import exit_code
    data = tmp_path / "p.txt"
    data.write_text("\n".join(PROMPTS) + "\n")
    common = ["--model_id", "tiny-sd3", "--data_path", str(data), "--gen_num", "2", "--device", "cpu"]
    assert exit_code(detect_mem.main, [*common, "--out_dir", str(tmp_path / "a")]) == 0
    assert exit_code(detect_mem.main, [*common, "--out_dir", str(tmp_path / "b"), "--max_memory_gb", "1e-6"]) == 0
    a, b = (torch.load(tmp_path / d / "p_gen2.pt", weights_only=True) for d in "ab")
    assert a.abs().max() > 0
    torch.testing.assert_close(b, a, rtol=1e-5, atol=0)
