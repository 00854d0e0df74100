"""Evaluate mitigation: fetch the prompts' training images, score generated images by SSCD and CLIP, plot Figure 6.

    python mitigate_eval.py fetch --jsonl prompts/sd1_mem.jsonl --out training_images/sd1
    python mitigate_eval.py score --images miti_outputs/sd1/mem --gt training_images/sd1 [--compare OTHER.json]
    python mitigate_eval.py plot miti_outputs/sd1 --similarity sscd --out figures/sd1_fig6
    python mitigate_eval.py labels miti_outputs/sd1/mem_nomiti --source prompts/memorized_laion_prompts.csv --out L

score: per prompt, the similarity of each generated image to the prompt's training image(s) (max over them),
averaged over its images, the CLIP score (image vs the original prompt) and the share of nearly blank images.
Prompts are matched to training images by caption text. SSCD weights are fetched on first use into torch hub's
cache (checked by SHA-256; --sscd PATH offline). Writes <out>.json (summary, per-prompt rows, arguments, versions)
and <out>.csv. plot: one point per scored generation folder (method x setting): PREFIX.png and PREFIX.csv, and
with --grid_prompts a per-prompt image grid PREFIX_grid.png. labels: from the score of a no-mitigation run, each
memorized prompt's copy status beside its published label (utils/evaluation/label_report.py): L.csv, L.json, L.md.
"""
import os
import sys

from utils import demo  # noqa: F401  (registers the demo CLIP model: --clip_model demo)
from utils import distributed as D
from utils.evaluation import scoring as E
from utils.evaluation import fetch as F
from utils.evaluation import fetch_manifest as FM
from utils.evaluation import label_report as LR
from utils.evaluation import matching as M
from utils.evaluation import side_effects as SE
from utils.evaluation import similarity as S
from utils.cli import (CHECK_ONLY_HELP, ArgumentParser, UserError, bounded_float, bounded_int, checked_only,
    device_name, finite_float, flag_hint, guarded, nonneg_int, nonneg_seconds, seconds, warn)
from utils.evaluation.images import MIN_SIDE
from utils.io import atomic_write_bytes, atomic_write_text, check_outputs, write_sidecar
from utils.models.clip import SSCD_URL, load_clip, load_sscd, sscd_cache_path, sscd_weights
from utils.mitigation import methods
from utils.models.families import FAMILIES
from utils.models.loading import resolve_device
from utils.prompts import read_jsonl, read_text



