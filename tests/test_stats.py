"""Bootstrap intervals of detection metrics (utils/stats.py) and their place in detect_eval.py."""
import json
import re

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

import detect_eval
from tests.cli_run import exit_code
from utils.metrics import detection_metrics
from utils.stats import (BootstrapSettings, metric_intervals, paired_auc_difference, point_metrics, rank_auc,
                         roc_points)


def _tied(rng, n):
    return rng.integers(0, 6, n).astype(np.float64)  # few distinct values: ties and collinear ROC points


def test_resample_metrics_equal_sklearn_and_detection_metrics():
    """The lean ROC/AUC used on every resample agree with sklearn and with the table's own numbers."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        a, b = _tied(rng, rng.integers(1, 25)), _tied(rng, rng.integers(1, 25))
        y, s = np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b]
        fpr, tpr, _ = roc_curve(y, s)
        mine = roc_points(a, b)
        assert np.array_equal(mine[0], fpr) and np.array_equal(mine[1], tpr)
        assert rank_auc(a, b) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        ref, strict = detection_metrics(a, b, (0.01, 0.03), "closest"), detection_metrics(a, b, (0.01,), "strict")
        assert point_metrics(a, b) == pytest.approx([ref["auc"], ref["tpr_at_fpr"][0.01], strict["tpr_at_fpr"][0.01],
                                                     ref["tpr_at_fpr"][0.03]], abs=1e-12)


def test_auc_interval_covers_the_true_auc_at_about_the_nominal_rate():
    """Gaussian scores N(d, 1) vs N(0, 1) have AUC Phi(d / sqrt 2). 200 data sets (fixed seed, so the count is
    fixed): the 90% percentile interval must cover the truth in 80-97% of them (nominal 90%, binomial sd 2%)."""
    rng = np.random.default_rng(1)
    d = 1.0
    truth = norm.cdf(d / np.sqrt(2))
    settings = BootstrapSettings(bootstrap=400, ci_level=0.9)
    hits = 0
    for rep in range(200):
        mem, nmem = rng.normal(d, 1, 40), rng.normal(0, 1, 50)
        lo, hi = metric_intervals(mem, nmem, settings, columns=())["auc"]["interval"]
        hits += lo <= truth <= hi
    assert 160 <= hits <= 194


def test_intervals_are_seeded_and_hold_the_point_value():
    rng = np.random.default_rng(2)
    mem, nmem = rng.normal(1.5, 1, 30), rng.normal(0, 1, 30)
    s = BootstrapSettings(bootstrap=300)
    a, b = metric_intervals(mem, nmem, s), metric_intervals(mem, nmem, s)
    assert a == b and a != metric_intervals(mem, nmem, BootstrapSettings(bootstrap=300, ci_seed=1))
    point = point_metrics(mem, nmem)
    for v, key in zip(point, ("auc", "tpr_1_closest", "tpr_1_strict", "tpr_3_closest")):
        lo, hi = a[key]["interval"]
        assert lo <= v <= hi and a[key]["standard_error"] > 0


@pytest.mark.parametrize("method", ["percentile", "BCa"])
def test_paired_difference_of_a_detector_with_itself_is_exactly_zero(method):
    rng = np.random.default_rng(3)
    mem, nmem = rng.normal(1, 1, 25), rng.normal(0, 1, 20)
    res = paired_auc_difference(mem, nmem, mem, nmem, BootstrapSettings(bootstrap=200, ci_method=method))
    assert res["difference"] == 0 and res["interval"] == [0.0, 0.0] and res["flip_share"] == 0
    assert res["tie_share"] == 1 and res["standard_error"] == 0


def test_paired_difference_is_paired_and_antisymmetric():
    """B is A plus noise on the same prompts: the paired interval is far narrower than the two separate AUC
    intervals would suggest, swapping A and B negates it, and the flip share matches the distribution's tail."""
    rng = np.random.default_rng(4)
    mem_a, nmem_a = rng.normal(1.2, 1, 60), rng.normal(0, 1, 60)
    mem_b, nmem_b = mem_a + rng.normal(0, 0.3, 60), nmem_a + rng.normal(0, 0.3, 60)
    s = BootstrapSettings(bootstrap=500)
    ab = paired_auc_difference(mem_a, nmem_a, mem_b, nmem_b, s)
    ba = paired_auc_difference(mem_b, nmem_b, mem_a, nmem_a, s)
    assert ab["difference"] == pytest.approx(roc_auc_score(np.r_[np.ones(60), np.zeros(60)], np.r_[mem_a, nmem_a])
                                             - roc_auc_score(np.r_[np.ones(60), np.zeros(60)], np.r_[mem_b, nmem_b]))
    assert ba["difference"] == pytest.approx(-ab["difference"])
    assert ba["interval"] == pytest.approx([-ab["interval"][1], -ab["interval"][0]])
    assert ab["flip_share"] == ba["flip_share"]
    single = metric_intervals(mem_a, nmem_a, s, columns=())["auc"]["standard_error"]
    assert ab["standard_error"] < single / 2
    # NaN in either detector drops that prompt from both
    mem_b[0] = np.nan
    assert paired_auc_difference(mem_a, nmem_a, mem_b, nmem_b, s)["n_mem"] == 59


