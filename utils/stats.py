"""Bootstrap confidence intervals of detection metrics, and the paired comparison of two detectors.

Prompts are resampled within each class (memorized and non-memorized separately: a stratified bootstrap, so every
resample has the original class sizes), by scipy.stats.bootstrap (percentile or BCa interval), with a fixed seed.
The statistic receives resampled prompt *indices*, so the same resample can be applied to two detectors' scores of
the same prompts: that is the paired comparison (the bootstrap distribution of the AUC difference).
"""
import warnings
from dataclasses import dataclass, field

import numpy as np

from .cli import UserError, bounded_float, bounded_int, seed_int
from .metrics import tpr_at_fpr

CI_METHODS = ("percentile", "BCa")
MAX_RESAMPLES = 100_000   # beyond this the intervals do not improve, only the run time (and memory) grows
_BATCH_ELEMENTS = 4_000_000  # resampled indices held at once (int64: 32 MB): bounds memory for any B and n
# The table's TPR columns: (key, target FPR, rule), as tables.build_table names them.
TPR_COLUMNS = (("tpr_1_closest", 0.01, "closest"), ("tpr_1_strict", 0.01, "strict"), ("tpr_3_closest", 0.03, "closest"))


@dataclass(frozen=True)
class BootstrapSettings:
    bootstrap: int = field(default=2000, metadata=dict(type=bounded_int(0, MAX_RESAMPLES), metavar="B"))  # bootstrap resamples of the prompts (stratified by class) for the confidence intervals; 0: no intervals
    ci_level: float = field(default=0.95, metadata=dict(type=bounded_float(0, 1, low_open=True, high_open=True)))  # confidence level of the bootstrap intervals
    ci_method: str = field(default="percentile", metadata=dict(choices=CI_METHODS))  # interval from the bootstrap distribution (scipy.stats.bootstrap): percentile or BCa (bias-corrected and accelerated)
    ci_seed: int = field(default=0, metadata=dict(type=seed_int))  # seed of the resampling (same seed, same intervals)


def roc_points(pos, neg):
    """The ROC curve of scores (larger = positive) as sklearn.metrics.roc_curve computes it (collinear points
    dropped, (0, 0) prepended), without its input checks, which cost more than the curve on every resample.
    pos, neg: 1-D arrays. Returns (fpr, tpr), 1-D arrays."""
    s = np.concatenate([pos, neg])
    y = np.zeros(len(s))
    y[:len(pos)] = 1.0
    order = np.argsort(s, kind="mergesort")[::-1]   # sklearn's order: stable sort, reversed
    s, y = s[order], y[order]
    last = np.empty(len(s), bool)                   # last position of each distinct score
    last[:-1] = s[1:] != s[:-1]
    last[-1] = True
    idx = np.flatnonzero(last)
    tps = np.cumsum(y)[idx]
    fps = 1 + idx - tps
    if len(fps) > 2:
        keep = np.ones(len(fps), bool)
        keep[1:-1] = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.concatenate([[0.0], fps]), np.concatenate([[0.0], tps])
    return fps / fps[-1], tps / tps[-1]


