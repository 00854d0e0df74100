"""Mitigation evaluation: score a generation folder against the prompts' training images, and report.

A generation folder is mitigate_mem.py's output (manifest.jsonl + images); a training-image folder is
`mitigate_eval.py fetch`'s output (fetch_manifest.csv + <index>_<k>.<ext>). Per prompt: the copy similarity of
each generated image to the prompt's training image(s) (max over them), averaged over its images, and the CLIP
score (image vs prompt). Prompts are matched to training images by caption text (utils.matching).
"""
import csv
import io
import json
import math
import os

import torch

from . import matching as M
from . import similarity as S
from .cli import UserError, warn
from .fetch_manifest import MANIFEST_NAME, read_manifest
from .images import MAX_FILE_BYTES
from .io import DataPathError, read_limited

CSV_COLUMNS = ["index", "prompt", "status", "gt_indices", "n_gt_images", "n_images", "n_missing", "similarity_mean",
               "similarity_max", "similarity_per_image", "clip_mean", "clip_per_image"]


def open_image(path, max_bytes=MAX_FILE_BYTES):
    """An RGB PIL image, or None (with a warning) if the file cannot be read (utils.io.read_limited: a regular
    file of at most max_bytes) or decoded."""
    from PIL import Image

    from .images import to_rgb
    try:
        data = read_limited(path, max_bytes)
    except DataPathError as e:
        warn(f"cannot read image {path} ({e.detail}); skipped")
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb(im)
    except Exception as e:  # PIL raises many types for corrupt files
        warn(f"cannot read image {path} ({type(e).__name__}); skipped")
        return None


def pixel_embedder(size=32):
    """images -> pixel cosine features (N, 3*size*size) float64."""
    return lambda images: S.pixel_vectors(images, size)


def sscd_embedder(model, preprocess, device="cpu", batch_size=32):
    """images -> L2-normalized SSCD descriptors (N, D)."""
    return lambda images: S.sscd_descriptors(model, preprocess, images, device, batch_size)


def expand_keywords(words):
    """Keyword list with 'paper' expanded to the reference's SD v2.0 keywords; order kept, duplicates dropped."""
    return tuple(dict.fromkeys(w for k in words for w in (M.PAPER_SHARED_KEYWORDS if k == "paper" else [k])))


def evaluate(manifest, images_dir, gt_dir, embed, clip=None, *, keywords=(), thresholds=(0.5, 0.7), device="cpu",
             batch_size=32):
    """Score every prompt of a generation manifest. embed: images -> (N, D) unit vectors (pixel_embedder or
    sscd_embedder); clip: (model, preprocess, tokenizer) or None.

    Returns a dict: summary, counts, per_prompt rows, unmatched_prompts, missing_images, extra_files,
    shared_gt_keywords, generation_header, manifest, gt (the caller adds what describes the measures).
    """
    from tqdm import tqdm
    header, records = M.read_generation_manifest(manifest)
    gt_recs = M.ground_truth_records(read_manifest(os.path.join(gt_dir, MANIFEST_NAME)), gt_dir)
    matches, unmatched = M.match_captions([r["prompt"] for r in records], [g["caption"] for g in gt_recs])
    groups = M.keyword_groups([g["caption"] for g in gt_recs], keywords)
    training_files = {f for g in gt_recs for f in g["files"]}
    present, missing, extra = M.check_images(records, os.path.dirname(os.path.abspath(manifest)), images_dir,
                                             exclude=training_files)
    gt_cache, rows, img_sims, prompt_sims, prompt_clips = {}, [], [], [], []
    for rec, paths, match in tqdm(list(zip(records, present, matches)), desc="score", unit="prompt"):
        images = [im for im in map(open_image, paths) if im is not None]
        gt_files = sorted({f for j in match for g in groups[j] for f in gt_recs[g]["files"]})
        for f in gt_files:
            if f not in gt_cache:  # each training image is embedded once, however many prompts share it
                im = open_image(f)
                gt_cache[f] = None if im is None else embed([im])
        gt = [gt_cache[f] for f in gt_files if gt_cache[f] is not None]
        row = {"index": rec["index"], "prompt": rec["prompt"], "gt_indices": ";".join(
            str(gt_recs[j]["index"]) for j in match), "n_gt_images": len(gt), "n_images": len(images),
            "n_missing": len(rec["images"]) - len(images), "similarity_mean": None, "similarity_max": None,
            "similarity_per_image": [], "clip_mean": None, "clip_per_image": []}
        row["status"] = ("unmatched" if not match else "no_ground_truth" if not gt else
                         "no_images" if not images else "ok")
        with torch.no_grad():
            if row["status"] == "ok":
                sims = S.max_similarity(embed(images).double(), torch.cat(gt).double()).tolist()
                if _all_finite(sims, "similarity", rec["index"]):
                    row.update(similarity_per_image=sims, similarity_mean=sum(sims) / len(sims),
                               similarity_max=max(sims))
                    img_sims += sims
                    prompt_sims.append(row["similarity_mean"])
                else:
                    row["status"] = "non_finite"
            if clip and images:
                c = S.clip_scores(*clip, images, [rec["prompt"]] * len(images), device, batch_size).tolist()
                if _all_finite(c, "CLIP score", rec["index"]):
                    row.update(clip_per_image=c, clip_mean=sum(c) / len(c))
                    prompt_clips.append(row["clip_mean"])
        rows.append(row)
    counts = {"n_prompts": len(records), "n_evaluated": len(prompt_sims),
              "n_skipped_no_gt": sum(r["status"] in ("unmatched", "no_ground_truth") for r in rows),
              "n_unmatched": len(unmatched), "n_no_images": sum(r["status"] == "no_images" for r in rows),
              "n_images": sum(r["n_images"] for r in rows), "n_missing_images": len(missing),
              "n_extra_files": len(extra)}
    return {"thresholds": list(thresholds), "summary": S.summarize(img_sims, prompt_sims, prompt_clips, thresholds),
            "counts": counts, "unmatched_prompts": [records[i]["prompt"] for i in unmatched],
            "missing_images": [{"index": i, "file": n, "reason": why} for i, n, why in missing], "extra_files": extra,
            "shared_gt_keywords": list(keywords), "generation_header": header,
            "manifest": os.path.abspath(manifest), "gt": os.path.abspath(gt_dir), "per_prompt": rows}


