"""Evaluate detection: AUC and TPR@1%/3%FPR of memorized vs non-memorized prompt scores from detect_mem.py.

    python detect_eval.py --mem det_outputs/sd1_mem_gen4.pt --nmem det_outputs/sd1_nmem_gen4.pt
    python detect_eval.py --table det_outputs            # every metric x n x steps found: the paper's Table 1

Pair mode: a prompt's score is the mean over the measured sampling steps (or the steps given by --steps); prints
one line, writes the numbers as JSON and the ROC curve as PNG beside the inputs (or where --out says).
Table mode: for each memorized / non-memorized pair of prompt sets in the folder (<x>_mem and <x>_nmem, or
--sets), writes <mem>_vs_<nmem>.table.md / .json / .roc.png there and prints the Markdown table.
"""
import os

import numpy as np

from utils.cli import ArgumentParser, UserError, guarded, parse_int_list, settings_arguments, settings_from, warn
from utils.detection import DETECTORS
from utils.io import atomic_write_bytes, atomic_write_text, check_outputs, figure_png, write_sidecar
from utils.metrics import TPR_RULES, detection_metrics
from utils.evaluation.labels import SUBSETS, labelled_subset
from utils.detection.maps import load_masks, localization_scores, resized_maps, result_maps
from utils.detection.seeds import pooled_rows, seed_folders
from utils.detection.tables import (TABLE_STEPS, build_table, comparisons, discover, load_paper, markdown, roc_figure,
    set_pairs, table_curves)
from utils.results import describe_differences, differences, read_detection_result
from utils.stats import BootstrapSettings, metric_intervals

TARGET_FPRS = (0.01, 0.03)  # the paper reports TPR@1%FPR; 3% is printed too, as the reference does


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mem", default="det_outputs/sd1_mem_gen4.pt", help="scores of memorized prompts (.pt)")
    p.add_argument("--nmem", default="det_outputs/sd1_nmem_gen4.pt", help="scores of non-memorized prompts (.pt)")
    p.add_argument("--steps", default=None,
                   help="comma-separated 1-based steps to average (default: all measured steps)")
    p.add_argument("--tpr_rule", default="closest", choices=TPR_RULES,
                   help="closest: ROC point with FPR nearest the target (reference); strict: best TPR with FPR<=target")
    p.add_argument("--out", default=None, help="JSON path (default: <mem stem>_vs_<nmem stem>.eval.json beside --mem)")
    p.add_argument("--no_plot", action="store_true", help="skip the ROC curve PNG")
    p.add_argument("--allow_mixed", action="store_true",
                   help="pair mode: compare results of different settings (model, seed, n, metric, ...) on purpose")
    p.add_argument("--table", default=None, metavar="DIR", help="table mode: every result found in DIR")
    p.add_argument("--sets", nargs=2, default=None, metavar=("MEM_STEM", "NMEM_STEM"),
                   help="table mode: the two prompt sets (default: every <x>_mem / <x>_nmem pair in DIR)")
    p.add_argument("--table_steps", default=",".join(map(str, TABLE_STEPS)),
                   help="table mode: first-k-steps settings of multi-step metrics (the paper's 1, 5, 50)")
    p.add_argument("--localization", default=None, metavar="MASKS_DIR",
                   help="localization mode: IoU, mean IoU and pixel accuracy of --mem's maps (curv_ds, curv_dh, be --be_maps) "
                        "against the binary masks in MASKS_DIR (<index>_<k>.png or <index>.png; docs/detection.md)")
    p.add_argument("--labels", default=None, metavar="LABELS.csv",
                   help="per-prompt labels of the memorized set (docs/detection.md): evaluate on --subset only")
    p.add_argument("--subset", default="all", choices=SUBSETS,
                   help="with --labels: copies (status), verbatim or template (source_label), or all")
    added = settings_arguments(p, BootstrapSettings, title="confidence intervals")
    args = p.parse_args(argv)
    if args.subset != "all" and not args.labels:
        p.error(f"--subset {args.subset} needs --labels")
    args.bootstrap_settings = settings_from(BootstrapSettings, vars(args), added)
    return args


