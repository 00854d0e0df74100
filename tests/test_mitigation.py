"""Mitigation harness: every method with its effect switched off equals plain sampling bit for bit, which equals
plain diffusers sampling; Wen's optimization lowers its own objective; RNA/RTA draws depend only on (seed, prompt
index); CFG-delay rules; gating; the plot's numbers equal the score JSONs; bad input exits 2 and loses nothing."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cli_run import exit_code
import detect_mem
import mitigate_eval
import mitigate_mem
from utils.mitigation import augment as AUG, cfg_delay as CFG, gating, methods as MI, ren as REN, wen as WEN
from utils.models.families import load_pipeline
from utils.models.denoisers import denoiser
from utils.models.families import SD1
from utils.models.conditioning import Conditioning

PROMPTS = ["a red cat sitting on a mat", "Blue Rug by Andover Mills"]
STEPS = 10  # DDIM steps of the CLI runs: every property tested holds for any number (the default is 50)


_run = exit_code  # (main, argv) -> exit code


def _images(folder):
    """{index: [uint8 arrays]} and {index: record} of a generation folder."""
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    recs = {r["index"]: r for r in map(json.loads, lines[1:])}
    return {i: [np.asarray(Image.open(folder / n)) for n in r["images"]] for i, r in recs.items()}, recs


@pytest.fixture(scope="module")
def runs(tiny_eps_dir, tmp_path_factory):
    """Every method with its effect off (and a few with it on) on two prompts, n = 2, the tiny pipeline."""
    tmp = tmp_path_factory.mktemp("miti")
    data = tmp / "p.txt"
    data.write_text("\n".join(PROMPTS) + "\n")
    base = ["--model_id", tiny_eps_dir, "--data_path", str(data), "--gen_num", "2", "--device", "cpu",
            "--out_dir", str(tmp / "out"), "--num_inference_steps", str(STEPS)]
    off = {"mem_nomiti": ["--no_mitigation"], "mem": ["--miti_thres", "100"],
           "mem_wen": ["--method", "wen", "--wen_target_loss", "1e9"],
           "mem_rna": ["--method", "rna", "--aug_count", "0"], "mem_rta": ["--method", "rta", "--aug_count", "0"],
           "mem_cfg_delay_t1000_w0": ["--method", "cfg_delay", "--grid", "1000"],
           "mem_ren": ["--method", "ren", "--ren_factor", "1", "--ren_no_mask"]}
    on = {"mem_rta_n4": ["--method", "rta", "--grid", "4"], "mem_cfg_delay_dynamic": ["--method", "cfg_delay",
                                                                                         "--grid", "dynamic"],
          "mem_ren_C1.5": ["--method", "ren", "--grid", "1.5"]}
    for folder, extra in {**off, **on}.items():
        assert _run(mitigate_mem.main, [*base, *extra]) == 0, folder
    return tmp, base, tmp / "out" / os.path.basename(tiny_eps_dir), list(off), list(on)


def test_none_equals_diffusers_and_effect_off_equals_none(runs, tiny_eps_dir):
    tmp, _, out, off, on = runs
    none, _ = _images(out / "mem_nomiti")
    pipe = load_pipeline(tiny_eps_dir, torch.device("cpu"), torch.float32)
    for i, prompt in enumerate(PROMPTS):
        torch.manual_seed(42)
        ref = pipe(prompt, num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=7.5).images
        assert all(np.array_equal(np.asarray(r), a) for r, a in zip(ref, none[i]))
    for folder in off[1:]:  # SAIL accepting its first candidates: the first rows of the same seeded draw
        imgs, recs = _images(out / folder)
        assert all(np.array_equal(a, b) for i in none for a, b in zip(none[i], imgs[i])), folder
        assert all(r["prompts_used"] == [r["prompt"]] * 2 for r in recs.values())
    for folder in on:
        imgs, recs = _images(out / folder)
        assert not np.array_equal(imgs[0][0], none[0][0]), folder
    _, recs = _images(out / "mem_rta_n4")
    assert all(len(r["prompts_used"][0].split(" ")) == len(r["prompt"].split(" ")) + 4 for r in recs.values())
    _, recs = _images(out / "mem_wen")
    assert all(r["reached_target"] and r["wen_updates"] == 0 and r["search_unet_calls"] == 1 for r in recs.values())
    header = json.loads((out / "mem_cfg_delay_dynamic" / "manifest.jsonl").read_text().splitlines()[0])["header"]
    assert header["method"] == "cfg_delay" and header["settings"]["rule"] == "dynamic"


def test_rna_resume_in_another_order_gives_the_same_prompts_and_images(runs):
    tmp, base, out, _, _ = runs
    argv = [*base, "--method", "rna", "--aug_count", "3", "--prompt_type", "order"]
    assert _run(mitigate_mem.main, argv) == 0
    folder = out / "order_rna"
    imgs, recs = _images(folder)
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    (folder / "manifest.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n")  # prompt 0 "not yet done"
    for name in recs[0]["images"]:
        os.remove(folder / name)
    assert _run(mitigate_mem.main, argv) == 0  # prompt 0 now generated after prompt 1
    again, recs2 = _images(folder)
    assert recs2[0]["prompts_used"] == recs[0]["prompts_used"] != [PROMPTS[0]] * 2
    assert all(np.array_equal(a, b) for a, b in zip(imgs[0], again[0]))
    assert AUG.augmented_prompts(PROMPTS[0], 0, 42, 2, AUG.AugmentSettings(count=3), AUG.random_number)[0] == \
        recs[0]["prompts_used"]


def test_augmentation_properties(tiny_eps):
    st = AUG.AugmentSettings(count=5)
    a = AUG.augmented_prompts("one two three", 7, 42, 3, st, AUG.random_number)
    assert a == AUG.augmented_prompts("one two three", 7, 42, 3, st, AUG.random_number)
    assert a != AUG.augmented_prompts("one two three", 8, 42, 3, st, AUG.random_number)
    prompts, words = a
    assert prompts[0] == prompts[1] == prompts[2] and len(words[0]) == 5  # one draw for all images (their code)
    assert all(w.isdigit() and 0 <= int(w) <= 99999 for w in words[0])
    assert [w for w in prompts[0].split(" ") if not w.isdigit()] == ["one", "two", "three"]
    per = AUG.augmented_prompts("one two three", 7, 42, 3, AUG.AugmentSettings(count=5, per_image=True),
                               AUG.random_number)[0]
    assert len(set(per)) == 3 and per[0] == prompts[0]  # image 0 gets the shared draw, the others new ones
    gaps = {AUG.insert_words("a b c", 1, AUG.augmentation_rng(s, 0), lambda r: "X")[0].split(" ").index("X")
            for s in range(200)}
    assert gaps == {0, 1, 2, 3}  # len + 1 gaps: both ends included
    assert AUG.augmented_prompts("a b", 0, 1, 2, AUG.AugmentSettings(count=0), AUG.random_number)[0] == ["a b"] * 2
    from utils.models.clip import token_text
    tok = tiny_eps.tokenizer
    _, w = AUG.augmented_prompts("a b", 3, 42, 1, AUG.AugmentSettings(count=6, vocab=49400),
                                lambda r: token_text(tok, int(r.integers(0, 49400))))
    rng = AUG.augmentation_rng(42, 3)
    ids = [int(rng.integers(0, k)) for k in (3, 49400, 4, 49400, 5, 49400, 6, 49400, 7, 49400, 8, 49400)][1::2]
    assert w[0] == [tok.decode([i]) for i in ids]


def test_wen_lowers_its_objective_and_follows_their_loop(tiny_eps, tiny_v_dir):
    pipe = tiny_eps
    model = denoiser(pipe.unet, pipe.scheduler)
    noise = SD1.initial_latents(pipe, 2, 42)
    c, u = SD1.embed(pipe, PROMPTS[0]), SD1.embed(pipe, "")
    t = model.timesteps(50)[0]

    def loss(e):  # written out: one norm over both images of cond-minus-uncond at the first DDIM step
        with torch.no_grad():
            out = pipe.unet(torch.cat([noise, noise]), t, encoder_hidden_states=torch.cat([u, u, e, e]))[0]
        return float((out[2:] - out[:2]).norm())

    st = WEN.WenSettings(target_loss=0.0, max_iters=5)
    e, rec = WEN.wen_embedding(model, Conditioning.of(c, u), noise, st)
    e = e.cond
    assert rec["wen_losses"][0] == pytest.approx(loss(c), rel=1e-5) and rec["wen_updates"] == 5
    assert not rec["reached_target"] and len(rec["wen_losses"]) == 5
    assert loss(e) < 0.9 * loss(c)
    # BOS gets no gradient, only AdamW's decoupled weight decay (1 - lr * wd) per update
    torch.testing.assert_close(e[:, 0], c[:, 0] * (1 - 0.05 * 0.01) ** 5)
    # early stop: a target met after two updates returns the embedding of a 2-iteration run
    e2, rec2 = WEN.wen_embedding(model, Conditioning.of(c, u), noise,
                                WEN.WenSettings(target_loss=rec["wen_losses"][2], max_iters=5))
    e3, _ = WEN.wen_embedding(model, Conditioning.of(c, u), noise, WEN.WenSettings(target_loss=0.0, max_iters=2))
    e2, e3 = e2.cond, e3.cond
    assert rec2["reached_target"] and rec2["wen_updates"] == 2 and torch.equal(e2, e3)
    assert not torch.equal(e2, e)
    # v-prediction: the eps-space loss is alpha_t times the raw-output loss (x cancels in the difference)
    vp = load_pipeline(tiny_v_dir, torch.device("cpu"), torch.float32)
    vm = denoiser(vp.unet, vp.scheduler)
    tv = vm.timesteps(50)[0]
    xin, emb = torch.cat([noise, noise]), Conditioning.of(c, u, 2)
    raw = WEN.wen_loss(vm, tv, xin, emb, WEN.WenSettings())
    eps = WEN.wen_loss(vm, tv, xin, emb, WEN.WenSettings(space="eps"))
    assert float(eps.detach()) == pytest.approx(float(vm.alpha_sigma(tv)[0]) * float(raw.detach()), rel=1e-5)


def test_cfg_delay_rules():
    from utils.demo.model import ddim_scheduler
    sched = ddim_scheduler()
    sched.set_timesteps(50)
    rule = CFG.StaticDelay(500.0, 0.0, 7.5)
    ws = [rule(i, t, None) for i, t in enumerate(sched.timesteps)]
    assert ws == [0.0] * 25 + [7.5] * 25 and int(sched.timesteps[25]) == 481 and rule.report()["pre_steps"] == 25

    def out_for(ds):  # pair outputs whose per-image ||uncond - cond|| are ds
        ds = torch.tensor(ds, dtype=torch.float32)
        return torch.cat([torch.zeros(len(ds), 1, 2, 2), -ds.view(-1, 1, 1, 1) / 2 * torch.ones(len(ds), 1, 2, 2)])
    # image 0: first strict local minimum at step 2 -> fires at step 3; image 1: a plateau at the bottom never fires
    seq = [[5, 5], [4, 4], [3, 4], [3.5, 5], [1, 0.5]]
    dyn = CFG.DynamicDelay(1.0, 7.5)
    got = [dyn(i, 900 - 100 * i, out_for(d)).tolist() for i, d in enumerate(seq)]
    assert got == [[1, 1], [1, 1], [1, 1], [7.5, 1], [7.5, 1]]
    assert dyn.report() == {"transition_step": [3, None], "transition_t": [600, None]}
    assert CFG.CfgDelaySettings().pre_scale == 0.0 and CFG.CfgDelaySettings(rule="dynamic").pre_scale == 1.0


def _detect(runs, data):
    """detect_mem.py sharpness (n = 1) on a prompt file: the result's path (computed once)."""
    tmp, base = runs[0], runs[1]
    det = tmp / "det" / (os.path.splitext(os.path.basename(data))[0] + "_gen1.pt")
    if not det.exists():
        assert _run(detect_mem.main, ["--model_id", base[1], "--data_path", str(data), "--gen_num", "1",
                                      "--device", "cpu", "--out_dir", str(det.parent)]) == 0
    return det


