"""`mitigate_eval.py labels`: each prompt's status from a no-mitigation run's pixel cosine, checked against
hand-made images whose similarity is known exactly (a copy: 1; its negative: -1), the published source labels
joined by caption, and the CSV read back by utils.evaluation.labels (the format `detect_eval.py --labels` takes)."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

import mitigate_eval
from utils.evaluation.labels import read_labels, subset_mask


def _save(arr, path):
    Image.fromarray(arr.astype(np.uint8)).save(path)


@pytest.fixture()
def scored(tmp_path):
    """A fetched training folder (caption 'Oak' has no file), a no-mitigation generation of five prompts and
    its pixel score: prompt 0 = [copy, negative], 1 = [negative, negative], 2 unmatched, 3 without a training
    file, 4 = [copy] of another caption's image (it copies 'Red Rug's image, not its own: negative)."""
    rng = np.random.default_rng(1)
    red, blue = rng.integers(0, 256, size=(32, 32, 3)), rng.integers(0, 256, size=(32, 32, 3))
    (tmp_path / "train").mkdir()
    _save(red, tmp_path / "train" / "red.png")
    _save(blue, tmp_path / "train" / "blue.png")
    recs = [{"caption": "Red Rug", "index": 10, "file": "train/red.png"},
            {"caption": "Blue Rug", "index": 11, "file": "train/blue.png"},
            {"caption": "Oak", "index": 12, "file": "train/oak.png"},
            {"caption": "Green Rug", "index": 13, "file": "train/blue.png"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    gt = tmp_path / "gt"
    mitigate_eval.main(["fetch", "--jsonl", str(tmp_path / "train.jsonl"), "--out", str(gt)])
    gen = tmp_path / "gen"
    gen.mkdir()
    _save(red, gen / "0_0.png")
    _save(255 - red, gen / "0_1.png")
    _save(255 - blue, gen / "1_0.png")
    _save(255 - blue, gen / "1_1.png")
    _save(red, gen / "2_0.png")
    _save(red, gen / "3_0.png")
    _save(255 - blue, gen / "4_0.png")
    prompts = ["Red Rug", "Blue Rug", "Never trained on", "Oak", "Green Rug"]
    images = [["0_0.png", "0_1.png"], ["1_0.png", "1_1.png"], ["2_0.png"], ["3_0.png"], ["4_0.png"]]
    lines = [{"header": {"sd_ver": "demo", "method": "none", "settings": {}}}]
    lines += [{"index": i, "prompt": p, "images": im} for i, (p, im) in enumerate(zip(prompts, images))]
    (gen / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    mitigate_eval.main(["score", "--images", str(gen), "--gt", str(gt), "--similarity", "pixel",
                        "--clip_model", "none"])
    return tmp_path, gen, prompts


def test_statuses_fractions_and_source_labels(scored, capsys):
    tmp, gen, prompts = scored
    src = tmp / "src.jsonl"  # SD v2.0's layout: caption + overfit_type (one caption with a '/' the prompt lacks)
    src.write_text("\n".join(json.dumps(r) for r in [{"caption": "Red / Rug", "overfit_type": "MV"},
                                                      {"caption": "Blue Rug", "overfit_type": "TV"},
                                                      {"caption": "Oak", "overfit_type": "RV"}]) + "\n")
    capsys.readouterr()
    mitigate_eval.main(["labels", str(gen), "--source", str(src), "--out", str(tmp / "lab")])
    out = capsys.readouterr()
    assert "labels 3 of the 5 prompts" in out.err
    with open(tmp / "lab.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == prompts
    assert [r["status"] for r in rows] == ["copies", "does not copy", "no training image", "no training image",
                                           "does not copy"]
    assert [r["source_label"] for r in rows] == ["MV", "TV", "", "RV", ""]
    assert [r["max_similarity"] for r in rows] == ["1.000000", "-1.000000", "", "", "-1.000000"]
    assert [r["frac_above_0.5"] for r in rows] == ["0.500000", "0.000000", "", "", "0.000000"]
    assert [r["frac_above_0.7"] for r in rows] == ["0.500000", "0.000000", "", "", "0.000000"]
    assert rows[0]["n_images"] == "2" and rows[3]["n_gt_images"] == "0" and rows[4]["gt_indices"] == "13"
    s = json.loads((tmp / "lab.json").read_text())["summary"]
    assert s["status"] == {"copies": 1, "does not copy": 2, "no training image": 2}
    assert s["source_kind_by_status"]["verbatim"] == {"copies": 1, "does not copy": 0, "no training image": 1}
    assert s["frac_images_above"] == {"0.5": 0.2, "0.7": 0.2}  # 1 of the 5 judged images
    assert s["mean_max_similarity"] == pytest.approx(-1 / 3)
    assert "| copies | 1 | 20.0% |" in (tmp / "lab.md").read_text()

    # the CSV is what detect_eval.py --labels reads: each subset picks the expected prompts
    lab = read_labels(str(tmp / "lab.csv"))
    assert subset_mask(lab, prompts, "copies").tolist() == [True, False, False, False, False]
    assert subset_mask(lab, prompts, "verbatim").tolist() == [True, False, False, True, False]
    assert subset_mask(lab, prompts, "template").tolist() == [False, True, False, False, False]


def test_nemo_csv_labels(scored):
    tmp, gen, _ = scored
    (tmp / "nemo.csv").write_text(";Caption;URL;type;mean_sscd;max_sscd;Index\n0;Red Rug;u;VM;0.9;0.9;10\n"
                                  "1;Blue Rug;u;TM;0.1;0.2;11\n2;Oak;u;TM;;;12\n3;Never trained on;u;VM;1;1;1\n"
                                  "4;Green Rug;u;TM;0;0;13\n")
    mitigate_eval.main(["labels", str(gen), "--source", str(tmp / "nemo.csv"), "--out", str(tmp / "n")])
    lab = read_labels(str(tmp / "n.csv"))
    assert [r["source_label"] for r in lab] == ["VM", "TM", "VM", "TM", "TM"]
    prompts = [r["prompt"] for r in lab]
    assert subset_mask(lab, prompts, "verbatim").tolist() == [True, False, True, False, False]


def test_bad_inputs_exit_2(scored, capsys):
    tmp, gen, _ = scored
    (tmp / "other.jsonl").write_text(json.dumps({"caption": "Something else", "overfit_type": "MV"}) + "\n")
    (tmp / "plain.jsonl").write_text(json.dumps({"caption": "Red Rug", "index": 1}) + "\n")
    # a mitigated run is not a label source
    mit = tmp / "mit"
    mit.mkdir()
    head = json.loads((gen / "manifest.jsonl").read_text().splitlines()[0])
    res = json.loads((gen / "eval_pixel.json").read_text())
    res["generation_header"] = dict(head["header"], method="rna", settings={"count": 4})
    (mit / "eval_pixel.json").write_text(json.dumps(res))
    # a prompt whose images are all gone cannot be judged
    nog = json.loads((gen / "eval_pixel.json").read_text())
    nog["per_prompt"][0].update(status="no_images", similarity_max=None)
    (tmp / "nog.json").write_text(json.dumps(nog))
    base = ["labels", str(gen), "--out", str(tmp / "x")]
    cases = [(base + ["--source", str(tmp / "other.jsonl")], "for another prompt set"),
             (base + ["--source", str(tmp / "plain.jsonl")], "no caption and overfit_type"),
             (base + ["--source", str(tmp / "absent.csv")], "not found"),
             (["labels", str(mit), "--out", str(tmp / "x")], "reads a no-mitigation run"),
             (["labels", str(tmp / "nog.json"), "--out", str(tmp / "x")], "has no scored image"),
             (["labels", str(tmp / "gt"), "--out", str(tmp / "x")], "no score results"),
             (["labels", str(gen), "--out", str(gen / "eval_pixel")], "--out"),
             (base + ["--copy_threshold", "2"], "--copy_threshold")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            mitigate_eval.main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and err.count("error:") == 1, (argv, err)
    assert not (tmp / "x.csv").exists()