def run_localization(args):
    maps = result_maps(args.mem)
    scores = localization_scores(resized_maps(maps), load_masks(args.localization, maps))
    out = args.out or os.path.splitext(args.mem)[0] + ".localization.json"
    check_outputs({"--out": out}, {"--mem": args.mem})
    print(f"IoU: {scores['iou']:.4f} | mIoU: {scores['miou']:.4f} | accuracy: {scores['accuracy']:.4f} "
          f"({scores['maps']} maps)")
    write_sidecar(out, _arguments(args), **scores)
    print(f"saved {out}")


def run_pair(args):
    steps = None if args.steps is None else parse_int_list(args.steps, 1, None, "--steps (1-based step numbers)")
    stem = lambda p: os.path.splitext(os.path.basename(p))[0]
    part = f".{args.subset}" if args.labels else ""  # a subset's files beside, not over, the whole set's
    out = args.out or os.path.join(os.path.dirname(args.mem) or ".",
                                   f"{stem(args.mem)}_vs_{stem(args.nmem)}{part}.eval.json")
    check_outputs({"--out": out, "the ROC PNG": os.path.splitext(out)[0] + ".roc.png"},
                  {"--mem": args.mem, "--nmem": args.nmem})
    results = [read_detection_result(p) for p in (args.mem, args.nmem)]
    diff = differences(*results)
    if diff and not args.allow_mixed:
        raise UserError(f"--mem and --nmem come from different settings ({describe_differences(*results, diff)}); "
                        "their scores are not comparable (--allow_mixed compares them anyway)")
    widths = [r.values.shape[1] for r in results]
    if steps is None and widths[0] != widths[1]:
        raise UserError(f"--mem has {widths[0]} measured step(s) and --nmem {widths[1]}: their means over all steps "
                        "are not comparable; choose common steps with --steps")
    mem, nmem = (r.scores(steps) for r in results)  # per prompt: mean over the steps, larger = memorized
    if args.labels:
        mask = labelled_subset(args.labels, results[0].prompts, args.subset, len(nmem))
        mem = mem[mask]
    keep_m, keep_n = np.isfinite(mem), np.isfinite(nmem)
    if (~keep_m).any() or (~keep_n).any():
        warn(f"dropped {int((~keep_m).sum())} memorized and {int((~keep_n).sum())} non-memorized prompt(s) "
             "with NaN scores")
    mem, nmem = mem[keep_m], nmem[keep_n]
    if len(mem) == 0 or len(nmem) == 0:
        raise UserError("need at least one finite score in each of --mem and --nmem")
    res = detection_metrics(mem, nmem, TARGET_FPRS, args.tpr_rule)
    if res["auc"] < 0.5:
        warn(f"AUC {res['auc']:.3f} is below 0.5: memorized prompts score LOWER than non-memorized ones; "
             "reported as is (check that --mem and --nmem are not swapped)")
    tprs = " | ".join(f"TPR@{f * 100:g}%FPR: {v:.3f}" for f, v in res["tpr_at_fpr"].items())
    print(f"AUC: {res['auc']:.3f} | {tprs}")
    boot = args.bootstrap_settings
    if boot.bootstrap > 0:  # the pair's TPR columns are the table's: closest rule at 1% and 3%, strict at 1%
        res["ci"] = metric_intervals(mem, nmem, boot)
        ci = res["ci"]
        show = lambda key: "[" + ", ".join("?" if v is None else f"{v:.3f}" for v in ci[key]["interval"]) + "]"
        print(f"{boot.ci_level * 100:g}% interval ({boot.ci_method}, {boot.bootstrap} resamples): AUC {show('auc')} | "
              f"TPR@1%FPR {show('tpr_1_closest')} (strict {show('tpr_1_strict')}) | TPR@3%FPR {show('tpr_3_closest')}")

    if args.labels:
        res.update(labels=args.labels, subset=args.subset, subset_size=int(mask.sum()), set_size=len(mask))
    res.update(mem_file=args.mem, nmem_file=args.nmem, steps=steps or "all",
               dropped_nan=dict(mem=int((~keep_m).sum()), nmem=int((~keep_n).sum())))
    write_sidecar(out, _arguments(args), **res)
    if not args.no_plot:
        curve = [(f"AUC {res['auc']:.3f}", res["roc"]["fpr"], res["roc"]["tpr"])]
        png = figure_png(roc_figure(curve, f"{stem(args.mem)} vs {stem(args.nmem)}"))
        atomic_write_bytes(os.path.splitext(out)[0] + ".roc.png", png)
    print(f"saved {out}")


