"""The SDXL family on a tiny SDXL-shaped pipeline (two text encoders with projection, added conditions, tokenizers
rebuilt offline): each detector against a computation written here with plain diffusers calls, plain sampling bit
for bit against StableDiffusionXLPipeline, the unconditional branch, the per-family rules, the other SD profiles,
and the bad inputs."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.func import jvp

from cli_run import exit_code
import detect_mem
import mitigate_mem
from utils.cli import UserError
from utils.detection.be import first_down_block
from utils.detection.loop import run_detectors, settings_for
from utils.models import families as F
from utils.models.attention import cross_attention_layers
from utils.models.denoisers import denoiser
from utils.models.loading import SD_MODELS, model_label, resolve_model_id
from utils.models.sdxl import SDXL, norm_scale, ren_layer_rule
from utils.startup import load_model

PROMPTS = ["a photo of a cat", "Blue Rug by Andover Mills"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def xl():
    from utils.demo.model import tiny_xl_pipeline
    return tiny_xl_pipeline()


@pytest.fixture(scope="module")
def xl_dir(xl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_xl")
    xl.save_pretrained(str(folder))
    return str(folder)


def _plain_conditions(pipe, prompt, n):
    """Both branches' UNet keyword arguments (2n rows, uncond first) from the pipeline's own encode_prompt and
    _get_add_time_ids, as StableDiffusionXLPipeline.__call__ assembles them."""
    pe, npe, pp, npp = pipe.encode_prompt(prompt, device=CPU, num_images_per_prompt=n,
                                          do_classifier_free_guidance=True)
    size = (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return dict(encoder_hidden_states=torch.cat([npe, pe]),
                added_cond_kwargs={"text_embeds": torch.cat([npp, pp]), "time_ids": ids.repeat(2 * n, 1)})


def test_encode_equals_the_pipelines_conditions_and_zero_uncond(xl):
    cond = SDXL.encode(xl, PROMPTS, CPU)
    for k, prompt in enumerate(PROMPTS):
        want = _plain_conditions(xl, prompt, 1)
        one = SDXL.encode(xl, [prompt], CPU).stacked()  # one prompt per call, as the pipeline: bit for bit
        assert torch.equal(one["encoder_hidden_states"], want["encoder_hidden_states"])
        for name in ("text_embeds", "time_ids"):
            assert torch.equal(one["added_cond_kwargs"][name], want["added_cond_kwargs"][name])
            # a batch of prompts: the same up to the text encoders' batched float arithmetic
            torch.testing.assert_close(cond.rows([k]).stacked()["added_cond_kwargs"][name],
                                       want["added_cond_kwargs"][name])
    # force_zeros_for_empty_prompt (SDXL base): the unconditional branch is zeros, not the empty prompt's
    assert not cond.uncond.any() and not cond.added["text_embeds"][0].any()
    assert cond.cond.shape == (2, 77, 48) and cond.added["time_ids"][1].tolist()[0] == [16.0, 16.0, 0, 0, 16.0, 16.0]


def test_without_forced_zeros_the_uncond_branch_is_the_empty_prompts():
    from utils.demo.model import tiny_xl_pipeline
    pipe = tiny_xl_pipeline(force_zeros_for_empty_prompt=False)
    cond = SDXL.encode(pipe, PROMPTS[:1], CPU)
    want = _plain_conditions(pipe, PROMPTS[0], 1)
    assert cond.uncond.abs().sum() > 0
    assert torch.equal(cond.stacked()["encoder_hidden_states"], want["encoder_hidden_states"])
    assert torch.equal(cond.stacked()["added_cond_kwargs"]["text_embeds"], want["added_cond_kwargs"]["text_embeds"])


def test_wen_and_sharpness_equal_plain_diffusers_and_torch_func(xl):
    n, lat = 2, SDXL.initial_latents(xl, 2, 5)
    model = denoiser(xl.unet, xl.scheduler)
    vals, _, _, _ = run_detectors(model, SDXL.encode(xl, PROMPTS, CPU).repeat_each(1), lat, ["wen", "sharpness"],
                                  settings_for(wen_steps=1))
    xl.scheduler.set_timesteps(50)
    t = xl.scheduler.timesteps[0]
    sigma = torch.sqrt(1 - xl.scheduler.alphas_cumprod[int(t)])
    for k, prompt in enumerate(PROMPTS):
        kw = _plain_conditions(xl, prompt, n)
        with torch.no_grad():
            e_u, e_c = xl.unet(torch.cat([lat, lat]), t, **kw).sample.chunk(2)
        torch.testing.assert_close(vals["wen"][k][:, 0], (e_c - e_u).flatten(1).norm(dim=1), rtol=1e-5, atol=1e-7)

        def s_delta(x):  # the score difference -(eps_c - eps_u) / sigma_t, written out
            u, c = xl.unet(torch.cat([x, x]), t, **kw).sample.chunk(2)
            return -(c - u) / sigma

        with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            s = s_delta(lat)
            _, hs = jvp(s_delta, (lat,), (s,))
        torch.testing.assert_close(vals["sharpness"][k][:, 0], hs.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-6)


def test_method_none_equals_the_sdxl_pipeline_bit_for_bit(xl_dir, tmp_path):
    data = tmp_path / "p.txt"
    data.write_text("\n".join(PROMPTS) + "\n")
    assert exit_code(mitigate_mem.main, ["--model_id", xl_dir, "--data_path", str(data), "--gen_num", "2",
                                         "--device", "cpu", "--out_dir", str(tmp_path / "out"),
                                         "--num_inference_steps", "4", "--method", "none"]) == 0
    folder = tmp_path / "out" / os.path.basename(xl_dir) / "mem_nomiti"
    lines = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    run = json.loads((folder / "run.json").read_text())
    assert run["family"]["name"] == "sdxl" and "sail_thres" in run["family"]["by_rule"]
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, add_watermarker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for rec in lines[1:]:
        torch.manual_seed(42)
        ref = pipe(rec["prompt"], num_images_per_prompt=2, num_inference_steps=4, guidance_scale=7.5).images
        got = [np.asarray(Image.open(folder / name)) for name in rec["images"]]
        assert all(np.array_equal(np.asarray(r), g) for r, g in zip(ref, got)), rec["prompt"]


def _unet(down, up, depth, cross=True):
    """A UNet2DConditionModel with a real model's block layout at toy width (the rules read only the layout)."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8, 16, 16)[:len(down)], down_block_types=down, up_block_types=up,
        layers_per_block=2, transformer_layers_per_block=depth, attention_head_dim=2, cross_attention_dim=8,
        norm_num_groups=4)


