"""Table 1: every detector x n x steps found in a folder of detect_mem.py outputs, for a memorized and a
non-memorized prompt set, with AUC, TPR@FPR under both rules, cost per prompt, and the paper's values beside.
"""
import json
import os
import re

import numpy as np

from ..cli import UserError, warn
from ..metrics import detection_metrics
from ..io import read_json_file
from ..results import DetectionResult, describe_differences, differences, read_detection_result
from ..schemas import DetectionSidecar

PAPER_TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "paper",
                           "table1.json")
MULTI_STEP = ("sharpness", "wen")  # metrics with one column per measured step
TABLE_STEPS = (1, 5, 50)           # the paper's step settings (first k steps, averaged)
SD_VERSIONS = {"CompVis/stable-diffusion-v1-4": "1.4", "stabilityai/stable-diffusion-2": "2.0"}
_NAME = re.compile(r"^(?P<stem>.+?)(?:_(?P<metric>[a-z_0-9]+?))?_gen(?P<n>\d+)\.json$")


def discover(folder, known_metrics):
    """Result sidecars in folder: list of dict(stem, metric, n, pt, sidecar). Sidecars written before the harness
    (sharpness only) are recognized by their name <stem>_gen<n>.json."""
    out = []
    for name in sorted(os.listdir(folder)):
        m = _NAME.match(name)
        pt = os.path.join(folder, name[:-5] + ".pt")
        if not m or not os.path.isfile(pt):
            continue
        side = read_json_file(os.path.join(folder, name), "result sidecar", DetectionSidecar)  # damaged: an error
        meta = side.get("metric") if isinstance(side, dict) else None
        if isinstance(meta, dict):
            metric, stem = meta.get("name"), meta.get("stem")
        elif m.group("metric") is None:
            metric, stem = "sharpness", m.group("stem")  # the reference's naming, sharpness only
        else:
            metric, stem = m.group("metric"), m.group("stem")
        if metric not in known_metrics:
            continue
        n = int(m.group("n"))
        # The names of the table's outputs come from the stems: a sidecar's stem (data) must be its file's own,
        # which also makes (stem, metric, n) name one file (two files can never claim the same result).
        expected = f"{stem}_gen{n}.json" if metric == "sharpness" else f"{stem}_{metric}_gen{n}.json"
        if not isinstance(stem, str) or name != expected or os.sep in stem or stem.startswith("."):
            raise UserError(f"{os.path.join(folder, name)}: its sidecar names set {stem!r:.80} and metric {metric!r}, "
                            "which do not match its file name; the file was renamed or edited by hand")
        if isinstance(meta, dict) and meta.get("gen_num") not in (None, n):
            raise UserError(f"{os.path.join(folder, name)}: the file name says n = {n}, its sidecar "
                            f"{meta.get('gen_num')}; the file was renamed or edited by hand")
        out.append(dict(stem=stem, metric=metric, n=n, pt=pt, sidecar=side))
    return out  # (stem, metric, n) is unique: each names one file, so no two results can replace each other


def set_pairs(results):
    """(memorized stem, non-memorized stem) pairs found: stems '<x>_mem' and '<x>_nmem' with the same <x>."""
    stems = {r["stem"] for r in results}
    return sorted((s, s[:-4] + "_nmem") for s in stems if s.endswith("_mem") and s[:-4] + "_nmem" in stems)


def load_paper(path=PAPER_TABLE):
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)["table1"]
    return {(r["metric"], r["sd"], r["n"], r["steps"]): r for r in rows}


def _settings(side):
    meta = side.get("metric") if isinstance(side.get("metric"), dict) else {}
    ident = dict(side.get("identity") or {})
    ident.pop("data_sha256", None)
    return meta.get("settings"), ident


def build_table(results, mem_stem, nmem_stem, steps=TABLE_STEPS, paper=None):
    """Rows (dicts) for every (metric, n) present for both sets. A mismatch between the two sets' settings of the
    same metric and n (other model, seed, steps, options) is a UserError: the numbers would not be comparable."""
    by = {(r["stem"], r["metric"], r["n"]): r for r in results}
    rows = []
    for (stem, metric, n), mem in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if stem != mem_stem:
            continue
        nmem = by.get((nmem_stem, metric, n))
        if nmem is None:
            warn(f"{metric} n = {n}: found for {mem_stem} but not for {nmem_stem}; skipped")
            continue
        a, b = (DetectionResult(r["pt"], None, r["sidecar"]) for r in (mem, nmem))
        diff = differences(a, b)
        if _settings(mem["sidecar"]) != _settings(nmem["sidecar"]) or diff:
            raise UserError(f"{os.path.basename(mem['pt'])} and {os.path.basename(nmem['pt'])} were computed with "
                            f"different settings ({describe_differences(a, b, diff) or 'metric settings'}); rerun "
                            "one of them")
        rm, rn = read_detection_result(mem["pt"]), read_detection_result(nmem["pt"])  # shapes checked on read
        width = rm.values.shape[1]  # the tensor's, not what a sidecar says
        if width != rn.values.shape[1]:
            raise UserError(f"{metric} n = {n}: the two sets have different numbers of measured steps")
        meta = mem["sidecar"].get("metric") if isinstance(mem["sidecar"].get("metric"), dict) else {}
        direction = meta.get("direction", "higher")
        settings = meta.get("settings") or {}
        ks = sorted({k for k in steps if k <= width} | {width}) if metric in MULTI_STEP else [None]
        for k in ks:
            mem_s, nmem_s = rm.scores(k or width), rn.scores(k or width)
            keep_m, keep_n = np.isfinite(mem_s), np.isfinite(nmem_s)
            if not keep_m.any() or not keep_n.any():
                warn(f"{metric} n = {n}: no finite scores; skipped")
                continue
            res = detection_metrics(mem_s[keep_m], nmem_s[keep_n], (0.01, 0.03), "closest")
            strict = detection_metrics(mem_s[keep_m], nmem_s[keep_n], (0.01,), "strict")
            used = k or (1 if metric in ("anisotropy", "le") else settings.get("num_inference_steps", 50))
            row = dict(metric=metric, n=n, steps=used, direction=direction, auc=res["auc"],
                       tpr_1_closest=res["tpr_at_fpr"][0.01], tpr_1_strict=strict["tpr_at_fpr"][0.01],
                       tpr_3_closest=res["tpr_at_fpr"][0.03], n_mem=int(keep_m.sum()), n_nmem=int(keep_n.sum()),
                       dropped_nan=int((~keep_m).sum() + (~keep_n).sum()), roc=res["roc"],
                       cost=_cost(mem["sidecar"], nmem["sidecar"], metric, k, width))
            sd = SD_VERSIONS.get((mem["sidecar"].get("identity") or {}).get("model_id"))
            p = (paper or {}).get((metric, sd, n, used))
            row["paper"] = None if p is None else dict(auc=p["auc"], tpr_1=p["tpr_at_1pct_fpr"])
            rows.append(row)
    return rows


