"""The detection harness: each metric against an independently written computation (plain diffusers calls on the
tiny pipeline, closed forms on the Gaussian model), one pass == each metric alone, the script's files, the table."""
import json
import os

import numpy as np
import pytest
import torch

from cli_run import exit_code
import detect_eval
import detect_mem
from gaussian import GaussianUNet, ddim_scheduler, gaussian_embedding
from utils.detection.loop import run_detectors, settings_for
from utils.detection.sharpness import Sharpness, SharpnessSettings
from utils.detection.tiled_l2 import pairwise_tiled_l2
from utils.detection.wen import Wen
from utils.models.denoisers import denoiser
from utils.models.families import SD1
from utils.models.conditioning import Conditioning

PROMPTS = ["a photo of a cat", "digit seven"]


def _run(mod, argv):
    return exit_code(mod.main, argv)


@pytest.fixture(scope="module")
def setup(tiny_eps):
    pipe = tiny_eps
    lat = SD1.initial_latents(pipe, 3, 5)
    return pipe, SD1.embed(pipe, PROMPTS, "cpu"), SD1.embed(pipe, "", "cpu"), lat


def _plain_trajectory(pipe, prompt, lat, steps):
    """Plain diffusers calls: DDIM with CFG 7.5 from lat; yields (t, x_t, eps_uncond, eps_cond) per step."""
    unet, sched = pipe.unet, pipe.scheduler
    sched.set_timesteps(50)
    with torch.no_grad():
        c = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        u = pipe.encode_prompt("", "cpu", 1, False)[0]
        n = lat.shape[0]
        emb = torch.cat([u.expand(n, -1, -1), c.expand(n, -1, -1)])
        x = lat.clone()
        for t in sched.timesteps[:steps]:
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.chunk(2)
            yield t, x, e_u, e_c
            x = sched.step(e_u + 7.5 * (e_c - e_u), t, x, eta=0.0).prev_sample


def test_wen_equals_plain_diffusers_loop(setup):
    pipe, cond, uncond, lat = setup
    vals, _, _, _ = run_detectors(denoiser(pipe.unet, pipe.scheduler), Conditioning.of(cond, uncond), lat, ["wen"],
                                  settings_for(wen_steps=4))
    assert vals["wen"].shape == (2, 3, 4)
    for k, prompt in enumerate(PROMPTS):
        want = torch.stack([(e_c - e_u).flatten(1).norm(dim=1) for _, _, e_u, e_c in
                            _plain_trajectory(pipe, prompt, lat, 4)], dim=1)  # (n, steps)
        torch.testing.assert_close(vals["wen"][k], want, rtol=1e-5, atol=1e-7)