def _gated(runs):
    """RTA (4 tokens) on the prompts a threshold between the two detection scores flags: (scores, threshold)."""
    tmp, base, out = runs[:3]
    det = _detect(runs, tmp / "p.txt")
    scores = torch.load(det).mean(dim=1).tolist()
    thr = sum(scores) / 2
    if not (out / "mem_rta_gated" / "manifest.jsonl").exists():
        assert _run(mitigate_mem.main, [*base, "--method", "rta", "--aug_count", "4", "--flagged_by", str(det),
                                        "--flag_threshold", repr(thr)]) == 0
    return scores, thr


def test_gating_flags_only_detected_prompts(runs):
    tmp, base, out, _, _ = runs
    scores, thr = _gated(runs)
    hi = int(np.argmax(scores))
    imgs, recs = _images(out / "mem_rta_gated")
    none, _ = _images(out / "mem_nomiti")
    assert [recs[i]["mitigated"] for i in range(2)] == [i == hi for i in range(2)]
    assert recs[1 - hi]["method"] == "none" and recs[hi]["method"] == "rta"
    assert all(np.array_equal(a, b) for a, b in zip(imgs[1 - hi], none[1 - hi]))
    assert not np.array_equal(imgs[hi][0], none[hi][0])
    assert recs[hi]["detection_score"] == pytest.approx(scores[hi])
    header = json.loads((out / "mem_rta_gated" / "manifest.jsonl").read_text().splitlines()[0])["header"]
    assert header["gate"]["flagged"] == [hi] and header["gate"]["threshold"] == thr
    # calibration at a target FPR on non-memorized scores: at most floor(fpr * N) of them above the threshold
    nm = list(np.random.default_rng(0).permutation(np.arange(1.0, 101.0)))
    assert gating.calibrated_threshold(nm, 0.01) == 99.0 and gating.calibrated_threshold(nm, 0.0) == 100.0
    assert gating.flag_prompts([99.0, 99.5, float("nan")], 99.0) == [False, True, True]


