"""The label report: which memorized prompts really copy a training image, beside their published labels.

Input: the score result of a no-mitigation run of the memorized prompts (`mitigate_eval.py score` on
`mitigate_mem.py --method none`: per prompt and image, the copy similarity to the prompt's training image(s),
SSCD or pixel cosine) and optionally the published source labels (SD v2.0's `overfit_type` in sd2_mem.jsonl;
NeMo's `type` in memorized_laion_prompts.csv for SD v1.4). Output: a per-prompt CSV in the format
utils.evaluation.labels reads (`detect_eval.py --labels`), and a summary as JSON and Markdown.

The status rule (one threshold, default 0.7, the field's SSCD convention: Wen et al.'s issue #5 and NeMo's
verbatim/template split count a prompt as copying when an image reaches SSCD > 0.7): `copies` when the largest
similarity over the prompt's k images exceeds the threshold, `does not copy` otherwise, `no training image` when
the prompt has no usable training image (no caption match, or its image could not be fetched or read).
"""
import csv
import io
import os

from ..cli import UserError, warn
from . import matching as M
from .labels import SOURCE_KINDS, STATUSES

COPY_THRESHOLD = 0.7
COLUMNS = ["prompt", "status", "source_label", "index", "max_similarity", "n_images", "n_gt_images", "gt_indices"]


def prompt_status(row, threshold=COPY_THRESHOLD):
    """Status (one of labels.STATUSES) of one per-prompt row of a score result. A prompt whose images could not
    be scored (none readable, or a non-finite similarity) has no status: UserError."""
    if row["status"] in ("unmatched", "no_ground_truth"):
        return STATUSES[2]
    if row["status"] != "ok" or row.get("similarity_max") is None:
        raise UserError(f"prompt {row['index']} ({row['prompt']!r:.60}) has no scored image (score status "
                        f"{row['status']}); regenerate or rescore it before labelling")
    return STATUSES[0] if row["similarity_max"] > threshold else STATUSES[1]


def read_source_labels(path, text):
    """{normalized caption: published label} of a source-label file, given its text: a JSON-lines prompt file
    whose records carry `overfit_type` (SD v2.0), or NeMo's ';'-separated CSV with `Caption` and `type` columns
    (VM / TM). Anything else is a UserError."""
    if path.lower().endswith(".jsonl"):
        import json
        out = {}
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise UserError(f"{path} line {i} is not valid JSON") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("caption"), str) or "overfit_type" not in rec:
                raise UserError(f"{path} line {i} has no caption and overfit_type: not a source-label file "
                                "(SD v2.0's sd2_mem.jsonl has them; SD v1.4's jsonl has none)")
            out.setdefault(M.normalize_caption(rec["caption"]), str(rec["overfit_type"]))
        return out
    try:
        rows = list(csv.DictReader(io.StringIO(text), delimiter=";"))
    except csv.Error as e:
        raise UserError(f"cannot read {path} as a CSV: {e}") from None
    if not rows or not {"Caption", "type"} <= set(rows[0]):
        raise UserError(f"{path} has no 'Caption' and 'type' columns (NeMo's memorized_laion_prompts.csv, "
                        "';'-separated)")
    out = {}
    for r in rows:
        out.setdefault(M.normalize_caption(r["Caption"] or ""), (r["type"] or "").strip())
    return out


def label_rows(result, threshold=COPY_THRESHOLD, sources=None, source_path="the source labels"):
    """The per-prompt label rows (dicts with COLUMNS) of a score result, in its prompt order. sources: the
    output of read_source_labels or None. A source file that matches none of the prompts is for another prompt
    set: UserError; one that misses some leaves their source_label empty (a warning counts them)."""
    rows = []
    for r in result["per_prompt"]:
        rows.append({"prompt": r["prompt"], "status": prompt_status(r, threshold),
                     "source_label": "" if sources is None else sources.get(M.normalize_caption(r["prompt"]), ""),
                     "index": r["index"], "max_similarity": r.get("similarity_max"),
                     "per_image": list(r.get("similarity_per_image") or []), "n_images": r["n_images"],
                     "n_gt_images": r["n_gt_images"], "gt_indices": r["gt_indices"]})
    if sources is not None:
        found = sum(bool(r["source_label"]) for r in rows)
        if not found:
            raise UserError(f"{source_path} labels none of the {len(rows)} prompts: it is for another prompt set")
        if found < len(rows):
            warn(f"{source_path} labels {found} of the {len(rows)} prompts; the others get no source label")
    return rows


