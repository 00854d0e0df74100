"""End to end: `mitigate_eval.py fetch` on local training images, then `score --similarity pixel --clip_model none`
on hand-made generated images with a hand-written manifest; exact expected numbers."""
import csv
import json

import numpy as np
import pytest
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