def test_plot_numbers_equal_the_score_jsons(runs, capsys):
    tmp, _, out, _, _ = runs
    rng = np.random.default_rng(0)
    (tmp / "train").mkdir(exist_ok=True)
    recs = []
    for i, p in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(tmp / "train" / f"{i}.png")
        recs.append({"caption": p, "index": i, "file": f"train/{i}.png"})
    (tmp / "t.jsonl").write_text("\n".join(map(json.dumps, recs)) + "\n")
    gt = tmp / "gt"
    assert _run(mitigate_eval.main, ["fetch", "--jsonl", str(tmp / "t.jsonl"), "--out", str(gt), "--min_side",
                                     "8"]) == 0
    _gated(runs)
    folders = ["mem_nomiti", "mem", "mem_rta_n4", "mem_cfg_delay_dynamic", "mem_rta_gated"]
    for f in folders:
        assert _run(mitigate_eval.main, ["score", "--images", str(out / f), "--gt", str(gt), "--similarity", "pixel",
                                         "--clip_model", "none"]) == 0
    prefix = tmp / "fig6"
    assert _run(mitigate_eval.main, ["plot", str(out), "--out", str(prefix), "--y", "not_blank",
                                     "--grid_prompts", "0,1", "--gt", str(gt), "--grid_pick", "rta=n4"]) == 0
    assert os.path.getsize(str(prefix) + ".png") > 0 and os.path.getsize(str(prefix) + "_grid.png") > 0
    with open(str(prefix) + ".csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["none", "sail", "rta", "rta", "cfg_delay"]
    assert [r["gated"] for r in rows] == ["False", "False", "False", "True", "False"]
    for r in rows:
        res = json.loads(open(r["result"]).read())
        s = res["summary"]
        assert float(r["mean_similarity"]) == s["mean_similarity"] and float(r["frac_blank"]) == s["frac_blank"]
        assert float(r["frac_above_0.7"]) == s["frac_above_0.7"] and r["mean_clip"] == ""
        assert int(r["n_images"]) == res["counts"]["n_images"] == 4
    gated = next(r for r in rows if r["gated"] == "True")
    assert int(gated["n_mitigated"]) == 1
    # no CLIP in the results: the CLIP plot is refused with one line
    capsys.readouterr()
    assert _run(mitigate_eval.main, ["plot", str(out), "--out", str(tmp / "x")]) == 2
    assert "no CLIP score" in capsys.readouterr().err


def test_bad_inputs_exit_2_and_lose_nothing(runs, capsys):
    tmp, base, out, _, _ = runs
    before = {f: (out / "mem_nomiti" / f).read_bytes() for f in os.listdir(out / "mem_nomiti")}
    shuffled = tmp / "shuffled.txt"
    shuffled.write_text("\n".join(reversed(PROMPTS)) + "\n")
    det = _detect(runs, shuffled).parent
    torch.save(torch.tensor([[float("nan")], [1.0]]), det / "nan.pt")
    side = json.loads((det / "shuffled_gen1.json").read_text())
    (det / "nan.json").write_text(json.dumps(side))
    torch.save(torch.tensor([[1.0], [2.0]]), det / "other.pt")  # a result for two other prompts
    (det / "other.json").write_text(json.dumps(dict(side, prompts=["another prompt", PROMPTS[1]])))
    cases = [
        (["--method", "nope"], "invalid choice"),
        (["--method", "ren", "--grid", "x"], "not a valid factor"),
        (["--method", "rna", "--grid", "1.5"], "not a valid count"),
        (["--method", "sail", "--grid", "0.5,high"], "not a valid thres"),
        (["--method", "rna", "--flagged_by", str(det / "shuffled_gen1.pt"), "--flag_threshold", "0"],
         "in another order"),
        (["--method", "rna", "--flagged_by", str(det / "other.pt"), "--flag_threshold", "0"], "for other prompts"),
        (["--method", "none", "--flagged_by", str(det / "other.pt"), "--flag_threshold", "0"], "nothing to"),
        (["--method", "rna", "--flagged_by", str(det / "shuffled_gen1.pt"), "--flag_threshold", "nan"],
         "finite"),
        (["--method", "rna", "--flagged_by", str(det / "shuffled_gen1.pt"), "--flag_fpr", "0.01"], "--flag_nmem"),
        (["--method", "wen", "--wen_target_loss", "nan"], "finite"),
        (["--method", "cfg_delay", "--cfg_transition", "inf"], "finite"),
        # another method's hyperparameter is refused, not silently ignored
        (["--method", "wen", "--miti_thres", "3"], "--miti_thres is not an option of --method wen"),
        (["--no_mitigation", "--ren_no_mask"], "--ren_no_mask is not an option of --method none"),
        (["--method", "rna", "--cfg_w_pre", "-2"], "--cfg_w_pre is not an option of --method rna"),
        (["--method", "wen", "--aug_count", "4"], "--aug_count is not an option of --method wen"),  # its default too
        (["--no_mitigation", "--gen_seed", "7"], "different settings"),  # the finished folder is kept as it is
    ]
    for extra, msg in cases:
        capsys.readouterr()
        assert _run(mitigate_mem.main, [*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (extra, err)
    # a calibration file with NaN scores (data from another prompt order is caught first, so use the right order)
    good = _detect(runs, tmp / "p.txt")
    assert _run(mitigate_mem.main, [*base, "--method", "rna", "--flagged_by", str(good), "--flag_fpr", "0.01",
                                    "--flag_nmem", str(det / "nan.pt")]) == 2
    assert "NaN" in capsys.readouterr().err
    assert {f: (out / "mem_nomiti" / f).read_bytes() for f in os.listdir(out / "mem_nomiti")} == before


def test_ren_edits_only_while_sampling_and_changes_the_images(tiny_eps):
    """Ren et al.'s method: the attention edit is installed for sampling and removed afterwards (also when
    sampling fails), and it changes the images; its record names the kept tokens."""
    pipe = tiny_eps
    model = denoiser(pipe.unet, pipe.scheduler)
    ctx = MI.Context(model=model, family=SD1, encode=lambda ps: SD1.encode(pipe, ps, "cpu"),
                     noise=SD1.initial_latents(pipe, 2, 42), seed=42, tokenizer=pipe.tokenizer, num_inference_steps=5)
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    plain = MI.run_plan(ctx, MI.plan_none(ctx, 0, PROMPTS[0]))
    plan = REN.plan_ren(ctx, 0, PROMPTS[0], REN.RenSettings(factor=1.5))
    edited = MI.run_plan(ctx, plan)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before
    assert not torch.allclose(plain, edited)
    assert plan.record["kept_tokens"] == len(pipe.tokenizer(PROMPTS[0]).input_ids)
    bad = REN.plan_ren(ctx, 0, PROMPTS[0], REN.RenSettings(factor=1.5))
    bad.guidance = lambda i, t, out: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        MI.run_plan(ctx, bad)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before


def test_a_negated_flag_reads_as_it_says_in_the_run_record():
    """--ren_no_mask is generated from Ren's `mask` field: the parsed flag (echoed into run.json) holds what the
    flag says, and the settings hold the field's value."""
    for argv, no_mask in ((["--method", "ren"], False), (["--method", "ren", "--ren_no_mask"], True)):
        a, added = mitigate_mem.parse_args(argv)
        assert a.ren_no_mask is no_mask and mitigate_mem.method_settings(a, added).mask is (not no_mask)
