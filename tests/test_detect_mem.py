"""End-to-end detect_mem.py / detect_eval.py on tiny pipelines: outputs, batching, resuming, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cli_run import exit_code
import detect_eval
import detect_mem
from utils.models.families import SD1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ['"A ""quoted"" <i>caption</i> with HTML"', "a red square on a blue field", "digit seven",
           "Mothers influence on her young hippo", "a photo of a cat"]


def _write(path, text, mode="w"):
    with open(path, mode if isinstance(text, str) else "wb") as f:
        f.write(text)
    return str(path)


def _run(argv):
    """Run a script's main in-process; returns the SystemExit code (0 when it returns)."""
    return exit_code((detect_mem if argv[0] == "mem" else detect_eval).main, argv[1:])


@pytest.fixture
def prompt_file(tmp_path):
    # BOM, CRLF and a blank line must all be handled; the text itself stays verbatim.
    return _write(tmp_path / "tiny_mem.txt", ("\ufeff" + "\r\n".join(PROMPTS[:3] + [""] + PROMPTS[3:])).encode())


def test_outputs_layout_and_metadata(tiny_eps_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(["mem", "--model_id", tiny_eps_dir, "--data_path", prompt_file, "--gen_num", "2",
                 "--hvp_sampling_num", "2", "--out_dir", str(out), "--device", "cpu"]) == 0
    t = torch.load(out / "tiny_mem_gen2.pt", weights_only=True)
    assert t.dtype == torch.float32 and t.shape == (5, 2) and torch.isfinite(t).all()
    meta = json.loads((out / "tiny_mem_gen2.json").read_text())
    assert meta["prompts"] == PROMPTS  # verbatim, blank line skipped
    per_gen = torch.tensor(meta["per_generation"])  # [prompts, steps, generations]
    assert per_gen.shape == (5, 2, 2)
    torch.testing.assert_close(per_gen.mean(dim=2), t, rtol=1e-6, atol=0)
    assert meta["arguments"]["gen_num"] == 2 and meta["versions"]["torch"] == torch.__version__
    assert meta["cost"]["unet_forwards_per_prompt_batch"] == 2 and meta["cost"]["jvps_per_prompt_batch"] == 2
    assert "blank line" in capsys.readouterr().err


def test_matches_independent_dense_jacobian_computation(tiny_eps_dir, tiny_eps, tmp_path):
    """The script's step-1 value equals ||(J_c - J_u) s_delta|| from reverse-mode dense Jacobians."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    f = _write(tmp_path / "p.txt", "a photo of a cat\ndigit seven")
    assert _run(["mem", "--model_id", tiny_eps_dir, "--data_path", f, "--gen_num", "2", "--out_dir",
                 str(tmp_path), "--device", "cpu", "--gen_seed", "7"]) == 0
    got = torch.load(tmp_path / "p_gen2.pt", weights_only=True)[:, 0]
    pipe = tiny_eps
    pipe.scheduler.set_timesteps(50)
    t = pipe.scheduler.timesteps[0]
    sigma = (1 - pipe.scheduler.alphas_cumprod[t]).sqrt()
    x = SD1.initial_latents(pipe, 2, 7)
    for k, prompt in enumerate(["a photo of a cat", "digit seven"]):
        with torch.no_grad():
            c = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
            u = pipe.encode_prompt("", "cpu", 1, False)[0]
        vals = []
        for g in range(2):
            xg = x[g:g + 1]
            score = lambda z, e: -pipe.unet(z.view_as(xg), t, encoder_hidden_states=e).sample.flatten() / sigma
            with sdpa_kernel(SDPBackend.MATH):
                jc = torch.autograd.functional.jacobian(lambda z: score(z, c), xg.flatten())
                ju = torch.autograd.functional.jacobian(lambda z: score(z, u), xg.flatten())
            with torch.no_grad():
                sd = score(xg.flatten(), c) - score(xg.flatten(), u)
            vals.append(((jc - ju) @ sd).norm())
        torch.testing.assert_close(got[k], torch.stack(vals).mean(), rtol=1e-4, atol=0)


def test_batching_equals_batch_size_one_and_v_prediction(tiny_v_dir, prompt_file, tmp_path):
    base = ["--model_id", tiny_v_dir, "--data_path", prompt_file, "--gen_num", "2", "--device", "cpu"]
    assert _run(["mem", *base, "--out_dir", str(tmp_path / "b1")]) == 0
    assert _run(["mem", *base, "--out_dir", str(tmp_path / "b3"), "--batch_size", "3"]) == 0
    a = torch.load(tmp_path / "b1" / "tiny_mem_gen2.pt", weights_only=True)
    b = torch.load(tmp_path / "b3" / "tiny_mem_gen2.pt", weights_only=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert json.loads((tmp_path / "b1" / "tiny_mem_gen2.json").read_text())["prediction_type"] == "v_prediction"


def test_interrupted_run_resumes_to_identical_result(tiny_eps_dir, prompt_file, tmp_path, monkeypatch):
    base = ["--model_id", tiny_eps_dir, "--data_path", prompt_file, "--gen_num", "1", "--device", "cpu"]
    assert _run(["mem", *base, "--out_dir", str(tmp_path / "full")]) == 0
    real = detect_mem.run_detectors
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(detect_mem, "run_detectors", flaky)
    assert _run(["mem", *base, "--out_dir", str(tmp_path / "resumed")]) == 130
    log = (tmp_path / "resumed" / "tiny_mem_gen1.progress.jsonl").read_text().splitlines()
    assert len(log) == 1 + 2 and not (tmp_path / "resumed" / "tiny_mem_gen1.pt").exists()
    monkeypatch.setattr(detect_mem, "run_detectors", real)
    assert _run(["mem", *base, "--out_dir", str(tmp_path / "resumed")]) == 0
    assert torch.equal(torch.load(tmp_path / "full" / "tiny_mem_gen1.pt", weights_only=True),
                       torch.load(tmp_path / "resumed" / "tiny_mem_gen1.pt", weights_only=True))
    # A different setting in the same folder is refused instead of mixing results.
    assert _run(["mem", *base, "--out_dir", str(tmp_path / "resumed"), "--gen_seed", "1"]) == 2


@pytest.mark.parametrize("case", ["missing", "empty", "blank_only", "bad_bytes", "sd_ver", "model_dir", "cuda"])
def test_bad_input_exits_2_with_one_message(case, tmp_path, capsys, tiny_eps_dir):
    good = _write(tmp_path / "good.txt", "a prompt")
    argv = ["mem", "--model_id", tiny_eps_dir, "--data_path", good, "--out_dir", str(tmp_path), "--device", "cpu"]
    if case == "missing":
        argv[4] = str(tmp_path / "nope.txt")
    elif case == "empty":
        argv[4] = _write(tmp_path / "e.txt", "")
    elif case == "blank_only":
        argv[4] = _write(tmp_path / "b.txt", "\n  \n")
    elif case == "bad_bytes":
        argv[4] = _write(tmp_path / "x.txt", b"ok\n\xff\xfe bad\n")
    elif case == "sd_ver":
        argv = ["mem", "--sd_ver", "3", "--data_path", good, "--device", "cpu"]
    elif case == "model_dir":
        argv[2] = str(tmp_path / "no_such_model")
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        argv[-1] = "cuda"
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]


def test_offline_hub_model_fails_fast_with_advice(tmp_path):
    """A hub id that is not cached, offline: exit 2, advice, no traceback (real subprocess)."""
    f = _write(tmp_path / "p.txt", "a prompt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "detect_mem.py"), "--sd_ver", "1", "--data_path", f,
                        "--device", "cpu", "--out_dir", str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "CompVis/stable-diffusion-v1-4" in r.stderr and "--model_id" in r.stderr


def test_detect_eval_numbers_plot_and_no_label_flip(tmp_path, capsys):
    mem = torch.tensor([[3.0, 5.0], [4.0, 4.0], [1.0, 1.0]])   # means 4, 4, 1
    nmem = torch.tensor([[2.0, 2.0], [0.0, 1.0], [float("nan"), 1.0]])  # means 2, 0.5, NaN
    torch.save(mem, tmp_path / "m.pt")
    torch.save(nmem, tmp_path / "n.pt")
    assert _run(["eval", "--mem", str(tmp_path / "m.pt"), "--nmem", str(tmp_path / "n.pt")]) == 0
    out = capsys.readouterr()
    # Positives 4, 4, 1 vs negatives 2, 0.5: 5 of 6 pairs ranked right -> AUC 5/6; at FPR 0 two of three
    # positives are already found, so TPR@1%FPR = 2/3 (closest ROC point, highest TPR at that FPR).
    assert out.out.startswith("AUC: 0.833 | TPR@1%FPR: 0.667 | TPR@3%FPR: 0.667")
    assert "dropped 0 memorized and 1 non-memorized" in out.err
    res = json.loads((tmp_path / "m_vs_n.eval.json").read_text())
    assert abs(res["auc"] - 5 / 6) < 1e-12 and os.path.getsize(tmp_path / "m_vs_n.eval.roc.png") > 1000
    # Swapped inputs: AUC 1/6, reported as is with a warning.
    assert _run(["eval", "--mem", str(tmp_path / "n.pt"), "--nmem", str(tmp_path / "m.pt"), "--no_plot"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("AUC: 0.167") and "below 0.5" in out.err
    # Only step 2: mem 5, 4, 1 vs nmem 2, 1, 1 -> (3 + 3 + 2 * 0.5) / 9 = 7/9.
    assert _run(["eval", "--mem", str(tmp_path / "m.pt"), "--nmem", str(tmp_path / "n.pt"), "--steps", "2",
                 "--no_plot"]) == 0
    assert capsys.readouterr().out.startswith("AUC: 0.778")
    assert _run(["eval", "--mem", str(tmp_path / "m.pt"), "--nmem", str(tmp_path / "n.pt"), "--steps", "3"]) == 2


def test_tpr_rules_on_a_hand_made_roc():
    from utils.metrics import tpr_at_fpr
    fpr, tpr = [0.0, 0.0, 0.008, 0.008, 0.02, 1.0], [0.0, 0.3, 0.3, 0.6, 0.9, 1.0]
    assert tpr_at_fpr(fpr, tpr, 0.01, "closest") == 0.6   # nearest FPR 0.008, top of its vertical step
    assert tpr_at_fpr(fpr, tpr, 0.015, "closest") == 0.9  # nearest FPR is 0.02 > target: allowed by 'closest'
    assert tpr_at_fpr(fpr, tpr, 0.015, "strict") == 0.6   # strict never exceeds the target
    assert tpr_at_fpr(fpr, tpr, 0.0, "strict") == 0.3


def test_several_seeds_each_their_own_result(tiny_eps_dir, tmp_path, capsys):
    """--gen_seed 3,5: one result per seed in seed<s>/, each the file a single-seed run writes; repeats refused."""
    f = _write(tmp_path / "p.txt", "digit seven\na photo of a cat\n")
    base = ["mem", "--model_id", tiny_eps_dir, "--data_path", f, "--gen_num", "1", "--device", "cpu",
            "--metrics", "wen", "--wen_steps", "1"]
    assert _run(base + ["--gen_seed", "3,5", "--out_dir", str(tmp_path / "multi")]) == 0
    assert _run(base + ["--gen_seed", "5", "--out_dir", str(tmp_path / "single")]) == 0
    load = lambda p: torch.load(p, weights_only=True)
    assert torch.equal(load(tmp_path / "multi" / "seed5" / "p_wen_gen1.pt"), load(tmp_path / "single" / "p_wen_gen1.pt"))
    assert not torch.equal(load(tmp_path / "multi" / "seed3" / "p_wen_gen1.pt"),
                           load(tmp_path / "single" / "p_wen_gen1.pt"))
    single = json.loads((tmp_path / "single" / "p_wen_gen1.json").read_text())
    assert single["arguments"]["gen_seed"] == 5  # one seed: recorded as today, an integer
    capsys.readouterr()
    assert _run(base + ["--gen_seed", "3,5,3", "--out_dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "must not repeat" in err and not (tmp_path / "bad").exists()
