"""SAIL: faithfulness to the reference algorithm, behaviour on a closed-form sharp Gaussian, bookkeeping, CLI."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cli_run import exit_code
import mitigate_mem
from gaussian import GaussianUNet, gaussian_embedding
from utils.mitigation.sail import SailSettings, sail_latents, sail_latents_batch
from utils.models.denoisers import denoiser
from utils.models.conditioning import Conditioning


def reference_style_sail(unet, scheduler, cond, uncond, shape, gen_num, seed, thres, lr, budget, max_steps, alpha):
    """The reference's search written out plainly with the GLOBAL torch RNG (an independent oracle).

    Per round: seed, draw candidates, build the doubled model input once; each step: direction from that input,
    proxy at latents + direction, accept new indices (views into the live tensor), backward, Adam step.
    """
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[0]
    emb = torch.cat([uncond] * budget + [cond] * budget)
    kept, failures = [], 0
    for p in unet.parameters():
        p.requires_grad_(False)
    while True:
        torch.manual_seed(seed)
        lat = torch.randn((budget, *shape), requires_grad=True)
        opt = torch.optim.Adam([lat], lr=lr)
        with torch.enable_grad():
            doubled = torch.cat([scheduler.scale_model_input(lat, t)] * 2)
            seen = []
            for _ in range(max_steps):
                e_uc, e_c = unet(doubled, t, encoder_hidden_states=emb)[0].chunk(2)
                direction = e_c - e_uc
                direction = direction / direction.view(budget, -1).norm(dim=1)[:, None, None, None]
                m_uc, m_c = unet(torch.cat([lat + direction] * 2), t, encoder_hidden_states=emb)[0].chunk(2)
                loss = (m_c - m_uc).view(budget, -1).norm(dim=1) + alpha * lat.view(budget, -1).norm(dim=1)
                new = [i for i in range(budget) if loss[i] <= thres and i not in seen]
                seen += new
                kept += [lat[i].detach().unsqueeze(0) for i in new]
                if len(kept) >= gen_num:
                    break
                loss.sum().backward()
                opt.step()
                opt.zero_grad()
        if len(kept) >= gen_num:
            for p in unet.parameters():
                p.requires_grad_(True)
            return torch.cat(kept)[:gen_num].clone(), thres
        failures += 1
        if failures % 3 == 0:
            thres += 0.1
            seed = torch.randint(0, 50000, (1,)).item()


def _cond_minus_uncond(out):
    """SAIL's difference on an epsilon model: cond minus uncond of the [uncond; cond] output."""
    uc, c = out.chunk(2)
    return c - uc


def _embeds(pipe, prompt):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0], pipe.encode_prompt("", "cpu", 1, False)[0]


def test_reference_form_equals_reference_algorithm(tiny_eps):
    """Multi-round case: an accepted view keeps moving, repeated rounds re-accept, threshold and seed change."""
    pipe = tiny_eps
    c, u = _embeds(pipe, "a cat")
    kw = dict(gen_num=4, seed=42, thres=0.80, lr=0.2, budget=4, max_steps=3)
    got, info = sail_latents(denoiser(pipe.unet, pipe.scheduler), Conditioning.of(c, u), (4, 8, 8), SailSettings(alpha=0.05, **kw))
    assert all(p.requires_grad for p in pipe.unet.parameters())  # frozen only during the search
    want, want_thres = reference_style_sail(pipe.unet, pipe.scheduler, c, u, (4, 8, 8), alpha=0.05, **kw)
    assert torch.equal(got, want)
    assert info["rounds"] == 4 and info["final_threshold"] == pytest.approx(want_thres) == pytest.approx(0.9)
    assert len(info["seeds"]) == 2 and info["seeds"][0] == 42 and info["reached_threshold"]
    # Rounds 1-3 share seed 42 and so re-accept the same candidate: the reference's duplicates.
    assert [a["round"] for a in info["accepted"]][:3] == [1, 2, 3]
    assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])


