"""Several processes (the environment accelerate launch / torchrun set: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*),
gloo on CPU: merged outputs bit-identical to one process, a killed process, resuming with another count."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from cli_run import exit_code
import detect_mem
import mitigate_eval
import mitigate_mem
from utils.distributed import Shard, my_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETECT = ["--gen_num", "2", "--metrics", "sharpness,wen", "--wen_steps", "3", "--device", "cpu"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(script_argv, world, rank, port, **extra_env):
    env = dict(os.environ, WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", TQDM_DISABLE="1", **extra_env)
    return subprocess.Popen([sys.executable, *script_argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def launch(script_argv, world, **extra_env):
    """Start `world` processes of a script as a launcher would; returns the Popen objects."""
    port = _free_port()
    return [_start(script_argv, world, rank, port, **extra_env) for rank in range(world)]


_call = exit_code  # (main, argv) -> exit code


def _run_in_process(argv):
    return _call(detect_mem.main, argv)


def test_batches_are_the_single_process_chunks_dealt_round_robin():
    todo = list(range(10))
    one = my_batches(todo, 3, Shard(0, 1, 0))
    parts = [my_batches(todo, 3, Shard(r, 2, r)) for r in range(2)]
    assert one == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert parts == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9]]]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    f = tmp_path_factory.mktemp("dist") / "p.txt"
    f.write_text("\n".join(f"prompt number {i} about a thing" for i in range(8)))
    return f


SLOW_RANK_1 = """
import os, sys, time
if os.environ.get("RANK") == "1":  # this process loads its model 2 s after the other
    sys.path.insert(0, {root!r})
    import utils.models.loading as models
    _load = models.load_pipeline
    def load_pipeline(*args, **kwargs):
        time.sleep(2)
        return _load(*args, **kwargs)
    models.load_pipeline = load_pipeline