def _cost(side_m, side_n, metric, k, width):
    """Cost per prompt of the metric in the run that produced it (mean over both sets' prompts)."""
    per = [c for s in (side_m, side_n) for c in ((s.get("cost") or {}).get("per_prompt") or []) if c]
    counts = dict(unet_forwards=(k or 1) if metric in MULTI_STEP else None, jvps=(k or 0) if metric == "sharpness"
                  else 0)
    if not per:
        return dict(counts, seconds=None, forward_seconds=None, ratio=None, run_steps=width)
    mean = lambda key: float(np.mean([c[key] for c in per if c.get(key) is not None])) if any(
        c.get(key) is not None for c in per) else None
    if metric not in MULTI_STEP:
        counts = dict(unet_forwards=mean("unet_forwards"), jvps=mean("jvps"))
    secs, fwd = mean("seconds"), mean("forward_seconds")
    if metric in MULTI_STEP and k and all(len(c.get("step_seconds") or []) >= k for c in per):
        secs = float(np.mean([sum(c["step_seconds"][:k]) for c in per]))  # what the first k steps cost
    return dict(counts, seconds=secs, forward_seconds=fwd, ratio=secs / fwd if secs and fwd else None,
                run_steps=width, vae_decodes=mean("vae_decodes"))


def markdown(rows, title):
    """The table as Markdown text."""
    def f(v, d=3):
        return "–" if v is None else f"{v:.{d}f}"
    lines = [f"### {title}", "",
             "| method | n | steps | AUC | TPR@1%FPR (closest) | TPR@1%FPR (strict) | TPR@3%FPR | UNet forwards + JVPs"
             " / prompt | s / prompt | × one forward | paper AUC / TPR@1% |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["cost"]
        fw = "–" if c["unet_forwards"] is None else f"{c['unet_forwards']:g} + {c['jvps']:g}"
        paper = "–" if r["paper"] is None else f"{r['paper']['auc']:.3f} / {r['paper']['tpr_1']:.3f}"
        lines.append(f"| {r['metric']} | {r['n']} | {r['steps']} | {f(r['auc'])} | {f(r['tpr_1_closest'])} | "
                     f"{f(r['tpr_1_strict'])} | {f(r['tpr_3_closest'])} | {fw} | {f(c['seconds'], 4)} | "
                     f"{f(c['ratio'], 1)} | {paper} |")
    lines += ["", "steps: sampling steps used (sharpness, wen: the first k measured steps, averaged; anisotropy: the "
              "first step plus one low-noise forward; tiled_l2: full generations and the VAE decode). s / prompt: the "
              "measured time of the UNet calls (and decodes) this row needs, shared calls counted in full, per "
              "prompt; × one forward: that time over one [uncond; cond] UNet forward of the same run. closest: the "
              "ROC point with FPR nearest the target (the reference's rule); strict: the best TPR with FPR <= "
              "target."]
    return "\n".join(lines) + "\n"


def roc_figure(curves, title):
    """The ROC plot of detection results: a matplotlib figure of `curves`, a list of (label, fpr, tpr), with the
    chance line dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    one = len(curves) == 1
    fig, ax = plt.subplots(figsize=(4, 4) if one else (5, 5), dpi=100)
    for label, fpr, tpr in curves:
        ax.plot(fpr, tpr, lw=1.5 if one else 1.4, label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", **({} if one else dict(fontsize=7)))
    fig.tight_layout()
    return fig


def table_curves(rows):
    """One ROC curve per method for roc_figure: its row with the largest n, then the fewest steps."""
    best = {}
    for r in rows:
        key = (r["n"], -r["steps"])
        if r["metric"] not in best or key > best[r["metric"]][0]:
            best[r["metric"]] = (key, r)
    return [(f"{metric} (n={r['n']}, {r['steps']} step{'s' if r['steps'] > 1 else ''}): AUC {r['auc']:.3f}",
             r["roc"]["fpr"], r["roc"]["tpr"]) for metric, (_, r) in sorted(best.items())]