def labels_csv(rows, thresholds):
    """The per-prompt CSV: COLUMNS plus frac_above_<t> (share of the prompt's images above each threshold);
    similarities with 6 decimals, empty where there are none."""
    cols = list(COLUMNS)
    cols[5:5] = [f"frac_above_{t:g}" for t in thresholds]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        sims = r["per_image"]
        flat = dict(r, **{f"frac_above_{t:g}": (sum(s > t for s in sims) / len(sims)) if sims else None
                          for t in thresholds})
        w.writerow(["" if flat[c] is None else f"{flat[c]:.6f}" if isinstance(flat[c], float) else flat[c]
                    for c in cols])
    return buf.getvalue()


def summary(rows, thresholds):
    """Counts: prompts per status, per source label and per (source kind, status), and over the prompts with a
    training image the share of images above each threshold and the mean of the per-prompt maxima."""
    def count(keys):
        out = {}
        for k in keys:
            out[k] = out.get(k, 0) + 1
        return out
    judged = [r for r in rows if r["status"] != STATUSES[2]]
    sims = [s for r in judged for s in r["per_image"]]
    kinds = [SOURCE_KINDS.get(r["source_label"].lower(), r["source_label"] or "unlabelled") for r in rows]
    cross = {}
    for kind, r in zip(kinds, rows):
        cross.setdefault(kind, {s: 0 for s in STATUSES})[r["status"]] += 1
    return {"n_prompts": len(rows), "status": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
            "source_label": count(r["source_label"] or "" for r in rows), "source_kind_by_status": cross,
            "mean_max_similarity": (sum(r["max_similarity"] for r in judged) / len(judged)) if judged else None,
            "frac_images_above": {f"{t:g}": (sum(s > t for s in sims) / len(sims)) if sims else None
                                  for t in thresholds}}


def summary_markdown(s, measure, threshold, title):
    """The summary as a short Markdown page: status counts, then status by published source kind."""
    n = s["n_prompts"]
    lines = [f"# {title}", "", f"{n} memorized prompts; copy similarity: {measure}; status rule: copies when the "
             f"largest similarity over a prompt's images exceeds {threshold:g}.", "",
             "| status | prompts | share |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {v / n:.1%} |" for k, v in s["status"].items()]
    m = s["mean_max_similarity"]
    lines += ["", f"Mean over judged prompts of the largest similarity: {'-' if m is None else f'{m:.3f}'}; share "
              "of their images above " + ", ".join(f"{t}: {'-' if v is None else f'{v:.1%}'}"
                                                   for t, v in s["frac_images_above"].items()) + ".", ""]
    if set(s["source_kind_by_status"]) != {"unlabelled"}:
        lines += ["| published label | " + " | ".join(STATUSES) + " |", "|---" * (len(STATUSES) + 1) + "|"]
        lines += [f"| {kind} | " + " | ".join(str(c[st]) for st in STATUSES) + " |"
                  for kind, c in sorted(s["source_kind_by_status"].items())]
        raw = ", ".join(f"{k or '(none)'} {v}" for k, v in sorted(s["source_label"].items()))
        lines += ["", f"Source labels as published: {raw}."]
    return "\n".join(lines) + "\n"



def make_report(result_path, prefix, arguments, describe_run, threshold=COPY_THRESHOLD, source_path=None,
                source_text=None):
    """The label report of the score result at result_path (load_result), written to PREFIX.csv/.json/.md;
    source_text: the text of the source-label file at source_path, or None. describe_run: the method registry's
    header reader (utils.mitigation.methods.describe_run, passed in: evaluation does not import method code); a
    result of another method than none is a UserError. Returns the summary."""
    from .scoring import load_result
    result = load_result(result_path)
    method = describe_run(result.get("generation_header") or {})[0]
    if method != "none":
        raise UserError(f"{result_path} scores a {method} run; the label report reads a no-mitigation run "
                        "(--method none)")
    sources = read_source_labels(source_path, source_text) if source_text is not None else None
    rows = label_rows(result, threshold, sources, source_path)
    return write_report(prefix, arguments, result, result_path, rows, threshold)


def write_report(prefix, arguments, result, result_path, rows, threshold):
    """PREFIX.csv (labels_csv), PREFIX.json (summary, rule, measure, inputs, arguments, versions) and PREFIX.md
    (summary_markdown); returns the summary."""
    from ..io import atomic_write_text, write_sidecar
    th = result["thresholds"]
    s = summary(rows, th)
    measure = result["similarity"]["name"]
    atomic_write_text(prefix + ".csv", labels_csv(rows, th))
    write_sidecar(prefix + ".json", arguments, summary=s, copy_threshold=threshold, similarity=result["similarity"],
                  score_result=os.path.abspath(result_path), generation_header=result.get("generation_header"),
                  rule=f"copies: max over the prompt's images of the {measure} to its training image(s) > "
                       f"{threshold:g}; no training image: none matched or usable; else does not copy")
    atomic_write_text(prefix + ".md", summary_markdown(s, measure, threshold, "Label report"))
    return s