def test_anisotropy_equals_plain_computation(setup):
    pipe, cond, uncond, lat = setup
    st = settings_for(aniso_weights=(1.0, 2.0))
    vals, extras, _, _ = run_detectors(denoiser(pipe.unet, pipe.scheduler), Conditioning.of(cond, uncond), lat, ["anisotropy"], st)
    sched = pipe.scheduler
    for k, prompt in enumerate(PROMPTS):
        (t1, x, e_u, e_c), = list(_plain_trajectory(pipe, prompt, lat, 1))
        norm = (e_c - e_u).flatten(1).norm(dim=1)
        t_low = sched.timesteps[-3]
        assert int(t_low) == 41  # the authors' low-noise timestep on SD's schedule
        with torch.no_grad():
            c = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            u = pipe.encode_prompt("", "cpu", 1, False)[0]
            emb = torch.cat([u.expand(3, -1, -1), c.expand(3, -1, -1)])
            l_u, l_c = pipe.unet(torch.cat([lat, lat]), t_low, encoder_hidden_states=emb).sample.chunk(2)
        a, b = l_u, l_c - l_u  # default mode "x,c|x": unconditional vs guidance direction, per pixel over channels
        cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).flatten(1).mean(dim=1)
        torch.testing.assert_close(torch.tensor(extras["anisotropy"][k]["norm"]), norm, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.tensor(extras["anisotropy"][k]["cosine"]), cos, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(vals["anisotropy"][k, :, 0], norm + 2 * cos, rtol=1e-4, atol=1e-6)


def test_tiled_l2_equals_pipeline_images_and_numpy_tiles(setup):
    pipe, cond, uncond, lat = setup
    st = settings_for(tile_px=4)  # the tiny pipeline makes 16x16 images: a 4x4 grid of 4-pixel tiles
    vals, extras, images, _ = run_detectors(denoiser(pipe.unet, pipe.scheduler), Conditioning.of(cond, uncond), lat, ["tiled_l2"],
                                            st, decode=lambda z: SD1.decode(pipe, z))
    for k, prompt in enumerate(PROMPTS):
        ref = pipe(prompt, latents=lat.clone(), num_images_per_prompt=3, num_inference_steps=50,
                   guidance_scale=7.5).images
        got = [np.asarray(im) for im in images[k]]
        assert all(np.array_equal(g, np.asarray(r)) for g, r in zip(got, ref))  # same pixels as the pipeline
        arr = [np.asarray(r, dtype=np.float64) / 255 for r in ref]
        d = np.zeros((3, 3))
        for i in range(3):
            for j in range(3):
                d[i, j] = max(np.sqrt(((arr[i][y:y + 4, x:x + 4] - arr[j][y:y + 4, x:x + 4]) ** 2).mean())
                              for y in range(0, 16, 4) for x in range(0, 16, 4))
        np.testing.assert_allclose(extras["tiled_l2"][k]["pairwise"], d, rtol=1e-12, atol=1e-15)
        assert vals["tiled_l2"][k, 0, 0].item() == pytest.approx(d[np.triu_indices(3, 1)].mean(), rel=1e-6)


def test_one_pass_equals_each_metric_alone(setup):
    pipe, cond, uncond, lat = setup
    model = denoiser(pipe.unet, pipe.scheduler)
    st = settings_for(hvp_sampling_num=2, wen_steps=3, tile_px=4, aniso_weights=(1.0, 2.0))
    dec = lambda z: SD1.decode(pipe, z)
    together, ex, _, meter = run_detectors(model, Conditioning.of(cond, uncond), lat, ["sharpness", "wen", "anisotropy", "tiled_l2"],
                                           st, decode=dec)
    for m in ("sharpness", "wen", "anisotropy", "tiled_l2"):
        alone, ex_alone, _, _ = run_detectors(model, Conditioning.of(cond, uncond), lat, [m], st, decode=dec)
        assert torch.equal(together[m], alone[m]), m
        assert ex[m] == ex_alone[m], m
    cost = meter.summary(["sharpness", "wen", "anisotropy", "tiled_l2"])
    # Shared calls run once: 50 trajectory forwards + 1 low-noise forward, 2 JVPs, 1 decode in total; each
    # metric's own count is what it would cost alone.
    assert (cost["total"]["unet_forwards"], cost["total"]["jvps"], cost["total"]["vae_decodes"]) == (51, 2, 1)
    assert [cost[m]["unet_forwards"] for m in ("sharpness", "wen", "anisotropy", "tiled_l2")] == [2, 3, 2, 50]
    assert cost["sharpness"]["jvps"] == 2 and "wen" in cost["sharpness"]["shared_with"]


def test_fd_sharpness_agrees_with_the_jvp_and_costs_forwards(setup):
    """--hvp fd: close to the exact JVP on the tiny pipeline, the shared forward untouched (wen bit-identical),
    one extra forward per measured step (two for central), no JVP; its settings enter the identity, the default's
    identity is unchanged (old progress logs resume)."""
    pipe, cond, uncond, lat = setup
    model = denoiser(pipe.unet, pipe.scheduler)
    metrics = ["sharpness", "wen"]
    exact, _, _, _ = run_detectors(model, Conditioning.of(cond, uncond), lat, metrics, settings_for(hvp_sampling_num=2, wen_steps=2))
    for scheme, extra in (("forward", 1), ("central", 2)):
        st = settings_for(hvp_sampling_num=2, wen_steps=2, hvp="fd", fd_scheme=scheme)
        fd, _, _, meter = run_detectors(model, Conditioning.of(cond, uncond), lat, metrics, st)
        torch.testing.assert_close(fd["sharpness"], exact["sharpness"], rtol=1e-2, atol=0)
        assert torch.equal(fd["wen"], exact["wen"])
        cost = meter.summary(metrics)["sharpness"]
        assert (cost["unet_forwards"], cost["fd_forwards"], cost["jvps"]) == (2 + 2 * extra, 2 * extra, 0)
    assert "hvp" not in Sharpness().identity()
    assert Sharpness(st["sharpness"]).identity()["fd_scheme"] == "central" and "hvp" not in Wen(st["wen"]).identity()
    for bad in (dict(hvp="hessian"), dict(fd_step=0.0), dict(fd_precision="fp8"), dict(fd_scheme="backward")):
        with pytest.raises(ValueError):
            SharpnessSettings(**bad)


def test_wen_and_anisotropy_norm_on_gaussian_closed_form():
    """For a Gaussian, eps(x, c) = sigma (x - alpha mu_c) / v_c: Wen's quantity is the norm of a known linear map
    of x; on v-prediction the raw-v difference is the eps difference over alpha_t (Wen's code takes raw v)."""
    shape = (4, 4, 4)
    for pred in ("epsilon", "v_prediction"):
        sched = ddim_scheduler(pred)
        model = GaussianUNet(sched.alphas_cumprod, shape, pred).double()
        g = torch.Generator().manual_seed(1)
        cond = gaussian_embedding(torch.randn(2, *shape, generator=g), torch.randn(2, *shape, generator=g) - 2)
        uncond = gaussian_embedding(torch.zeros(1, *shape), torch.zeros(1, *shape))
        lat = torch.randn(3, *shape, generator=g, dtype=torch.float64)
        vals, ext, _, _ = run_detectors(denoiser(model, sched), Conditioning.of(cond.double(), uncond.double()), lat,
                                        ["wen", "anisotropy"], settings_for(wen_steps=1, aniso_weights=(1.0, 2.0)))
        t = int(sched.timesteps[0])
        alpha, sigma, mu, var_c = model.marginal(t, cond.double().repeat_interleave(3, 0))
        _, _, _, var_u = model.marginal(t, uncond.double().expand(6, -1, -1))
        x = lat.repeat(2, 1, 1, 1)
        d_eps = sigma * ((x - alpha * mu) / var_c - x / var_u)
        want = d_eps.flatten(1).norm(dim=1) / (alpha if pred == "v_prediction" else 1)
        torch.testing.assert_close(vals["wen"][..., 0].flatten().double(), want, rtol=1e-5, atol=0)
        # the authors' norm term: eps difference (epsilon); (alpha/sigma^2) x v difference = eps diff / sigma^2 (v)
        norm = torch.tensor([v for e in ext["anisotropy"] for v in e["norm"]], dtype=torch.float64)
        scale = 1 / sigma ** 2 if pred == "v_prediction" else 1
        torch.testing.assert_close(norm, d_eps.flatten(1).norm(dim=1) * scale, rtol=1e-5, atol=0)


def test_pairwise_tiled_l2_rejects_indivisible_tiles_and_is_symmetric():
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d = pairwise_tiled_l2(x, 4)
    assert torch.equal(d, d.T) and torch.equal(d.diagonal(), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError):
        pairwise_tiled_l2(x, 3)


def _script_run(model_dir, data, out, *extra):
    return _run(detect_mem, ["--model_id", model_dir, "--data_path", str(data), "--out_dir", str(out),
                             "--device", "cpu", *extra])


def test_script_outputs_resume_and_table(tiny_eps_dir, tmp_path, capsys):
    (tmp_path / "t_mem.txt").write_text("\n".join(PROMPTS + ["a red square"]))
    (tmp_path / "t_nmem.txt").write_text("\n".join(["an oil painting", "a blue circle", "the number 3"]))
    out = tmp_path / "out"
    args = ["--gen_num", "2", "--metrics", "sharpness,wen,anisotropy,tiled_l2", "--wen_steps", "5", "--tile_px", "4"]
    for name in ("t_mem", "t_nmem"):
        assert _script_run(tiny_eps_dir, tmp_path / f"{name}.txt", out, *args) == 0
    for m, cols in (("", 1), ("_wen", 5), ("_anisotropy", 1), ("_tiled_l2", 1)):
        t = torch.load(out / f"t_mem{m}_gen2.pt", weights_only=True)
        assert t.shape == (3, cols) and t.dtype == torch.float32
        side = json.loads((out / f"t_mem{m}_gen2.json").read_text())
        assert side["metric"]["name"] == (m[1:] or "sharpness") and side["versions"]["torch"] == torch.__version__
    assert len(os.listdir(out / "t_mem_gen2_images")) == 6
    # the sharpness file is the one --metrics sharpness alone writes (shared calls change no number)
    assert _script_run(tiny_eps_dir, tmp_path / "t_mem.txt", tmp_path / "alone", "--gen_num", "2") == 0
    assert torch.equal(torch.load(out / "t_mem_gen2.pt", weights_only=True),
                       torch.load(tmp_path / "alone" / "t_mem_gen2.pt", weights_only=True))
    # a finished run resumes to the same files; another setting in the same folder is refused
    before = (out / "t_mem_wen_gen2.pt").read_bytes()
    assert _script_run(tiny_eps_dir, tmp_path / "t_mem.txt", out, *args) == 0
    assert (out / "t_mem_wen_gen2.pt").read_bytes() == before
    capsys.readouterr()
    assert _script_run(tiny_eps_dir, tmp_path / "t_mem.txt", out, *args[:-1], "2") == 2
    assert "different settings" in capsys.readouterr().err
    assert _run(detect_eval, ["--table", str(out)]) == 0
    md = (out / "t_mem_vs_t_nmem.table.md").read_text()
    rows = json.loads((out / "t_mem_vs_t_nmem.table.json").read_text())["rows"]
    assert {(r["metric"], r["steps"]) for r in rows} == {("sharpness", 1), ("wen", 1), ("wen", 5),
                                                           ("anisotropy", 1), ("tiled_l2", 50)}
    assert "| tiled_l2 | 2 | 50 |" in md and os.path.getsize(out / "t_mem_vs_t_nmem.table.roc.png") > 1000
    wen1 = next(r for r in rows if r["metric"] == "wen" and r["steps"] == 1)
    assert wen1["cost"]["unet_forwards"] == 1 and wen1["cost"]["ratio"] == pytest.approx(1.0, rel=0.5)


def test_table_numbers_direction_and_mismatch(tmp_path):
    """Hand-made results: known AUCs, tiled_l2's lower-is-memorized direction, and a settings mismatch."""
    def save(stem, metric, vals, settings, identity=None):
        name = f"{stem}_gen4" if metric == "sharpness" else f"{stem}_{metric}_gen4"
        torch.save(torch.tensor(vals, dtype=torch.float32), tmp_path / f"{name}.pt")
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(
            metric=dict(name=metric, stem=stem, gen_num=4, settings=settings,
                        direction="lower" if metric == "tiled_l2" else "higher"),
            values=vals, identity=identity or dict(model_id="m", gen_seed=1))))
    save("a_mem", "sharpness", [[3.0], [4.0], [1.0]], {"s": 1})
    save("a_nmem", "sharpness", [[2.0], [0.5]], {"s": 1})
    save("a_mem", "tiled_l2", [[0.1], [0.2], [0.9]], {"t": 1})   # small distance = memorized
    save("a_nmem", "tiled_l2", [[0.5], [0.3]], {"t": 1})
    assert _run(detect_eval, ["--table", str(tmp_path)]) == 0
    rows = {r["metric"]: r for r in json.loads((tmp_path / "a_mem_vs_a_nmem.table.json").read_text())["rows"]}
    # sharpness 3, 4, 1 vs 2, 0.5: 5 of 6 pairs ordered; tiled_l2 (negated) -0.1, -0.2, -0.9 vs -0.5, -0.3: 4 of 6
    assert rows["sharpness"]["auc"] == pytest.approx(5 / 6) and rows["tiled_l2"]["auc"] == pytest.approx(4 / 6)
    save("a_nmem", "tiled_l2", [[0.5], [0.3]], {"t": 2})
    assert _run(detect_eval, ["--table", str(tmp_path)]) == 2