def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download/copy the training images of a jsonl prompt set")
    f.add_argument("--jsonl", required=True, help="records with caption, index and url (or file)")
    f.add_argument("--out", required=True, help="folder for <index>_<k>.<ext> images and fetch_manifest.csv")
    f.add_argument("--prompt_mirror", default=None, help="folder with verified benchmark files (offline machines)")
    f.add_argument("--workers", type=bounded_int(1, 256), default=8)
    f.add_argument("--timeout", type=seconds, default=15.0, help="seconds per connect/read (at most one day)")
    f.add_argument("--total_timeout", type=seconds, default=60.0,
                   help="seconds per URL, all its retries, redirects and reads included (at most one day)")
    f.add_argument("--retries", type=bounded_int(0, 100), default=2, help="extra tries for timeouts, 429 and 5xx")
    f.add_argument("--backoff", type=nonneg_seconds, default=1.0, help="seconds before the first retry (doubles)")
    f.add_argument("--max_mb", type=bounded_float(0, 100_000, low_open=True), default=30.0,
                   help="largest accepted image (MB), downloaded or local")
    f.add_argument("--min_side", type=bounded_int(1, 100_000), default=MIN_SIDE,
                   help="smaller images are placeholders")
    f.add_argument("--offline_after", type=nonneg_int, default=24,
                   help="stop when this many first downloads all fail to connect (0: never)")
    s = sub.add_parser("score", help="SSCD (or pixel cosine) to training images, and CLIP score")
    s.add_argument("--images", required=True, help="folder of generated images (mitigate_mem.py output)")
    s.add_argument("--manifest", default=None, help="generation manifest (default: <images>/manifest.jsonl)")
    s.add_argument("--gt", required=True, help="training-image folder written by `fetch`")
    s.add_argument("--similarity", default="sscd", choices=["sscd", "pixel"])
    s.add_argument("--sscd", default=None, help="SSCD TorchScript file (default: fetched once into torch hub's cache)")
    s.add_argument("--sscd_sha256", default=None, metavar="HEX",
                   help="pin the SSCD file's SHA-256 (none is published; without it the hash seen at the first "
                        "download is recorded beside the file and checked on every later use)")
    s.add_argument("--sscd_url", default=SSCD_URL, help="where to fetch the SSCD weights from")
    s.add_argument("--sscd_preprocess", default="center224", choices=sorted(S.SSCD_PRESETS))
    s.add_argument("--pixel_size", type=bounded_int(1, 1024), default=32, help="common side for --similarity pixel")
    s.add_argument("--clip_model", default="ViT-H-14",
                   help="open_clip architecture, 'demo' (the demo's own CLIP model) or 'none' to skip CLIP")
    s.add_argument("--clip_pretrained", default=None,
                   help="open_clip tag or checkpoint file (default laion2b_s32b_b79k, the paper's); for 'demo' its "
                        "weights folder")
    s.add_argument("--shared_gt_keywords", nargs="*", default=[], metavar="WORD",
                   help="prompts with one of these words are judged against all training images sharing it "
                        "('paper' = design designart mills anderson, the reference's SD v2.0 rule)")
    s.add_argument("--gt_match", default="caption", choices=["caption", "all"],
                   help="caption: each prompt's own training image(s); all: the most similar of all training images "
                        "(e.g. for non-memorized prompts)")
    s.add_argument("--thresholds", type=finite_float, nargs="+", default=[0.5, 0.7])
    s.add_argument("--device", default=None, type=device_name)
    s.add_argument("--batch_size", type=bounded_int(1, 100_000), default=32)
    s.add_argument("--out", default=None,
                   help="results JSON, a name ending in .json (default: <images>/eval_<similarity>.json); the "
                        "per-prompt CSV goes beside it")
    s.add_argument("--compare", default=None, help="another results JSON to print side by side (e.g. baseline)")
    s.add_argument("--reference", default=None, metavar="NONE_FOLDER",
                   help="a --method none run of the same prompts: also each image's similarity to its unmitigated "
                        "twin (same noise) and the paired CLIP change (side effects, docs/mitigation.md)")
    s.add_argument("--allow_incomplete", action="store_true",
                   help="score a generation that did not finish (a killed run's prompts so far) on purpose")
    s.add_argument("--check_only", action="store_true", help=CHECK_ONLY_HELP)
    g = sub.add_parser("plot", help="Figure 6: copy similarity vs CLIP score, one point per method and setting")
    g.add_argument("results", nargs="+", help="score result JSONs, or folders searched for them (eval_*.json)")
    g.add_argument("--out", required=True, help="path prefix: writes PREFIX.png and PREFIX.csv")
    g.add_argument("--similarity", default=None, choices=["sscd", "pixel"],
                   help="in folders, take eval_<this>.json (needed when both kinds are there)")
    g.add_argument("--y", default="clip", choices=["clip", "not_blank"],
                   help="y axis: mean CLIP score (the paper), or the share of images that are not nearly blank")
    g.add_argument("--title", default=None)
    g.add_argument("--grid_prompts", type=index_list, default=None, metavar="I,J,...",
                   help="also PREFIX_grid.png: these prompt indices under each method (the paper's Figures 7-8)")
    g.add_argument("--grid_pick", nargs="*", default=[], metavar="METHOD=SETTING",
                   help="setting shown per method in the grid (label or folder tag, e.g. sail=thres0.6)")
    g.add_argument("--gt", default=None, help="training-image folder: the grid's first column")
    g.add_argument("--side", nargs="+", default=None, metavar="RESULT",
                   help="score results (or folders) of the non-memorized prompts scored with --reference: a second "
                        "panel, x = similarity to the unmitigated image, y = CLIP change; PREFIX_side.csv")
    g.add_argument("--allow_mixed", action="store_true",
                   help="plot runs of different models, seeds, n, steps or prompt lists in one figure on purpose")
    lab = sub.add_parser("labels", help="label report: which memorized prompts copy, beside their published labels")
    lab.add_argument("result", help="score result of a --method none run of the memorized prompts, or its folder")
    lab.add_argument("--similarity", default=None, choices=["sscd", "pixel"], help="in a folder, eval_<this>.json")
    lab.add_argument("--source", default=None, metavar="FILE",
                     help="published labels: prompts/sd2_mem.jsonl (overfit_type) or prompts/"
                          "memorized_laion_prompts.csv (NeMo's VM/TM, SD v1.4); fetched by name, SHA-256 checked")
    lab.add_argument("--prompt_mirror", default=None, help="folder with verified benchmark files (offline machines)")
    lab.add_argument("--copy_threshold", type=bounded_float(-1, 1), default=LR.COPY_THRESHOLD,
                     help="copies: the largest similarity over a prompt's images exceeds this")
    lab.add_argument("--out", required=True, help="path prefix: PREFIX.csv (detect_eval.py --labels), .json, .md")
    return p.parse_args(argv)