def rank_auc(pos, neg):
    """ROC AUC along the last axis by the rank-sum (Mann-Whitney) formula, ties counted half: equal to
    sklearn's roc_auc_score. pos: [..., n_pos], neg: [..., n_neg] (broadcast). Returns an array of shape [...]."""
    from scipy.stats import rankdata
    shape = np.broadcast_shapes(pos.shape[:-1], neg.shape[:-1])
    pos, neg = np.broadcast_to(pos, shape + pos.shape[-1:]), np.broadcast_to(neg, shape + neg.shape[-1:])
    n1, n0 = pos.shape[-1], neg.shape[-1]
    ranks = rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)
    return (ranks[..., :n1].sum(axis=-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _flat_pairs(i, j):
    """Index arrays of the two classes broadcast to one batch shape and flattened to [rows, n]."""
    shape = np.broadcast_shapes(i.shape[:-1], j.shape[:-1])
    i, j = np.broadcast_to(i, shape + i.shape[-1:]), np.broadcast_to(j, shape + j.shape[-1:])
    return i.reshape(-1, i.shape[-1]), j.reshape(-1, j.shape[-1]), shape


def _run(statistic, n_mem, n_nmem, settings):
    """scipy.stats.bootstrap over the prompt indices of the two classes, resampled separately (stratified)."""
    from scipy.stats import bootstrap
    data = (np.arange(n_mem), np.arange(n_nmem))
    batch = max(1, _BATCH_ELEMENTS // (n_mem + n_nmem))
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa on a degenerate sample: reported as None by _interval, not warned
        return bootstrap(data, statistic, n_resamples=settings.bootstrap, batch=batch, vectorized=True,
                         paired=False, axis=-1, confidence_level=settings.ci_level, method=settings.ci_method,
                         rng=np.random.default_rng(settings.ci_seed))


def _interval(res, k=None):
    """[low, high] of output k of a bootstrap result; a distribution without spread (every resample equal, where
    BCa is undefined) gives the zero-width interval at that value."""
    dist = res.bootstrap_distribution if k is None else res.bootstrap_distribution[k]
    lo, hi = (res.confidence_interval.low, res.confidence_interval.high) if k is None else (
        res.confidence_interval.low[k], res.confidence_interval.high[k])
    if np.all(dist == dist[0]):
        return [float(dist[0]), float(dist[0])]
    return [float(v) if np.isfinite(v) else None for v in (lo, hi)]  # None: BCa undefined (a degenerate sample)


def point_metrics(mem, nmem, columns=TPR_COLUMNS):
    """AUC and the TPR@FPR `columns` of one detector's scores, computed as the bootstrap computes them on every
    resample (equal to utils.metrics.detection_metrics). Returns a list of floats: [auc, *tprs]."""
    fpr, tpr = roc_points(mem, nmem)
    return [float(rank_auc(mem, nmem))] + [tpr_at_fpr(fpr, tpr, target, rule) for _, target, rule in columns]


def metric_intervals(mem, nmem, settings, columns=TPR_COLUMNS):
    """Bootstrap intervals of AUC and TPR@FPR (`columns`: (key, target FPR, rule); default: the table's) for one
    detector.

    mem, nmem: 1-D arrays of finite scores (larger = memorized). Returns a dict: level, method, resamples, seed,
    and per metric (auc and the column keys) {"interval": [low, high], "standard_error": float}."""
    mem, nmem = np.asarray(mem, np.float64), np.asarray(nmem, np.float64)

    def statistic(i, j, axis=-1):
        i, j, shape = _flat_pairs(i, j)
        out = np.empty((1 + len(columns), len(i)))
        out[0] = rank_auc(mem[i], nmem[j])  # vectorized over resamples; the ROC curves one by one
        for r in range(len(i) if columns else 0):
            fpr, tpr = roc_points(mem[i[r]], nmem[j[r]])
            out[1:, r] = [tpr_at_fpr(fpr, tpr, target, rule) for _, target, rule in columns]
        return out.reshape((len(out),) + shape)

    res = _run(statistic, len(mem), len(nmem), settings)
    keys = ["auc"] + [k for k, _, _ in columns]
    out = dict(level=settings.ci_level, method=settings.ci_method, resamples=settings.bootstrap, seed=settings.ci_seed)
    for k, key in enumerate(keys):
        out[key] = dict(interval=_interval(res, k), standard_error=float(res.standard_error[k]))
    return out


def paired_auc_difference(mem_a, nmem_a, mem_b, nmem_b, settings):
    """Detector A against detector B on the same prompts: the bootstrap distribution of AUC(A) - AUC(B), both
    computed on the same resample of prompts in every draw.

    mem_a, mem_b: [n_mem] scores of the same memorized prompts in the same order (nmem_* likewise); a prompt
    without a finite score in either detector is left out of both. Returns a dict: difference (on the prompts
    used), interval, standard_error, flip_share (share of resamples whose difference has the opposite sign of the
    observed one), tie_share (share with a difference of exactly 0), n_mem, n_nmem, and the settings."""
    mem_a, nmem_a, mem_b, nmem_b = (np.asarray(x, np.float64) for x in (mem_a, nmem_a, mem_b, nmem_b))
    if mem_a.shape != mem_b.shape or nmem_a.shape != nmem_b.shape:
        raise UserError("a paired comparison needs both detectors' scores of the same prompts")
    km = np.isfinite(mem_a) & np.isfinite(mem_b)
    kn = np.isfinite(nmem_a) & np.isfinite(nmem_b)
    if not km.any() or not kn.any():
        raise UserError("no prompt has a finite score in both detectors")
    mem_a, mem_b, nmem_a, nmem_b = mem_a[km], mem_b[km], nmem_a[kn], nmem_b[kn]

    def statistic(i, j, axis=-1):
        return rank_auc(mem_a[i], nmem_a[j]) - rank_auc(mem_b[i], nmem_b[j])

    diff = float(rank_auc(mem_a, nmem_a) - rank_auc(mem_b, nmem_b))
    res = _run(statistic, len(mem_a), len(nmem_a), settings)
    dist = res.bootstrap_distribution
    return dict(difference=diff, interval=_interval(res), standard_error=float(res.standard_error),
                flip_share=float(np.mean(np.sign(dist) == -np.sign(diff))) if diff != 0 else 0.0,
                tie_share=float(np.mean(dist == 0)), n_mem=int(km.sum()), n_nmem=int(kn.sum()),
                level=settings.ci_level, method=settings.ci_method, resamples=settings.bootstrap,
                seed=settings.ci_seed)


def interval_text(value, ci, digits=3):
    """'0.987 [0.975, 0.995]': a point value with its interval, for Markdown; the value alone without one."""
    if value is None:
        return "–"
    if ci is None:
        return f"{value:.{digits}f}"
    lo, hi = ("?" if v is None else f"{v:.{digits}f}" for v in ci)
    return f"{value:.{digits}f} [{lo}, {hi}]"