def test_clean_form_freezes_accepted_and_never_repeats(tiny_eps):
    pipe = tiny_eps
    c, u = _embeds(pipe, "a cat")
    got, info = sail_latents(denoiser(pipe.unet, pipe.scheduler), Conditioning.of(c, u), (4, 8, 8),
                             SailSettings(gen_num=4, seed=42, thres=0.80, lr=0.2, budget=4, max_steps=3, alpha=0.05,
                                          form="clean"))
    assert info["reached_threshold"]
    for i in range(4):
        for j in range(i):
            assert not torch.equal(got[i], got[j])
    # Frozen at acceptance: each returned latent's recomputed loss is the loss recorded when it was accepted.
    pipe.scheduler.set_timesteps(50)
    t = pipe.scheduler.timesteps[0]
    emb = torch.cat([u.expand(4, -1, -1), c.expand(4, -1, -1)])
    with torch.no_grad():
        x2 = torch.cat([got] * 2)
        d = _cond_minus_uncond(pipe.unet(x2, t, encoder_hidden_states=emb)[0])
        d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        xm = torch.cat([got + d] * 2)
        p = _cond_minus_uncond(pipe.unet(xm, t, encoder_hidden_states=emb)[0]).flatten(1).norm(dim=1)
    loss = p + 0.05 * got.flatten(1).norm(dim=1)
    torch.testing.assert_close(loss, torch.tensor([x["loss"] for x in info["accepted"]]), rtol=1e-5, atol=1e-6)
    assert (loss <= 0.9 + 1e-6).all()


