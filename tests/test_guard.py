"""GUARD (utils/mitigation/guard.py): r = 0 and alpha = 1 give `none`'s images bit for bit; the three-way prediction
handed to the scheduler equals u + w (p - u) - r cos(pi i / 2S) (g - u) on the captured UNet outputs, with the
edit on the attracting rows only; the spike rule flags the tokens an independent computation flags; bad values
are one error line."""
import json
import math
import os

import numpy as np
import torch
from PIL import Image

from cli_run import exit_code
import mitigate_mem
from utils.evaluation.scoring import manifest_cost
from utils.evaluation.matching import read_generation_manifest
from utils.mitigation import guard as GUARD, methods as MI
from utils.models.denoisers import denoiser
from utils.models.families import SD1

PROMPT = "a red cat sitting on a mat"
STEPS = 3


def _images(folder):
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines[1:]]
    return recs, [np.asarray(Image.open(folder / n)) for r in recs for n in r["images"]]


def test_effect_off_equals_none_and_bad_values(tiny_eps_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    argv = ["--model_id", tiny_eps_dir, "--data_path", str(tmp_path / "p.txt"), "--gen_num", "2", "--device", "cpu",
            "--num_inference_steps", str(STEPS), "--out_dir", str(tmp_path / "out")]
    out = tmp_path / "out" / os.path.basename(tiny_eps_dir)
    assert exit_code(mitigate_mem.main, [*argv, "--no_mitigation"]) == 0
    assert exit_code(mitigate_mem.main, [*argv, "--method", "guard", "--guard_repulsion", "0",
                                         "--guard_spike_scale", "1"]) == 0
    assert exit_code(mitigate_mem.main, [*argv, "--method", "guard", "--grid", "2"]) == 0
    _, none = _images(out / "mem_nomiti")
    _, off = _images(out / "mem_guard")
    recs, on = _images(out / "mem_guard_r2_alpha0.3")
    assert all(np.array_equal(a, b) for a, b in zip(none, off)) and not np.array_equal(none[0], on[0])
    assert 0 < recs[0]["spike_fraction"] < 1 and recs[0]["sample_branches"] == 3
    run = read_generation_manifest(str(out / "mem_guard_r2_alpha0.3" / "manifest.jsonl"))
    assert manifest_cost(*run)["cost_ratio"] == 1.5
    for extra, msg in ((["--guard_spike_scale", "0"], "--guard_spike_scale"),
                       (["--guard_repulsion", "-1"], "--guard_repulsion"),
                       (["--grid", "1,-2"], "not a valid repulsion")):
        capsys.readouterr()
        assert exit_code(mitigate_mem.main, [*argv, "--method", "guard", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_three_way_prediction_equals_the_formula_on_captured_outputs(tiny_eps):
    pipe = tiny_eps
    model = denoiser(pipe.unet, pipe.scheduler)
    ctx = MI.Context(model=model, family=SD1, encode=lambda ps: SD1.encode(pipe, ps, "cpu"),
                     noise=SD1.initial_latents(pipe, 2, 42), seed=42, tokenizer=pipe.tokenizer,
                     num_inference_steps=STEPS)
    outs, preds = [], []
    hook = pipe.unet.register_forward_hook(lambda mod, args, kwargs_out: outs.append(kwargs_out[0].detach().clone()))
    step = model.scheduler.step
    model.scheduler.step = lambda pred, t, x, **kw: (preds.append(pred.clone()), step(pred, t, x, **kw))[1]
    try:
        plan = GUARD.plan_guard(ctx, 0, PROMPT, GUARD.GuardSettings(repulsion=2.0, spike_scale=0.3))
        MI.run_plan(ctx, plan)
    finally:
        hook.remove()
        del model.scheduler.step
    assert len(outs) == len(preds) == STEPS
    for i, (out, pred) in enumerate(zip(outs, preds)):
        u, p, g = out[:2], out[2:4], out[4:]
        r_t = 2.0 * math.cos(math.pi * i / (2 * STEPS))
        assert torch.equal(pred, u + 7.5 * (p - u) - r_t * (g - u))
        assert not torch.allclose(p, g)  # the edit changes the attracting rows, not the repelling ones
    # the repelling rows are the plain conditional prediction (no edit), up to the batch's float rounding
    x = model.initial(ctx.noise)
    t = model.timesteps(STEPS)[0]
    with torch.no_grad():
        plain = model.output(model.scale_input(torch.cat([x, x]), t), t, ctx.encode([PROMPT]).expand(2))
    assert torch.allclose(outs[0][4:], plain[2:], atol=1e-5) and torch.allclose(outs[0][:2], plain[:2], atol=1e-5)
    assert 0 < plan.record["spike_fraction"] < 1


def test_spike_rule_against_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    n, heads, queries, keys = 2, 3, 5, 8
    z = torch.randn(3 * n, heads, queries, keys, generator=g)
    z[n:2 * n, :, 1, 3] += 6.0  # a spike on token 3 in every attracting row
    edit = GUARD.GuardEdit(layers=[0], branches=3, threshold=1.0, scale=0.3)
    out = edit.edit_logits(z)
    zn = z.numpy()
    for r in range(3 * n):
        for h in range(heads):
            peak = zn[r, h].max(axis=0)
            content = peak[1:]
            zscore = (peak - content.mean()) / (content.std(ddof=1) + 1e-6)
            flagged = [k for k in range(1, keys) if zscore[k] > 1.0] if n <= r < 2 * n else []
            if n <= r < 2 * n:
                assert 3 in flagged
            want = zn[r, h].copy()
            want[:, flagged] *= 0.3
            assert np.allclose(out[r, h].numpy(), want, rtol=0, atol=0), (r, h)