def _all_finite(values, what, index):
    """True if every value is finite; else a warning (a NaN from a broken model must not enter the averages, and
    would make the results JSON non-standard)."""
    if all(math.isfinite(v) for v in values):
        return True
    warn(f"prompt {index}: a {what} is not finite (NaN or inf); left out of the results")
    return False


def warn_problems(result):
    """Warnings for prompts without a training image, images listed but missing or refused, and unlisted image
    files."""
    for row in result["per_prompt"]:
        if row["status"] == "unmatched":
            warn(f"no training-image record has the caption of prompt {row['index']}: {row['prompt']!r}")
    missing, extra = result["missing_images"], result["extra_files"]
    if missing:
        m = missing[0]
        warn(f"{len(missing)} image(s) listed in {result['manifest']} are missing or not usable (not scored), e.g. "
             f"{m['file']!r:.80} ({m.get('reason', 'missing')})")
    if extra:
        warn(f"{len(extra)} image file(s) in the images folder are not in the manifest (not scored), e.g. {extra[0]}")


def rows_csv(rows):
    """The per-prompt rows as CSV text (lists joined by ';', floats with 6 decimals)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (";".join(f"{x:.6f}" for x in r[k]) if isinstance(r[k], list) else
                        "" if r[k] is None else f"{r[k]:.6f}" if isinstance(r[k], float) else r[k])
                    for k in CSV_COLUMNS})
    return buf.getvalue()


def metric_lines(result, keep=None, thresholds=None):
    """(label, value) lines of a result, optionally restricted to prompts whose normalized text is in keep;
    thresholds default to the result's own."""
    name, th = result["similarity"]["name"], thresholds or result["thresholds"]
    rows = [r for r in result["per_prompt"] if keep is None or M.normalize_caption(r["prompt"]) in keep]
    sims = [r["similarity_mean"] for r in rows if r["similarity_mean"] is not None]
    clips = [r["clip_mean"] for r in rows if r["clip_mean"] is not None]
    s = S.summarize([x for r in rows for x in r["similarity_per_image"]], sims, clips, th)
    lines = [(f"mean {name}", s["mean_similarity"])]
    lines += [(f"{name} > {t:g} (frac. of images)", s[f"frac_above_{t:g}"]) for t in th]
    return lines + [("mean CLIP", s["mean_clip"]), ("prompts evaluated", len(sims))]


def print_summary(result):
    c = result["counts"]
    print(f"evaluated {c['n_evaluated']}/{c['n_prompts']} prompts ({c['n_skipped_no_gt']} skipped: no ground-truth "
          f"image, of which {c['n_unmatched']} unmatched; {c['n_no_images']} without images), {c['n_images']} images")
    for label, v in metric_lines(result)[:-1]:
        print(f"  {label:<38} {_fmt(v)}")


def load_result(path):
    """A results JSON written by `mitigate_eval.py score`; anything else is a UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        r["similarity"]["name"], r["per_prompt"], r["thresholds"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a results JSON of mitigate_eval.py score ({type(e).__name__})")
    return r


def print_compare(this, other, other_path):
    """Side-by-side table of two results, over all evaluated prompts and over the prompts evaluated in both; both
    summarized with this result's thresholds (neither result is modified)."""
    if this["similarity"]["name"] != other["similarity"]["name"]:
        warn(f"comparing {this['similarity']['name']} with {other['similarity']['name']}: not the same measure")
    th = this["thresholds"]
    common = ({M.normalize_caption(r["prompt"]) for r in this["per_prompt"] if r["status"] == "ok"}
              & {M.normalize_caption(r["prompt"]) for r in other["per_prompt"] if r["status"] == "ok"})
    print(f"\n{'':<40}{'this run':>12}{'compared':>12}{'diff':>10}   (compared: {other_path})")
    for scope, keep in (("all evaluated prompts", None), (f"{len(common)} prompts evaluated in both", common)):
        print(f"  [{scope}]")
        for (label, x), (_, y) in zip(metric_lines(this, keep, th), metric_lines(other, keep, th)):
            d = x - y if x is not None and y is not None else None
            print(f"  {label:<38}{_fmt(x):>12}{_fmt(y):>12}{_fmt(d, sign=True):>10}")


def _fmt(v, sign=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return f"{v:+d}" if sign else str(v)
    return f"{v:+.4f}" if sign else f"{v:.4f}"