def index_list(text):
    """argparse type: comma-separated prompt indices (integers >= 0)."""
    return [nonneg_int(v) for v in text.split(",") if v.strip()]


def run_fetch(a):
    check_outputs({"--out": a.out}, {"--jsonl": a.jsonl})  # the jsonl (and its local images) never inside --out
    records = read_jsonl(a.jsonl, a.prompt_mirror)
    fetcher = F.Fetcher(timeout=a.timeout, retries=a.retries, backoff=a.backoff,
                        max_bytes=int(a.max_mb * (1 << 20)), total_timeout=a.total_timeout)
    with flag_hint("--offline_after 0 tries every URL", only=F.Offline):
        rows = F.fetch_all(records, os.path.dirname(os.path.abspath(a.jsonl)), a.out, fetcher, workers=a.workers,
                           min_side=a.min_side, offline_after=a.offline_after)
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    usable, total = FM.usable_count(rows)
    write_sidecar(os.path.join(a.out, FM.INFO_NAME), vars(a), jsonl=os.path.abspath(a.jsonl), usable_records=usable,
                  records=total, status_counts=counts, user_agent=F.USER_AGENT)
    print("status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    paper = next((u[1:] for u in (f.hparam("paper_usable") for f in FAMILIES.values())
                  if u and u[0] == os.path.basename(a.jsonl)), None)  # the family's (file, usable, records)
    print(f"usable: {usable}/{total} records have a training image"
          + (f" (the paper had {paper[0]}/{paper[1]}; link rot lowers this over time)" if paper else ""))
    for group in FM.shared_bytes(rows)[:5]:
        warn(f"records {', '.join(map(str, group[:6]))}{' ...' if len(group) > 6 else ''} got byte-identical "
             "images (a site's placeholder picture?); check them before scoring")
    print(f"manifest: {os.path.join(a.out, FM.MANIFEST_NAME)}")