"""


def test_a_slow_process_deals_out_the_same_batches_as_a_fast_one(tiny_eps_dir, prompts, tmp_path):
    """Process 1 starts computing 2 s after process 0, which by then has finished prompts: both still split the
    same list (the logs are read by all before any is written), so every prompt is computed once, by one process,
    and the merge equals one process's files."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_RANK_1.format(root=ROOT))
    argv = ["--model_id", tiny_eps_dir, "--data_path", str(prompts), *DETECT, "--metrics", "wen"]
    procs = launch(["detect_mem.py", *argv, "--out_dir", str(tmp_path / "two")], 2,
                   PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    assert _run_in_process([*argv, "--out_dir", str(tmp_path / "one")]) == 0
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    logs = [[json.loads(x)["index"] for x in (tmp_path / "two" / f"p_wen_gen2.progress.{r}.jsonl").read_text()
             .splitlines()[1:]] for r in range(2)]
    assert sorted(logs[0]) == [0, 2, 4, 6] and sorted(logs[1]) == [1, 3, 5, 7]
    assert torch.equal(torch.load(tmp_path / "one" / "p_wen_gen2.pt", weights_only=True),
                       torch.load(tmp_path / "two" / "p_wen_gen2.pt", weights_only=True))


def test_two_processes_merge_to_the_single_process_files(tiny_eps_dir, prompts, tmp_path):
    argv = ["--model_id", tiny_eps_dir, "--data_path", str(prompts), *DETECT]
    procs = launch(["detect_mem.py", *argv, "--out_dir", str(tmp_path / "two")], 2)
    assert _run_in_process([*argv, "--out_dir", str(tmp_path / "one")]) == 0
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    for name in ("p_gen2.pt", "p_wen_gen2.pt"):
        assert torch.equal(torch.load(tmp_path / "one" / name, weights_only=True),
                           torch.load(tmp_path / "two" / name, weights_only=True)), name
    assert sorted(f for f in os.listdir(tmp_path / "two") if "progress" in f and f.endswith("jsonl")) == [
        "p_gen2.progress.0.jsonl", "p_gen2.progress.1.jsonl", "p_wen_gen2.progress.0.jsonl",
        "p_wen_gen2.progress.1.jsonl"]


@pytest.mark.slow
def test_killed_process_then_resume_with_one_process(tiny_eps_dir, prompts, tmp_path):
    argv = ["--model_id", tiny_eps_dir, "--data_path", str(prompts), *DETECT, "--wen_steps", "25",
            "--out_dir", str(tmp_path / "run")]
    procs = launch(["detect_mem.py", *argv], 2)
    log = tmp_path / "run" / "p_gen2.progress.1.jsonl"
    deadline = time.time() + 150
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    procs[1].kill()  # one process dies after its first prompt
    _, err = procs[0].communicate(timeout=180)
    procs[1].communicate()
    assert procs[0].returncode == 2 and "run the same command again to resume" in err
    assert not (tmp_path / "run" / "p_gen2.pt").exists()  # nothing merged from an incomplete run
    assert _run_in_process(argv) == 0  # resumed by one process: it reads both processes' logs
    assert _run_in_process([*argv[:-1], str(tmp_path / "fresh")]) == 0
    for name in ("p_gen2.pt", "p_wen_gen2.pt"):
        assert torch.equal(torch.load(tmp_path / "run" / name, weights_only=True),
                           torch.load(tmp_path / "fresh" / name, weights_only=True)), name


def test_processes_with_different_arguments_are_refused(tiny_eps_dir, prompts, tmp_path):
    argv = ["detect_mem.py", "--model_id", tiny_eps_dir, "--data_path", str(prompts), *DETECT,
            "--out_dir", str(tmp_path / "o")]
    port = _free_port()
    procs = [_start(argv, 2, 0, port), _start([*argv, "--gen_seed", "7"], 2, 1, port)]  # rank 1: another seed
    errs = [p.communicate(timeout=180)[1] for p in procs]
    assert all(p.returncode == 2 for p in procs), errs
    assert all("disagree on the arguments" in e for e in errs)
    assert not os.path.exists(tmp_path / "o" / "p_gen2.pt")


def _manifest(folder):
    """Header and records of a manifest without the timing fields (they differ between any two runs)."""
    lines = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    drop = ("search_seconds", "generate_seconds")
    return lines[0], [{k: v for k, v in r.items() if k not in drop} for r in lines[1:]]


@pytest.mark.slow
def test_sail_and_scoring_with_two_processes_equal_one_process(tiny_eps_dir, prompts, tmp_path):
    sail = ["mitigate_mem.py", "--model_id", tiny_eps_dir, "--data_path", str(prompts), "--gen_num", "2",
            "--device", "cpu", "--num_inference_steps", "10", "--miti_thres", "0.8", "--miti_lr", "0.2",
            "--miti_budget", "4", "--miti_max_steps", "3", "--miti_max_rounds", "3", "--save_latents"]
    procs = launch([*sail, "--out_dir", str(tmp_path / "two")], 2)
    assert _call(mitigate_mem.main, [*sail[1:], "--out_dir", str(tmp_path / "one")]) == 0
    for p in procs:
        assert p.communicate(timeout=300)[0] is not None and p.returncode == 0, p.stderr
    name = os.path.basename(tiny_eps_dir)
    a, b = tmp_path / "one" / name / "mem", tmp_path / "two" / name / "mem"
    assert _manifest(a) == _manifest(b)
    files = sorted(f for f in os.listdir(a) if f.endswith(".png"))
    assert files and files == sorted(f for f in os.listdir(b) if f.endswith(".png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert all(torch.equal(torch.load(a / "latents" / f, weights_only=True),
                           torch.load(b / "latents" / f, weights_only=True)) for f in os.listdir(a / "latents"))
    # scoring the same folder with two processes writes what one process writes (apart from the run's echo)
    gt = tmp_path / "gt"
    (tmp_path / "train").mkdir()
    recs = []
    for i, line in enumerate(prompts.read_text().splitlines()):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(
            tmp_path / "train" / f"{i}.png")
        recs.append(json.dumps({"caption": line, "index": i, "file": f"train/{i}.png"}))
    (tmp_path / "t.jsonl").write_text("\n".join(recs) + "\n")
    assert _call(mitigate_eval.main, ["fetch", "--jsonl", str(tmp_path / "t.jsonl"), "--out", str(gt)]) == 0
    score = ["mitigate_eval.py", "score", "--images", str(a), "--gt", str(gt), "--similarity", "pixel",
             "--clip_model", "demo"]
    procs = launch([*score, "--out", str(tmp_path / "s2.json")], 2)
    assert _call(mitigate_eval.main, [*score[1:], "--out", str(tmp_path / "s1.json")]) == 0
    for p in procs:
        p.communicate(timeout=300)
        assert p.returncode == 0
    s1, s2 = (json.loads((tmp_path / f).read_text()) for f in ("s1.json", "s2.json"))
    for key in ("per_prompt", "summary", "counts"):
        assert s1[key] == s2[key], key
    assert (tmp_path / "s1.csv").read_bytes() == (tmp_path / "s2.csv").read_bytes()
