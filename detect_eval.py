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

from utils.cli import ArgumentParser, UserError, guarded, parse_int_list, warn
from utils.detection import DETECTORS
from utils.io import atomic_write_bytes, atomic_write_text, check_outputs, figure_png, write_sidecar
from utils.metrics import TPR_RULES, detection_metrics
from utils.detection.tables import (TABLE_STEPS, build_table, discover, load_paper, markdown, roc_figure, set_pairs,
    table_curves)
from utils.results import describe_differences, differences, read_detection_result

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
    return p.parse_args(argv)


def run_pair(args):
    steps = None if args.steps is None else parse_int_list(args.steps, 1, None, "--steps (1-based step numbers)")
    stem = lambda p: os.path.splitext(os.path.basename(p))[0]
    out = args.out or os.path.join(os.path.dirname(args.mem) or ".", f"{stem(args.mem)}_vs_{stem(args.nmem)}.eval.json")
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

    res.update(mem_file=args.mem, nmem_file=args.nmem, steps=steps or "all",
               dropped_nan=dict(mem=int((~keep_m).sum()), nmem=int((~keep_n).sum())))
    write_sidecar(out, vars(args), **res)
    if not args.no_plot:
        curve = [(f"AUC {res['auc']:.3f}", res["roc"]["fpr"], res["roc"]["tpr"])]
        png = figure_png(roc_figure(curve, f"{stem(args.mem)} vs {stem(args.nmem)}"))
        atomic_write_bytes(os.path.splitext(out)[0] + ".roc.png", png)
    print(f"saved {out}")


def run_table(args):
    if not os.path.isdir(args.table):
        raise UserError(f"--table {args.table} is not a folder")
    steps = parse_int_list(args.table_steps, 1, None, "--table_steps")
    results = discover(args.table, tuple(DETECTORS))
    pairs = [tuple(args.sets)] if args.sets else set_pairs(results)
    if not pairs:
        raise UserError(f"no pair of <x>_mem / <x>_nmem results in {args.table}; name the sets with --sets")
    paper = load_paper()
    for mem_stem, nmem_stem in pairs:
        rows = build_table(results, mem_stem, nmem_stem, steps, paper)
        if not rows:
            raise UserError(f"no metric was computed for both {mem_stem} and {nmem_stem} in {args.table}")
        base = os.path.join(args.table, f"{mem_stem}_vs_{nmem_stem}.table")
        text = markdown(rows, f"{mem_stem} vs {nmem_stem}")
        atomic_write_text(base + ".md", text)
        write_sidecar(base + ".json", vars(args), mem=mem_stem, nmem=nmem_stem,
                      rows=[{k: v for k, v in r.items() if k != "roc"} for r in rows])
        atomic_write_bytes(base + ".roc.png", figure_png(roc_figure(table_curves(rows), f"{mem_stem} vs {nmem_stem}")))
        print(text)
        print(f"saved {base}.md, .json and .roc.png")


@guarded
def main(argv=None):
    args = parse_args(argv)
    run_table(args) if args.table else run_pair(args)


if __name__ == "__main__":
    main()
