"""Mitigation evaluation: score a generation folder against the prompts' training images, and report.

A generation folder is mitigate_mem.py's output (manifest.jsonl + images); a training-image folder is
`mitigate_eval.py fetch`'s output (fetch_manifest.csv + <index>_<k>.<ext>). Per prompt: the copy similarity of
each generated image to the prompt's training image(s) (max over them), averaged over its images, and the CLIP
score (image vs prompt). Prompts are matched to training images by caption text (utils.matching).
"""
import csv
import io
import math
import os

import torch

from . import matching as M
from .cost import image_cost
from . import side_effects as SE
from . import similarity as S
from ..cli import UserError, warn
from .fetch_manifest import MANIFEST_NAME, read_manifest
from .images import MAX_FILE_BYTES
from ..io import DataPathError, atomic_write_text, read_json_file, read_limited, write_sidecar
from ..schemas import ScoreResult

CSV_COLUMNS = ["index", "prompt", "status", "gt_indices", "n_gt_images", "n_images", "n_missing", "similarity_mean",
               "similarity_max", "similarity_per_image", "clip_mean", "clip_per_image", "n_blank"]


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
             batch_size=32, match_all=False, shard=None, reference=None):
    """Score every prompt of a generation manifest. embed: images -> (N, D) unit vectors (pixel_embedder or
    sscd_embedder); clip: (model, preprocess, tokenizer) or None. match_all: judge every prompt against every
    training image (max over all, as a retrieval over the training set) instead of its caption's images.
    shard: a utils.distributed.Shard when several processes share the prompts (each scores its share; every
    process gets all rows back, in manifest order, so the summary is the one a single process computes).
    reference: a side_effects.Reference (a no-mitigation run of the same prompts): each row then also gets its
    images' similarity to the unmitigated ones and the CLIP change, and the result a `side_effects` summary.

    Returns a dict: summary, counts, per_prompt rows, unmatched_prompts, missing_images, extra_files,
    shared_gt_keywords, generation_header, manifest, gt (the caller adds what describes the measures).
    """
    from tqdm import tqdm
    header, records = M.read_generation_manifest(manifest)
    if reference is not None:
        reference.check_run(header)
    gt_recs = M.ground_truth_records(read_manifest(os.path.join(gt_dir, MANIFEST_NAME)), gt_dir)
    matches, unmatched = M.match_captions([r["prompt"] for r in records], [g["caption"] for g in gt_recs])
    if match_all:
        matches, unmatched = [list(range(len(gt_recs)))] * len(records), ([] if gt_recs else list(range(len(records))))
    groups = M.keyword_groups([g["caption"] for g in gt_recs], keywords)
    training_files = {f for g in gt_recs for f in g["files"]}
    present, missing, extra = M.check_images(records, os.path.dirname(os.path.abspath(manifest)), images_dir,
                                             exclude=training_files)
    from .. import distributed as D
    shard = shard or D.Shard()
    mine = [p for batch in D.my_batches(list(range(len(records))), 1, shard) for p in batch]
    gt_cache, rows = {}, []
    for pos in tqdm(mine, desc="score", unit="prompt"):
        rec, paths, match = records[pos], present[pos], matches[pos]
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
            "similarity_per_image": [], "clip_mean": None, "clip_per_image": [],
            "n_blank": sum(b <= S.BLANK_LEVEL for b in S.max_brightness(images))}
        row["status"] = ("unmatched" if not match else "no_ground_truth" if not gt else
                         "no_images" if not images else "ok")
        with torch.no_grad():
            if row["status"] == "ok":
                sims = S.max_similarity(embed(images).double(), torch.cat(gt).double()).tolist()
                if _all_finite(sims, "similarity", rec["index"]):
                    row.update(similarity_per_image=sims, similarity_mean=sum(sims) / len(sims),
                               similarity_max=max(sims))
                else:
                    row["status"] = "non_finite"
            if clip and images:
                c = S.clip_scores(*clip, images, [rec["prompt"]] * len(images), device, batch_size).tolist()
                if _all_finite(c, "CLIP score", rec["index"]):
                    row.update(clip_per_image=c, clip_mean=sum(c) / len(c))
        if reference is not None:
            row.update(reference.compare(rec, paths, images, row["clip_per_image"], embed, clip, device,
                                         batch_size, open_image))
        rows.append((pos, row))
    rows = [row for _, row in sorted((r for part in D.gather(shard, rows) for r in part), key=lambda r: r[0])]
    img_sims = [x for r in rows if r["similarity_mean"] is not None for x in r["similarity_per_image"]]
    prompt_sims = [r["similarity_mean"] for r in rows if r["similarity_mean"] is not None]
    prompt_clips = [r["clip_mean"] for r in rows if r["clip_mean"] is not None]
    counts = {"n_prompts": len(records), "n_evaluated": len(prompt_sims),
              "n_skipped_no_gt": sum(r["status"] in ("unmatched", "no_ground_truth") for r in rows),
              "n_unmatched": len(unmatched), "n_no_images": sum(r["status"] == "no_images" for r in rows),
              "n_images": sum(r["n_images"] for r in rows), "n_missing_images": len(missing),
              "n_extra_files": len(extra)}
    summary = S.summarize(img_sims, prompt_sims, prompt_clips, thresholds)
    summary["frac_blank"] = blank_fraction(rows)
    side = {} if reference is None else {"side_effects": SE.summarize(rows, reference.manifest)}
    return {**side, "thresholds": list(thresholds), "summary": summary, "match": "all" if match_all else "caption",
            "counts": counts, "unmatched_prompts": [records[i]["prompt"] for i in unmatched],
            "missing_images": [{"index": i, "file": n, "reason": why} for i, n, why in missing], "extra_files": extra,
            "shared_gt_keywords": list(keywords), "generation_header": header,
            "manifest": os.path.abspath(manifest), "gt": os.path.abspath(gt_dir), "per_prompt": rows}