@pytest.mark.parametrize("argv,msg", [
    (["--metrics", "sharpness,nope"], "expected comma-separated metrics"),
    (["--metrics", "tiled_l2", "--gen_num", "1"], "needs --gen_num of at least 2"),
    (["--metrics", "wen", "--wen_steps", "51"], "exceeds the 50 sampling steps"),
    (["--hvp_sampling_num", "51"], "exceeds the 50 sampling steps"),
    (["--metrics", "tiled_l2", "--gen_num", "2", "--tile_px", "5"], "does not divide"),
    (["--metrics", "anisotropy", "--aniso_weights", "1"], "two finite numbers"),
    (["--hvp", "fd", "--fd_precision", "tf32"], "needs CUDA"),
    (["--hvp", "fd", "--fd_step", "0"], "positive number"),
])
def test_bad_harness_input_exits_2(argv, msg, tiny_eps_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a prompt")
    assert _script_run(tiny_eps_dir, tmp_path / "p.txt", tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0]


def test_attention_metrics_equal_diffusers_attention_scores(setup):
    """le, ae and be against probabilities from diffusers' own attn.get_attention_scores, recorded by a plain
    processor in call order on a plain DDIM loop, and the formulas written out with numpy."""
    from diffusers.models.attention_processor import AttnProcessor
    pipe, cond, uncond, lat = setup
    n, steps = lat.shape[0], 50
    vals, extras, _, _ = run_detectors(denoiser(pipe.unet, pipe.scheduler), Conditioning.of(cond, uncond), lat, ["le", "ae", "be"],
                                       settings_for(le_layer=1, be_maps=True), prompt_lengths=[
                                           len(pipe.tokenizer(p).input_ids) for p in PROMPTS])
    calls = []

    class Recorder:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            out = AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
            if encoder_hidden_states is not None:
                q = attn.head_to_batch_dim(attn.to_q(hidden_states))
                k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
                p = attn.get_attention_scores(q, k, None)  # (B*heads, N, 77)
                calls.append((self.path, p.view(hidden_states.shape[0], attn.heads, *p.shape[1:]).double()))
            return out

    procs = {}
    for name in pipe.unet.attn_processors:
        procs[name] = Recorder()
        procs[name].path = name
    saved = dict(pipe.unet.attn_processors)
    pipe.unet.set_attn_processor(procs)
    try:
        for k, prompt in enumerate(PROMPTS):
            calls.clear()
            diffs = [(e_c - e_u).double() for _, _, e_u, e_c in _plain_trajectory(pipe, prompt, lat, steps)]
            per_step = len(calls) // steps
            order = [path for path, _ in calls[:per_step]]  # the order the UNet calls them: forward order
            assert order.index("mid_block.attentions.0.transformer_blocks.0.attn2.processor") < \
                order.index("up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor")
            dist = lambda s, l: calls[s * per_step + l][1][n:].mean(dim=(1, 2)).numpy()  # cond rows: (n, 77)
            ent = lambda p: -(p * np.log(np.where(p > 0, p, 1))).sum(-1)
            L = len(pipe.tokenizer(prompt).input_ids)
            np.testing.assert_allclose(vals["le"][k, :, 0].numpy(), ent(dist(0, 1)), rtol=1e-4)
            mean_p = lambda s: np.mean([dist(s, l) for l in range(per_step)], axis=0)
            summ = lambda p: -(p[:, L - 1:] * np.log(p[:, L - 1:])).sum(-1)
            window = range(steps - steps // 5, steps)
            ae = np.mean([ent(mean_p(s)) for s in window], 0) + np.mean([summ(mean_p(s)) for s in window], 0) \
                - summ(mean_p(0))
            np.testing.assert_allclose(vals["ae"][k, :, 0].numpy(), ae, rtol=1e-4)
            first = [i for i, p in enumerate(order) if p.startswith("down_blocks.0.")]
            m = np.mean([calls[(steps - 1) * per_step + i][1][n:, :, :, L - 1].mean(1).numpy() for i in first], 0)
            h = w = lat.shape[-1]
            be = np.mean([np.linalg.norm((m.reshape(n, 1, h, w) * d.numpy()).reshape(n, -1), axis=1) / m.mean(1)
                          for d in diffs], 0)
            np.testing.assert_allclose(vals["be"][k, :, 0].numpy(), be, rtol=1e-4)
            # --be_maps: the saved map of each generation is that mask, on the latent grid
            np.testing.assert_allclose(extras["be"][k]["maps"].numpy(), m.reshape(n, h, w), rtol=1e-5, atol=1e-7)
    finally:
        pipe.unet.set_attn_processor(saved)


def test_be_maps_off_leaves_every_output_bit_identical(tiny_eps_dir, tmp_path, capsys):
    """be without --be_maps: no maps and the same files as before the flag (no be_maps key in its identity); with
    it: the same .pt bits and sidecar values, the mask of every generation saved in the shared map format, and
    detect_eval.py --localization scores it."""
    import json
    from PIL import Image
    import detect_eval
    from cli_run import exit_code
    (tmp_path / "p.txt").write_text("a prompt")
    off, on = tmp_path / "off", tmp_path / "on"
    assert _script_run(tiny_eps_dir, tmp_path / "p.txt", off, "--metrics", "be", "--gen_num", "2") == 0
    assert _script_run(tiny_eps_dir, tmp_path / "p.txt", on, "--metrics", "be", "--gen_num", "2", "--be_maps") == 0
    assert sorted(f.name for f in off.iterdir()) == ["p_be_gen2." + e for e in ("json", "progress.jsonl", "pt")]
    assert (off / "p_be_gen2.pt").read_bytes() == (on / "p_be_gen2.pt").read_bytes()
    a, b = (json.loads((d / "p_be_gen2.json").read_text()) for d in (off, on))
    assert "be_maps" not in a["metric"]["settings"] and a["metric"] == b["metric"]
    assert a["per_generation"] == b["per_generation"] and a["extras"] == b["extras"]
    maps = [np.load(on / "p_gen2_maps" / "be" / "00000.npy")]
    assert all(m.shape == (2, 8, 8) and m.dtype == np.float32 and (m >= 0).all() for m in maps)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i, m in enumerate(maps):  # masks at twice the map's size: each map's own upper half by value
        for k, g in enumerate(m):
            Image.fromarray(((g > np.median(g)) * 255).astype(np.uint8)).resize((16, 16), Image.NEAREST).save(
                masks / f"{i:05d}_{k}.png")
    capsys.readouterr()
    assert exit_code(detect_eval.main, ["--localization", str(masks), "--mem", str(on / "p_be_gen2.pt")]) == 0
    assert "(2 maps)" in capsys.readouterr().out
    assert json.loads((on / "p_be_gen2.localization.json").read_text())["maps"] == 2


def test_attention_layers_that_do_not_exist_exit_2(tiny_eps_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a prompt")
    for argv in (["--metrics", "le", "--le_layer", "99"], ["--metrics", "be", "--be_layers", "1,42"]):
        assert _script_run(tiny_eps_dir, tmp_path / "p.txt", tmp_path / "o", "--gen_num", "1", *argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no cross-attention layer" in err[0], err
