"""End to end: `mitigate_eval.py fetch` on local training images, then `score --similarity pixel --clip_model none`
on hand-made generated images with a hand-written manifest; exact expected numbers. SSCD weights fetched from a
loopback server with trust-on-first-use hashing; --clip_model demo."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mitigate_eval


def _save(arr, path):
    Image.fromarray(arr.astype(np.uint8)).save(path)


@pytest.fixture()
def setup(tmp_path):
    rng = np.random.default_rng(0)
    red = rng.integers(0, 256, size=(64, 64, 3))
    other = rng.integers(0, 256, size=(64, 64, 3))
    (tmp_path / "train").mkdir()
    _save(red, tmp_path / "train" / "red.png")
    _save(255 - red, tmp_path / "train" / "blue.png")  # pixel cosine with red: exactly -1
    _save(other, tmp_path / "train" / "oak.png")
    recs = [{"caption": "A Red Rug by Andover Mills", "index": 100, "file": "train/red.png"},
            {"caption": "Blue Rug by Andover Mills", "index": 101, "file": "train/blue.png"},
            {"caption": "Shaw Design Center / Oak", "index": 102, "file": "train/oak.png"},
            {"caption": "Lost image", "index": 103, "file": "train/lost.png"}]
    (tmp_path / "demo.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    gt = tmp_path / "gt"
    mitigate_eval.main(["fetch", "--jsonl", str(tmp_path / "demo.jsonl"), "--out", str(gt)])

    gen = tmp_path / "gen"
    gen.mkdir()
    _save(red, gen / "0_0.png")
    _save(255 - red, gen / "0_1.png")
    _save(other, gen / "1_0.png")
    _save(other, gen / "2_0.png")
    _save(other, gen / "3_0.png")
    _save(red, gen / "4_0.png")
    _save(red, gen / "stray.png")  # not in the manifest
    lines = [{"header": {"sd_ver": "demo", "seed": 0}},
             {"index": 0, "prompt": "a red rug by andover  mills", "images": ["0_0.png", "0_1.png"]},
             {"index": 1, "prompt": "Shaw Design Center Oak", "images": ["1_0.png"]},
             {"index": 2, "prompt": "Lost image", "images": ["2_0.png"]},
             {"index": 3, "prompt": "Never trained on", "images": ["3_0.png"]},
             {"index": 4, "prompt": "Blue Rug by Andover Mills", "images": ["4_0.png", "4_1.png"]}]
    (gen / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return tmp_path, gt, gen


def _score(gen, gt, out, *extra):
    mitigate_eval.main(["score", "--images", str(gen), "--gt", str(gt), "--similarity", "pixel",
                        "--clip_model", "none", "--out", str(out), *extra])
    return json.loads(out.read_text())


def test_score_pixel_end_to_end(setup, capsys):
    tmp, gt, gen = setup
    capsys.readouterr()
    res = _score(gen, gt, tmp / "plain.json")
    text = capsys.readouterr()
    rows = {r["index"]: r for r in res["per_prompt"]}
    assert rows[0]["similarity_per_image"] == pytest.approx([1.0, -1.0], abs=1e-12)
    assert rows[0]["similarity_mean"] == pytest.approx(0.0, abs=1e-12)
    assert rows[0]["similarity_max"] == pytest.approx(1.0, abs=1e-12)
    assert rows[1]["similarity_per_image"] == pytest.approx([1.0], abs=1e-12)  # caption had a '/'
    assert rows[4]["similarity_per_image"] == pytest.approx([-1.0], abs=1e-12)  # one image missing
    assert [rows[i]["status"] for i in range(5)] == ["ok", "ok", "no_ground_truth", "unmatched", "ok"]
    assert rows[0]["gt_indices"] == "100" and rows[4]["n_missing"] == 1
    s, c = res["summary"], res["counts"]
    assert s["mean_similarity"] == pytest.approx(0.0, abs=1e-12)  # prompts: 0, 1, -1
    assert s["frac_above_0.5"] == 0.5 and s["frac_above_0.7"] == 0.5  # images: 1, -1, 1, -1
    assert s["mean_clip"] is None and res["clip"] is None
    assert c == {"n_prompts": 5, "n_evaluated": 3, "n_skipped_no_gt": 2, "n_unmatched": 1, "n_no_images": 0,
                 "n_images": 6, "n_missing_images": 1, "n_extra_files": 1}
    assert res["similarity"]["name"] == "pixel cosine" and res["generation_header"]["sd_ver"] == "demo"
    assert res["unmatched_prompts"] == ["Never trained on"] and res["extra_files"] == ["stray.png"]
    assert "mean pixel cosine" in text.out and "pixel cosine > 0.5" in text.out
    assert "4_1.png" in text.err and "stray.png" in text.err and "Never trained on" in text.err
    with open(tmp / "plain.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table[0]["similarity_per_image"] == "1.000000;-1.000000" and table[3]["status"] == "unmatched"

    # The reference's SD v2.0 rule: 'mills' prompts are judged against every 'mills' training image (max).
    shared = _score(gen, gt, tmp / "shared.json", "--shared_gt_keywords", "mills")
    rows = {r["index"]: r for r in shared["per_prompt"]}
    assert rows[0]["similarity_per_image"] == pytest.approx([1.0, 1.0], abs=1e-12)
    assert rows[4]["similarity_per_image"] == pytest.approx([1.0], abs=1e-12)
    assert rows[0]["gt_indices"] == "100" and rows[0]["n_gt_images"] == 2
    assert shared["summary"]["mean_similarity"] == pytest.approx(1.0) and shared["summary"]["frac_above_0.7"] == 1

    capsys.readouterr()
    _score(gen, gt, tmp / "again.json", "--compare", str(tmp / "plain.json"), "--shared_gt_keywords", "paper")
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.strip().startswith("mean pixel cosine")][-1]
    assert line.split()[-3:] == ["1.0000", "0.0000", "+1.0000"]
    assert "3 prompts evaluated in both" in out


def test_score_bad_inputs_exit_2(setup, capsys):
    tmp, gt, gen = setup
    base = ["score", "--images", str(gen), "--gt", str(gt)]
    cases = [
        (base + ["--sscd", str(tmp / "none.pt"), "--clip_model", "none"], "sscd_disc_large.torchscript.pt"),
        (base + ["--similarity", "pixel", "--clip_model", "ViT-Q-99"], "unknown CLIP model"),
        (base + ["--similarity", "pixel", "--clip_model", "none", "--manifest", str(tmp / "x.jsonl")], "not found"),
        (["score", "--images", str(gen), "--gt", str(tmp / "nogt"), "--similarity", "pixel"], "run `mitigate_eval"),
        (base + ["--similarity", "pixel", "--clip_model", "none", "--compare", str(tmp / "demo.jsonl")],
         "not a results JSON"),
        (["fetch", "--jsonl", str(tmp / "absent.jsonl"), "--out", str(tmp / "o")], "not found"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            mitigate_eval.main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (argv, err)


# ------------------------------------------------------------------ SSCD weights: fetched once, checked by SHA-256

class _Descriptor(torch.nn.Module):
    """A TorchScript-able stand-in with SSCD's interface: images (B, 3, H, W) -> descriptors (B, 4)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x):
        return self.lin(x.mean(dim=(2, 3)))