def _pair(tmp_path):
    torch.save(torch.tensor([[4.0], [4.0], [1.0], [3.0]]), tmp_path / "m.pt")
    torch.save(torch.tensor([[2.0], [0.5], [1.5]]), tmp_path / "n.pt")
    return ["--mem", str(tmp_path / "m.pt"), "--nmem", str(tmp_path / "n.pt"), "--no_plot"]


def test_detect_eval_pair_intervals_and_bootstrap_off(tmp_path, capsys):
    argv = _pair(tmp_path)
    assert exit_code(detect_eval.main, argv + ["--bootstrap", "0", "--out", str(tmp_path / "off.json")]) == 0
    off_out = capsys.readouterr().out
    assert exit_code(detect_eval.main, argv + ["--bootstrap", "300", "--out", str(tmp_path / "on.json")]) == 0
    on_out = capsys.readouterr().out
    off, on = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("off", "on"))
    assert "ci" not in off and "interval (percentile, 300 resamples): AUC [" in on_out
    assert off_out.splitlines()[0] == on_out.splitlines()[0]  # the point line is unchanged
    # new keys only: every key and value of the run without intervals is there unchanged
    assert {k: v for k, v in on.items() if k not in ("ci", "arguments", "versions")} == {
        k: v for k, v in off.items() if k not in ("arguments", "versions")}
    ref = metric_intervals(np.array([4.0, 4.0, 1.0, 3.0]), np.array([2.0, 0.5, 1.5]), BootstrapSettings(bootstrap=300))
    assert on["ci"] == ref


@pytest.mark.parametrize("flag,value,fragment", [("--bootstrap", "-1", "--bootstrap"),
                                                 ("--bootstrap", "1000000000", "at most"),
                                                 ("--ci_level", "1", "--ci_level"),
                                                 ("--ci_method", "bootstrap-t", "--ci_method")])