class _Pipe:
    def __init__(self, unet):
        self.unet = unet


def test_attention_layer_rules_reproduce_sd14_and_pick_sdxls():
    cad, dn = "CrossAttnDownBlock2D", "DownBlock2D"
    cau, up = "CrossAttnUpBlock2D", "UpBlock2D"
    sd14 = _unet((cad, cad, cad, dn), (up, cau, cau, cau), 1)
    assert ren_layer_rule(_Pipe(sd14)) == 3 == F.SD1.hparam("le_layer")  # Ren et al.'s published layer
    layers = cross_attention_layers(sd14)
    assert [layers[i].path for i in first_down_block(layers)] == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2", "down_blocks.0.attentions.1.transformer_blocks.0.attn2"]
    sdxl = _unet((dn, cad, cad), (cau, cau, up), (1, 2, 10))
    layers = cross_attention_layers(sdxl)
    assert layers[ren_layer_rule(_Pipe(sdxl))].path == "down_blocks.2.attentions.1.transformer_blocks.9.attn2"
    assert {layers[i].path.rsplit(".", 3)[0] for i in first_down_block(layers)} == {
        "down_blocks.1.attentions.0", "down_blocks.1.attentions.1"} and len(first_down_block(layers)) == 4
    with pytest.raises(ValueError, match="fewer than two down blocks"):
        ren_layer_rule(_Pipe(_unet((cad, dn), (up, cau), 1)))


def test_rule_values_are_sd14s_scaled_by_the_latent_norm():
    assert norm_scale((4, 128, 128)) == 2.0 and norm_scale((4, 64, 64)) == 1.0
    assert SDXL.hparam("sail_thres") == 2 * F.SD1.hparam("sail_thres") == 16.4
    assert SDXL.hparam("wen_target_loss") == 6.0 and SDXL.hparam("sail_alpha") == F.SD1.hparam("sail_alpha")
    assert [g["thres"] for g in SDXL.hparam("grids")["sail"]] == [15.2, 15.6, 16.4, 17.2, 18.0]
    assert SDXL.hparam("aniso_weights") == (0.5, 2.0)
    with pytest.raises(ValueError, match="needs the pipeline"):
        SDXL.hparam("le_layer")


def test_short_names_and_family_from_configs(xl_dir, tiny_eps_dir, tiny_v_dir, tmp_path):
    assert [k for k in SD_MODELS if k not in ("demo", "demo_flow")] == ["1", "1.5", "2", "2.1", "xl"]
    assert resolve_model_id("xl") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert model_label("2.1") == "sd2.1" and model_label("xl") == "sdxl"
    assert F.family_of(xl_dir) is SDXL and F.family_of("tiny-xl") is SDXL
    # SD 1.5-like (epsilon) and 2.1-like (v) folders load with their family's defaults
    eps, v = load_model("1", tiny_eps_dir, CPU), load_model("1", tiny_v_dir, CPU)
    assert (eps.family.name, eps.hparam("sail_alpha"), v.family.name, v.hparam("sail_alpha")) == ("sd1", 0.05,
                                                                                                   "sd2", 0.01)
    # SD 2.x base: epsilon with SD 2's 1024-wide text context
    base = tmp_path / "base"
    shutil.copytree(tiny_eps_dir, base)
    cfg = json.loads((base / "unet" / "config.json").read_text())
    (base / "unet" / "config.json").write_text(json.dumps(dict(cfg, cross_attention_dim=1024)))
    assert F.family_of(str(base)) is F.SD2_BASE and "grids" in F.SD2_BASE.by_rule
    assert F.family_of("x", "StableDiffusionPipeline", "epsilon", {"cross_attention_dim": 768}) is F.SD1
    with pytest.raises(UserError, match="PixArtAlphaPipeline; supported families: sd1 "):
        F.family_of("x", "PixArtAlphaPipeline", "epsilon", {})


