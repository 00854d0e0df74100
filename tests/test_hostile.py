"""Hostile inputs and faults (issue #16): every bad value is one `error:` line with exit code 2, nothing outside the
named output folder changes, no input is replaced, paths from data files never leave their folder, downloads are
bounded in time and Ctrl-C ends them.

Layout, for adding scripts (detect_mem.py, detect_eval.py, mitigate_mem.py):
- run_script(module, argv) runs a script's main(argv) in-process and returns (exit code, stderr);
- check_row(...) runs one row and checks its exit code, its single `error:` line and that nothing changed under
  the test's folder (tree snapshots before and after) nor in the repository;
- one table per script of (argv, exit code, message fragment); argv items are formatted with w (the shared
  hostile world folder, see `world`) and repo (the repository root), e.g. "{w}/afile/out" lies under a file.
Only loopback addresses (127.0.0.1) and files made here are used.
"""
import contextlib
import errno
import functools
import importlib
import importlib.util
import io
import json
import math
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = str(2 ** 63)  # one past the largest seed


# ------------------------------------------------------------------------------------------------ shared helpers

@functools.lru_cache(maxsize=None)
def load_module(module):
    """A script as a module: a top-level name ("mitigate_eval") or a path relative to the repository
    ("examples/toy_2d.py")."""
    if not module.endswith(".py"):
        return importlib.import_module(module)
    spec = importlib.util.spec_from_file_location(os.path.basename(module)[:-3], os.path.join(ROOT, module))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(module, argv):
    """Run module.main(argv) in-process: (exit code, stderr text). A normal return is 0; an uncaught exception
    is code 1 with its traceback as the text (what a user would see)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            load_module(module).main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # a traceback: what the issue forbids for bad input
            code = 1
            err.write(traceback.format_exc())
    return code, err.getvalue()


def tree(root):
    """Snapshot of everything under root: {relative path: (kind, size, mtime_ns)}; links are not followed."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            kind = "dir" if os.path.isdir(path) and not os.path.islink(path) else "other"
            out[os.path.relpath(path, root)] = (kind, st.st_size if kind != "dir" else 0, st.st_mtime_ns
                                                if kind != "dir" else 0)
    return out


def changes(before, after, allowed=()):
    """Paths added, removed or modified between two tree() snapshots, except those under an allowed prefix."""
    keys = set(before) | set(after)
    diff = sorted(k for k in keys if before.get(k) != after.get(k))
    return [k for k in diff if not any(k == a or k.startswith(a + os.sep) for a in allowed)]


def committed_state():
    """What no failing run may touch in the repository: its top-level names and the committed model and prompts."""
    return (sorted(os.listdir(ROOT)), tree(os.path.join(ROOT, "demo_model")), tree(os.path.join(ROOT, "prompts")),
            tree(os.path.join(ROOT, "demo_flow_model")))


def check_row(module, argv, code, fragment, w, allowed=()):
    """Run one table row and check it: exit code; for code 2 exactly one `error:` line, containing fragment, and
    no traceback; nothing changed under w (except the allowed relative paths) nor in the repository.
    Returns stderr."""
    argv = [a.format(w=w, repo=ROOT) for a in argv]
    before, repo = tree(w), committed_state()
    got, err = run_script(module, argv)
    assert got == code, f"{module} {argv}: exit {got}, expected {code}\n{err}"
    if code == 2:
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in err, (argv, err)
    assert changes(before, tree(w), allowed) == [], f"{module} {argv} changed files outside its output"
    assert committed_state() == repo, f"{module} {argv} changed the repository"
    return err


@contextlib.contextmanager
def time_limit(seconds):
    """Fail (TimeoutError in the main thread) instead of hanging, e.g. on a FIFO opened for reading."""
    def alarm(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _png(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(48, 48, 3)).astype(np.uint8)).save(path)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# --------------------------------------------------------------------------------------------- the shared world

