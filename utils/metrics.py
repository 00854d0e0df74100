"""Detection metrics: ROC AUC and TPR at fixed false-positive rates (memorized prompts are the positives)."""
import numpy as np

TPR_RULES = ("closest", "strict")


def tpr_at_fpr(fpr, tpr, target, rule="closest"):
    """TPR read off an ROC curve at a target FPR.

    rule="closest": the ROC point whose FPR is nearest the target (the reference's choice; can exceed the target);
        where several points share that FPR (a vertical step of the curve), the highest TPR among them.
    rule="strict": the best TPR among points with FPR <= target.
    """
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    if rule == "closest":
        gap = np.abs(fpr - target)
        return float(tpr[gap == gap.min()].max())
    if rule == "strict":
        ok = fpr <= target + 1e-12
        return float(tpr[ok].max()) if ok.any() else 0.0
    raise ValueError(f"rule must be one of {TPR_RULES}")


def detection_metrics(mem_scores, nmem_scores, fprs=(0.01, 0.03), rule="closest"):
    """AUC and TPR@FPR for scores where larger means 'memorized'.

    mem_scores, nmem_scores: 1-D arrays (one value per prompt). Returns a dict with auc, tpr_at_fpr
    {target: tpr}, and the ROC curve (fpr, tpr, thresholds) as lists. Labels are never flipped.
    """
    from sklearn.metrics import roc_auc_score, roc_curve
    mem, nmem = np.asarray(mem_scores, dtype=np.float64), np.asarray(nmem_scores, dtype=np.float64)
    y = np.concatenate([np.ones(len(mem)), np.zeros(len(nmem))])
    s = np.concatenate([mem, nmem])
    fpr, tpr, thr = roc_curve(y, s)
    return dict(auc=float(roc_auc_score(y, s)),
                tpr_at_fpr={float(f): tpr_at_fpr(fpr, tpr, f, rule) for f in fprs},
                rule=rule, n_mem=len(mem), n_nmem=len(nmem),
                roc=dict(fpr=fpr.tolist(), tpr=tpr.tolist(), thresholds=[float(t) for t in thr]))