def run_table(args):
    if not os.path.isdir(args.table):
        raise UserError(f"--table {args.table} is not a folder")
    steps = parse_int_list(args.table_steps, 1, None, "--table_steps")
    # several seeds (detect_mem.py --gen_seed a,b): one folder per seed, pooled into one table here
    folders = seed_folders(args.table) or [(None, args.table)]
    if folders[0][0] is not None and discover(args.table, tuple(DETECTORS)):
        warn(f"{args.table} has seed<s>/ folders: they are pooled, and the results directly in it are not used")
    found = [(seed, discover(folder, tuple(DETECTORS))) for seed, folder in folders]
    results = found[0][1]
    pairs = [tuple(args.sets)] if args.sets else set_pairs(results)
    if not pairs:
        raise UserError(f"no pair of <x>_mem / <x>_nmem results in {folders[0][1]}; name the sets with --sets")
    paper = load_paper()
    for mem_stem, nmem_stem in pairs:
        mask, title = None, f"{mem_stem} vs {nmem_stem}"
        if args.labels:
            first = next((r for r in results if r["stem"] == mem_stem), None)
            nmem_first = next((r for r in results if r["stem"] == nmem_stem), None)
            if first is None or nmem_first is None:
                raise UserError(f"no result of {mem_stem} and {nmem_stem} in {folders[0][1]}")
            mask = labelled_subset(args.labels, first["sidecar"].get("prompts"), args.subset,
                                   len(nmem_first["sidecar"].get("values") or []))
            title += f", subset {args.subset}: {int(mask.sum())} of {len(mask)} memorized prompts"
        boot = args.bootstrap_settings if len(found) == 1 else None  # pooled rows carry no intervals
        rows = pooled_rows([(seed, build_table(res, mem_stem, nmem_stem, steps, paper, boot, mask))
                            for seed, res in found])
        if not rows:
            raise UserError(f"no metric was computed for both {mem_stem} and {nmem_stem} in {args.table}")
        base = os.path.join(args.table, f"{mem_stem}_vs_{nmem_stem}" + (f".{args.subset}" if args.labels else "")
                            + ".table")
        compared = comparisons(rows, args.bootstrap_settings)
        text = markdown(rows, title, compared)
        atomic_write_text(base + ".md", text)
        extra = dict(comparisons=compared) if compared else {}
        if mask is not None:
            extra.update(labels=args.labels, subset=args.subset, subset_size=int(mask.sum()), set_size=len(mask))
        write_sidecar(base + ".json", _arguments(args), mem=mem_stem, nmem=nmem_stem,
                      rows=[{k: v for k, v in r.items() if k not in ("roc", "scores")} for r in rows], **extra)
        atomic_write_bytes(base + ".roc.png", figure_png(roc_figure(table_curves(rows), title)))
        print(text)
        print(f"saved {base}.md, .json and .roc.png")


def _arguments(args):
    """The arguments as the sidecar records them (the settings object is recorded by its flags)."""
    return {k: v for k, v in vars(args).items() if k != "bootstrap_settings"}


@guarded
def main(argv=None):
    args = parse_args(argv)
    run_table(args) if args.table else run_localization(args) if args.localization else run_pair(args)


if __name__ == "__main__":
    main()