def blank_fraction(rows):
    """Share of all read images that are nearly blank (similarity.BLANK_LEVEL), over per-prompt rows; None if none."""
    n = sum(r["n_images"] for r in rows)
    return sum(r.get("n_blank", 0) for r in rows) / n if n else None


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
    lines += [("mean CLIP", s["mean_clip"])]
    if all("n_blank" in r for r in rows):  # results written before the blank count have none
        lines += [("nearly blank (frac. of images)", blank_fraction(rows))]
    return lines + [("prompts evaluated", len(sims))]


def print_summary(result):
    c = result["counts"]
    print(f"evaluated {c['n_evaluated']}/{c['n_prompts']} prompts ({c['n_skipped_no_gt']} skipped: no ground-truth "
          f"image, of which {c['n_unmatched']} unmatched; {c['n_no_images']} without images), {c['n_images']} images")
    for label, v in metric_lines(result)[:-1]:
        print(f"  {label:<38} {_fmt(v)}")
    side = result.get("side_effects")
    if side:
        print(f"  against no mitigation ({side['n_prompts_paired']} prompts paired, same noise):")
        print(f"  {'similarity to the unmitigated image':<38} {_fmt(side['mean_reference_similarity'])} ± "
              f"{_fmt(side['se_reference_similarity'])}")
        print(f"  {'CLIP change':<38} {_fmt(side['mean_clip_change'], sign=True)} ± {_fmt(side['se_clip_change'])}")
        print(f"  {'pixel-identical images':<38} {_fmt(side['frac_identical_images'])}")


def write_score_result(path, arguments, result):
    """The score result: `result` (similarity, clip, generation header, summary, per_prompt, ...) as JSON at
    `path` with the run's arguments and versions, and its per-prompt rows as CSV beside it (read: load_result)."""
    write_sidecar(path, arguments, **result)
    atomic_write_text(os.path.splitext(path)[0] + ".csv", rows_csv(result["per_prompt"]))


def check_score_outputs(out, manifest, gt, compare=None, sscd=None, clip_pretrained=None):
    """Refuse results that would replace an input: out must be a .json name (never a generated image or the
    manifest) and, like the CSV beside it, no input file nor anything inside the training-image folder gt."""
    if not out.lower().endswith(".json"):
        raise UserError(f"--out {out} must be a file name ending in .json (the CSV is written beside it)")
    from ..io import check_outputs
    inputs = {"--manifest": manifest, "--gt": gt, "--compare": compare, "--sscd": sscd,
              "--clip_pretrained": clip_pretrained if clip_pretrained and os.path.isfile(clip_pretrained) else None}
    check_outputs({"--out": out, "--out's CSV": os.path.splitext(out)[0] + ".csv"}, inputs)