@pytest.fixture()
def sscd_server(tmp_path, monkeypatch):
    """A loopback HTTP server (127.0.0.1 only) serving a small TorchScript file; yields (url, bytes, stop)."""
    import http.server
    import io
    import threading
    import warnings
    torch.manual_seed(0)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # TorchScript is deprecated in new torch, but it is SSCD's release format
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(_Descriptor()), buf)
    data = buf.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/sscd_disc_large.torchscript.pt"
    stopped = []

    def stop():
        if not stopped:
            server.shutdown()
            server.server_close()
            stopped.append(1)
    yield url, data, stop
    stop()


def test_sscd_fetch_trust_on_first_use_and_pinning(sscd_server, tmp_path):
    import hashlib

    from utils.cli import UserError
    from utils.models.clip import load_sscd, sscd_weights
    url, data, stop = sscd_server
    digest = hashlib.sha256(data).hexdigest()
    hub = tmp_path / "hub"
    with pytest.raises(UserError, match="pinned SHA-256"):  # a wrong pin keeps nothing
        sscd_weights(None, "0" * 64, url, hub_dir=str(hub))
    assert os.listdir(hub / "checkpoints") == []
    path = sscd_weights(None, None, url, hub_dir=str(hub))
    assert path == str(hub / "checkpoints" / "sscd_disc_large.torchscript.pt")
    assert open(path, "rb").read() == data and open(path + ".sha256").read().strip() == digest
    assert load_sscd(path)(torch.zeros(1, 3, 8, 8)).shape == (1, 4)
    stop()  # from now on offline: the cached, recorded file is used
    assert sscd_weights(None, None, url, hub_dir=str(hub)) == path
    assert sscd_weights(None, digest.upper(), url, hub_dir=str(hub)) == path
    with pytest.raises(UserError, match="pinned"):
        sscd_weights(None, "f" * 64, url, hub_dir=str(hub))
    with open(path, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(UserError, match="changed"):
        sscd_weights(None, None, url, hub_dir=str(hub))
    with pytest.raises(UserError, match="could not download"):  # nothing listens there any more
        sscd_weights(None, None, url, hub_dir=str(tmp_path / "other"))
    with pytest.raises(UserError, match="64 hexadecimal"):
        sscd_weights(path, "abc", url)


def test_score_fetches_sscd_into_the_torch_hub_cache(setup, sscd_server, monkeypatch, capsys):
    tmp, gt, gen = setup
    url, data, _ = sscd_server
    monkeypatch.setenv("TORCH_HOME", str(tmp / "torch_home"))
    argv = ["score", "--images", str(gen), "--gt", str(gt), "--clip_model", "none", "--sscd_url", url,
            "--out", str(tmp / "sscd.json")]
    mitigate_eval.main(argv)
    res = json.loads((tmp / "sscd.json").read_text())
    assert res["similarity"]["model"] == str(tmp / "torch_home" / "hub" / "checkpoints" /
                                             "sscd_disc_large.torchscript.pt")
    assert res["summary"]["mean_similarity"] is not None and res["counts"]["n_evaluated"] == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mitigate_eval.main(argv + ["--sscd_sha256", "1" * 64])
    assert e.value.code == 2 and "pinned SHA-256" in capsys.readouterr().err


def test_clip_model_demo(setup, capsys):
    """--clip_model demo scores with the project's demo CLIP model (utils/demo_clip.py), offline."""
    from utils.demo.clip import load_demo_clip
    from utils.evaluation.similarity import clip_scores
    tmp, gt, gen = setup
    argv = ["score", "--images", str(gen), "--gt", str(gt), "--similarity", "pixel", "--clip_model", "demo",
            "--out", str(tmp / "democlip.json")]
    mitigate_eval.main(argv)
    res = json.loads((tmp / "democlip.json").read_text())
    row = next(r for r in res["per_prompt"] if r["index"] == 0)
    want = clip_scores(*load_demo_clip(), [Image.open(gen / "0_0.png"), Image.open(gen / "0_1.png")],
                       [row["prompt"]] * 2).tolist()
    assert res["clip"]["model"] == "demo" and row["clip_per_image"] == pytest.approx(want, abs=1e-9)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mitigate_eval.main(argv + ["--clip_pretrained", str(tmp / "no_such_folder")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "demo CLIP" in err and "Traceback" not in err