def run_score(a):
    manifest = a.manifest or os.path.join(a.images, "manifest.jsonl")
    M.check_generation_started(manifest)
    out = a.out or os.path.join(a.images, f"eval_{a.similarity}.json")
    E.check_score_outputs(out, manifest, a.gt, a.compare, a.sscd if a.similarity == "sscd" else None,
                          a.clip_pretrained)
    # a run still going, killed midway or otherwise unfinished is refused before any work
    M.check_generation_finished(manifest, *M.read_generation_manifest(manifest), a.allow_incomplete)
    if a.similarity == "sscd" and not a.sscd:  # the weights' cache, checked before any process starts work
        with flag_hint("or pass --sscd PATH"):
            sscd_cache_path(a.sscd_url)
    other = E.load_result(a.compare) if a.compare else None  # a bad path fails now, not after the scoring
    if checked_only(a.check_only):
        return
    # several processes under accelerate launch / torchrun: prompts are sharded
    shard, device = D.join(resolve_device(a.device), vars(a))
    if a.similarity == "sscd":
        with flag_hint("pass --sscd PATH, or --similarity pixel for the offline demo"):
            if not shard.main:
                D.barrier(shard)  # the main process fetches the weights once, the others then read them
            path = sscd_weights(a.sscd, a.sscd_sha256, a.sscd_url)
            if shard.main:
                D.barrier(shard)
            sscd = load_sscd(path, device)
        embed = E.sscd_embedder(sscd, S.sscd_transform(a.sscd_preprocess), device, a.batch_size)
        sim = {"name": "SSCD", "kind": "sscd", "model": os.path.abspath(path), "preprocess": a.sscd_preprocess,
               **S.SSCD_PRESETS[a.sscd_preprocess]}
    else:
        embed = E.pixel_embedder(a.pixel_size)
        sim = {"name": S.PIXEL_NAME, "kind": "pixel", "size": a.pixel_size}
    clip, pretrained = None, a.clip_pretrained
    if a.clip_model.lower() != "none":
        if pretrained is None and a.clip_model != "demo":
            pretrained = "laion2b_s32b_b79k"  # the paper's ViT-H-14 weights
        with flag_hint("--clip_pretrained FILE takes a checkpoint; --clip_model none skips CLIP"):
            clip = load_clip(a.clip_model, pretrained, device)
    keywords = E.expand_keywords(a.shared_gt_keywords)
    reference = SE.Reference(a.reference) if a.reference else None
    result = E.evaluate(manifest, a.images, a.gt, embed, clip, keywords=keywords, thresholds=a.thresholds,
                        device=device, batch_size=a.batch_size, match_all=a.gt_match == "all", shard=shard,
                        reference=reference)
    D.finish(shard)
    if not shard.main:  # the main process writes and reports what all of them scored
        return
    result = {"similarity": sim, "clip": None if clip is None else {"model": a.clip_model,
                                                                      "pretrained": pretrained}, **result}
    header = result["generation_header"]
    family = FAMILIES.get(header.get("model")) or (FAMILIES["sd2"] if str(header.get("sd_ver")) == "2" else None)
    rule = family.hparam("eval_keywords") if family else ()  # SD v2.0: the reference's keyword rule
    if rule and not keywords:
        warn(f"for {family.title} the paper takes the max over all training images sharing the keywords "
             f"{', '.join(E.expand_keywords(rule))}: add --shared_gt_keywords {' '.join(rule)} to follow it")
    E.write_score_result(out, vars(a), result)
    E.warn_problems(result)
    E.print_summary(result)
    print(f"results: {out} (+ .csv)")
    if other is not None:
        E.print_compare(result, other, a.compare)


