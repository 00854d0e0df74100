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
from ..stats import interval_text, metric_intervals, paired_auc_difference

PAPER_TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "paper",
                           "table1.json")
MULTI_STEP = ("sharpness", "wen")  # metrics with one column per measured step
TABLE_STEPS = (1, 5, 50)           # the paper's step settings (first k steps, averaged)
SD_VERSIONS = {"CompVis/stable-diffusion-v1-4": "1.4", "stabilityai/stable-diffusion-2": "2.0"}
TARGET_STEPS = dict(metric2=("metric2_step", 1), dsm=("dsm_step", 2), curv_ds=("curv_step", 1),
                    curv_dh=("curv_step", 1))  # and nemo: 1 (it reads x_T only, at step 0)
OPTIONAL_COSTS = ("vjps", "probes")  # cost counts only some detectors have (utils.detection.loop.OPTIONAL_KINDS)
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


def build_table(results, mem_stem, nmem_stem, steps=TABLE_STEPS, paper=None, bootstrap=None, mem_mask=None):
    """Rows (dicts) for every (metric, n) present for both sets. A mismatch between the two sets' settings of the
    same metric and n (other model, seed, steps, options) is a UserError: the numbers would not be comparable.
    bootstrap: a stats.BootstrapSettings with resamples > 0 adds each row's intervals under "ci". Every row keeps
    its per-prompt scores under "scores" (for comparisons; not written to the JSON). mem_mask: a boolean mask
    over the memorized prompts (a labelled subset); only those count."""
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
            if mem_mask is not None:
                if len(mem_mask) != len(mem_s):
                    raise UserError(f"{os.path.basename(mem['pt'])} has {len(mem_s)} prompts and the labels "
                                    f"{len(mem_mask)}")
                mem_s = mem_s[mem_mask]
            keep_m, keep_n = np.isfinite(mem_s), np.isfinite(nmem_s)
            if not keep_m.any() or not keep_n.any():
                warn(f"{metric} n = {n}: no finite scores; skipped")
                continue
            res = detection_metrics(mem_s[keep_m], nmem_s[keep_n], (0.01, 0.03), "closest")
            strict = detection_metrics(mem_s[keep_m], nmem_s[keep_n], (0.01,), "strict")
            used = k or (1 if metric in ("anisotropy", "le") else _target_steps(metric, settings)
                         or settings.get("num_inference_steps", 50))
            row = dict(metric=metric, n=n, steps=used, direction=direction, auc=res["auc"],
                       tpr_1_closest=res["tpr_at_fpr"][0.01], tpr_1_strict=strict["tpr_at_fpr"][0.01],
                       tpr_3_closest=res["tpr_at_fpr"][0.03], n_mem=int(keep_m.sum()), n_nmem=int(keep_n.sum()),
                       dropped_nan=int((~keep_m).sum() + (~keep_n).sum()), roc=res["roc"],
                       cost=_cost(mem["sidecar"], nmem["sidecar"], metric, k, width))
            if bootstrap is not None and bootstrap.bootstrap > 0:
                row["ci"] = metric_intervals(mem_s[keep_m], nmem_s[keep_n], bootstrap)
            row["scores"] = dict(mem=mem_s, nmem=nmem_s, data=tuple((s.get("identity") or {}).get("data_sha256")
                                                                     for s in (mem["sidecar"], nmem["sidecar"])))
            sd = SD_VERSIONS.get((mem["sidecar"].get("identity") or {}).get("model_id"))
            p = (paper or {}).get((metric, sd, n, used))
            row["paper"] = None if p is None else dict(auc=p["auc"], tpr_1=p["tpr_at_1pct_fpr"])
            family = mem["sidecar"].get("family")
            if isinstance(family, dict) and family.get("uncond"):  # Flux: its "uncond" is not a CFG branch
                row["uncond"] = str(family["uncond"])
            rows.append(row)
    return rows


def _target_steps(metric, settings):
    """Trajectory steps a one-step detector of 2024-26 uses (its target step + 1; dsm: + 2), else None."""
    if metric == "nemo":
        return 1
    field, extra = TARGET_STEPS.get(metric, (None, 0))
    return settings[field] + extra if field in settings else None


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
        counts.update({k: mean(k) for k in OPTIONAL_COSTS if mean(k) is not None})  # only the detectors using them
    secs, fwd = mean("seconds"), mean("forward_seconds")
    if metric in MULTI_STEP and k and all(len(c.get("step_seconds") or []) >= k for c in per):
        secs = float(np.mean([sum(c["step_seconds"][:k]) for c in per]))  # what the first k steps cost
    return dict(counts, seconds=secs, forward_seconds=fwd, ratio=secs / fwd if secs and fwd else None,
                run_steps=width, vae_decodes=mean("vae_decodes"))


def comparisons(rows, bootstrap):
    """Paired AUC comparisons between methods on the same prompts: every pair of the rows table_curves plots (one
    per method), A before B in the table's order. Pairs whose prompt files differ (their hashes) are skipped.
    Returns a list of dicts: a, b (labels) and stats.paired_auc_difference's fields."""
    if bootstrap is None or bootstrap.bootstrap <= 0:
        return []
    best = [r for _, r in _best(rows) if "scores" in r]  # pooled several-seed rows have none
    out = []
    for x, ra in enumerate(best):
        for rb in best[x + 1:]:
            sa, sb = ra["scores"], rb["scores"]
            if sa["data"] != sb["data"] or sa["mem"].shape != sb["mem"].shape or sa["nmem"].shape != sb["nmem"].shape:
                warn(f"{_label(ra)} and {_label(rb)} were not computed on the same prompts; not compared")
                continue
            try:
                res = paired_auc_difference(sa["mem"], sa["nmem"], sb["mem"], sb["nmem"], bootstrap)
            except UserError as e:
                warn(f"{_label(ra)} vs {_label(rb)}: {e}; not compared")
                continue
            out.append(dict(a=_label(ra), b=_label(rb), **res))
    return out


