"""Evaluate mitigation: fetch the prompts' training images, then score generated images by SSCD and CLIP.

    python mitigate_eval.py fetch --jsonl prompts/sd1_mem.jsonl --out training_images/sd1
    python mitigate_eval.py score --images miti_outputs/sd1/mem --gt training_images/sd1 \
        --sscd sscd_disc_large.torchscript.pt [--compare OTHER.json]

score: per prompt, the similarity of each generated image to the prompt's training image(s) (max over them),
averaged over its images, and the CLIP score (image vs prompt). Prompts are matched to training images by caption
text. Writes <out>.json (summary, per-prompt rows, arguments, versions) and <out>.csv (per-prompt rows).
"""
import argparse
import csv
import io
import math
import os
import sys

os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")  # before huggingface_hub is imported: offline fails fast
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")

from utils import fetch as F
from utils import matching as M
from utils import similarity as S
from utils.cli import UserError, finite_float, guarded, positive_float, positive_int, warn
from utils.io import atomic_write_json, atomic_write_text, library_versions
from utils.prompts import read_jsonl

PAPER_USABLE = {"sd1_mem.jsonl": (454, 500), "sd2_mem.jsonl": (202, 219)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download/copy the training images of a jsonl prompt set")
    f.add_argument("--jsonl", required=True, help="records with caption, index and url (or file)")
    f.add_argument("--out", required=True, help="folder for <index>_<k>.<ext> images and fetch_manifest.csv")
    f.add_argument("--prompt_mirror", default=None, help="folder with verified benchmark files (offline machines)")
    f.add_argument("--workers", type=positive_int, default=8)
    f.add_argument("--timeout", type=positive_float, default=15.0, help="seconds per connect/read")
    f.add_argument("--total_timeout", type=positive_float, default=60.0, help="seconds per whole download")
    f.add_argument("--retries", type=int, default=2, help="extra tries for timeouts, 429 and 5xx")
    f.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry (doubles)")
    f.add_argument("--max_mb", type=positive_float, default=30.0, help="largest accepted download")
    f.add_argument("--min_side", type=positive_int, default=F.MIN_SIDE, help="smaller images are placeholders")
    f.add_argument("--offline_after", type=int, default=24,
                   help="stop when this many first downloads all fail to connect (0: never)")
    s = sub.add_parser("score", help="SSCD (or pixel cosine) to training images, and CLIP score")
    s.add_argument("--images", required=True, help="folder of generated images (mitigate_mem.py output)")
    s.add_argument("--manifest", default=None, help="generation manifest (default: <images>/manifest.jsonl)")
    s.add_argument("--gt", required=True, help="training-image folder written by `fetch`")
    s.add_argument("--similarity", default="sscd", choices=["sscd", "pixel"])
    s.add_argument("--sscd", default="sscd_disc_large.torchscript.pt", help="SSCD TorchScript file")
    s.add_argument("--sscd_preprocess", default="center224", choices=sorted(S.SSCD_PRESETS))
    s.add_argument("--pixel_size", type=positive_int, default=32, help="common side for --similarity pixel")
    s.add_argument("--clip_model", default="ViT-H-14", help="open_clip architecture, or 'none' to skip CLIP")
    s.add_argument("--clip_pretrained", default="laion2b_s32b_b79k", help="open_clip tag or checkpoint file")
    s.add_argument("--shared_gt_keywords", nargs="*", default=[], metavar="WORD",
                   help="prompts with one of these words are judged against all training images sharing it "
                        "('paper' = design designart mills anderson, the reference's SD v2.0 rule)")
    s.add_argument("--thresholds", type=finite_float, nargs="+", default=[0.5, 0.7])
    s.add_argument("--device", default=None)
    s.add_argument("--batch_size", type=positive_int, default=32)
    s.add_argument("--out", default=None, help="results JSON (default: <images>/eval_<similarity>.json)")
    s.add_argument("--compare", default=None, help="another results JSON to print side by side (e.g. baseline)")
    return p.parse_args(argv)


def run_fetch(a):
    records = read_jsonl(a.jsonl, a.prompt_mirror)
    fetcher = F.Fetcher(timeout=a.timeout, retries=max(0, a.retries), backoff=max(0.0, a.backoff),
                        max_bytes=int(a.max_mb * (1 << 20)), total_timeout=a.total_timeout)
    rows = F.fetch_all(records, os.path.dirname(os.path.abspath(a.jsonl)), a.out, fetcher, workers=a.workers,
                       min_side=a.min_side, offline_after=max(0, a.offline_after))
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    usable, total = F.usable_count(rows)
    atomic_write_json(os.path.join(a.out, F.INFO_NAME), {
        "jsonl": os.path.abspath(a.jsonl), "usable_records": usable, "records": total, "status_counts": counts,
        "arguments": vars(a), "user_agent": F.USER_AGENT, "versions": F.versions()})
    print("status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    paper = PAPER_USABLE.get(os.path.basename(a.jsonl))
    print(f"usable: {usable}/{total} records have a training image"
          + (f" (the paper had {paper[0]}/{paper[1]}; link rot lowers this over time)" if paper else ""))
    for group in F.shared_bytes(rows)[:5]:
        warn(f"records {', '.join(map(str, group[:6]))}{' ...' if len(group) > 6 else ''} got byte-identical "
             "images (a site's placeholder picture?); check them before scoring")
    print(f"manifest: {os.path.join(a.out, F.MANIFEST_NAME)}")


def open_image(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return F.to_rgb(im)
    except Exception as e:  # PIL raises many types for corrupt files
        warn(f"cannot read image {path} ({type(e).__name__}); skipped")
        return None


def run_score(a):
    import torch
    from tqdm import tqdm
    from utils.models import resolve_device
    manifest = a.manifest or os.path.join(a.images, "manifest.jsonl")
    header, records = M.read_generation_manifest(manifest)
    other = load_result(a.compare) if a.compare else None  # a bad path fails now, not after the scoring
    gt_recs = M.ground_truth_records(F.read_manifest(os.path.join(a.gt, F.MANIFEST_NAME)), a.gt)
    keywords = tuple(dict.fromkeys(w for k in a.shared_gt_keywords
                                   for w in (M.PAPER_SHARED_KEYWORDS if k == "paper" else [k])))
    if str(header.get("sd_ver")) == "2" and not keywords:
        warn("for SD v2.0 the paper takes the max over all training images sharing the keywords design, "
             "designart, mills, anderson: add --shared_gt_keywords paper to follow it")
    matches, unmatched = M.match_captions([r["prompt"] for r in records], [g["caption"] for g in gt_recs])
    groups = M.keyword_groups([g["caption"] for g in gt_recs], keywords)
    present, missing, extra = M.check_images(records, os.path.dirname(os.path.abspath(manifest)), a.images)
    device = resolve_device(a.device)
    if a.similarity == "sscd":
        sim_name, model, prep = "SSCD", S.load_sscd(a.sscd, device), S.sscd_transform(a.sscd_preprocess)

        def embed(ims):
            return S.sscd_descriptors(model, prep, ims, device, a.batch_size)
    else:
        sim_name = S.PIXEL_NAME

        def embed(ims):
            return S.pixel_vectors(ims, a.pixel_size)
    clip = None if a.clip_model.lower() == "none" else S.load_clip(a.clip_model, a.clip_pretrained, device)
    gt_cache, rows, img_sims, prompt_sims, prompt_clips = {}, [], [], [], []
    for rec, paths, match in tqdm(list(zip(records, present, matches)), desc="score", unit="prompt"):
        images = [im for im in map(open_image, paths) if im is not None]
        gt_files = sorted({f for j in match for g in groups[j] for f in gt_recs[g]["files"]})
        for f in gt_files:
            if f not in gt_cache:  # each training image is embedded once, however many prompts share it
                gt_cache[f] = _embed_one(embed, f)
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
                row.update(similarity_per_image=sims, similarity_mean=sum(sims) / len(sims), similarity_max=max(sims))
                img_sims += sims
                prompt_sims.append(row["similarity_mean"])
            if clip and images:
                c = S.clip_scores(*clip, images, [rec["prompt"]] * len(images), device, a.batch_size).tolist()
                row.update(clip_per_image=c, clip_mean=sum(c) / len(c))
                prompt_clips.append(row["clip_mean"])
        rows.append(row)
    summary = S.summarize(img_sims, prompt_sims, prompt_clips, a.thresholds)
    counts = {"n_prompts": len(records), "n_evaluated": len(prompt_sims),
              "n_skipped_no_gt": sum(r["status"] in ("unmatched", "no_ground_truth") for r in rows),
              "n_unmatched": len(unmatched), "n_no_images": sum(r["status"] == "no_images" for r in rows),
              "n_images": sum(r["n_images"] for r in rows), "n_missing_images": len(missing),
              "n_extra_files": len(extra)}
    out = a.out or os.path.join(a.images, f"eval_{a.similarity}.json")
    result = {"similarity": {"name": sim_name, "kind": a.similarity, **(
                  {"model": os.path.abspath(a.sscd), "preprocess": a.sscd_preprocess, **S.SSCD_PRESETS[
                      a.sscd_preprocess]} if a.similarity == "sscd" else {"size": a.pixel_size})},
              "clip": None if clip is None else {"model": a.clip_model, "pretrained": a.clip_pretrained},
              "thresholds": a.thresholds, "summary": summary, "counts": counts,
              "unmatched_prompts": [records[i]["prompt"] for i in unmatched],
              "missing_images": [{"index": i, "file": n} for i, n in missing], "extra_files": extra,
              "shared_gt_keywords": list(keywords), "generation_header": header, "manifest": os.path.abspath(manifest),
              "gt": os.path.abspath(a.gt), "arguments": vars(a), "versions": library_versions(), "per_prompt": rows}
    atomic_write_json(out, result)
    atomic_write_text(os.path.splitext(out)[0] + ".csv", _rows_csv(rows))
    for i in unmatched:
        warn(f"no training-image record has the caption of prompt {records[i]['index']}: {records[i]['prompt']!r}")
    if missing:
        warn(f"{len(missing)} image(s) listed in {manifest} are missing, e.g. {missing[0][1]}")
    if extra:
        warn(f"{len(extra)} image file(s) in {a.images} are not in the manifest (not scored), e.g. {extra[0]}")
    print_summary(result)
    print(f"results: {out} (+ .csv)")
    if other is not None:
        print_compare(result, other, a.compare)


def _embed_one(embed, path):
    im = open_image(path)
    return None if im is None else embed([im])


def _rows_csv(rows):
    buf = io.StringIO()
    cols = ["index", "prompt", "status", "gt_indices", "n_gt_images", "n_images", "n_missing", "similarity_mean",
            "similarity_max", "similarity_per_image", "clip_mean", "clip_per_image"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (";".join(f"{x:.6f}" for x in r[k]) if isinstance(r[k], list) else
                        "" if r[k] is None else f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in cols})
    return buf.getvalue()


def _metrics(result, keep=None):
    """(label, value) lines of a result, optionally restricted to prompts whose normalized text is in keep."""
    name, th = result["similarity"]["name"], result["thresholds"]
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
    for label, v in _metrics(result)[:-1]:
        print(f"  {label:<38} {_fmt(v)}")


def load_result(path):
    import json
    try:
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        r["similarity"]["name"], r["per_prompt"], r["thresholds"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--compare {path} is not a results JSON of mitigate_eval.py score ({type(e).__name__})")
    return r


def print_compare(this, other, other_path):
    if this["similarity"]["name"] != other["similarity"]["name"]:
        warn(f"comparing {this['similarity']['name']} with {other['similarity']['name']}: not the same measure")
    other["thresholds"] = this["thresholds"]
    common = ({M.normalize_caption(r["prompt"]) for r in this["per_prompt"] if r["status"] == "ok"}
              & {M.normalize_caption(r["prompt"]) for r in other["per_prompt"] if r["status"] == "ok"})
    print(f"\n{'':<40}{'this run':>12}{'compared':>12}{'diff':>10}   (compared: {other_path})")
    for scope, keep in (("all evaluated prompts", None), (f"{len(common)} prompts evaluated in both", common)):
        print(f"  [{scope}]")
        for (label, x), (_, y) in zip(_metrics(this, keep), _metrics(other, keep)):
            d = x - y if x is not None and y is not None else None
            print(f"  {label:<38}{_fmt(x):>12}{_fmt(y):>12}{_fmt(d, sign=True):>10}")


def _fmt(v, sign=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return f"{v:+d}" if sign else str(v)
    return f"{v:+.4f}" if sign else f"{v:.4f}"


@guarded
def main(argv=None):
    a = parse_args(argv)
    if a.cmd == "fetch":
        run_fetch(a)
    else:
        if not os.path.isdir(a.images):
            raise UserError(f"--images {a.images} is not a folder")
        if not os.path.isdir(a.gt):
            raise UserError(f"--gt {a.gt} is not a folder; run `mitigate_eval.py fetch` first")
        run_score(a)


if __name__ == "__main__":
    sys.exit(main())