def result_paths(items, similarity=None):
    """Score-result paths from files and folders (a folder: every eval_<similarity>.json under it, or every
    eval_*.json when similarity is None), in the order given, folders sorted. UserError for anything else."""
    paths = []
    for r in items:
        if os.path.isdir(r):
            pattern = f"eval_{similarity}.json" if similarity else None
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(r) for f in fs
                           if (f == pattern if pattern else f.startswith("eval_") and f.endswith(".json")))
            if not found:
                raise UserError(f"no score results ({pattern or 'eval_*.json'}) under {r}; run `score` first")
            paths += found
        elif os.path.isfile(r):
            paths.append(r)
        else:
            raise UserError(f"{r} is neither a score result nor a folder")
    return paths


def load_result(path):
    """A results JSON written by `mitigate_eval.py score` (write_score_result); anything else is a UserError."""
    if not os.path.lexists(path):
        raise UserError(f"{path} not found: not a results JSON of mitigate_eval.py score")
    try:
        return read_json_file(path, "score result", ScoreResult)
    except UserError as e:
        raise UserError(f"{path} is not a results JSON of mitigate_eval.py score: {e}") from None


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
        theirs = dict(metric_lines(other, keep, th))
        for label, x in metric_lines(this, keep, th):
            y = theirs.get(label)
            d = x - y if x is not None and y is not None else None
            print(f"  {label:<38}{_fmt(x):>12}{_fmt(y):>12}{_fmt(d, sign=True):>10}")


