"""Side effects on ordinary prompts: `score --reference NONE_FOLDER` pairs image k with the unmitigated image k.
`none` against itself is exactly no change (similarity 1, CLIP change 0, every image identical); hand-made images
with a known pixel cosine (a copy: 1, its negative: -1) give the expected per-image numbers and standard errors;
`plot --side` adds the second panel and its CSV (gated run: share mitigated and cost saved)."""
import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

import mitigate_eval

PROMPTS = ["a small dog", "two red apples", "a house by a lake"]


def _save(arr, path):
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _run(folder, header, images):
    """A generation folder: images[i] is the list of arrays of prompt i; manifest records as mitigate_mem.py."""
    folder.mkdir()
    lines = [{"header": dict({"model": "sddemo", "gen_num": 2, "gen_seed": 42, "num_inference_steps": 50},
                             **header)}]
    for i, (p, arrs) in enumerate(zip(PROMPTS, images)):
        names = [f"{i}_{k}.png" for k in range(len(arrs))]
        for n, arr in zip(names, arrs):
            _save(arr, folder / n)
        lines.append({"index": i, "prompt": p, "images": names, "mitigated": i != 2})
    (folder / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


@pytest.fixture()
def runs(tmp_path):
    rng = np.random.default_rng(3)
    base = [[rng.integers(0, 256, size=(32, 32, 3)) for _ in range(2)] for _ in PROMPTS]
    _run(tmp_path / "nmem_nomiti", {"method": "none", "settings": {}}, base)
    # the method: prompt 0 unchanged, prompt 1 image 1 negated (cosine -1), prompt 2 both negated
    moved = [base[0], [base[1][0], 255 - base[1][1]], [255 - a for a in base[2]]]
    _run(tmp_path / "nmem_rna_n4", {"method": "rna", "settings": {"count": 4}}, moved)
    _run(tmp_path / "nmem_rna_n4_gated", {"method": "rna", "settings": {"count": 4}, "gate": {"threshold": 1}}, moved)
    (tmp_path / "train").mkdir()
    _save(base[0][0], tmp_path / "train" / "t.png")
    (tmp_path / "train.jsonl").write_text(json.dumps({"caption": "x", "index": 1, "file": "train/t.png"}) + "\n")
    mitigate_eval.main(["fetch", "--jsonl", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "gt")])
    return tmp_path


def _score(tmp, name, *extra):
    mitigate_eval.main(["score", "--images", str(tmp / name), "--gt", str(tmp / "gt"), "--similarity", "pixel",
                        "--gt_match", "all", "--reference", str(tmp / "nmem_nomiti"), *extra])
    return json.loads((tmp / name / "eval_pixel.json").read_text())


def test_none_against_itself_is_exactly_no_change(runs):
    res = _score(runs, "nmem_nomiti", "--clip_model", "demo")
    s = res["side_effects"]
    assert s["mean_reference_similarity"] == 1.0 and s["se_reference_similarity"] == 0.0
    assert s["mean_clip_change"] == 0.0 and s["se_clip_change"] == 0.0
    assert s["frac_identical_images"] == 1.0 and s["frac_unchanged_prompts"] == 1.0
    assert s["n_prompts_paired"] == 3 and s["n_images_paired"] == 6
    assert all(r["reference_similarity_per_image"] == [1.0, 1.0] and r["clip_change"] == 0.0
               for r in res["per_prompt"])


def test_moved_images_numbers_and_side_panel(runs, capsys):
    plain = json.loads(json.dumps(_score(runs, "nmem_nomiti", "--clip_model", "none")))
    res = _score(runs, "nmem_rna_n4", "--clip_model", "none")
    sims = [r["reference_similarity_per_image"] for r in res["per_prompt"]]
    assert sims[0] == [1.0, 1.0]
    assert sims[1][0] == 1.0 and sims[1][1] == pytest.approx(-1.0, abs=1e-12)
    assert sims[2] == pytest.approx([-1.0, -1.0], abs=1e-12)
    s = res["side_effects"]
    per_prompt = [1.0, 0.0, -1.0]  # mean over each prompt's two images
    assert s["mean_reference_similarity"] == pytest.approx(0.0, abs=1e-12)
    assert s["se_reference_similarity"] == pytest.approx(np.std(per_prompt, ddof=1) / math.sqrt(3))
    assert s["frac_identical_images"] == pytest.approx(3 / 6) and s["frac_unchanged_prompts"] == pytest.approx(1 / 3)
    assert s["mean_clip_change"] is None
    # without --reference nothing new is written: the side effects are an addition only
    mitigate_eval.main(["score", "--images", str(runs / "nmem_rna_n4"), "--gt", str(runs / "gt"), "--similarity",
                        "pixel", "--gt_match", "all", "--clip_model", "none", "--out", str(runs / "bare.json")])
    bare = json.loads((runs / "bare.json").read_text())
    assert "side_effects" not in bare and "reference_similarity_per_image" not in bare["per_prompt"][0]
    assert plain["per_prompt"][0]["similarity_mean"] == bare["per_prompt"][0]["similarity_mean"]

    _score(runs, "nmem_rna_n4_gated", "--clip_model", "none")
    mitigate_eval.main(["plot", str(runs / "nmem_nomiti"), "--y", "not_blank", "--out", str(runs / "fig"),
                        "--side", str(runs / "nmem_nomiti"), str(runs / "nmem_rna_n4"), str(runs / "nmem_rna_n4_gated"),
                        "--allow_mixed"])
    with open(runs / "fig_side.csv", newline="") as f:
        rows = {(r["method"], r["gated"]): r for r in csv.DictReader(f)}
    assert float(rows[("none", "False")]["mean_reference_similarity"]) == 1.0
    assert rows[("none", "False")]["frac_mitigated"] == "0.0"
    assert float(rows[("rna", "False")]["frac_mitigated"]) == pytest.approx(2 / 3)
    assert rows[("rna", "False")]["cost_saved"] == "" and float(rows[("rna", "True")]["cost_saved"]) == 0.0
    assert (runs / "fig.png").stat().st_size > 0


def test_bad_reference_exit_2(runs, capsys):
    other = runs / "other"
    _run(other, {"method": "none", "settings": {}, "gen_seed": 7}, [[np.zeros((32, 32, 3))] * 2] * 3)
    cases = [(["--reference", str(runs / "nmem_rna_n4")], "measured against no mitigation"),
             (["--reference", str(other)], "gen_seed"),
             (["--reference", str(runs / "gt")], "no manifest.jsonl")]
    for extra, msg in cases:
        with pytest.raises(SystemExit) as e:
            mitigate_eval.main(["score", "--images", str(runs / "nmem_nomiti"), "--gt", str(runs / "gt"),
                                "--similarity", "pixel", "--clip_model", "none", "--out", str(runs / "o.json"),
                                *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
