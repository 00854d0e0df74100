"""NeMo (utils/mitigation/nemo.py): deactivation changes exactly the chosen neurons' value outputs (a hook test);
no neurons gives `none`'s images bit for bit; found neurons are recorded and refined below their threshold;
statistics of another model and a missing statistics file are one error line."""
import json
import os

import numpy as np
import torch
from PIL import Image

from cli_run import exit_code
import mitigate_mem
from utils.mitigation import nemo as NEMO
from utils.models.families import SD1

PROMPT = "a red cat sitting on a mat"
STATS = ["a photo of a dog", "an oil painting of a harbour", "a red bicycle", "a bowl of fruit on a table",
         "a city street at night", "a portrait of an old man"]


def test_deactivation_changes_exactly_the_chosen_value_outputs(tiny_eps):
    unet = tiny_eps.unet
    emb = SD1.encode(tiny_eps, [PROMPT], "cpu").cond
    layers = NEMO.value_layers(unet)
    assert [p.split(".")[0] for p, _ in layers] == ["down_blocks", "mid_block"]
    chosen = {layers[0][0]: [1, 5], layers[1][0]: [0]}
    with torch.no_grad():
        before = [lin(emb) for _, lin in layers]
        with NEMO.deactivated(unet, chosen):
            during = [lin(emb) for _, lin in layers]
        after = [lin(emb) for _, lin in layers]
    for (path, _), b, d, a in zip(layers, before, during, after):
        idx = chosen[path]
        rest = [i for i in range(b.shape[-1]) if i not in idx]
        assert torch.equal(b[..., rest], d[..., rest]) and torch.equal(b, a)
        assert torch.all(d[..., idx] == 0) and not torch.all(b[..., idx] == 0)


def _images(folder):
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines[1:]]
    return recs, [np.asarray(Image.open(folder / n)) for r in recs for n in r["images"]]


def test_no_neurons_is_none_and_bad_statistics(tiny_eps_dir, tmp_path, capsys):
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    (tmp_path / "stats.txt").write_text("\n".join(STATS) + "\n")
    argv = ["--data_path", str(tmp_path / "p.txt"), "--gen_num", "2", "--device", "cpu",
            "--num_inference_steps", "3", "--out_dir", str(tmp_path / "out")]
    eps = ["--model_id", tiny_eps_dir, *argv]
    nemo = ["--method", "nemo", "--nemo_stats_prompts", str(tmp_path / "stats.txt"), "--nemo_samples", "4",
            "--nemo_theta", "2", "--nemo_theta_step", "0.5"]  # a short initial search: theta 2, 1.5, 1
    out = tmp_path / "out" / os.path.basename(tiny_eps_dir)
    assert exit_code(mitigate_mem.main, [*eps, "--no_mitigation"]) == 0
    # a threshold no pairwise SSIM exceeds: not memorized, no neurons, plain sampling
    assert exit_code(mitigate_mem.main, [*eps, *nemo, "--nemo_threshold", "1"]) == 0
    # the statistics file this run cached (the refinement itself: test_localization_records_and_refines)
    _, none = _images(out / "mem_nomiti")
    recs, off = _images(out / "mem_nemo")
    assert recs[0]["nemo_neurons"] == {} and not recs[0]["nemo_memorized"]
    assert all(np.array_equal(a, b) for a, b in zip(none, off))
    cached = list((out / "cache").glob("nemo_stats_*.pt"))
    assert len(cached) == 1
    # the eps model's statistics handed to the v model; no statistics at all
    for extra, msg in ((["--sd_ver", "demo", *argv, "--method", "nemo", "--nemo_stats_prompts", str(cached[0])],
                        "statistics of another model"),
                       ([*eps, "--method", "nemo"], "give --nemo_stats_prompts"),
                       ([*eps, *nemo, "--grid", "1.5"], "not a valid threshold"),
                       ([*eps, *nemo, "--author_settings", "--sampler", "ddim"], "give one of")):
        capsys.readouterr()
        assert exit_code(mitigate_mem.main, extra) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (extra, err)


def test_localization_records_and_refines(tiny_eps, tmp_path):
    """A threshold below the random tiny model's pairwise SSIMs (0.02-0.06): neurons are found, the refined set is
    part of the initial one and its strength is at most the refinement threshold; sampling with them differs."""
    from utils.mitigation import methods as MI
    from utils.models.denoisers import denoiser
    pipe = tiny_eps
    model = denoiser(pipe.unet, pipe.scheduler)
    encode = lambda ps: SD1.encode(pipe, ps, "cpu")  # noqa: E731
    (tmp_path / "stats.txt").write_text("\n".join(STATS) + "\n")
    stats = NEMO.activation_statistics(model, encode, str(tmp_path / "stats.txt"), str(tmp_path), "tiny")
    st = NEMO.NemoSettings(threshold=0.03, samples=4, theta=2.0, theta_step=0.5)
    found, rec = NEMO.localize(model, encode([PROMPT]), stats, st, 3)
    assert rec["nemo_memorized"] and found and rec["nemo_refined_ssim"] <= rec["nemo_refine_threshold"]
    assert all(set(v) <= set(rec["nemo_initial"][p]) for p, v in found.items())
    ctx = MI.Context(model=model, family=SD1, encode=encode, noise=SD1.initial_latents(pipe, 2, 42), seed=42,
                     num_inference_steps=3)
    plain = MI.run_plan(ctx, MI.plan_none(ctx, 0, PROMPT))
    with NEMO.deactivated(pipe.unet, found):
        with torch.no_grad():
            off = ctx.model.sample(ctx.noise, encode([PROMPT]).expand(2), 3, 7.5)
    assert not torch.allclose(plain, off)