def _sharp_gaussian():
    """A scheduler whose first DDIM step keeps signal (alpha ~ 0.6) and a condition 100x sharper than uncond."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=2e-3, beta_schedule="linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    shape = (4, 4, 4)
    model = GaussianUNet(sched.alphas_cumprod, shape)
    cond = gaussian_embedding(torch.full((1, *shape), 3.0), torch.full((1, *shape), float(np.log(1e-4))))
    uncond = gaussian_embedding(torch.zeros(1, *shape), torch.zeros(1, *shape))
    return model, sched, cond, uncond, shape


def _proxy(model, sched, x, cond, uncond):
    sched.set_timesteps(50)
    t = sched.timesteps[0]
    b = x.shape[0]
    emb = torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)])
    d = _cond_minus_uncond(model(torch.cat([x, x]), t, emb)[0])
    d = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    xm = torch.cat([x + d] * 2)
    return _cond_minus_uncond(model(xm, t, emb)[0]).flatten(1).norm(dim=1)


def test_sharp_gaussian_accepted_latents_are_smoother_and_loop_stops():
    model, sched, cond, uncond, shape = _sharp_gaussian()
    init = torch.randn((8, *shape), generator=torch.Generator().manual_seed(42))
    p0 = _proxy(model, sched, init, cond, uncond)
    thres = float((p0 + 0.05 * init.flatten(1).norm(dim=1)).min()) * 0.6  # unreachable without optimization
    lat, info = sail_latents(denoiser(model, sched), Conditioning.of(cond, uncond), shape,
                             SailSettings(gen_num=2, seed=42, thres=thres, lr=0.1, budget=8, max_steps=50, max_rounds=3,
                                          alpha=0.05))
    assert info["reached_threshold"] and info["rounds"] == 1 and 0 < info["opt_steps"] < 50
    assert info["unet_calls"] == 2 * (info["opt_steps"] + 1)  # stopped at the step that accepted the 2nd latent
    assert _proxy(model, sched, lat, cond, uncond).max() < p0.min()


def test_unreachable_threshold_ends_after_max_rounds_with_report():
    model, sched, cond, uncond, shape = _sharp_gaussian()
    lat, info = sail_latents(denoiser(model, sched), Conditioning.of(cond, uncond), shape,
                             SailSettings(gen_num=3, seed=42, thres=-1.0, lr=0.1, budget=2, max_steps=2, max_rounds=7,
                                          alpha=0.05))
    assert not info["reached_threshold"] and info["rounds"] == 7 and info["n_accepted"] == 0
    assert lat.shape == (3, *shape) and len(info["filled_losses"]) == 3
    assert info["filled_losses"] == sorted(info["filled_losses"])
    # +0.1 after failed rounds 3 and 6; each change draws the next seed from the CPU generator like the reference.
    assert info["final_threshold"] == pytest.approx(-0.8) and len(info["seeds"]) == 3
    g = torch.Generator().manual_seed(42)
    torch.randn((2, *shape), generator=g)
    assert info["seeds"][1] == int(torch.randint(0, 50000, (1,), generator=g))


def _run(argv):
    return exit_code(mitigate_mem.main, argv)


@pytest.mark.parametrize("bad", [["--gen_num", "0"], ["--miti_budget", "0"], ["--miti_lr", "0"],
                                 ["--miti_thres", "nan"], ["--miti_thres", "inf"], ["--miti_alpha", "-1"]])
def test_bad_hyperparameters_exit_2(bad, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a prompt")
    assert _run(["--data_path", str(f), "--out_dir", str(tmp_path), "--device", "cpu", *bad]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("which", ["eps", "v"])
def test_end_to_end_and_no_mitigation_matches_plain_diffusers(which, tiny_eps_dir, tiny_v_dir, tmp_path):
    from utils.models.families import load_pipeline
    model_dir = tiny_eps_dir if which == "eps" else tiny_v_dir
    f = tmp_path / "p.txt"
    prompts = ['"Mothers influence on her young hippo"', "a <b>bold</b> / slashed prompt"]
    f.write_text("\n".join(prompts))
    base = ["--model_id", model_dir, "--data_path", str(f), "--gen_num", "2", "--device", "cpu",
            "--out_dir", str(tmp_path / "out")]
    assert _run([*base, "--miti_thres", "100", "--miti_budget", "3"]) == 0
    folder = tmp_path / "out" / os.path.basename(model_dir) / "mem"
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines[1:]]
    assert json.loads(lines[0])["header"]["settings"]["thres"] == 100 and [r["prompt"] for r in recs] == prompts
    for r in recs:
        assert r["reached_threshold"] and r["rounds"] == 1 and r["opt_steps"] == 0 and len(r["images"]) == 2
        assert all(os.path.isfile(folder / n) and "/" not in n and '"' not in n for n in r["images"])
    assert len(set(recs[0]["images"] + recs[1]["images"])) == 4
    # Resuming a finished run does nothing and changes nothing.
    assert _run([*base, "--miti_thres", "100", "--miti_budget", "3"]) == 0
    assert (folder / "manifest.jsonl").read_text().splitlines() == lines
    # --no_mitigation: the same pixels as plain diffusers sampling after torch.manual_seed(gen_seed).
    assert _run([*base, "--no_mitigation"]) == 0
    rec = json.loads((folder.parent / "mem_nomiti" / "manifest.jsonl").read_text().splitlines()[1])
    pipe = load_pipeline(model_dir, torch.device("cpu"), torch.float32)
    torch.manual_seed(42)
    ref = pipe(prompts[0], num_images_per_prompt=2, num_inference_steps=50, guidance_scale=7.5).images
    for name, img in zip(rec["images"], ref):
        saved = np.asarray(Image.open(folder.parent / "mem_nomiti" / name))
        assert np.array_equal(saved, np.asarray(img))


PATH_KEYS = ("seeds", "rounds", "opt_steps", "unet_calls", "thresholds", "reached_threshold", "n_accepted",
             "final_threshold")


def _same_search(alone, batched, rtol, atol):
    """Each prompt's search took the same path (rounds, steps, seeds, thresholds, which candidate was accepted
    when) and ended at the same latents and losses within tolerance."""
    for (la, ia), (lb, ib) in zip(alone, batched):
        assert {k: ia[k] for k in PATH_KEYS} == {k: ib[k] for k in PATH_KEYS}
        where = lambda info: [(a["round"], a["step"], a["candidate"], a["seed"]) for a in info["accepted"]]
        assert where(ia) == where(ib)
        torch.testing.assert_close(torch.tensor([a["loss"] for a in ib["accepted"]] + ib["filled_losses"]),
                                   torch.tensor([a["loss"] for a in ia["accepted"]] + ia["filled_losses"]),
                                   rtol=rtol, atol=atol)
        torch.testing.assert_close(lb, la, rtol=0, atol=atol)


def test_batched_prompts_search_exactly_as_alone(tiny_eps, form="reference"):
    """Three prompts in one UNet call per step: one accepts in round 4 and leaves the batch, two stop at
    max_rounds = 5 and are filled with their best candidates; each search equals sail_latents for that prompt
    alone (sail_latents is the one-prompt case of the batched search; test_reference_form_equals_reference_algorithm
    checks it bit for bit against an independent re-implementation)."""
    pipe = tiny_eps
    with torch.no_grad():
        conds = pipe.encode_prompt(["a cat", "a red square on a blue field", "digit seven"], "cpu", 1, False)[0]
        u = pipe.encode_prompt("", "cpu", 1, False)[0]
    model = denoiser(pipe.unet, pipe.scheduler)
    st = SailSettings(gen_num=4, seed=42, thres=0.80, lr=0.2, budget=4, max_steps=3, alpha=0.05, form=form,
                      max_rounds=5)
    alone = [sail_latents(model, Conditioning.of(conds[k:k + 1], u), (4, 8, 8), st) for k in range(3)]
    assert [(info["rounds"], info["reached_threshold"]) for _, info in alone] == [(4, True), (5, False), (5, False)]
    batched = sail_latents_batch(model, Conditioning.of(conds, u), (4, 8, 8), st)
    # Adam's first step is lr * sign(gradient): rounding-level differences of the batched UNet calls can move an
    # entry by up to lr, so the latents are compared loosely and the search path exactly.
    _same_search(alone, batched, rtol=1e-3, atol=2e-2)
    assert all(info["batch_prompts"] == 3 for _, info in batched)
    assert all(p.requires_grad for p in pipe.unet.parameters())


@pytest.mark.parametrize("form", ["reference", "clean"])
def test_batched_prompts_on_gaussian_including_one_that_never_reaches_the_threshold(form):
    """Closed-form model, conditions of different sharpness: one accepts at once, one after optimizing, one
    never (max_rounds, then filled with its best candidates); each equals its search alone."""
    model, sched, cond, uncond, shape = _sharp_gaussian()
    def embedding(mu, log_var):
        return gaussian_embedding(torch.full((1, *shape), mu), torch.full((1, *shape), float(log_var)))

    conds = torch.cat([embedding(0.5, 0.0), embedding(1.0, -1.0), cond])  # initial losses ~2.3, ~5.8, ~19
    st = SailSettings(gen_num=2, seed=42, thres=4.0, lr=0.2, budget=4, max_steps=10, max_rounds=4, alpha=0.05,
                      form=form)
    sm = denoiser(model, sched)
    alone = [sail_latents(sm, Conditioning.of(conds[k:k + 1], uncond), shape, st) for k in range(3)]
    assert [info["reached_threshold"] for _, info in alone] == [True, True, False]
    assert alone[0][1]["opt_steps"] == 0 < alone[1][1]["opt_steps"]
    _same_search(alone, sail_latents_batch(sm, Conditioning.of(conds, uncond), shape, st), rtol=1e-5, atol=1e-5)


def test_script_prompt_batch_equals_one_at_a_time(tiny_eps_dir, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\na red square on a blue field\ndigit seven")
    base = ["--model_id", tiny_eps_dir, "--data_path", str(f), "--gen_num", "2", "--device", "cpu",
            "--miti_thres", "0.8", "--miti_lr", "0.2", "--miti_budget", "4", "--miti_max_steps", "3",
            "--miti_alpha", "0.05", "--miti_max_rounds", "3", "--save_latents"]
    for k in ("1", "2"):
        assert _run([*base, "--out_dir", str(tmp_path / k), "--miti_prompt_batch", k]) == 0
    folders = [tmp_path / k / os.path.basename(tiny_eps_dir) / "mem" for k in ("1", "2")]
    recs = [[json.loads(x) for x in (d / "manifest.jsonl").read_text().splitlines()[1:]] for d in folders]
    assert [r["prompt"] for r in recs[1]] == [r["prompt"] for r in recs[0]]
    for a, b in zip(*recs):
        assert {k: a[k] for k in ("seeds", "rounds", "opt_steps", "unet_calls", "reached_threshold", "images")} == \
               {k: b[k] for k in ("seeds", "rounds", "opt_steps", "unet_calls", "reached_threshold", "images")}
        np.testing.assert_allclose(b["accepted_losses"], a["accepted_losses"], rtol=1e-3)
    for i in range(3):
        la, lb = (torch.load(d / "latents" / f"{i:05d}.pt", weights_only=True) for d in folders)
        torch.testing.assert_close(lb, la, rtol=0, atol=2e-2)
    assert _run([*base, "--out_dir", str(tmp_path / "3"), "--miti_prompt_batch", "0"]) == 2


@pytest.mark.slow
def test_gated_prompt_batch_searches_only_the_flagged_prompts_as_alone(tiny_eps_dir, tmp_path):
    """--miti_prompt_batch with --flagged_by: the flagged prompts (not adjacent here) are searched together, each
    as it is searched one at a time; the unflagged prompt is sampled normally in both runs."""
    import detect_mem
    f = tmp_path / "p.txt"
    f.write_text("a cat\na red square on a blue field\ndigit seven\na dog on a mat")
    try:
        detect_mem.main(["--model_id", tiny_eps_dir, "--data_path", str(f), "--gen_num", "1", "--device", "cpu",
                         "--out_dir", str(tmp_path / "det")])
    except SystemExit as e:
        assert e.code == 0
    det = tmp_path / "det" / "p_gen1.pt"
    scores = torch.load(det, weights_only=True).mean(dim=1)
    order = scores.argsort()
    thr = float((scores[order[1]] + scores[order[2]]) / 2)  # the two highest scores are flagged
    flagged = sorted(order[2:].tolist())
    base = ["--model_id", tiny_eps_dir, "--data_path", str(f), "--gen_num", "2", "--device", "cpu",
            "--miti_thres", "0.8", "--miti_lr", "0.2", "--miti_budget", "4", "--miti_max_steps", "3",
            "--miti_alpha", "0.05", "--miti_max_rounds", "3", "--save_latents",
            "--flagged_by", str(det), "--flag_threshold", repr(thr)]
    for k in ("1", "3"):
        assert _run([*base, "--out_dir", str(tmp_path / k), "--miti_prompt_batch", k]) == 0
    folders = [tmp_path / k / os.path.basename(tiny_eps_dir) / "mem_gated" for k in ("1", "3")]
    recs = [[json.loads(x) for x in (d / "manifest.jsonl").read_text().splitlines()[1:]] for d in folders]
    assert [r["index"] for r in recs[1] if r["mitigated"]] == flagged == [r["index"] for r in recs[0] if r["mitigated"]]
    for a, b in zip(*recs):
        assert a["index"] == b["index"]
        if not a["mitigated"]:  # plain sampling from the seeded noise: the same bits
            assert a == {**b, "search_seconds": a["search_seconds"], "generate_seconds": a["generate_seconds"]}
            continue
        assert "batch_prompts" not in a and b["batch_prompts"] == 2
        assert {k: a[k] for k in ("seeds", "rounds", "opt_steps", "unet_calls", "reached_threshold")} == \
               {k: b[k] for k in ("seeds", "rounds", "opt_steps", "unet_calls", "reached_threshold")}
        np.testing.assert_allclose(b["accepted_losses"], a["accepted_losses"], rtol=1e-3)
    for i in range(4):
        la, lb = (torch.load(d / "latents" / f"{i:05d}.pt", weights_only=True) for d in folders)
        torch.testing.assert_close(lb, la, rtol=0, atol=2e-2)
