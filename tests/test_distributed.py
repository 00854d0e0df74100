"""Several processes (the environment accelerate launch / torchrun set: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*),
gloo on CPU: merged outputs bit-identical to one process, a killed process, resuming with another count."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import detect_mem
from utils.distributed import Shard, my_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETECT = ["--gen_num", "2", "--metrics", "sharpness,wen", "--wen_steps", "3", "--device", "cpu"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(script_argv, world, rank, port):
    env = dict(os.environ, WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.Popen([sys.executable, *script_argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def launch(script_argv, world):
    """Start `world` processes of a script as a launcher would; returns the Popen objects."""
    port = _free_port()
    return [_start(script_argv, world, rank, port) for rank in range(world)]


def _run_in_process(argv):
    try:
        detect_mem.main(argv)
    except SystemExit as e:
        return e.code
    return 0


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