SECRET = b"SECRET-OUTSIDE-THE-FOLDER"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder of hostile and ordinary inputs, shared by the tables (no row may change it):
    afile (a regular file: outputs under it cannot be written), fifo (a named pipe), nonutf8.txt/.jsonl,
    deep.jsonl (nesting beyond the parser), data/ (a jsonl with local training images) -> gt/ (fetched),
    gen/ (a generation folder scoring 1.0 against gt), bad_manifests/*.jsonl (damaged generation manifests),
    gt_fifo/ (a training folder whose manifest is a FIFO), secret.txt (beside data/: never to be read)."""
    w = tmp_path_factory.mktemp("hostile_world")
    (w / "afile").write_text("x")
    os.mkfifo(w / "fifo")
    (w / "nonutf8.txt").write_bytes(b"a prompt\n\xff\xfe not utf-8\n")
    (w / "nonutf8.jsonl").write_bytes(b'{"caption": "\xff"}\n')
    (w / "deep.jsonl").write_text("[" * 100_000 + "\n")
    (w / "empty.jsonl").write_text("\n\n")
    (w / "notjson.jsonl").write_text('{"caption": "a", "index": 1, "url": "http://127.0.0.1:9/x"}\nnot json\n')
    (w / "secret.txt").write_bytes(SECRET)
    data = w / "data"
    (data / "train").mkdir(parents=True)
    _png(data / "train" / "a.png", 0)
    _png(data / "train" / "b.png", 1)
    _jsonl(data / "good.jsonl", [{"caption": "Red Rug", "index": 100, "file": "train/a.png"},
                                 {"caption": "Blue Rug", "index": 101, "file": "train/b.png"}])
    assert run_script("mitigate_eval", ["fetch", "--jsonl", str(data / "good.jsonl"), "--out", str(w / "gt")])[0] == 0
    gen = w / "gen"
    gen.mkdir()
    _png(gen / "0_0.png", 0)
    _png(gen / "1_0.png", 2)
    _jsonl(gen / "manifest.jsonl", [{"header": {"sd_ver": "demo"}},
                                    {"index": 0, "prompt": "Red Rug", "images": ["0_0.png"]},
                                    {"index": 1, "prompt": "Blue Rug", "images": ["1_0.png"]}])
    bad = w / "bad_manifests"
    bad.mkdir()
    (bad / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    (bad / "nul.jsonl").write_bytes(b'{"header": {}}\n\x00\x01\x02garbage\n{"index": 0, "prompt": "p", "images": []}\n')
    _jsonl(bad / "missing_keys.jsonl", [{"header": {}}, {"index": 0, "prompt": "Red Rug"}, {"index": 1}])
    _jsonl(bad / "wrong_types.jsonl", [{"header": {}}, {"index": "0", "prompt": "Red Rug", "images": []},
                                       {"index": 1, "prompt": 5, "images": []}])
    _jsonl(bad / "no_header.jsonl", [{"index": 0, "prompt": "Red Rug", "images": []}])
    (w / "gt_fifo").mkdir()
    os.mkfifo(w / "gt_fifo" / "fetch_manifest.csv")
    (w / "model_like").mkdir()
    (w / "model_like" / "notes.txt").write_text("not a model")
    (w / "results.json").write_text("{}")
    return w


# -------------------------------------------------------------------------------------- mitigate_eval.py fetch

FETCH = ["fetch", "--jsonl", "{w}/data/good.jsonl"]
FETCH_ROWS = [  # (argv, exit code, message fragment)
    (FETCH + ["--out", "{w}/o", "--backoff", "inf"], 2, "--backoff"),
    (FETCH + ["--out", "{w}/o", "--backoff", "1e300"], 2, "one day"),
    (FETCH + ["--out", "{w}/o", "--timeout", "1e300"], 2, "one day"),
    (FETCH + ["--out", "{w}/o", "--total_timeout", "nan"], 2, "finite"),
    (FETCH + ["--out", "{w}/o", "--timeout", "0"], 2, "positive"),
    (FETCH + ["--out", "{w}/o", "--workers", "0"], 2, "--workers"),
    (FETCH + ["--out", "{w}/o", "--workers", "100000"], 2, "at most 256"),
    (FETCH + ["--out", "{w}/o", "--retries", "1" + "0" * 5000], 2, "--retries"),
    (FETCH + ["--out", "{w}/o", "--max_mb", "0"], 2, "--max_mb"),
    (FETCH + ["--out", "{w}/o", "--min_side", "-1"], 2, "--min_side"),
    (["fetch", "--jsonl", "{w}/nonutf8.jsonl", "--out", "{w}/o"], 2, "not UTF-8"),
    (["fetch", "--jsonl", "{w}/fifo", "--out", "{w}/o"], 2, "not a regular file"),
    (["fetch", "--jsonl", "{w}/deep.jsonl", "--out", "{w}/o"], 2, "not valid JSON"),
    (["fetch", "--jsonl", "{w}/notjson.jsonl", "--out", "{w}/o"], 2, "line 2 is not valid JSON"),
    (["fetch", "--jsonl", "{w}/empty.jsonl", "--out", "{w}/o"], 2, "holds no records"),
    (["fetch", "--jsonl", "{w}/data", "--out", "{w}/o"], 2, "is a folder"),
    (["fetch", "--jsonl", "{w}/absent.jsonl", "--out", "{w}/o"], 2, "not found"),
    (FETCH + ["--out", "{w}/afile"], 2, "cannot write"),
    (FETCH + ["--out", "{w}/afile/sub"], 2, "cannot write"),
    (FETCH + ["--out", "{w}/data"], 2, "lies inside --out"),
    (FETCH + ["--out", "{w}"], 2, "lies inside --out"),
]


@pytest.mark.parametrize("argv,code,fragment", FETCH_ROWS, ids=lambda v: None)
def test_fetch_bad_inputs(world, argv, code, fragment):
    check_row("mitigate_eval", argv, code, fragment, world)


def test_fetch_paths_from_records_stay_in_their_folder(world, tmp_path):
    """Local `file` records: '..', absolute paths, links out, a FIFO, a folder, an oversized file and a device
    are bad records with their reason (no hang, nothing read from outside); indices come from the records."""
    d = tmp_path / "d"
    (d / "train").mkdir(parents=True)
    _png(d / "train" / "ok.png", 3)
    (tmp_path / "outside.png").write_bytes(SECRET)
    os.mkfifo(d / "train" / "pipe.png")
    (d / "train" / "folder.png").mkdir()
    (d / "train" / "big.png").write_bytes(b"\x89PNG" + b"0" * 20000)
    os.symlink(tmp_path / "outside.png", d / "train" / "link_out.png")
    os.symlink("/dev/zero", d / "train" / "zero.png")
    os.symlink("ok.png", d / "train" / "link_in.png")
    recs = [{"caption": "malformed, no index"},                      # old rule: index 0, taking record 0's
            {"caption": "real zero", "index": 0, "file": "train/ok.png"},
            {"caption": "dotdot", "index": 1, "file": "../outside.png"},
            {"caption": "absolute", "index": 2, "file": str(tmp_path / "outside.png")},
            {"caption": "link out", "index": 3, "file": "train/link_out.png"},
            {"caption": "fifo", "index": 4, "file": "train/pipe.png"},
            {"caption": "folder", "index": 5, "file": "train/folder.png"},
            {"caption": "big", "index": 6, "file": "train/big.png"},
            {"caption": "device", "index": 7, "file": "train/zero.png"},
            {"caption": "link in", "index": 8, "file": "train/link_in.png"},
            {"caption": "bool index", "index": True, "url": "http://127.0.0.1:9/x"},
            {"caption": "huge index", "index": 2 ** 70, "file": "train/ok.png"},
            {"caption": "steals 0", "index": 0, "file": "train/ok.png"}]
    _jsonl(d / "h.jsonl", recs)
    out = tmp_path / "out"
    before = tree(tmp_path)
    with time_limit(30):
        code, err = run_script("mitigate_eval", ["fetch", "--jsonl", str(d / "h.jsonl"), "--out", str(out),
                                                 "--max_mb", "0.012"])
    assert code == 0, err
    assert changes(before, tree(tmp_path), allowed=["out"]) == []
    from utils.evaluation.fetch_manifest import read_manifest
    from utils.evaluation.matching import ground_truth_records
    rows = read_manifest(str(out / "fetch_manifest.csv"))
    status = {r["caption"]: (r["index"], r["status"]) for r in rows}
    assert status == {"malformed, no index": (None, "bad_record"), "real zero": (0, "ok"),
                      "dotdot": (1, "bad_path"), "absolute": (2, "bad_path"), "link out": (3, "bad_path"),
                      "fifo": (4, "not_file"), "folder": (5, "not_file"), "big": (6, "too_large"),
                      "device": (7, "bad_path"), "link in": (8, "ok"), "bool index": (None, "bad_record"),
                      "huge index": (None, "bad_record"), "steals 0": (0, "duplicate_index")}
    for r in rows:  # nothing from outside the folder reached the outputs
        assert "SECRET" not in r["detail"]
    assert all(SECRET not in p.read_bytes() for p in out.iterdir() if p.is_file())
    # The rejected records lend no caption: index 0 is the real record's (the dropped ground truth).
    recs0 = {g["index"]: g for g in ground_truth_records(rows, str(out))}
    assert recs0[0]["caption"] == "real zero" and len(recs0[0]["files"]) == 1


# -------------------------------------------------------------------------------------- mitigate_eval.py score

SCORE = ["score", "--images", "{w}/gen", "--gt", "{w}/gt", "--similarity", "pixel", "--clip_model", "none"]
SCORE_ROWS = [
    (SCORE + ["--out", "{w}/gen/manifest.jsonl"], 2, "ending in .json"),
    (SCORE + ["--manifest", "{w}/results.json", "--out", "{w}/results.json"], 2, "is --manifest"),
    (SCORE + ["--compare", "{w}/results.json", "--out", "{w}/results.json"], 2, "is --compare"),
    (SCORE + ["--out", "{w}/gt/eval.json"], 2, "lies inside --gt"),
    (SCORE + ["--out", "{w}/gen/0_0.png"], 2, "ending in .json"),
    (SCORE + ["--out", "{w}/afile/x.json"], 2, "cannot write"),
    (SCORE + ["--out", "{w}/data"], 2, "ending in .json"),
    (SCORE + ["--device", "foo"], 2, "expected cpu, cuda"),
    (SCORE + ["--device", "meta"], 2, "expected cpu, cuda"),
    (SCORE + ["--pixel_size", "0"], 2, "--pixel_size"),
    (SCORE + ["--pixel_size", "100000"], 2, "at most 1024"),
    (SCORE + ["--batch_size", "0"], 2, "--batch_size"),
    (SCORE + ["--thresholds", "nan"], 2, "finite"),
    (SCORE + ["--manifest", "{w}/bad_manifests/binary.jsonl"], 2, "not UTF-8"),
    (SCORE + ["--manifest", "{w}/bad_manifests/nul.jsonl"], 2, "line 2 is not valid JSON"),
    (SCORE + ["--manifest", "{w}/bad_manifests/missing_keys.jsonl"], 2, "'images' missing"),
    (SCORE + ["--manifest", "{w}/bad_manifests/wrong_types.jsonl"], 2, "integer 'index'"),
    (SCORE + ["--manifest", "{w}/bad_manifests/no_header.jsonl"], 2, "no header line"),
    (SCORE + ["--manifest", "{w}/fifo"], 2, "not a regular file"),
    (["score", "--images", "{w}/gen", "--gt", "{w}/gt_fifo", "--similarity", "pixel", "--clip_model", "none",
      "--out", "{w}/x.json"], 2, "not a regular file"),
]


@pytest.mark.parametrize("argv,code,fragment", SCORE_ROWS, ids=lambda v: None)
def test_score_bad_inputs(world, argv, code, fragment):
    check_row("mitigate_eval", argv, code, fragment, world)


def test_score_reads_generated_images_only_inside_their_folder(world, tmp_path):
    """A manifest naming training images, files outside its folder, a FIFO or a device: none is scored (the
    issue's training image scored as a generated one, similarity 1.0), each is reported with its reason."""
    gen = tmp_path / "gen"
    gen.mkdir()
    _png(gen / "mine.png", 7)
    os.mkfifo(gen / "pipe.png")
    os.symlink(world / "gt" / "100_0.png", gen / "link_to_gt.png")
    os.symlink("/dev/zero", gen / "zero.png")
    images = ["mine.png", str(world / "gt" / "100_0.png"), "../../" + os.path.relpath(world / "gt" / "100_0.png",
                                                                                       tmp_path.parent),
              "link_to_gt.png", "pipe.png", "zero.png", "none.png"]
    _jsonl(gen / "manifest.jsonl", [{"header": {}}, {"index": 0, "prompt": "Red Rug", "images": images}])
    with time_limit(30):
        code, err = run_script("mitigate_eval", SCORE[:1] + ["--images", str(gen), "--gt", str(world / "gt")]
                               + SCORE[5:] + ["--out", str(tmp_path / "r.json")])
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    row = res["per_prompt"][0]
    assert row["n_images"] == 1 and row["similarity_max"] < 0.5  # only mine.png, not the training image
    reasons = {m["file"]: m["reason"] for m in res["missing_images"]}
    assert set(reasons) == set(images[1:])
    assert "absolute" in reasons[images[1]] and "outside" in reasons[images[2]]
    assert "outside" in reasons["link_to_gt.png"] and "FIFO" in reasons["pipe.png"]
    assert "outside" in reasons["zero.png"] and reasons["none.png"] == "missing"


def test_score_never_scores_a_training_image_inside_the_images_folder(tmp_path):
    """Training folder inside the generation folder: a generated-image name that resolves to a training image is
    refused by the exclusion, not by the folder rule."""
    gen = tmp_path / "gen"
    (gen / "train").mkdir(parents=True)
    _png(gen / "train" / "a.png", 0)
    _jsonl(gen / "train" / "d.jsonl", [{"caption": "Red Rug", "index": 5, "file": "a.png"}])
    assert run_script("mitigate_eval", ["fetch", "--jsonl", str(gen / "train" / "d.jsonl"), "--out",
                                        str(gen / "gt")])[0] == 0
    _jsonl(gen / "manifest.jsonl", [{"header": {}}, {"index": 0, "prompt": "Red Rug", "images": ["gt/5_0.png"]}])
    code, err = run_script("mitigate_eval", SCORE[:1] + ["--images", str(gen), "--gt", str(gen / "gt")] + SCORE[5:]
                           + ["--out", str(tmp_path / "r.json")])
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["per_prompt"][0]["n_images"] == 0
    assert res["missing_images"][0]["reason"] == "is a training image, not a generated one"


def test_score_leaves_non_finite_similarities_out(world):
    import torch

    from utils.evaluation import scoring as E

    def broken_model(images):
        return torch.full((len(images), 4), float("nan"))
    res = E.evaluate(str(world / "gen" / "manifest.jsonl"), str(world / "gen"), str(world / "gt"), broken_model)
    assert [r["status"] for r in res["per_prompt"]] == ["non_finite", "non_finite"]
    assert res["summary"]["mean_similarity"] is None or not math.isnan(res["summary"]["mean_similarity"])
    json.dumps(res, allow_nan=False)  # standard JSON: no NaN reached the results


# ---------------------------------------------------------------------------------------------- train_demo.py

TRAIN_ROWS = [
    (["--smoke"], 2, "pass --out_dir"),
    (["--smoke", "--out_dir", "{repo}/demo_model"], 2, "--overwrite_committed"),
    (["--smoke", "--out_dir", "{repo}/demo_model/../demo_model"], 2, "--overwrite_committed"),
    (["--smoke", "--overwrite_committed"], 2, "--smoke never writes"),
    (["--smoke", "--out_dir", "{w}/m", "--prompts_dir", "{repo}/prompts"], 2, "--overwrite_committed"),
    (["--smoke", "--out_dir", "{w}/afile"], 2, "not a folder"),
    (["--smoke", "--out_dir", "{w}/model_like"], 2, "not replaced"),
    (["--smoke", "--out_dir", "{w}"], 2, "not replaced"),
    (["--smoke", "--out_dir", "{w}/m", "--prompts_dir", "{w}/m"], 2, "is --prompts_dir"),
    (["--smoke", "--out_dir", "{w}/m", "--prompts_dir", "{w}/m/p"], 2, "lies inside --out_dir"),
    (["--smoke", "--out_dir", ""], 2, "must not be empty"),
    (["--out_dir", "{w}/m", "--seed", BIG], 2, "2^63"),
    (["--out_dir", "{w}/m", "--seed", "-1"], 2, "--seed"),
    (["--out_dir", "{w}/m", "--lr", "1e308"], 2, "--lr"),
    (["--out_dir", "{w}/m", "--lr", "nan"], 2, "finite"),
    (["--out_dir", "{w}/m", "--stop_frac", "1.5"], 2, "(0, 1]"),
    (["--out_dir", "{w}/m", "--stop_frac", "0"], 2, "(0, 1]"),
    (["--out_dir", "{w}/m", "--p_uncond", "1"], 2, "[0, 1)"),
    (["--out_dir", "{w}/m", "--batch_size", "1000000"], 2, "at most"),
    (["--out_dir", "{w}/m", "--dup", "1000000000"], 2, "at most"),
    (["--out_dir", "{w}/m", "--threads", "0"], 2, "--threads"),
    (["--out_dir", "{w}/m", "--steps", "1e3"], 2, "--steps"),
]


@pytest.mark.parametrize("argv,code,fragment", TRAIN_ROWS, ids=lambda v: None)
def test_train_demo_bad_inputs(world, argv, code, fragment):
    check_row("train_demo", argv, code, fragment, world)


FLOW_TRAIN_ROWS = [
    (["--smoke"], 2, "pass --out_dir"),
    (["--smoke", "--out_dir", "{repo}/demo_flow_model"], 2, "--overwrite_committed"),
    (["--smoke", "--out_dir", "{repo}/demo_flow_model/../demo_flow_model"], 2, "--overwrite_committed"),
    (["--smoke", "--overwrite_committed"], 2, "--smoke never writes"),
    (["--smoke", "--out_dir", "{w}/afile"], 2, "not a folder"),
    (["--smoke", "--out_dir", "{w}/model_like"], 2, "not replaced"),
    (["--smoke", "--out_dir", ""], 2, "must not be empty"),
    (["--smoke", "--out_dir", "{repo}/demo_model/flow"], 2, "--demo_dir"),
    (["--smoke", "--out_dir", "{w}/m", "--demo_dir", "{w}"], 2, "holds no saved demo model"),
    (["--out_dir", "{w}/m", "--seed", "-1"], 2, "--seed"),
    (["--out_dir", "{w}/m", "--lr", "nan"], 2, "finite"),
    (["--out_dir", "{w}/m", "--stop_frac", "0"], 2, "(0, 1]"),
    (["--out_dir", "{w}/m", "--p_uncond", "1"], 2, "[0, 1)"),
    (["--out_dir", "{w}/m", "--batch_size", "1000000"], 2, "at most"),
    (["--out_dir", "{w}/m", "--threads", "0"], 2, "--threads"),
]


@pytest.mark.parametrize("argv,code,fragment", FLOW_TRAIN_ROWS, ids=lambda v: None)
def test_train_demo_flow_bad_inputs(world, argv, code, fragment):
    check_row("train_demo_flow", argv, code, fragment, world)


def test_diverged_weights_are_never_saved(tmp_path):
    import torch

    from utils.cli import UserError
    from utils.demo.model import tiny_pipeline
    from utils.demo.train import save_model
    pipe = tiny_pipeline()
    with torch.no_grad():
        next(pipe.unet.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(UserError, match="diverged"):
        save_model(pipe, {}, str(tmp_path / "m"), 3)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------- folders replaced when complete

def _model_folder(path, tag):
    """A stand-in model folder: model_index.json, unet/w and a file only this version has."""
    path = pathlib.Path(path)
    (path / "unet").mkdir(parents=True)
    (path / "model_index.json").write_text(tag)
    (path / "unet" / "w").write_text(tag)
    (path / f"only_in_{tag}").write_text(tag)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two renames"])
def test_staged_dir_replaces_a_folder_only_when_complete(tmp_path, monkeypatch, exchange):
    from utils import io as uio
    if not exchange:
        monkeypatch.setattr(uio, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    _model_folder(target, "old")
    with pytest.raises(RuntimeError):
        with uio.staged_dir(target, marker="model_index.json") as tmp:
            _model_folder(tmp, "new")
            raise RuntimeError("killed during the save")
    assert (target / "unet" / "w").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["model"]
    with uio.staged_dir(target, marker="model_index.json") as tmp:
        _model_folder(tmp, "new")
    assert (target / "unet" / "w").read_text() == "new" and not (target / "only_in_old").exists()
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary or old folder left


def test_staged_dir_survives_sigkill_mid_save(tmp_path):
    target = tmp_path / "model"
    _model_folder(target, "old")
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[2]); from utils.io import staged_dir\n"
            "with staged_dir(sys.argv[1], marker='model_index.json') as tmp:\n"
            "    os.makedirs(os.path.join(tmp, 'vae')); open(os.path.join(tmp, 'vae', 'w'), 'w').write('new')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, str(target), ROOT], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert sorted(os.listdir(target)) == ["model_index.json", "only_in_old", "unet"]  # old model, whole
    from utils.io import staged_dir
    with staged_dir(target, marker="model_index.json") as tmp:  # the next save clears the debris
        _model_folder(tmp, "new")
    assert sorted(os.listdir(tmp_path)) == ["model"]


# ----------------------------------------------------------------------------------- examples/eigen_analysis.py

EIGEN = "examples/eigen_analysis.py"
EIGEN_BASE = ["--model_id", "tiny", "--mem_path", "{w}/p.txt", "--nmem_path", "{w}/p.txt", "--k", "2",
              "--max_prompts", "1"]
EIGEN_ROWS = [
    (EIGEN_BASE + ["--guidance_scale", "nan"], 2, "finite"),
    (EIGEN_BASE + ["--guidance_scale", "1e9"], 2, "--guidance_scale"),
    (EIGEN_BASE + ["--num_inference_steps", "5000"], 2, "at most 1000"),
    (EIGEN_BASE + ["--num_inference_steps", "0"], 2, "--num_inference_steps"),
    (EIGEN_BASE + ["--k", "0"], 2, "--k"),
    (EIGEN_BASE + ["--krylov_dim", "10000000"], 2, "at most"),
    (EIGEN_BASE + ["--dense_max", "1000000000"], 2, "at most"),
    (EIGEN_BASE + ["--device", "foo"], 2, "expected cpu, cuda"),
    (EIGEN_BASE + ["--device", "meta"], 2, "expected cpu, cuda"),
    (EIGEN_BASE + ["--gen_seed", BIG], 2, "2^63"),
    (EIGEN_BASE + ["--start_seed", "-3"], 2, "--start_seed"),
    (EIGEN_BASE + ["--steps", "0,x"], 2, "--steps"),
    (EIGEN_BASE + ["--steps", "0,50"], 2, "--steps"),
    (EIGEN_BASE + ["--threads", "0"], 2, "--threads"),
    (EIGEN_BASE[:2] + ["--mem_path", "{w}/fifo", "--nmem_path", "{w}/p.txt"], 2, "not a regular file"),
    (EIGEN_BASE[:2] + ["--mem_path", "{w}/nonutf8.txt", "--nmem_path", "{w}/p.txt"], 2, "not UTF-8"),
    (EIGEN_BASE + ["--out_dir", "{w}/afile"], 2, "cannot write"),
    (EIGEN_BASE + ["--out_dir", "{w}/afile/sub"], 2, "cannot write"),
    (EIGEN_BASE + ["--out_dir", "{w}/eig_binary"], 2, "progress log"),
    (EIGEN_BASE + ["--out_dir", "{w}/eig_wrong"], 2, "integer 'index'"),
]


@pytest.fixture(scope="module")
def eigen_world(world):
    (world / "p.txt").write_text("a red rug\n")
    (world / "eig_binary").mkdir()
    (world / "eig_binary" / "eigenvalues.progress.jsonl").write_bytes(b"\x00\xff" * 100)
    (world / "eig_wrong").mkdir()
    (world / "eig_wrong" / "eigenvalues.progress.jsonl").write_text('{"header": {}}\n{"index": [1]}\n{"index": 2}\n')
    return world


@pytest.mark.parametrize("argv,code,fragment", EIGEN_ROWS, ids=lambda v: None)
def test_eigen_analysis_bad_inputs(eigen_world, argv, code, fragment):
    check_row(EIGEN, argv, code, fragment, eigen_world)


# ------------------------------------------------------------------------------------------- examples/toy_2d.py

TOY = "examples/toy_2d.py"
TOY_ROWS = [
    (["--mem_ratio", "1"], 2, "--mem_ratio"),
    (["--mem_ratio", "nan"], 2, "finite"),
    (["--mem_std", "0"], 2, "--mem_std"),
    (["--num_data", "1"], 2, "--num_data"),
    (["--num_data", "1" + "0" * 30], 2, "at most"),
    (["--ddim_steps", "5000"], 2, "at most 1000"),
    (["--lr", "inf"], 2, "finite"),
    (["--low_noise_fraction", "2"], 2, "[0, 1]"),
    (["--second_order_weight", "-1"], 2, "--second_order_weight"),
    (["--seed", BIG], 2, "2^63"),
    (["--trace_steps", "5,x"], 2, "--trace_steps"),
    (["--trace_steps", "5,1000"], 2, "--trace_steps"),
    (["--threads", "100000"], 2, "at most"),
    (["--out_dir", "{w}/afile"], 2, "cannot write"),
    (["--out_dir", "{w}/afile/sub"], 2, "cannot write"),
]


@pytest.mark.parametrize("argv,code,fragment", TOY_ROWS, ids=lambda v: None)
def test_toy_2d_bad_inputs(world, argv, code, fragment):
    check_row(TOY, argv, code, fragment, world)


# ------------------------------------------------------------------------------ detect_mem.py and detect_eval.py

DETECT = "detect_mem"
DETECT_BASE = ["--model_id", "tiny", "--data_path", "{w}/det/p.txt", "--device", "cpu", "--gen_num", "1"]
DETECT_ROWS = [
    (DETECT_BASE + ["--hvp_sampling_num", "51"], 2, "exceeds the 50 sampling steps"),
    (DETECT_BASE + ["--wen_steps", "51", "--metrics", "wen"], 2, "exceeds the 50 sampling steps"),
    (DETECT_BASE + ["--gen_seed", BIG], 2, "2^63"),
    (DETECT_BASE + ["--gen_seed", "-1"], 2, "--gen_seed"),
    (DETECT_BASE + ["--device", "foo"], 2, "expected cpu, cuda"),
    (DETECT_BASE + ["--device", "meta"], 2, "expected cpu, cuda"),
    (DETECT_BASE + ["--gen_num", "0"], 2, "--gen_num"),
    (DETECT_BASE + ["--gen_num", "10000000"], 2, "at most"),
    (DETECT_BASE + ["--batch_size", "0"], 2, "--batch_size"),
    (DETECT_BASE + ["--metrics", "sharpness,nope"], 2, "--metrics"),
    (DETECT_BASE + ["--metrics", "tiled_l2"], 2, "at least 2"),
    (DETECT_BASE + ["--metrics", "anisotropy", "--aniso_weights", "1,nan"], 2, "two finite numbers"),
    (DETECT_BASE + ["--sd_ver", "3"], 2, "--sd_ver"),
    (DETECT_BASE[:2] + ["--data_path", "{w}/fifo", "--device", "cpu"], 2, "not a regular file"),
    (DETECT_BASE[:2] + ["--data_path", "{w}/nonutf8.txt", "--device", "cpu"], 2, "not UTF-8"),
    (DETECT_BASE + ["--out_dir", "{w}/afile"], 2, "cannot write"),
    (DETECT_BASE + ["--out_dir", "{w}/afile/sub"], 2, "cannot write"),
    (DETECT_BASE + ["--out_dir", "{w}/det/binary_log"], 2, "progress log"),
    (DETECT_BASE + ["--out_dir", "{w}/det/o", "--metrics", "le", "--le_layer", "99"], 2, "no cross-attention layer"),
]


@pytest.fixture(scope="module")
def detect_world(world):
    import torch
    det = world / "det"
    (det / "binary_log").mkdir(parents=True)
    (det / "p.txt").write_text("a red rug\n")
    (det / "binary_log" / "p_gen1.progress.jsonl").write_bytes(b"\x00\xff" * 100)
    torch.save(torch.tensor([[1.0], [2.0]]), det / "a_mem_gen1.pt")
    torch.save(torch.tensor([[0.5, 1.0, 2.0], [1.0, 1.0, 1.0]]), det / "a_nmem_gen1.pt")
    torch.save(torch.tensor([[1.0], [2.0]]).to_sparse(), det / "sparse.pt")
    torch.save({"not": "a tensor"}, det / "dict.pt")
    (det / "nopairs").mkdir()
    return world


@pytest.mark.parametrize("argv,code,fragment", DETECT_ROWS, ids=lambda v: None)
def test_detect_mem_bad_inputs(detect_world, argv, code, fragment):
    check_row(DETECT, argv, code, fragment, detect_world, allowed=("det/o",))


DETECT_EVAL = "detect_eval"
D = "{w}/det/"
DETECT_EVAL_ROWS = [
    (["--mem", D + "a_mem_gen1.pt", "--nmem", D + "a_nmem_gen1.pt"], 2, "not comparable"),
    (["--mem", D + "a_mem_gen1.pt", "--nmem", D + "a_nmem_gen1.pt", "--steps", "2"], 2, "--steps asks for step 2"),
    (["--mem", D + "a_mem_gen1.pt", "--nmem", D + "a_nmem_gen1.pt", "--steps", "0"], 2, "--steps"),
    (["--mem", D + "a_mem_gen1.pt", "--nmem", D + "a_mem_gen1.pt", "--out", D + "a_mem_gen1.pt"], 2,
     "never replaces an input"),
    (["--mem", D + "sparse.pt", "--nmem", D + "a_mem_gen1.pt"], 2, "[prompts, steps] tensor"),
    (["--mem", D + "dict.pt", "--nmem", D + "a_mem_gen1.pt"], 2, "[prompts, steps] tensor"),
    (["--mem", "{w}/fifo", "--nmem", D + "a_mem_gen1.pt"], 2, "regular file"),
    (["--mem", D + "missing.pt", "--nmem", D + "a_mem_gen1.pt"], 2, "run detect_mem.py first"),
    (["--mem", "{w}/afile", "--nmem", D + "a_mem_gen1.pt"], 2, "not a detect_mem.py result"),
    (["--table", "{w}/afile"], 2, "not a folder"),
    (["--table", D + "nopairs"], 2, "no pair"),
    (["--table", D, "--table_steps", "x"], 2, "--table_steps"),
]


@pytest.mark.parametrize("argv,code,fragment", DETECT_EVAL_ROWS, ids=lambda v: None)
def test_detect_eval_bad_inputs(detect_world, argv, code, fragment):
    check_row(DETECT_EVAL, argv, code, fragment, detect_world)


# ------------------------------------------------------------------------------------------ mitigate_mem.py

MITI = "mitigate_mem"
MITI_BASE = ["--model_id", "tiny", "--data_path", "{w}/det/p.txt", "--device", "cpu", "--gen_num", "1",
             "--out_dir", "{w}/miti_out"]
MITI_ROWS = [
    (MITI_BASE + ["--prompt_type", "../../escape"], 2, "plain"),
    (MITI_BASE + ["--prompt_type", "/abs"], 2, "plain"),
    (MITI_BASE + ["--prompt_type", ""], 2, "--prompt_type"),
    (MITI_BASE + ["--method", "nope"], 2, "--method"),
    (MITI_BASE + ["--gen_seed", BIG], 2, "2^63"),
    (MITI_BASE + ["--miti_thres", "nan"], 2, "finite"),
    (MITI_BASE + ["--guidance_scale", "nan"], 2, "finite"),
    (MITI_BASE + ["--method", "cfg_delay", "--guidance_scale", "3"], 2, "--cfg_w_post"),
    (MITI_BASE + ["--method", "han_batch", "--author_settings", "--guidance_scale", "3"], 2, "one of --guidance_scale"),
    (MITI_BASE + ["--miti_lr", "0"], 2, "--miti_lr"),
    (MITI_BASE + ["--miti_alpha", "-1"], 2, "--miti_alpha"),
    (MITI_BASE + ["--device", "meta"], 2, "expected cpu, cuda"),
    (MITI_BASE + ["--method", "rna", "--grid", "1.5"], 2, "not a valid count"),
    (MITI_BASE + ["--method", "ren", "--grid", "inf"], 2, "not a valid factor"),
    (MITI_BASE + ["--method", "sail", "--flag_threshold", "1"], 2, "--flagged_by"),
    (MITI_BASE[:2] + ["--data_path", "{w}/fifo", "--device", "cpu"], 2, "not a regular file"),
    (MITI_BASE[:-1] + ["{w}/afile"], 2, "cannot write"),
    (MITI_BASE[:-1] + ["{w}/afile/sub"], 2, "cannot write"),
]


@pytest.mark.parametrize("argv,code,fragment", MITI_ROWS, ids=lambda v: None)
def test_mitigate_mem_bad_inputs(detect_world, argv, code, fragment):
    check_row(MITI, argv, code, fragment, detect_world, allowed=("miti_out",))


# -------------------------------------------------------------------------------- the shared guard and writers

def test_guard_turns_allocation_failures_into_one_line_and_keeps_bugs(capsys):
    from utils.cli import guarded

    def failing(exc):
        @guarded(memory_hint="use a smaller --batch_size")
        def main():
            raise exc
        return main

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: not enough memory: you tried to "
                       "allocate 80000000000 bytes.")
    for exc in (cpu, MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                OSError(errno.ENOMEM, "Cannot allocate memory")):
        with pytest.raises(SystemExit) as e:
            failing(exc)()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: out of memory") and "--batch_size" in err
    for bug in (RuntimeError("shape mismatch"), KeyError("x"), OSError(errno.EBADF, "Bad file descriptor")):
        with pytest.raises(type(bug)):
            failing(bug)()


def test_a_full_disk_is_one_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    from utils.cli import UserError
    from utils.io import atomic_write_json

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="No space left on device"):
        atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert os.listdir(tmp_path) == []


def test_a_second_live_run_in_the_same_folder_is_refused(tmp_path):
    """ProgressLog holds a lock for the run's lifetime: a second process is refused at once; once the first
    ends (even by SIGKILL, which leaves the lock file) the folder is usable again."""
    from utils.cli import UserError
    from utils.io import ProgressLog
    log = tmp_path / "run.progress.jsonl"
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from utils.io import ProgressLog\n"
            "log = ProgressLog(sys.argv[1], {'seed': 1}); print('ready', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(log), ROOT], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(UserError, match=f"another run \\(pid {p.pid}\\)"):
            ProgressLog(log, {"seed": 1})
    finally:
        p.kill()
        p.wait()
    with ProgressLog(log, {"seed": 1}) as again:
        again.add({"index": 0})
    assert not os.path.exists(str(log) + ".lock")  # released and removed


@pytest.mark.parametrize("name", ["", " ", ".", "..", "../x", "a/b", "/abs", "a\\b", "x\n", "t\x00", "\x7f",
                                  "y" * 256])
def test_names_that_become_paths_are_plain_components(name, tmp_path):
    from utils.cli import UserError
    from utils.io import safe_component, safe_join
    with pytest.raises(UserError, match="--prompt_type"):
        safe_join(str(tmp_path), "sd1", name, what="--prompt_type")
    with pytest.raises(UserError):
        safe_component(name)


def test_plain_names_pass_and_stay_under_the_folder(tmp_path):
    from utils.io import safe_join
    for name in ("mem", "mem_nomiti", "sd1", "a.b-c", "ünï cödé", "..x", "x.."):
        path = safe_join(str(tmp_path), "sd1", name)
        assert os.path.dirname(os.path.dirname(path)) == str(tmp_path)


def test_check_outputs_sees_links_and_folders(tmp_path):
    from utils.cli import UserError
    from utils.io import check_outputs
    (tmp_path / "in.pt").write_text("scores")
    os.link(tmp_path / "in.pt", tmp_path / "hard.pt")
    os.symlink(tmp_path / "in.pt", tmp_path / "soft.pt")
    (tmp_path / "gt").mkdir()
    for out in ("in.pt", "hard.pt", "soft.pt", "./x/../in.pt", "gt/r.json"):
        with pytest.raises(UserError, match="--out"):
            check_outputs({"--out": str(tmp_path / out)}, {"--mem": str(tmp_path / "in.pt"), "--gt": tmp_path / "gt",
                                                            "--nmem": None})
    with pytest.raises(UserError, match="lies inside --out_dir"):
        check_outputs({"--out_dir": str(tmp_path)}, [("--mem", str(tmp_path / "in.pt"))])
    check_outputs({"--out": str(tmp_path / "r.json")}, {"--mem": str(tmp_path / "in.pt"), "--gt": tmp_path / "gt"})


def test_prompt_lines_split_on_newlines_only(tmp_path, capsys):
    from utils.prompts import read_prompt_lines, read_prompts
    f = tmp_path / "p.txt"
    f.write_text("one\u2028still one\r\n\ntwo\u2029x\x0bx\x85y\n", encoding="utf-8")
    assert read_prompts(f) == ["one\u2028still one", "two\u2029x\x0bx\x85y"]
    assert read_prompt_lines(f) == [(1, "one\u2028still one"), (3, "two\u2029x\x0bx\x85y")]
    assert "(line 2)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- downloads bounded in time

def _trickle_server():
    """A loopback server whose answers never end: /body sends one body byte every 0.5 s, /headers one header
    byte every 0.5 s. Returns (base URL, server)."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            try:
                if self.path.startswith("/headers"):
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                for _ in range(240):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}", srv


@pytest.fixture()
def trickle():
    base, srv = _trickle_server()
    yield base
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("path", ["/body", "/headers"])
def test_total_timeout_bounds_a_trickling_server(trickle, path):
    from utils.evaluation.fetch import Fetcher, FetchError
    f = Fetcher(timeout=15, retries=3, backoff=0.1, total_timeout=2)
    t = time.monotonic()
    with pytest.raises(FetchError) as e:
        f.get(trickle + path)
    took = time.monotonic() - t
    assert e.value.status == "timeout" and 1.9 < took < 3.5, took


@pytest.fixture()
def tls_trickle():
    """A loopback TCP server that answers a TLS client with one handshake byte every 0.5 s; yields its https URL."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(b"\x16\x03\x03\x40\x00")  # a TLS record header announcing 16 KiB
                    while not stop.wait(0.5):
                        conn.send(b"\x02")
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    yield f"https://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    srv.close()


def test_total_timeout_bounds_a_trickled_tls_handshake_and_cancel_is_immediate(tls_trickle):
    from utils.evaluation.fetch import Fetcher, FetchError
    f = Fetcher(timeout=15, retries=3, backoff=0.1, total_timeout=2)
    t = time.monotonic()
    with pytest.raises(FetchError) as e:
        f.get(tls_trickle + "/x")
    assert e.value.status == "timeout" and time.monotonic() - t < 3.5
    f = Fetcher(timeout=15, total_timeout=100)
    threading.Timer(0.5, f.cancel).start()
    t = time.monotonic()
    with pytest.raises(FetchError) as e:
        f.get(tls_trickle + "/x")
    assert e.value.status == "pending" and time.monotonic() - t < 2


def _sigint_default():
    """In the child before exec: SIGINT back to its default disposition. A suite started where SIGINT is ignored
    (a background job of a shell without job control, nohup) passes SIG_IGN on to its children, and Python then
    installs no KeyboardInterrupt handler: the signal below would be dropped and the fetch would run to its
    --total_timeout. Ctrl-C in a terminal always reaches a process whose SIGINT is at its default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_ends_fetch_at_once_with_the_manifest_saved(trickle, tmp_path):
    recs = [{"caption": f"c{i}", "index": i, "url": f"{trickle}/body/{i}"} for i in range(6)]
    _jsonl(tmp_path / "r.jsonl", recs)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "mitigate_eval.py"), "fetch", "--jsonl",
                          str(tmp_path / "r.jsonl"), "--out", str(out), "--workers", "2", "--timeout", "60",
                          "--total_timeout", "100"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_sigint_default)
    try:
        deadline = time.monotonic() + 60
        while not (out / "fetch_manifest.csv").exists():  # the run has started its downloads
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() else "slow start"
            time.sleep(0.1)
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=20)  # the downloads themselves would run for --total_timeout 100 s
    finally:
        if p.poll() is None:
            p.kill()
    err = p.stderr.read()
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    # Ended by the cancellation, not by a deadline: no row timed out. No wall-clock threshold on the exit (a
    # loaded machine's interpreter exit once took 3.03 s against the former 3 s limit).
    from utils.evaluation.fetch_manifest import read_manifest
    rows = read_manifest(str(out / "fetch_manifest.csv"))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"pending"}, rows


def test_loopback_only():
    """The corpus never leaves the machine: every URL above is 127.0.0.1."""
    src = open(__file__, encoding="utf-8").read()
    hosts = {h for h in re.findall(r"https?://([^/:\"'{ ]+)", src)}
    assert hosts == {"127.0.0.1"}, hosts
    assert socket.gethostbyname("127.0.0.1") == "127.0.0.1"


# ------------------------------------------------------------- round 3 (issue 26): one way in for files read back

def _sidecar(**over):
    side = dict(metric=dict(name="sharpness", direction="higher", settings={}, stem="a_mem", gen_num=1),
                prompts=["p0", "p1"], shape=[2, 1], values=[[1.0], [float("nan")]], model_id="tiny",
                identity={"seed": 0}, arguments={})
    side.update(over)
    return side


@pytest.mark.parametrize("edit,fragment", [
    (dict(prompts="p0"), "prompts: Input should be a valid list"),
    (dict(metric=dict(name="sharpness", direction="sideways")), "metric.direction"),
    (dict(metric=dict(direction="higher")), "metric.name: Field required"),
    (dict(values=[["1.0"], [2.0]]), "values.0.0"),
    (dict(identity=[1, 2]), "identity"),
])
def test_class5_a_hand_edited_sidecar_is_one_error_naming_the_field(tmp_path, edit, fragment):
    """Class 5: wrong types in a sidecar are one UserError naming the field, in the reader and in the table."""
    import torch
    from utils.cli import UserError
    from utils.results import read_detection_result
    torch.save(torch.tensor([[1.0], [2.0]]), tmp_path / "a_mem_gen1.pt")
    (tmp_path / "a_mem_gen1.json").write_text(json.dumps(_sidecar(**edit)))
    with pytest.raises(UserError, match=re.escape(fragment)):
        read_detection_result(str(tmp_path / "a_mem_gen1.pt"))
    err = check_row(DETECT_EVAL, ["--table", str(tmp_path)], 2, fragment, tmp_path)
    assert "damaged or was edited by hand" in err


def test_class4_fifo_device_link_and_size_are_refused_without_reading(tmp_path):
    """Class 4 (and 3): a FIFO or a link to /dev/zero in place of a JSON file read back is refused at once,
    a link out of the folder is never followed, and the size is capped."""
    from utils.cli import UserError
    from utils.io import read_json_file
    from utils.schemas import ScoreResult
    os.mkfifo(tmp_path / "fifo.json")
    os.symlink("/dev/zero", tmp_path / "zero.json")
    os.symlink(os.path.join(ROOT, "paper", "table1.json"), tmp_path / "out.json")
    (tmp_path / "big.json").write_text("[" + "0," * 600 + "0]")
    (tmp_path / "real.json").write_text("{}")
    os.symlink("real.json", tmp_path / "inside.json")  # a link inside its folder is fine
    with time_limit(20):
        with pytest.raises(UserError, match="not a regular file"):
            read_json_file(str(tmp_path / "fifo.json"))
        for name in ("zero.json", "out.json"):
            with pytest.raises(UserError, match="outside its folder"):
                read_json_file(str(tmp_path / name))
        with pytest.raises(UserError, match="larger than 1000 bytes"):
            read_json_file(str(tmp_path / "big.json"), max_bytes=1000)
        assert read_json_file(str(tmp_path / "inside.json")) == {}
        with pytest.raises(UserError, match="similarity: Field required"):
            read_json_file(str(tmp_path / "inside.json"), "score result", ScoreResult)


def test_class5_a_record_with_no_values_is_refused_on_read_and_never_written(tmp_path):
    """Class 5: a detect_mem.py progress record without values (or ragged, or of wrong types) is an error when the
    log is read back, and ProgressLog.add refuses to save one."""
    from utils.cli import UserError
    from utils.io import ProgressLog, read_run_log
    from utils.schemas import DetectionRecord
    good = dict(index=0, prompt="p", per_generation=[[1.0, 2.0]], seconds=1.0, unet_forwards=2, jvps=1)
    log = tmp_path / "run.progress.jsonl"
    with ProgressLog(log, {"seed": 1}, fields=DetectionRecord) as p:
        p.add(good)
        for bad in (dict(good, index=1, per_generation=[]), dict(good, index=1, per_generation=[[]]),
                    dict(good, index=1, per_generation=[[1.0], [1.0, 2.0]]), dict(good, index=1, seconds="1")):
            with pytest.raises(UserError):
                p.add(bad)
    assert len(read_run_log(str(log), fields=DetectionRecord)[1]) == 1
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(good, index=1, per_generation=[])) + "\n" + json.dumps(dict(good, index=2)) + "\n")
    with pytest.raises(UserError, match="line 3 .*per_generation"):
        read_run_log(str(log), "progress log", fields=DetectionRecord)


# ---------------------------------------------------------- round 3 (issue 26): one way out, results name no path

def test_class1_links_in_place_of_a_lock_log_or_folder_are_never_followed(tmp_path):
    """Class 1: a lock file or progress log that is a symbolic link (dangling or not), and a link below the output
    folder, are refused: the target elsewhere is neither truncated nor created."""
    from utils.cli import UserError
    from utils.io import ProgressLog, prepare_dir
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(elsewhere / "precious", out / "a.progress.jsonl.lock")
    with pytest.raises(UserError, match="lock file .* is a symbolic link"):
        ProgressLog(out / "a.progress.jsonl", {"seed": 1})
    os.symlink(elsewhere / "new.jsonl", out / "b.progress.jsonl")  # dangling
    with pytest.raises(UserError, match="progress log .* is a symbolic link"):
        ProgressLog(out / "b.progress.jsonl", {"seed": 1})
    os.symlink(elsewhere, out / "label")
    with pytest.raises(UserError, match="is a symbolic link"):
        prepare_dir(str(out / "label" / "mem"), inside=str(out))
    assert sorted(os.listdir(elsewhere)) == ["precious"] and (elsewhere / "precious").read_text() == "keep me"
    assert not os.path.exists(out / "b.progress.jsonl.lock")  # released


@pytest.fixture(scope="module")
def scored(world, tmp_path_factory):
    """A copy of the world's generation folder, scored (pixel) into gen/eval_pixel.json."""
    import shutil
    s = tmp_path_factory.mktemp("scored")
    shutil.copytree(world / "gen", s / "gen")
    _jsonl(s / "gen" / "manifest.jsonl", [{"header": {"method": "none", "settings": {}}},
                                          {"index": 0, "prompt": "Red Rug", "images": ["0_0.png"]},
                                          {"index": 1, "prompt": "Blue Rug", "images": ["1_0.png"]}])
    assert run_script("mitigate_eval", ["score", "--images", str(s / "gen"), "--gt", str(world / "gt"),
                                        "--similarity", "pixel", "--clip_model", "none"])[0] == 0
    return s


@pytest.mark.parametrize("prefix,fragment", [("{s}/gen/0_0", "a result's folder"), ("{s}/gen/eval_pixel", "a result"),
                                             ("{w}/gt/fetch_manifest", "--gt")])
def test_class2_plot_out_never_replaces_an_input(world, scored, prefix, fragment):
    """Class 2: plot --out may not name a generated image, the score CSV, or anything in the training folder."""
    check_row("mitigate_eval", ["plot", str(scored / "gen" / "eval_pixel.json"), "--y", "not_blank", "--gt",
                                str(world / "gt"), "--out", prefix.format(s=scored, w=world)], 2, fragment, world)


def test_class3_a_score_result_cannot_lead_to_another_runs_manifest(world, scored, tmp_path):
    """Class 3: the 'manifest' field of a score result is data: pointing it at another run's manifest is refused
    (its header is not the one scored), so the plot never reads that run's records or images."""
    res = json.loads((scored / "gen" / "eval_pixel.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    _jsonl(other / "manifest.jsonl", [{"header": {"sd_ver": "other"}}, {"index": 0, "prompt": "x", "images": []}])
    res["manifest"] = str(other / "manifest.jsonl")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "eval_pixel.json").write_text(json.dumps(res))
    check_row("mitigate_eval", ["plot", str(tmp_path / "r" / "eval_pixel.json"), "--y", "not_blank", "--out",
                                str(tmp_path / "fig")], 2, "not the run it scored", world)
    assert not os.path.exists(tmp_path / "fig.png")


# ------------------------------------------------------ round 3 (issue 26): results carry their identity (class 6)

def _result(folder, stem, metric="sharpness", n=1, values=((1.0,), (2.0,)), **ident):
    """A detect_mem.py result written by its one writer, with identity fields overridden by ident."""
    import torch
    from utils.detection.records import output_base
    from utils.results import write_detection_result
    base = output_base(str(folder), stem, metric, n)
    identity = dict(dict(model_id="tiny", gen_num=n, gen_seed=0, dtype="torch.float32", device="cpu",
                         data_sha256=stem), **ident)
    t = torch.tensor(values, dtype=torch.float32)
    write_detection_result(base, t, {}, metric=dict(name=metric, direction="higher", settings={}, stem=stem,
                                                    gen_num=n),
                           prompts=[f"p{i}" for i in range(len(values))], per_generation=[], extras=[],
                           model_id="tiny", prediction_type="epsilon", identity=identity, cost={})
    return base


def test_class6_pair_mode_and_table_refuse_results_of_other_settings(tmp_path):
    a = _result(tmp_path, "a_mem")
    b = _result(tmp_path, "a_nmem", values=((0.0,), (0.5,)), gen_seed=7)
    err = check_row(DETECT_EVAL, ["--mem", a + ".pt", "--nmem", b + ".pt", "--no_plot"], 2, "gen_seed 0 vs 7",
                    tmp_path)
    assert "--allow_mixed" in err
    check_row(DETECT_EVAL, ["--mem", a + ".pt", "--nmem", b + ".pt", "--no_plot", "--allow_mixed"], 0, "",
              tmp_path, allowed=("a_mem_gen1_vs_a_nmem_gen1.eval.json",))
    check_row(DETECT_EVAL, ["--table", str(tmp_path)], 2, "gen_seed 0 vs 7", tmp_path)


@pytest.mark.parametrize("case,fragment", [("stem", "do not match its file name"), ("dup", "do not match its file"),
                                           ("shape", "its sidecar says"), ("complex", "complex tensor")])
def test_class6_the_table_checks_names_shapes_and_claims(tmp_path, case, fragment):
    import torch
    a = _result(tmp_path, "a_mem")
    _result(tmp_path, "a_nmem", values=((0.0,), (0.5,)))
    side = json.loads(open(a + ".json").read())
    if case == "stem":  # a stem from a sidecar would name the table's output: ../x escapes
        side["metric"]["stem"] = "../x_mem"
        open(a + ".json", "w").write(json.dumps(side))
    elif case == "dup":  # a second file claiming the same (set, metric, n): refused by the name rule
        import shutil
        shutil.copy(a + ".pt", tmp_path / "a_mem_sharpness_gen1.pt")
        side["metric"]["name"] = "sharpness"
        shutil.copy(a + ".json", tmp_path / "a_mem_sharpness_gen1.json")
        side = json.loads(open(tmp_path / "a_mem_sharpness_gen1.json").read())
        side["metric"]["stem"] = "a_mem"
        (tmp_path / "a_mem_sharpness_gen1.json").write_text(json.dumps(side))
    elif case == "shape":
        torch.save(torch.ones(2, 3), a + ".pt")
    else:
        torch.save(torch.ones(2, 1, dtype=torch.complex64), a + ".pt")
    check_row(DETECT_EVAL, ["--table", str(tmp_path)], 2, fragment, tmp_path)


def test_class6_plot_refuses_runs_of_other_seeds(world, scored, tmp_path):
    for name, seed in (("r1", 0), ("r2", 1)):
        res = json.loads((scored / "gen" / "eval_pixel.json").read_text())
        res["generation_header"] = dict(res["generation_header"], gen_seed=seed)
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval_pixel.json").write_text(json.dumps(res))
    check_row("mitigate_eval", ["plot", str(tmp_path / "r1"), str(tmp_path / "r2"), "--y", "not_blank", "--out",
                                str(tmp_path / "fig")], 2, "gen_seed 0 in", world)


def test_class6_score_refuses_a_generation_that_is_still_running(world, tmp_path):
    import shutil
    shutil.copytree(world / "gen", tmp_path / "gen")
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from utils.io import RunLock\n"
            "lock = RunLock(sys.argv[1]); print('ready', flush=True); sys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "gen" / "manifest.jsonl.lock"), ROOT],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        check_row("mitigate_eval", ["score", "--images", str(tmp_path / "gen"), "--gt", str(world / "gt"),
                                    "--similarity", "pixel", "--clip_model", "none"], 2, "still running", tmp_path)
    finally:
        p.kill()
        p.wait()


@pytest.mark.slow
def test_class6_score_refuses_a_killed_generation_until_it_is_finished(world, tmp_path):
    """Class 6 (slow: a real run killed in a subprocess; the "killed" row below is the state it leaves, fast): a
    generation killed midway (SIGKILL right after its first prompt's record: the manifest holds 1 of
    its 2 prompts and the lock file stays, held by no process) is one error line naming what is missing and how to
    finish it; --allow_incomplete scores the part with a warning; rerunning the command finishes it, then it scores."""
    (tmp_path / "p.txt").write_text("Red Rug\nBlue Rug\n")
    argv = ["--model_id", "tiny", "--data_path", str(tmp_path / "p.txt"), "--device", "cpu", "--gen_num", "1",
            "--method", "none", "--num_inference_steps", "2", "--out_dir", str(tmp_path / "out")]
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); from utils import io\n"
            "add = io.ProgressLog.add\n"
            "def killed(self, record):\n    add(self, record)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            "io.ProgressLog.add = killed\nimport mitigate_mem; mitigate_mem.main(sys.argv[2:])\n")
    p = subprocess.run([sys.executable, "-c", code, ROOT, *argv], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    (manifest,) = (tmp_path / "out").rglob("manifest.jsonl")
    assert len(manifest.read_text().splitlines()) == 2 and manifest.with_name("manifest.jsonl.lock").exists()
    score = ["score", "--images", str(manifest.parent), "--gt", str(world / "gt"), "--similarity", "pixel",
             "--clip_model", "none"]
    err = check_row("mitigate_eval", score, 2, "incomplete: 1 of its 2 prompts have no images yet", tmp_path)
    assert "(prompt index 1)" in err and "manifest.jsonl.lock is left behind" in err
    assert "rerun the generation command to finish it" in err
    got, err = run_script("mitigate_eval", score + ["--allow_incomplete"])
    assert got == 0 and "scoring an incomplete generation" in err
    assert len(json.loads((manifest.parent / "eval_pixel.json").read_text())["per_prompt"]) == 1
    assert run_script("mitigate_mem", argv)[0] == 0  # the same command resumes and finishes the run
    assert run_script("mitigate_eval", score)[0] == 0
    assert len(json.loads((manifest.parent / "eval_pixel.json").read_text())["per_prompt"]) == 2


def _edited_generation(world, w, header, records, run_info=None, name="manifest.jsonl"):
    """A copy of the world's generation folder with this manifest (as `name`), run.json, and for a name ending in
    '+lock' the lock file a killed run leaves (its dead pid in it, held by no process)."""
    import shutil
    shutil.copytree(world / "gen", w / "gen")
    (w / "gen" / "manifest.jsonl").unlink()
    name, lock = name.split("+")[0], name.endswith("+lock")
    _jsonl(w / "gen" / name, [{"header": header}, *records])
    if lock:
        (w / "gen" / (name + ".lock")).write_text("999999999")
    if run_info is not None:
        (w / "gen" / "run.json").write_text(json.dumps(run_info))
    return ["score", "--images", str(w / "gen"), "--gt", str(world / "gt"), "--similarity", "pixel",
            "--clip_model", "none"]


RED, BLUE = {"index": 0, "prompt": "Red Rug", "images": ["0_0.png"]}, {"index": 1, "prompt": "Blue Rug", "images": ["1_0.png"]}


@pytest.mark.parametrize("header,records,run_info,name,fragment", [
    ({"gen_num": 2}, [RED, BLUE], None, "manifest.jsonl", "2 prompt(s) have fewer than the 2 images per prompt"),
    ({"gen_num": 1}, [RED], {"identity": {"gen_num": 1}, "prompts": 3}, "manifest.jsonl", "2 of its 3 prompts"),
    ({"gen_num": 1}, [RED, BLUE], {"identity": {"gen_num": 5}, "prompts": 2}, "manifest.jsonl", "another run"),
    ({"gen_num": 1}, [RED, BLUE], {"identity": {"gen_num": 1}, "prompts": "2"}, "manifest.jsonl", "another run"),
    ({"gen_num": 1}, [RED], None, "manifest.0.jsonl", "per-process log(s) (manifest.0.jsonl"),
    ({"gen_num": 1}, [RED], {"identity": {"gen_num": 1}, "prompts": 2}, "manifest.jsonl+lock",
     "1 of its 2 prompts have no images yet (prompt index 1); its run stopped before it ended (manifest.jsonl.lock"),
    ({"gen_num": 1}, [RED, BLUE], None, "manifest.jsonl+lock", "manifest.jsonl.lock is left behind, held by no"),
], ids=["images", "prompts", "other_run", "bad_count", "shards", "killed", "killed_after_the_last"])
def test_class6_score_refuses_an_incomplete_generation(world, tmp_path, header, records, run_info, name, fragment):
    """Class 6: fewer images than the header's gen_num, fewer prompts than run.json's count, a run.json of another
    run or with a damaged count, a run under several processes that left only its per-process logs, and the state
    a killed run leaves (the slow test above makes it for real): one error line saying how to finish it."""
    score = _edited_generation(world, tmp_path, header, records, run_info, name)
    err = check_row("mitigate_eval", score, 2, fragment, tmp_path)
    assert ("rerun the generation command to finish it" in err) == (fragment != "another run")
    if "+lock" in name:  # --allow_incomplete scores the part, with a warning
        got, err = run_script("mitigate_eval", score + ["--allow_incomplete"])
        assert got == 0 and "scoring an incomplete generation" in err
        rows = json.loads((tmp_path / "gen" / "eval_pixel.json").read_text())["per_prompt"]
        assert [r["index"] for r in rows] == [r["index"] for r in records]


# --------------------------------------------------------------- round 3 (issue 26): validation before work (7)

def test_class7_non_finite_latents_are_an_error_and_never_an_image(detect_world, monkeypatch):
    """Class 7: a generation that overflows (here: NaN injected into the method's latents) stops with one line
    naming the method and setting; no image file is written."""
    from utils.mitigation import methods
    real = methods.run_plan
    monkeypatch.setattr(methods, "run_plan", lambda ctx, plan: real(ctx, plan) * float("nan"))
    argv = ["--model_id", "tiny", "--data_path", "{w}/det/p.txt", "--device", "cpu", "--gen_num", "1",
            "--out_dir", "{w}/nan_out", "--method", "none", "--num_inference_steps", "2"]
    check_row(MITI, argv, 2, "non-finite latents", detect_world, allowed=("nan_out",))
    assert not [f for _, _, fs in os.walk(detect_world / "nan_out") for f in fs if f.endswith(".png")]


# --------------------------------------------------------------------- round 3 (issue 26): run scripts (class 8)

def _fake(path, body):
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_class8_demo_side_by_side_stops_the_other_run_and_passes_on_exit_2(tmp_path):
    """Class 8: when one of the demo's two parallel runs fails (exit 2), the script stops the other at once and
    ends with 2. PYTHON is a stand-in: the memorized run waits, the non-memorized one fails."""
    py = _fake(tmp_path / "py", f'echo $$ >> {tmp_path}/pids; case "$*" in *demo_nmem*) exit 2 ;; '
                                f'*) exec sleep 120 ;; esac')
    p = subprocess.run(["bash", os.path.join(ROOT, "run_detection.sh"), "demo"], env=dict(os.environ, PYTHON=py),
                       capture_output=True, text=True, timeout=100)
    assert p.returncode == 2, p.stderr
    pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2
    _wait_gone(pids)  # the waiting run was stopped (TERM is delivered before the script's wait returns)


def _wait_gone(pids):
    """Fail (after killing it) if any of pids is still running 10 s later."""
    for pid in pids:
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"run {pid} was left running")


@pytest.mark.parametrize("fails,waits", [("wen", "sail"), ("sail", "wen")])
def test_class8_mitigation_demo_stops_the_other_run_and_passes_on_exit_2(tmp_path, fails, waits):
    """Class 8: run_mitigation.sh demo runs SAIL beside the other methods; when one side fails (exit 2) the
    script stops the other at once and ends with 2. PYTHON is a stand-in: every other call succeeds."""
    py = _fake(tmp_path / "py", f'case "$*" in *"--method {fails} "*) echo $$ >> {tmp_path}/pids; exit 2 ;; '
                                f'*"--method {waits} "*) echo $$ >> {tmp_path}/pids; exec sleep 120 ;; '
                                f'*"--method ren "*) echo ren >> {tmp_path}/after ;; esac; exit 0')
    p = subprocess.run(["bash", os.path.join(ROOT, "run_mitigation.sh"), "demo"], env=dict(os.environ, PYTHON=py),
                       capture_output=True, text=True, timeout=100)
    assert p.returncode == 2, p.stderr
    pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 2
    _wait_gone(pids)
    if fails == "wen":  # the other methods' loop ended at its failure: the methods after wen never started
        assert not (tmp_path / "after").exists()


def test_class8_num_processes_from_the_environment_reaches_the_launcher(tmp_path):
    """Class 8: NUM_PROCESSES=2 bash run_detection.sh demo launches through accelerate with 2 processes (a
    stand-in accelerate records its arguments and fails, which the script passes on)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake(bindir / "accelerate", f'echo "$*" >> {tmp_path}/calls; exit 2')
    py = _fake(tmp_path / "py", f'echo "$*" >> {tmp_path}/checks; exit 0')  # every --check_only passes
    p = subprocess.run(["bash", os.path.join(ROOT, "run_detection.sh"), "demo"], capture_output=True, text=True,
                       env=dict(os.environ, NUM_PROCESSES="2", PYTHON=py, PATH=f"{bindir}:{os.environ['PATH']}"),
                       timeout=100)
    assert p.returncode == 2, p.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls and all("--num_processes 2" in c and "detect_mem.py" in c for c in calls), calls
    checks = (tmp_path / "checks").read_text().splitlines()
    assert checks and all(c.startswith("detect_mem.py") and c.endswith(" --check_only") for c in checks)


def _launcher_run(tmp_path, script, mode, check_body, launcher_body):
    """NUM_PROCESSES=2 bash SCRIPT MODE with a stand-in PYTHON (check_body; it also answers the scripts' other
    python calls) and a stand-in accelerate (launcher_body): (process, the launcher's calls)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake(bindir / "accelerate", f'echo "$*" >> {tmp_path}/calls\n' + launcher_body)
    py = _fake(tmp_path / "py", check_body)
    p = subprocess.run(["bash", os.path.join(ROOT, script), *mode], capture_output=True, text=True, timeout=100,
                       env=dict(os.environ, NUM_PROCESSES="2", PYTHON=py, PATH=f"{bindir}:{os.environ['PATH']}"))
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return p, calls


@pytest.mark.parametrize("script,mode", [("run_detection.sh", []), ("run_mitigation.sh", ["demo"])])
def test_class8_bad_input_under_the_launcher_is_one_error_line_before_it_starts(tmp_path, script, mode):
    """Class 8: with NUM_PROCESSES>1 the run scripts check each command's arguments once in one process
    (--check_only) before the launcher: bad input is one error line and exit 2, and the launcher never starts."""
    p, calls = _launcher_run(tmp_path, script, mode, 'case "$*" in *--check_only*) echo "error: --gen_num: bad" >&2; '
                             'exit 2 ;; esac; exit 0', "exit 1")
    assert p.returncode == 2 and calls == [], (p.stderr, calls)
    assert [ln for ln in p.stderr.splitlines() if "error" in ln.lower()] == ["error: --gen_num: bad"]


@pytest.mark.parametrize("recorded,code", [(True, 2), (False, 1)])
def test_class8_the_code_a_launched_process_leaves_is_the_scripts(tmp_path, recorded, code):
    """Class 8: an error met only inside a shard: the launched processes end through utils/cli.py's error path,
    which leaves their code (2) in the folder the script names in MEMSHARP_EXIT_DIR; the script exits with it,
    not with the launcher's 1, and removes the folder. Without a recorded code (a crash) the launcher's code stands."""
    child = ("import sys; sys.path.insert(0, sys.argv[1]); from utils.cli import UserError, guarded\n"
             "guarded(lambda: (_ for _ in ()).throw(UserError('process 1 has local rank 1 but only 1 GPU')))()\n")
    body = (f'echo "$MEMSHARP_EXIT_DIR" > {tmp_path}/dir\n' + (
        f'for r in 0 1; do {sys.executable} -c "{child}" {ROOT}; done\n' if recorded else "") +
        'echo "torch.distributed.elastic.multiprocessing.errors.ChildFailedError" >&2; exit 1')
    p, calls = _launcher_run(tmp_path, "run_mitigation.sh", ["demo"], "exit 0", body)
    assert p.returncode == code and len(calls) == 1, (p.stderr, calls)
    assert p.stderr.count("error: process 1 has local rank 1") == (2 if recorded else 0)
    folder = pathlib.Path((tmp_path / "dir").read_text().strip())
    assert folder.name.startswith("run.") and not folder.parent.exists()  # the script's code folder is gone


def test_class8_check_only_checks_and_writes_nothing(detect_world, world, tmp_path):
    """--check_only on each launched script: 0 and nothing written for good arguments; one error line and 2 for
    bad ones (the same checks as a run)."""
    w = detect_world
    det = ["--model_id", "tiny", "--data_path", f"{w}/det/p.txt", "--device", "cpu", "--gen_num", "1",
           "--out_dir", f"{tmp_path}/o", "--check_only"]
    check_row("detect_mem", det, 0, "", tmp_path)
    check_row("detect_mem", det + ["--metrics", "curv_ds_theta"], 2, "--curv_theta", tmp_path)
    miti = ["--model_id", "tiny", "--data_path", f"{w}/det/p.txt", "--device", "cpu", "--gen_num", "1",
            "--out_dir", f"{tmp_path}/o", "--method", "rna", "--check_only"]
    check_row("mitigate_mem", miti, 0, "", tmp_path)
    check_row("mitigate_mem", miti + ["--grid", "1.5"], 2, "not a valid count", tmp_path)
    import shutil
    shutil.copytree(world / "gen", tmp_path / "gen")
    score = ["score", "--images", str(tmp_path / "gen"), "--gt", str(world / "gt"), "--similarity", "pixel",
             "--clip_model", "none", "--check_only"]
    check_row("mitigate_eval", score, 0, "", tmp_path)
    check_row("mitigate_eval", score + ["--out", str(tmp_path / "gen" / "0_0.png")], 2, "ending in .json", tmp_path)


@pytest.mark.slow
def test_class8_a_real_launcher_passes_the_code_folder_to_its_processes(tmp_path):
    """Class 8 (slow: a real `accelerate launch --multi_gpu --num_processes 2` on the CPU): each launched process
    that ends on bad input leaves its code 2 in MEMSHARP_EXIT_DIR, while accelerate itself exits with 1."""
    codes = tmp_path / "codes"
    codes.mkdir()
    p = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "mitigate_eval.py", "score", "--images",
                        str(tmp_path / "nonexistent"), "--gt", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, MEMSHARP_EXIT_DIR=str(codes)))
    assert p.returncode == 1
    got = [f.read_text() for f in codes.iterdir()]
    assert got and set(got) == {"2\n"} and all(f.name.endswith(".code") for f in codes.iterdir())


# ------------------------------------------------------- round 3 (issue 26): encodings (class 9)

def test_class9_a_lone_surrogate_in_a_caption_or_a_manifest_prompt_is_one_error(world, tmp_path):
    (tmp_path / "s.jsonl").write_text('{"caption": "a \\ud800 rug", "index": 1, "file": "x.png"}\n')
    check_row("mitigate_eval", ["fetch", "--jsonl", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "o")], 2,
              "line 1 holds a lone surrogate", tmp_path)
    import shutil
    shutil.copytree(world / "gen", tmp_path / "gen")
    (tmp_path / "gen" / "manifest.jsonl").write_text('{"header": {}}\n{"index": 0, "prompt": "Red \\udfff Rug", '
                                                     '"images": ["0_0.png"]}\n')
    check_row("mitigate_eval", ["score", "--images", str(tmp_path / "gen"), "--gt", str(world / "gt"),
                                "--similarity", "pixel", "--clip_model", "none"], 2, "line 2 holds a lone surrogate",
              tmp_path)


@pytest.mark.parametrize("case", ["file", "under_file", "dangling_link", "unwritable"])
def test_class9_a_torch_home_that_is_not_a_writable_folder_is_one_error(world, tmp_path, monkeypatch, case):
    """Class 9: score fetches the SSCD weights into $TORCH_HOME/hub/checkpoints; a TORCH_HOME that is a file, lies
    under one, is a dangling link or cannot be written is one line naming TORCH_HOME before any work, and nothing
    is created there."""
    home = tmp_path / "torch_home"
    if case == "file":
        home.write_text("x")
    elif case == "under_file":
        (tmp_path / "f").write_text("x")
        home = tmp_path / "f" / "torch_home"
    elif case == "dangling_link":
        home.symlink_to(tmp_path / "absent")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes through any permission bits")
        home.mkdir(mode=0o555)
    monkeypatch.setenv("TORCH_HOME", str(home))
    check_row("mitigate_eval", ["score", "--images", str(world / "gen"), "--gt", str(world / "gt"),
                                "--similarity", "sscd", "--clip_model", "none", "--out", str(tmp_path / "r.json")],
              2, "TORCH_HOME", tmp_path)


# ------------------------------------------- round 3 (issue 26): model folders of an unsupported kind (class 10)

@pytest.mark.parametrize("damage,fragment", [("no_unet", "no file named config.json"),
                                             ("weights", "Unable to load weights"),
                                             ("fifo_config", "config.json"),  # never a hang
                                             ("class", "supported families")])
def test_class10_a_damaged_or_foreign_model_folder_is_one_line(detect_world, tmp_path, damage, fragment):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(os.path.join(ROOT, "demo_model"), model)
    if damage == "no_unet":
        shutil.rmtree(model / "unet")
    elif damage == "weights":
        f = model / "unet" / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    elif damage == "fifo_config":
        os.remove(model / "unet" / "config.json")
        os.mkfifo(model / "unet" / "config.json")
    else:
        idx = json.loads((model / "model_index.json").read_text())
        (model / "model_index.json").write_text(json.dumps(dict(idx, _class_name="KandinskyPipeline")))
    with time_limit(120):
        check_row(DETECT, ["--model_id", str(model), "--data_path", "{w}/det/p.txt", "--device", "cpu", "--gen_num",
                           "1", "--metrics", "wen", "--out_dir", str(tmp_path / "o")], 2, fragment, detect_world)
