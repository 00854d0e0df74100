"""Han et al.'s initial-noise adjustment (utils/mitigation/han.py): with zero iterations and guidance from the first
step both methods give `none`'s images bit for bit (and, with their author settings, the pipeline's at guidance
7); the batch-wise update equals their formula computed independently on the UNet; the per-sample search lowers
its objective and stops at the target; bad hyperparameters are one error line."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cli_run import exit_code
import mitigate_mem
from utils.evaluation.cost import image_cost
from utils.evaluation.scoring import manifest_cost
from utils.evaluation.matching import read_generation_manifest
from utils.mitigation import han as HAN, methods as MI
from utils.models.denoisers import denoiser
from utils.models.families import SD1, load_pipeline

PROMPT = "a red cat sitting on a mat"
STEPS = 4


def _images(folder):
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines[1:]]
    return (json.loads(lines[0])["header"], recs,
            [np.asarray(Image.open(folder / n)) for r in recs for n in r["images"]])


@pytest.fixture(scope="module")
def cli(tiny_eps_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("han")
    (tmp / "p.txt").write_text(PROMPT + "\n")
    argv = ["--model_id", tiny_eps_dir, "--data_path", str(tmp / "p.txt"), "--gen_num", "2", "--device", "cpu",
            "--num_inference_steps", str(STEPS), "--out_dir", str(tmp / "out")]
    return tmp / "out" / os.path.basename(tiny_eps_dir), argv


def test_effect_off_equals_none_and_author_guidance(cli, tiny_eps_dir):
    out, argv = cli
    runs = {"mem_nomiti": ["--no_mitigation"],
            "mem_han_batch": ["--method", "han_batch", "--han_iters", "0", "--han_cfg_step", "-1"],
            "mem_han_sample": ["--method", "han_sample", "--hans_max_iters", "0"],
            "mem_han_batch_g7": ["--method", "han_batch", "--han_iters", "0", "--han_cfg_step", "-1",
                                 "--author_settings"],
            "mem_han_batch_rho50": ["--method", "han_batch", "--grid", "50"]}
    for folder, extra in runs.items():
        assert exit_code(mitigate_mem.main, [*argv, *extra]) == 0, folder
    _, _, none = _images(out / "mem_nomiti")
    for folder in ("mem_han_batch", "mem_han_sample"):
        _, recs, imgs = _images(out / folder)
        assert all(np.array_equal(a, b) for a, b in zip(none, imgs)), folder
    header, _, g7 = _images(out / "mem_han_batch_g7")
    assert header["guidance_scale"] == 7.0 and MI.describe_run(header)[1] == "rho=50, w=7"
    pipe = load_pipeline(tiny_eps_dir, torch.device("cpu"), torch.float32)
    torch.manual_seed(42)
    ref = pipe(PROMPT, num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=7.0).images
    assert all(np.array_equal(np.asarray(r), a) for r, a in zip(ref, g7))
    _, recs, on = _images(out / "mem_han_batch_rho50")  # their setting: 2 updates, steps 0-4 unconditional
    assert recs[0]["search_unet_calls"] == 4 and recs[0]["uncond_steps"] == STEPS
    assert not np.array_equal(on[0], none[0])
    # cost per image in UNet rows: sampling 2 S = 8; the search 4 pair calls of 2n = 4 rows over n = 2 images
    cost = manifest_cost(*read_generation_manifest(str(out / "mem_han_batch_rho50" / "manifest.jsonl")))
    assert (cost["unet_forwards_per_image"], cost["unet_backwards_per_image"], cost["cost_ratio"]) == (16, 0, 2)
    assert manifest_cost(*read_generation_manifest(str(out / "mem_nomiti" / "manifest.jsonl")))["cost_ratio"] == 1


def _ctx(pipe):
    model = denoiser(pipe.unet, pipe.scheduler)
    return model, SD1.encode(pipe, [PROMPT], "cpu"), SD1.initial_latents(pipe, 2, 42)


def test_batch_update_equals_their_formula(tiny_eps):
    model, cond, noise = _ctx(tiny_eps)
    st = HAN.HanBatchSettings(rho=3.0, gamma=0.7, iters=2)
    lat, rec = HAN.batch_adjusted(model, noise, cond.expand(2), st, num_inference_steps=STEPS)
    # independently: the UNet called as their code does, on [x; x] with [uncond x 2; cond x 2] at the first step
    unet, t = tiny_eps.unet, tiny_eps.scheduler.timesteps[0]
    emb = torch.cat([cond.uncond.expand(2, -1, -1), cond.cond.expand(2, -1, -1)])

    def eps_tilde(x):
        with torch.no_grad():
            u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
        return c - u

    x = noise.clone()
    for _ in range(2):
        e = eps_tilde(x)
        norm = torch.sqrt((e ** 2).sum(dim=(1, 2, 3), keepdim=True))
        x = x - 0.7 * (eps_tilde(x + 3.0 * e / norm) - e)
    # float32 rounding (their order of operations differs in the last bits); the update itself moves x by ~0.07
    assert torch.allclose(lat, x, atol=1e-5, rtol=0) and (lat - noise).abs().max() > 1e-2
    assert rec["search_unet_calls"] == 4 and rec["search_backward_calls"] == 0


def test_per_sample_search_lowers_its_loss_and_stops_at_the_target(tiny_eps):
    model, cond, noise = _ctx(tiny_eps)
    free = HAN.HanSampleSettings(target_loss=1e-9, lr=0.2, max_iters=6)
    _, rec = HAN.sample_adjusted(model, noise, cond, free, STEPS)
    trace = rec["han_losses"][0]
    assert len(trace) == 6 and trace[-1] < trace[0] and not any(rec["han_reached"])
    assert rec["han_updates"] == [6, 6] and rec["search_backward_calls"] == 12
    # the target met at the fourth evaluation: three updates, that evaluation the last
    target = trace[3] * (1 + 1e-6)
    lat, rec = HAN.sample_adjusted(model, noise, cond, HAN.HanSampleSettings(target, lr=0.2, max_iters=6), STEPS)
    assert rec["han_losses"][0] == trace[:4] and rec["han_updates"][0] == 3 and rec["han_reached"][0]
    assert all(x > target for x in trace[:3])
    # its cost: every evaluation one pair (2 rows) of one image, every update one backward of 2 rows
    recs = [dict(images=["a", "b"], **{k: rec[k] for k in ("search_unet_calls", "search_backward_calls",
                                                          "search_batch")})]
    n_eval, n_upd = rec["search_unet_calls"], rec["search_backward_calls"]
    assert image_cost({"num_inference_steps": STEPS}, recs) == dict(
        unet_forwards_per_image=(2 * STEPS * 2 + 2 * n_eval) / 2, unet_backwards_per_image=2 * n_upd / 2,
        cost_ratio=(2 * STEPS * 2 + 2 * n_eval + 4 * n_upd) / 2 / (2 * STEPS))


def test_bad_hyperparameters(cli, capsys):
    _, argv = cli
    for extra, msg in ((["--method", "han_batch", "--han_rho", "-1"], "--han_rho"),
                       (["--method", "han_batch", "--grid", "10,-5"], "not a valid rho"),
                       (["--method", "han_sample", "--grid", "0"], "not a valid target_loss"),
                       (["--method", "han_sample", "--hans_lr", "0"], "--hans_lr"),
                       (["--method", "han_batch", "--han_cfg_step", "-2"], "--han_cfg_step")):
        capsys.readouterr()
        assert exit_code(mitigate_mem.main, [*argv, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (extra, err)