def _one_error_line(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs_are_one_line(xl_dir, tmp_path, capsys):
    data = tmp_path / "p.txt"
    data.write_text("a photo of a cat\n")
    common = ["--data_path", str(data), "--gen_num", "1", "--device", "cpu", "--out_dir", str(tmp_path / "o")]
    msg = _one_error_line(capsys, exit_code(detect_mem.main, ["--model_id", "tiny-xl", "--height", "15", *common]))
    assert "--height 15" in msg and "multiple of the VAE's downsampling factor 2" in msg
    no_te2 = tmp_path / "no_te2"
    shutil.copytree(xl_dir, no_te2)
    shutil.rmtree(no_te2 / "text_encoder_2")
    msg = _one_error_line(capsys, exit_code(mitigate_mem.main, ["--model_id", str(no_te2), "--method", "none",
                                                                 *common]))
    assert "no text_encoder_2/" in msg
    msg = _one_error_line(capsys, exit_code(detect_mem.main, ["--model_id", "tiny-xl", "--metrics", "le",
                                                               "--le_layer", "99", *common]))
    assert "no cross-attention layer 99" in msg and "--le_layer" in msg
    long = tmp_path / "long.txt"
    long.write_text("cat " * 90 + "\n")
    assert exit_code(detect_mem.main, ["--model_id", "tiny-xl", "--metrics", "wen", "--wen_steps", "1",
                                       "--data_path", str(long), "--gen_num", "1", "--device", "cpu",
                                       "--out_dir", str(tmp_path / "o2")]) == 0
    assert "1 prompt(s) exceed 77 tokens" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "p_gen1.pt")


def test_sail_on_sdxl_takes_the_familys_threshold_and_alpha(tmp_path):
    data = tmp_path / "p.txt"
    data.write_text("a photo of a cat\n")
    assert exit_code(mitigate_mem.main, ["--model_id", "tiny-xl", "--data_path", str(data), "--gen_num", "1",
                                         "--device", "cpu", "--out_dir", str(tmp_path / "out"), "--method", "sail",
                                         "--num_inference_steps", "2", "--miti_budget", "2", "--miti_max_steps", "1",
                                         "--miti_max_rounds", "1"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "tiny-xl" / "mem" / "manifest.jsonl").read_text().splitlines()]
    assert lines[0]["header"]["settings"]["thres"] == 16.4 and lines[1]["final_threshold"] == 16.4
    assert len(lines[1]["images"]) == 1 and (tmp_path / "out" / "tiny-xl" / "mem" / lines[1]["images"][0]).is_file()


def test_every_mitigation_and_a_gated_run_on_sdxl(tmp_path):
    data = tmp_path / "p.txt"
    data.write_text("\n".join(PROMPTS) + "\n")
    common = ["--model_id", "tiny-xl", "--data_path", str(data), "--gen_num", "2", "--device", "cpu",
              "--num_inference_steps", "3"]
    assert exit_code(detect_mem.main, [*common[:8], "--out_dir", str(tmp_path / "det"), "--metrics",
                                       "wen,sharpness", "--wen_steps", "1", "--hvp", "fd"]) == 0
    runs = {"none": [], "wen": [], "rna": [], "rta": [], "cfg_delay": [], "ren": [],
            "sail": ["--miti_budget", "2", "--miti_max_steps", "1", "--miti_max_rounds", "1"]}
    for method, extra in runs.items():
        assert exit_code(mitigate_mem.main, [*common, "--out_dir", str(tmp_path / "out"), "--method", method,
                                             *extra]) == 0, method
    assert exit_code(mitigate_mem.main, [*common, "--out_dir", str(tmp_path / "out"), "--method", "ren",
                                         "--flagged_by", str(tmp_path / "det" / "p_wen_gen2.pt"),
                                         "--flag_threshold", "0"]) == 0
    out = tmp_path / "out" / "tiny-xl"
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["mem", "mem_cfg_delay", "mem_nomiti", "mem_ren", "mem_ren_gated", "mem_rna", "mem_rta",
                       "mem_wen"]
    for name in folders:
        lines = [json.loads(x) for x in (out / name / "manifest.jsonl").read_text().splitlines()]
        assert len(lines) == 3 and all(len(r["images"]) == 2 for r in lines[1:]), name
        assert json.loads((out / name / "run.json").read_text())["family"]["name"] == "sdxl"