def run_plot(a):
    paths = E.result_paths(a.results, a.similarity)
    side_paths = E.result_paths(a.side, a.similarity) if a.side else []
    outs = {"--out (figure)": a.out + ".png", "--out (numbers)": a.out + ".csv",
            "--out (image grid)": a.out + "_grid.png" if a.grid_prompts else None,
            "--out (side effects)": a.out + "_side.csv" if a.side else None}
    # never replace a result read here, nor anything in its folder (generated images, score CSV, manifest) or in
    # the training-image folder
    check_outputs(outs, [("a result", p) for p in paths + side_paths] + [
        ("a result's folder", os.path.dirname(os.path.abspath(p))) for p in paths + side_paths] + [("--gt", a.gt)])
    results = [E.load_result(p) for p in paths]
    names = {r["similarity"]["name"] for r in results}
    if len(names) > 1:
        raise UserError(f"the results mix measures ({', '.join(sorted(names))}); choose one with --similarity")
    mixed = E.mixed_runs(results, paths)
    if mixed and not a.allow_mixed:
        raise UserError(f"the results come from different runs ({mixed}); plot them apart, or --allow_mixed")
    thresholds = sorted({t for r in results for t in r["thresholds"]})
    if any(r["thresholds"] != results[0]["thresholds"] for r in results):
        raise UserError("the results were scored with different --thresholds; score them alike")
    rows = E.figure6_rows(results, paths, methods)
    y = "mean_clip" if a.y == "clip" else "not_blank"
    for r in rows:
        r["not_blank"] = None if r["frac_blank"] is None else 1 - r["frac_blank"]
    if y == "mean_clip" and any(r["mean_clip"] is None for r in rows):
        bad = next(r["result"] for r in rows if r["mean_clip"] is None)
        raise UserError(f"{bad} has no CLIP score: score with --clip_model (or plot --y not_blank)")
    clip = next((r["clip"] for r in results if r.get("clip")), None) or {}
    ylabel = (f"mean CLIP score ({clip.get('model')})" if y == "mean_clip" else "share of images not nearly blank")
    side = None
    if a.side:
        side_results = [E.load_result(p) for p in side_paths]
        mixed = E.mixed_runs(side_results, side_paths)
        if {r["similarity"]["name"] for r in side_results} != names or (mixed and not a.allow_mixed):
            raise UserError("the --side results must share the measure of the others and one run (seed, n, ...)")
        side = E.side_rows(side_results, side_paths, methods)
        atomic_write_text(a.out + "_side.csv", E.side_csv(side))
    name = names.pop()
    atomic_write_text(a.out + ".csv", E.figure6_csv(rows, thresholds))
    atomic_write_bytes(a.out + ".png", E.figure6_plot(rows, f"mean {name} to the training image", ylabel, y,
                                                      a.title, side, f"mean {name} to the unmitigated image"))
    print(f"{len(rows)} point(s): {a.out}.png, {a.out}.csv")
    if a.grid_prompts:
        picks = dict(p.split("=", 1) for p in a.grid_pick if "=" in p)
        if len(picks) != len(a.grid_pick):
            raise UserError("--grid_pick takes METHOD=SETTING pairs")
        atomic_write_bytes(a.out + "_grid.png", E.image_grid(results, a.grid_prompts, methods, picks, a.gt))
        print(f"image grid: {a.out}_grid.png")


def run_labels(a):
    paths = E.result_paths([a.result], a.similarity)
    if len(paths) != 1:
        raise UserError(f"{a.result} holds {len(paths)} score results; choose one with --similarity or its path")
    outs = {f"--out ({x})": a.out + x for x in (".csv", ".json", ".md")}
    check_outputs(outs, {"the score result": paths[0], "--source": a.source})
    source_text = read_text(a.source, a.prompt_mirror) if a.source else None
    s = LR.make_report(paths[0], a.out, vars(a), methods.describe_run, a.copy_threshold, a.source, source_text)
    print(", ".join(f"{k} {v}" for k, v in s["status"].items()) + f" of {s['n_prompts']} prompts")
    print(f"labels: {a.out}.csv (detect_eval.py --labels), summary: {a.out}.json, {a.out}.md")


@guarded(memory_hint="use a smaller --batch_size")
def main(argv=None):
    a = parse_args(argv)
    if a.cmd == "fetch":
        run_fetch(a)
    elif a.cmd == "plot":
        run_plot(a)
    elif a.cmd == "labels":
        run_labels(a)
    else:
        if not os.path.isdir(a.images):
            raise UserError(f"--images {a.images} is not a folder")
        if not os.path.isdir(a.gt):
            raise UserError(f"--gt {a.gt} is not a folder; run `mitigate_eval.py fetch` first")
        run_score(a)


if __name__ == "__main__":
    sys.exit(main())