def test_detect_eval_bad_bootstrap_flags(tmp_path, capsys, flag, value, fragment):
    assert exit_code(detect_eval.main, _pair(tmp_path) + [flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and fragment in err and "Traceback" not in err and len(err.splitlines()) == 1


def _save(folder, stem, metric, vals):
    name = f"{stem}_gen4" if metric == "sharpness" else f"{stem}_{metric}_gen4"
    torch.save(torch.tensor(vals, dtype=torch.float32), folder / f"{name}.pt")
    (folder / f"{name}.json").write_text(json.dumps(dict(
        metric=dict(name=metric, stem=stem, gen_num=4, settings={}, direction="higher"), values=vals,
        identity=dict(model_id="m", gen_seed=1, data_sha256=stem))))


def test_table_intervals_comparisons_and_bootstrap_off(tmp_path):
    """--table: intervals in every cell, one paired comparison per pair of methods (a method against an exact copy
    of itself: difference 0, zero width, no flip); --bootstrap 0 writes today's table (no interval anywhere) with
    the same point values."""
    rng = np.random.default_rng(5)
    mem, nmem = rng.normal(1, 1, (12, 1)).tolist(), rng.normal(0, 1, (10, 1)).tolist()
    for metric in ("sharpness", "anisotropy"):   # the same scores under two names
        _save(tmp_path, "a_mem", metric, mem)
        _save(tmp_path, "a_nmem", metric, nmem)
    _save(tmp_path, "a_mem", "wen", (-np.asarray(mem)).tolist())  # the reversed ranking
    _save(tmp_path, "a_nmem", "wen", (-np.asarray(nmem)).tolist())
    assert exit_code(detect_eval.main, ["--table", str(tmp_path), "--bootstrap", "0"]) == 0
    md_off, off = (tmp_path / "a_mem_vs_a_nmem.table.md").read_text(), json.loads((tmp_path / "a_mem_vs_a_nmem.table.json").read_text())
    assert not re.search(r"\d \[\d", md_off) and "Paired" not in md_off and "bootstrap" not in md_off and "comparisons" not in off
    assert exit_code(detect_eval.main, ["--table", str(tmp_path), "--bootstrap", "200"]) == 0
    md, on = (tmp_path / "a_mem_vs_a_nmem.table.md").read_text(), json.loads((tmp_path / "a_mem_vs_a_nmem.table.json").read_text())
    assert [{k: v for k, v in r.items() if k != "ci"} for r in on["rows"]] == off["rows"]
    auc = on["rows"][0]["auc"]
    lo, hi = on["rows"][0]["ci"]["auc"]["interval"]
    assert f"| {auc:.3f} [{lo:.3f}, {hi:.3f}] |" in md and "200 resamples" in md
    pairs = {(c["a"].split()[0], c["b"].split()[0]): c for c in on["comparisons"]}
    assert set(pairs) == {("anisotropy", "sharpness"), ("anisotropy", "wen"), ("sharpness", "wen")}
    same = pairs[("anisotropy", "sharpness")]
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0] and same["flip_share"] == 0
    rev = pairs[("sharpness", "wen")]
    assert rev["difference"] == pytest.approx(2 * auc - 1) and rev["interval"][0] > 0 and rev["flip_share"] < 0.05
    assert "| sharpness (n=4, 1 step) | wen (n=4, 1 step) |" in md


# ------------------------------------------------------------------------------------------ several seeds

def _seed_world(folder, seeds, rng):
    for seed in seeds:
        sub = folder / f"seed{seed}"
        sub.mkdir(parents=True)
        mem, nmem = rng.normal(1, 1, (8, 1)), rng.normal(0, 1, (6, 1))
        for metric, sign in (("sharpness", 1), ("wen", -1)):
            _save(sub, "a_mem", metric, (sign * mem).tolist())
            _save(sub, "a_nmem", metric, (sign * nmem).tolist())


def test_one_seed_folder_gives_the_single_seed_table_exactly(tmp_path):
    _seed_world(tmp_path, [42], np.random.default_rng(6))
    argv = ["--bootstrap", "50"]
    assert exit_code(detect_eval.main, ["--table", str(tmp_path)] + argv) == 0
    assert exit_code(detect_eval.main, ["--table", str(tmp_path / "seed42")] + argv) == 0
    name = "a_mem_vs_a_nmem.table"
    assert (tmp_path / f"{name}.md").read_text() == (tmp_path / "seed42" / f"{name}.md").read_text()
    rows = lambda d: json.loads((d / f"{name}.json").read_text())["rows"]
    assert rows(tmp_path) == rows(tmp_path / "seed42")


def test_several_seeds_pool_and_spread(tmp_path):
    _seed_world(tmp_path, [1, 2, 3], np.random.default_rng(7))
    assert exit_code(detect_eval.main, ["--table", str(tmp_path)]) == 0
    rows = {r["metric"]: r for r in json.loads((tmp_path / "a_mem_vs_a_nmem.table.json").read_text())["rows"]}
    load = lambda s, stem: torch.load(tmp_path / f"seed{s}" / f"{stem}_gen4.pt").numpy().ravel()
    per = [detection_metrics(load(s, "a_mem"), load(s, "a_nmem"))["auc"] for s in (1, 2, 3)]
    pooled = detection_metrics(np.concatenate([load(s, "a_mem") for s in (1, 2, 3)]),
                               np.concatenate([load(s, "a_nmem") for s in (1, 2, 3)]))["auc"]
    sh = rows["sharpness"]
    assert sh["auc"] == pytest.approx(pooled) and sh["n_mem"] == 24 and sh["seeds"]["seeds"] == [1, 2, 3]
    assert sh["seeds"]["auc"] == pytest.approx(per) and sh["seeds"]["mean"]["auc"] == pytest.approx(np.mean(per))
    assert sh["seeds"]["sd"]["auc"] == pytest.approx(np.std(per, ddof=1))
    assert rows["wen"]["auc"] == pytest.approx(1 - pooled) and "ci" not in sh
    md = (tmp_path / "a_mem_vs_a_nmem.table.md").read_text()
    assert "Several seeds (1, 2, 3)" in md and f"{np.mean(per):.3f} ± {np.std(per, ddof=1):.3f}" in md


# ------------------------------------------------------------------------------------------ labelled subsets

CAPTIONS = ["a cat", "a dog", "an owl", "a fox", "a hen"]


def _labelled_world(tmp_path):
    """Memorized scores 5, 4, 1, 3, 0.5 against 2, 0.8, 1.5: the prompts that copy (1, 2, 4) all score above
    every non-memorized prompt, the others (3, 5) below."""
    for stem, vals in (("a_mem", [5.0, 4.0, 1.0, 3.0, 0.5]), ("a_nmem", [2.0, 0.8, 1.5])):
        _save(tmp_path, stem, "sharpness", [[v] for v in vals])
        side = json.loads((tmp_path / f"{stem}_gen4.json").read_text())
        side["prompts"] = CAPTIONS if stem == "a_mem" else ["x", "y", "z"]
        (tmp_path / f"{stem}_gen4.json").write_text(json.dumps(side))
    rows = [("a cat", "copies", "MV"), ("a dog", "copies", "TV"), ("an owl", "does not copy", "TV"),
            ("a fox", "copies", "MV"), ("a hen", "no training image", "TV")]
    (tmp_path / "labels.csv").write_text("prompt,status,source_label\n" + "".join(f"{p},{s},{k}\n" for p, s, k in rows))
    return tmp_path / "labels.csv"


def test_labelled_subsets_pair_and_table(tmp_path, capsys):
    labels = _labelled_world(tmp_path)
    pair = ["--mem", str(tmp_path / "a_mem_gen4.pt"), "--nmem", str(tmp_path / "a_nmem_gen4.pt"), "--no_plot",
            "--bootstrap", "0", "--labels", str(labels)]
    # all: 5, 4, 1, 3, 0.5 vs 2, 0.8, 1.5 -> (3 + 3 + 1 + 3 + 0) / 15; copies (5, 4, 3): 1; verbatim (5, 3): 1;
    # template (4, 1, 0.5): (3 + 1 + 0) / 9
    for subset, auc in (("all", 10 / 15), ("copies", 1.0), ("verbatim", 1.0), ("template", 4 / 9)):
        assert exit_code(detect_eval.main, pair + ["--subset", subset]) == 0
        res = json.loads((tmp_path / f"a_mem_gen4_vs_a_nmem_gen4.{subset}.eval.json").read_text())
        assert res["auc"] == pytest.approx(auc) and res["subset"] == subset
    assert res["subset_size"] == 3 and res["set_size"] == 5
    assert exit_code(detect_eval.main, ["--table", str(tmp_path), "--bootstrap", "0", "--labels", str(labels),
                                        "--subset", "template"]) == 0
    md = (tmp_path / "a_mem_vs_a_nmem.template.table.md").read_text()
    assert md.startswith("### a_mem vs a_nmem, subset template: 3 of 5 memorized prompts")
    row = json.loads((tmp_path / "a_mem_vs_a_nmem.template.table.json").read_text())["rows"][0]
    assert row["auc"] == pytest.approx(4 / 9) and row["n_mem"] == 3
    assert not (tmp_path / "a_mem_vs_a_nmem.table.md").exists()  # the whole set's table is another file


def test_labelled_subset_bad_input(tmp_path, capsys):
    labels = _labelled_world(tmp_path)
    pair = ["--mem", str(tmp_path / "a_mem_gen4.pt"), "--nmem", str(tmp_path / "a_nmem_gen4.pt"), "--no_plot",
            "--bootstrap", "0"]
    other = tmp_path / "other.csv"
    other.write_text(labels.read_text().replace("an owl", "a mole"))
    few = tmp_path / "few.csv"
    few.write_text(labels.read_text().replace(",MV", ",TV", 1).replace("a fox,copies,MV", "a fox,copies,TV"))
    for argv, fragment in ((["--labels", str(other)], "line 4 reads 'a mole'"),
                           (["--labels", str(other), "--table", str(tmp_path)], "line 4 reads 'a mole'"),
                           (["--labels", str(few), "--subset", "verbatim"], "leaves 0 memorized"),
                           (["--subset", "copies"], "needs --labels"),
                           (["--labels", str(tmp_path / "none.csv")], "cannot read the labels file")):
        assert exit_code(detect_eval.main, pair + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and fragment in err and len(err.splitlines()) == 1, err
