"""--sampler and --author_settings: ddim is today's path bit for bit (images and manifest header); dpmsolver and
euler runs of `none` equal the diffusers pipeline with that scheduler bit for bit; the authors' settings name
their sampler in the manifest, the folder and the figure label; bad choices are one error line."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cli_run import exit_code
import mitigate_mem
from utils.mitigation import methods as MI
from utils.models.families import load_pipeline

PROMPT = "a red cat sitting on a mat"
STEPS = 4


def _folder(folder):
    """(header, {name: uint8 array}) of a generation folder."""
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    header = json.loads(lines[0])["header"]
    names = [n for line in lines[1:] for n in json.loads(line)["images"]]
    return header, {n: np.asarray(Image.open(folder / n)) for n in names}


@pytest.fixture(scope="module")
def base(tiny_eps_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("samplers")
    (tmp / "p.txt").write_text(PROMPT + "\n")
    return tmp, ["--model_id", tiny_eps_dir, "--data_path", str(tmp / "p.txt"), "--gen_num", "2", "--device",
                 "cpu", "--num_inference_steps", str(STEPS), "--no_mitigation"]


def test_ddim_is_the_default_path_and_other_samplers_equal_the_pipeline(base, tiny_eps_dir):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
    tmp, argv = base
    model = os.path.basename(tiny_eps_dir)
    assert exit_code(mitigate_mem.main, [*argv, "--out_dir", str(tmp / "default")]) == 0
    assert exit_code(mitigate_mem.main, [*argv, "--out_dir", str(tmp / "ddim"), "--sampler", "ddim"]) == 0
    h0, im0 = _folder(tmp / "default" / model / "mem_nomiti")
    h1, im1 = _folder(tmp / "ddim" / model / "mem_nomiti")
    assert h0 == h1 and "sampler" not in h0  # the same identity: a run from before the option resumes
    assert im0.keys() == im1.keys() and all(np.array_equal(im0[k], im1[k]) for k in im0)
    pipe = load_pipeline(tiny_eps_dir, torch.device("cpu"), torch.float32)
    config = pipe.scheduler.config
    for name, cls in (("dpmsolver", DPMSolverMultistepScheduler), ("euler", EulerDiscreteScheduler)):
        assert exit_code(mitigate_mem.main, [*argv, "--out_dir", str(tmp / name), "--sampler", name]) == 0
        header, imgs = _folder(tmp / name / model / f"mem_nomiti_{name}")
        assert header["sampler"] == name and MI.describe_run(header)[1] == f"no mitigation, {name}"
        pipe.scheduler = cls.from_config(config)
        torch.manual_seed(42)
        ref = pipe(PROMPT, num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=7.5).images
        got = [imgs[n] for n in sorted(imgs)]
        assert all(np.array_equal(np.asarray(r), g) for r, g in zip(ref, got)), name
        assert not np.array_equal(got[0], im0[sorted(im0)[0]])  # another sampler: other images


def test_author_settings_and_bad_choices(base, tiny_eps_dir, capsys):
    tmp, argv = base
    argv = [a for a in argv if a != "--no_mitigation"] + ["--out_dir", str(tmp / "author")]
    model = os.path.basename(tiny_eps_dir)
    # Jain et al.: DPM-Solver on every model, recorded with its source
    assert exit_code(mitigate_mem.main, [*argv, "--method", "cfg_delay", "--author_settings"]) == 0
    header, _ = _folder(tmp / "author" / model / "mem_cfg_delay_dpmsolver")
    assert header["sampler"] == "dpmsolver" and "generate_test_dataset" in header["author_settings"]
    assert MI.describe_run(header)[1] == "t=500, w=0, dpmsolver"
    # a model saved with a DEIS scheduler: its config cannot build DPM-Solver (algorithm_type 'deis')
    deis = tmp / "deis_model"
    shutil.copytree(tiny_eps_dir, deis)
    cfg_path = deis / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), algorithm_type="deis")))
    deis_argv = [*argv[:1], str(deis), *argv[2:]]
    cases = [([*argv, "--method", "sail", "--author_settings"], "sail has none"),
             ([*argv, "--method", "wen", "--author_settings"], "wen has none"),
             ([*argv, "--method", "cfg_delay", "--author_settings", "--sampler", "euler"], "give one of"),
             ([*argv, "--no_mitigation", "--sampler", "heun"], "invalid choice"),
             ([*deis_argv, "--no_mitigation", "--sampler", "dpmsolver"], "cannot build the dpmsolver sampler")]
    for extra, msg in cases:
        capsys.readouterr()
        assert exit_code(mitigate_mem.main, extra) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp / "author" / "deis_model").exists()  # refused before anything was written
    # with DDIM the DEIS-saved model still runs (its config builds DDIM)
    assert exit_code(mitigate_mem.main, [*deis_argv, "--no_mitigation"]) == 0


def test_run_mitigation_author_settings_runs_every_method_that_has_them(tmp_path):
    """AUTHOR_SETTINGS=1 bash run_mitigation.sh demo: one --grid --author_settings run per method whose plug-in
    declares author settings (read from the plug-ins, not a list in the script), NeMo with its statistics prompts.
    PYTHON is a stand-in that records the script calls and hands `-c` queries to the real interpreter."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    py = tmp_path / "py"
    py.write_text(f'#!/usr/bin/env bash\ncase "$1" in -c) exec {sys.executable} "$@" ;; esac\n'
                  f'echo "$*" >> {tmp_path}/calls\nexit 0\n')
    py.chmod(0o755)
    p = subprocess.run(["bash", os.path.join(root, "run_mitigation.sh"), "demo"], cwd=tmp_path, timeout=100,
                       env=dict(os.environ, PYTHON=str(py), AUTHOR_SETTINGS="1", SIDE_EFFECTS="0"),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    authored = [c.split() for c in (tmp_path / "calls").read_text().splitlines() if "--author_settings" in c]
    methods = [c[c.index("--method") + 1] for c in authored]
    assert methods == ["cfg_delay", "ren", "han_batch", "han_sample", "nemo"]
    assert all("--grid" in c for c in authored)
    assert [c[c.index("--nemo_stats_prompts") + 1] for c in authored if "--nemo_stats_prompts" in c] == \
        ["prompts/demo_nmem.txt"]


def test_figure_draws_each_sampling_variant_as_its_own_curve():
    """A method's runs under another sampler or guidance (--author_settings) are their own group in Figure 6:
    their own legend entry in the method's colour, triangles and a dashed curve, beside the harness's solid one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from utils.evaluation import scoring as E
    assert MI.run_variant({"sampler": "euler", "guidance_scale": 7.0}) == "euler, w=7"
    assert MI.run_variant({"guidance_scale": 7.5}) == "" and MI.run_variant({}) == ""
    rows = [dict(method="han_sample", gated=False, variant=v, setting=f"l_target={t}" + (f", {v}" if v else ""),
                 mean_similarity=t, mean_clip=t / 2) for v in ("", "w=7") for t in (0.2, 0.3, 0.4)]
    fig, ax = plt.subplots()
    E._panel(ax, rows, "mean_similarity", "mean_clip", {("han_sample", False): "C3"})
    assert [line.get_linestyle() for line in ax.lines] == ["-", "--"]
    assert [list(line.get_xdata()) for line in ax.lines] == [[0.2, 0.3, 0.4]] * 2  # never mixing the two groups
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["han_sample", "han_sample (w=7)"]
    assert len({tuple(h.get_facecolor()[0]) for h in handles}) == 1  # one colour per method
    plt.close(fig)


def test_image_grid_default_pick_is_a_run_of_the_harness_sampling():
    """The image grid's default column for a method is the middle of its runs under the harness's sampling, not
    of those and its author-settings runs together; an asked-for setting is found among all of them."""
    from utils.evaluation import scoring as E
    cands = [((v, (0, t)), f"rho={t}" + (", w=7" if v else ""), f"{t}{v}") for v in (False, True) for t in (1, 2, 3)]
    tag = MI.folder_tag
    assert E.grid_pick("han_batch", cands, None, tag)[1] == "rho=2"
    assert E.grid_pick("han_batch", cands, "rho=3, w=7", tag)[1] == "rho=3, w=7"
    assert E.grid_pick("han_batch", cands[3:], None, tag)[1] == "rho=2, w=7"  # only variants: their middle
