"""Several seeds of one table: detect_mem.py --gen_seed a,b,... writes each seed's results in <out_dir>/seed<s>/;
the table pools them and reports the mean and spread across seeds beside the pooled value."""
import os
import re

import numpy as np

from ..cli import warn
from ..metrics import detection_metrics

SEED_DIR = re.compile(r"^seed(\d+)$")
SEED_KEYS = ("auc", "tpr_1_closest", "tpr_1_strict", "tpr_3_closest")


def seed_folders(folder):
    """[(seed, path)] of the seed<s> subfolders of folder, by seed."""
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := SEED_DIR.match(name)) and os.path.isdir(os.path.join(folder, name))]
    return sorted(found)


def pooled_rows(per_seed):
    """One table from the tables of several seeds (build_table's rows per seed).

    per_seed: [(seed, rows)], rows with their "scores". A (metric, n, steps) row missing in any seed is skipped
    (with a warning). One seed: its rows unchanged. Several: the point values are those of the pooled scores (every
    prompt once per seed, as separate samples), "seeds" holds each seed's values and their mean and sample
    standard deviation (ddof 1), cost and settings are the first seed's; no intervals and no "scores" (the pooled
    samples are not independent prompts, so resampling them as such would understate the spread)."""
    if len(per_seed) == 1:
        return per_seed[0][1]
    key = lambda r: (r["metric"], r["n"], r["steps"])
    tables = [{key(r): r for r in rows} for _, rows in per_seed]
    seeds = [s for s, _ in per_seed]
    out = []
    for r0 in per_seed[0][1]:
        k = key(r0)
        missing = [s for s, t in zip(seeds, tables) if k not in t]
        if missing:
            warn(f"{r0['metric']} n = {r0['n']}, {r0['steps']} steps: no result for seed(s) "
                 f"{', '.join(map(str, missing))}; left out of the several-seed table")
            continue
        rs = [t[k] for t in tables]
        mem = np.concatenate([r["scores"]["mem"] for r in rs])
        nmem = np.concatenate([r["scores"]["nmem"] for r in rs])
        km, kn = np.isfinite(mem), np.isfinite(nmem)
        res = detection_metrics(mem[km], nmem[kn], (0.01, 0.03), "closest")
        strict = detection_metrics(mem[km], nmem[kn], (0.01,), "strict")
        row = {k2: v for k2, v in r0.items() if k2 not in ("ci", "scores")}
        row.update(auc=res["auc"], tpr_1_closest=res["tpr_at_fpr"][0.01], tpr_1_strict=strict["tpr_at_fpr"][0.01],
                   tpr_3_closest=res["tpr_at_fpr"][0.03], n_mem=int(km.sum()), n_nmem=int(kn.sum()),
                   dropped_nan=int((~km).sum() + (~kn).sum()), roc=res["roc"])
        per = {m: [r[m] for r in rs] for m in SEED_KEYS}
        row["seeds"] = dict(seeds=seeds, **per, mean={m: float(np.mean(v)) for m, v in per.items()},
                            sd={m: float(np.std(v, ddof=1)) for m, v in per.items()})
        out.append(row)
    return out