def _label(r):
    return f"{r['metric']} (n={r['n']}, {r['steps']} step{'s' if r['steps'] > 1 else ''})"


def markdown(rows, title, compared=()):
    """The table as Markdown text; cells show bootstrap intervals where rows carry them ("ci"), and `compared`
    (comparisons()) adds the paired AUC differences below."""
    def f(v, d=3):
        return "–" if v is None else f"{v:.{d}f}"

    def fi(r, key):
        ci = (r.get("ci") or {}).get(key)
        return interval_text(r[key], None if ci is None else ci["interval"])
    lines = [f"### {title}", "",
             "| method | n | steps | AUC | TPR@1%FPR (closest) | TPR@1%FPR (strict) | TPR@3%FPR | UNet forwards + JVPs"
             " / prompt | s / prompt | × one forward | paper AUC / TPR@1% |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["cost"]
        fw = "–" if c["unet_forwards"] is None else f"{c['unet_forwards']:g} + {c['jvps']:g}" + (
            f" + {c['vjps']:g} VJPs" if "vjps" in c else "") + (f" (= {c['probes']:g} probes)" if "probes" in c else "")
        paper = "–" if r["paper"] is None else f"{r['paper']['auc']:.3f} / {r['paper']['tpr_1']:.3f}"
        lines.append(f"| {r['metric']} | {r['n']} | {r['steps']} | {fi(r, 'auc')} | {fi(r, 'tpr_1_closest')} | "
                     f"{fi(r, 'tpr_1_strict')} | {fi(r, 'tpr_3_closest')} | {fw} | {f(c['seconds'], 4)} | "
                     f"{f(c['ratio'], 1)} | {paper} |")
    lines += ["", "steps: sampling steps used (sharpness, wen: the first k measured steps, averaged; anisotropy: the "
              "first step plus one low-noise forward; tiled_l2: full generations and the VAE decode). s / prompt: the "
              "measured time of the UNet calls (and decodes) this row needs, shared calls counted in full, per "
              "prompt; × one forward: that time over one [uncond; cond] UNet forward of the same run. closest: the "
              "ROC point with FPR nearest the target (the reference's rule); strict: the best TPR with FPR <= "
              "target."]
    for note in sorted({r["uncond"] for r in rows if r.get("uncond")}):
        lines += ["", f"∅ (the uncond branch of every difference) on this model: {note}."]
    ci = next((r["ci"] for r in rows if r.get("ci")), None)
    if ci:
        lines += ["", f"[low, high]: {ci['level'] * 100:g}% bootstrap interval ({ci['method']}, {ci['resamples']} "
                  f"resamples of the prompts within each class, seed {ci['seed']})."]
    if compared:
        lines += ["", "Paired AUC differences (A − B on the same resamples of the same prompts; flip: share of "
                  "resamples where the order of A and B is the reverse of the observed one; tie: difference exactly 0):",
                  "", "| A | B | AUC A − B | flip | tie | prompts |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['a']} | {c['b']} | {interval_text(c['difference'], c['interval'])} | {c['flip_share']:.3f} | "
                  f"{c['tie_share']:.3f} | {c['n_mem']} + {c['n_nmem']} |" for c in compared]
    several = [r for r in rows if r.get("seeds")]
    if several:
        seeds = ", ".join(map(str, several[0]["seeds"]["seeds"]))
        ms = lambda r, k: f"{r['seeds']['mean'][k]:.3f} ± {r['seeds']['sd'][k]:.3f}"
        lines += ["", f"Several seeds ({seeds}): the values above pool every seed's scores (each prompt once per "
                  "seed); beside them the mean ± standard deviation of the per-seed values:", "",
                  "| method | n | steps | AUC pooled | AUC mean ± sd | TPR@1%FPR pooled | TPR@1%FPR mean ± sd | "
                  "per-seed AUC |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['metric']} | {r['n']} | {r['steps']} | {f(r['auc'])} | {ms(r, 'auc')} | "
                  f"{f(r['tpr_1_closest'])} | {ms(r, 'tpr_1_closest')} | "
                  f"{', '.join(f'{v:.3f}' for v in r['seeds']['auc'])} |" for r in several]
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


def _best(rows):
    """(metric, row) per method, sorted by metric: its row with the largest n, then the fewest steps."""
    best = {}
    for r in rows:
        key = (r["n"], -r["steps"])
        if r["metric"] not in best or key > best[r["metric"]][0]:
            best[r["metric"]] = (key, r)
    return [(metric, r) for metric, (_, r) in sorted(best.items())]


def table_curves(rows):
    """One ROC curve per method for roc_figure: its row with the largest n, then the fewest steps."""
    return [(f"{_label(r)}: AUC {r['auc']:.3f}", r["roc"]["fpr"], r["roc"]["tpr"]) for _, r in _best(rows)]