def _fmt(v, sign=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return f"{v:+d}" if sign else str(v)
    return f"{v:+.4f}" if sign else f"{v:.4f}"


# ------------------------------------------------------------------------ Figure 6: one point per method x setting

FIG6_COLUMNS = ["method", "setting", "gated", "mean_similarity", "mean_clip", "frac_above", "frac_blank",
                "n_prompts", "n_images", "n_mitigated", "search_seconds", "generate_seconds", "search_unet_calls",
                "unet_forwards_per_image", "unet_backwards_per_image", "cost_ratio", "result"]


# What every point of one Figure 6 shares: the generation run's identity but the method, its settings and its sampling
# (--sampler / --author_settings: a method's point says so in its label), and the training images scored against.
SHARED_RUN_FIELDS = ("model", "model_id", "data_sha256", "gen_num", "gen_seed", "dtype", "device",
                     "num_inference_steps", "height", "width")


def mixed_runs(results, paths):
    """The first difference between score results that one figure must not mix (None when alike): a line
    naming the field and the two results, e.g. "gen_seed 0 in a.json vs 1 in b.json"."""
    def fields(res):
        head = res.get("generation_header") or {}
        return dict({k: head.get(k) for k in SHARED_RUN_FIELDS}, gt=res.get("gt"))
    first = fields(results[0])
    for res, path in zip(results[1:], paths[1:]):
        other = fields(res)
        for k in first:
            if first[k] != other[k]:
                return f"{k} {first[k]!r:.60} in {paths[0]} vs {other[k]!r:.60} in {path}"
    return None


def scored_manifest(res, path):
    """(header, records) of the generation manifest the score result res (read from path) names, only when it is
    the manifest that result scored: its header equals the result's generation_header. A result file's
    'manifest' field is data, so it may never lead the tool to another run's files (UserError otherwise)."""
    m = res.get("manifest")
    if not (isinstance(m, str) and os.path.isabs(m)):
        raise UserError(f"{path}: 'manifest' is not an absolute path; the file is damaged or was edited by hand")
    header, recs = M.read_generation_manifest(m)
    if header != res.get("generation_header"):
        raise UserError(f"{path} names the generation manifest {m}, which is not the run it scored (another "
                        "header); rescore that folder")
    return header, recs


def run_cost(res, path):
    """Mean per-prompt cost of the generation run a score result (read from path) scored, from its manifest
    (scored_manifest; manifest_cost). A manifest no longer there gives {}."""
    if not os.path.lexists(res.get("manifest") or ""):
        return {}
    return manifest_cost(*scored_manifest(res, path))


def manifest_cost(header, recs):
    """Mean per-prompt cost of a generation run from its manifest header and records: search seconds, generation
    seconds, search UNet calls, how many prompts were mitigated, and UNet evaluations per image with their ratio to
    plain generation (utils.evaluation.cost). Missing fields (older runs) give None."""
    def mean(*keys):
        vals = [next((r[k] for k in keys if isinstance(r.get(k), (int, float))), None) for r in recs]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None
    return dict(n_mitigated=sum(bool(r.get("mitigated", True)) for r in recs), search_seconds=mean("search_seconds"),
                generate_seconds=mean("generate_seconds"), search_unet_calls=mean("search_unet_calls", "unet_calls"),
                **image_cost(header, recs))  # UNet evaluations per image, one unit for every method (cost.py)


def figure6_rows(results, paths, naming):
    """One row per score result (a generation folder): method, setting and gating from its generation header, the
    summary numbers exactly as in the JSON, and the mean cost from its manifest. Sorted: method registry order
    (none first), then setting. frac_above is {threshold: fraction}. naming: the method registry's run naming
    (utils.mitigation.methods), passed in so that evaluation does not import method code."""
    METHODS, describe_run, setting_sort_key = naming.METHODS, naming.describe_run, naming.setting_sort_key
    rows = []
    for res, path in zip(results, paths):
        method, setting, settings, gated = describe_run(res.get("generation_header") or {})
        variant = naming.run_variant(res.get("generation_header") or {})
        s, c = res["summary"], res["counts"]
        rows.append(dict(method=method, setting=setting, gated=gated, variant=variant,
                         mean_similarity=s["mean_similarity"],
                         mean_clip=s["mean_clip"], frac_above={t: s[f"frac_above_{t:g}"] for t in res["thresholds"]},
                         frac_blank=s.get("frac_blank"), n_prompts=c["n_evaluated"], n_images=c["n_images"],
                         result=path, **run_cost(res, path),
                         _key=(list(METHODS).index(method) if method in METHODS else len(METHODS), gated,
                               variant, setting_sort_key(method, settings))))
    rows.sort(key=lambda r: r["_key"])
    return [{k: v for k, v in r.items() if k != "_key"} for r in rows]


SIDE_COLUMNS = ["method", "setting", "gated", "mean_reference_similarity", "se_reference_similarity",
                "mean_clip_change", "se_clip_change", "frac_identical_images", "frac_unchanged_prompts",
                "n_prompts_paired", "n_prompts", "n_mitigated", "frac_mitigated", "unet_forwards_per_image",
                "cost_ratio", "cost_saved", "result"]


def side_rows(results, paths, naming):
    """One row per score result of the non-memorized prompts scored with --reference: method, setting, gating,
    its side_effects summary, the share of prompts the run mitigated and its cost (run_cost), and for a gated run
    the cost saved against the same method and setting ungated (1 - ratio of their UNet evaluations per image;
    None without that run). Sorted as figure6_rows. A result without side effects is a UserError."""
    METHODS, describe_run, setting_sort_key = naming.METHODS, naming.describe_run, naming.setting_sort_key
    rows = []
    for res, path in zip(results, paths):
        if not res.get("side_effects"):
            raise UserError(f"{path} has no side effects: score it with --reference NONE_FOLDER")
        method, setting, settings, gated = describe_run(res.get("generation_header") or {})
        variant = naming.run_variant(res.get("generation_header") or {})
        cost, n = run_cost(res, path), res["counts"]["n_prompts"]
        if method == "none" and cost:
            cost["n_mitigated"] = 0  # its records carry no `mitigated` flag: none of its prompts is mitigated
        rows.append(dict({k: res["side_effects"].get(k) for k in SIDE_COLUMNS if k in res["side_effects"]},
                         method=method, setting=setting, gated=gated, variant=variant, n_prompts=n, result=path,
                         n_mitigated=cost.get("n_mitigated"), unet_forwards_per_image=cost.get(
                             "unet_forwards_per_image"), cost_ratio=cost.get("cost_ratio"),
                         frac_mitigated=None if cost.get("n_mitigated") is None else cost["n_mitigated"] / n,
                         _key=(list(METHODS).index(method) if method in METHODS else len(METHODS), gated,
                               variant, setting_sort_key(method, settings))))
    full = {(r["method"], r["setting"]): r["cost_ratio"] for r in rows if not r["gated"]}
    for r in rows:
        base = full.get((r["method"], r["setting"])) if r["gated"] else None
        r["cost_saved"] = 1 - r["cost_ratio"] / base if base and r["cost_ratio"] is not None else None
    rows.sort(key=lambda r: r["_key"])
    return [{k: v for k, v in r.items() if k != "_key"} for r in rows]


def side_csv(rows):
    """The side-effect rows as CSV text (floats written exactly, with repr)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SIDE_COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(c) is None else repr(r[c]) if isinstance(r[c], float) else r[c] for c in SIDE_COLUMNS])
    return buf.getvalue()


def figure6_csv(rows, thresholds):
    """The figure's numbers as CSV text (floats written exactly, with repr)."""
    buf = io.StringIO()
    cols = [c for c in FIG6_COLUMNS if c != "frac_above"]
    cols[4:4] = [f"frac_above_{t:g}" for t in thresholds]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        flat = dict(r, **{f"frac_above_{t:g}": r["frac_above"].get(t) for t in thresholds})
        w.writerow(["" if flat.get(c) is None else repr(flat[c]) if isinstance(flat[c], float) else flat[c]
                    for c in cols])
    return buf.getvalue()


def figure6_plot(rows, xlabel, ylabel, y="mean_clip", title=None, side=None, side_xlabel=None):
    """Figure 6: x = mean copy similarity, y = the chosen measure; one colour per method (gated runs hollow), each
    point labelled with its setting, the no-mitigation point as a black star. side: side_rows of the
    non-memorized prompts: a second panel beside it, x = mean similarity to the unmitigated image (side_xlabel),
    y = mean CLIP change, same colours and marks. Returns PNG bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import figure_png
    if side is None:
        fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    else:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
        # one colour per method in both panels: the memorized panel's first, then methods only the side panel has
        both = [dict(r, _x=r["mean_similarity"], _y=r[y]) for r in rows]
        both += [dict(r, _x=r["mean_reference_similarity"], _y=r["mean_clip_change"]) for r in side]
        _panel(ax2, side, "mean_reference_similarity", "mean_clip_change", dict(_colours(plt, both, "_x", "_y")))
        ax2.axhline(0, color="k", lw=0.5, alpha=0.5)
        ax2.set(xlabel=side_xlabel, ylabel="CLIP change against no mitigation (paired)",
                title="non-memorized prompts: side effects")
        ax2.grid(alpha=0.3)
        if ax2.get_legend_handles_labels()[0]:
            ax2.legend(fontsize=7, loc="best")
    _panel(ax, rows, "mean_similarity", y, dict(_colours(plt, rows, "mean_similarity", y)))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title or "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return figure_png(fig)


def _colours(plt, rows, x, y):
    """(method, gated) -> colour, in the order the groups with a point first appear in rows (the memorized
    panel's order, as that panel always coloured them), so both panels colour a method alike."""
    cycle = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    seen = {}
    for r in rows:
        key = (r["method"], r["gated"])
        if key not in seen and r["method"] != "none" and r[x] is not None and r[y] is not None:
            seen[key] = next(cycle)
    return seen.items()


def _panel(ax, rows, x, y, colours):
    """One scatter panel of figure6_plot: one group per (method, gated, sampling variant), the setting beside each
    point; a variant (another sampler or guidance scale, e.g. --author_settings) in its method's colour with
    triangles and a dashed curve."""
    from itertools import count
    spare = count()
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["gated"], r.get("variant", "")), []).append(r)
    for (method, gated, variant), rs in groups.items():
        pts = [(r[x], r[y], r["setting"]) for r in rs if r[x] is not None and r[y] is not None]
        if not pts:
            continue
        name = method + (" (gated)" if gated else "") + (f" ({variant})" if variant else "")
        if method == "none":
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="*", s=180, c="k", label=name, zorder=3)
            continue
        c = colours.get((method, gated)) or f"C{next(spare) % 10}"
        own = [p[2][:-len(variant)].rstrip(", ") if variant else p[2] for p in pts]  # without the variant
        if len({lab.split("=")[0] for lab in own}) == 1 and "," not in own[0]:  # one hyperparameter: a curve
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if variant else "-", color=c, lw=0.6, alpha=0.5)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=36, label=name, zorder=3, marker="^" if variant else "o",
                   facecolors="none" if gated else c, edgecolors=c)
        for xv, yv, lab in pts:
            ax.annotate(lab, (xv, yv), textcoords="offset points", xytext=(4, 3), fontsize=6, color=c)


def grid_pick(method, cands, want, folder_tag):
    """The run of `method` shown in the image grid: cands are ((is a sampling variant, setting sort key), setting
    label, result); want a setting label or folder tag (UserError when none has it), or None: the middle setting
    of the runs under the harness's own sampling (of all of them when there are none of those)."""
    cands = sorted(cands, key=lambda c: c[0])
    hit = [c for c in cands if want in (c[1], folder_tag(c[1]))]
    if want and not hit:
        raise UserError(f"no {method} result with setting {want!r}; there are: {', '.join(c[1] for c in cands)}")
    own = [c for c in cands if not c[0][0]] or cands
    return hit[0] if want else own[(len(own) - 1) // 2]


def image_grid(results, prompt_indices, naming, picks=None, gt_dir=None):
    """Figures 7-8: one row per chosen prompt index, one column per method, each cell the prompt's first image
    (k = 0: the same initial noise under every method but SAIL); the training image first when gt_dir is given.
    picks: {method: setting label or folder tag}; default the middle setting of the method's non-gated runs under the
    harness's own sampling (of all its non-gated runs when it has none of those).
    results: score results (their manifests locate the images); naming as in figure6_rows. Returns PNG bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import figure_png
    METHODS, describe_run, setting_sort_key = naming.METHODS, naming.describe_run, naming.setting_sort_key
    folder_tag = naming.folder_tag
    runs = {}
    for res in results:
        method, setting, settings, gated = describe_run(res.get("generation_header") or {})
        if not gated:  # the harness's own sampling first, so that the default pick is one of its runs
            variant = naming.run_variant(res.get("generation_header") or {})
            runs.setdefault(method, []).append(((bool(variant), setting_sort_key(method, settings)), setting, res))
    chosen = []
    for method in sorted(runs, key=lambda m: list(METHODS).index(m) if m in METHODS else len(METHODS)):
        _, label, res = grid_pick(method, runs[method], (picks or {}).get(method), folder_tag)
        _, records = scored_manifest(res, "a score result")
        chosen.append((method, label, os.path.dirname(res["manifest"]), {r["index"]: r for r in records}))
    gt = _first_training_images(gt_dir) if gt_dir else None
    ncol = len(chosen) + (gt is not None)
    fig, axes = plt.subplots(len(prompt_indices), ncol, figsize=(1.5 * ncol, 1.6 * len(prompt_indices) + 0.3),
                             squeeze=False, dpi=110)
    for i, idx in enumerate(prompt_indices):
        prompt = next((recs[idx]["prompt"] for *_, recs in chosen if idx in recs), None)
        if prompt is None:
            raise UserError(f"prompt index {idx} is in none of the results")
        cells = ([("training image", gt.get(M.normalize_caption(prompt)))] if gt is not None else [])
        cells += [(f"{method}\n{label}", os.path.join(folder, recs[idx]["images"][0]) if idx in recs else None)
                  for method, label, folder, recs in chosen]
        for j, (title, path) in enumerate(cells):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            im = open_image(path) if path and os.path.isfile(path) else None
            if im is not None:
                ax.imshow(im)
            if i == 0:
                ax.set_title(title, fontsize=6)
        axes[i][0].set_ylabel(prompt[:30] + ("..." if len(prompt) > 30 else ""), fontsize=5)
    fig.tight_layout()
    return figure_png(fig)


def _first_training_images(gt_dir):
    """{normalized caption: first training-image file} of a fetched training-image folder."""
    recs = M.ground_truth_records(read_manifest(os.path.join(gt_dir, MANIFEST_NAME)), gt_dir)
    return {M.normalize_caption(r["caption"]): r["files"][0] for r in recs if r["files"]}
