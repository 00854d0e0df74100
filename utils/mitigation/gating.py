"""Detect-then-mitigate: which prompts a detection result flags (a threshold, or one calibrated at a false-positive rate)."""
import math
import os

import numpy as np

from ..cli import UserError
from ..results import describe_differences, differences, read_detection_result


def check_same_prompts(det_prompts, prompts, what):
    """UserError unless a detection result lists exactly these prompts in this order."""
    if det_prompts == prompts:
        return
    if len(det_prompts) != len(prompts):
        raise UserError(f"{what} scores {len(det_prompts)} prompts, the prompt file has {len(prompts)}: it belongs "
                        "to another prompt set")
    i = next(k for k, (a, b) in enumerate(zip(det_prompts, prompts)) if a != b)
    kind = "in another order" if sorted(det_prompts) == sorted(prompts) else "for other prompts"
    raise UserError(f"{what} was computed {kind} (prompt {i + 1}: {det_prompts[i][:60]!r} vs the prompt file's "
                    f"{prompts[i][:60]!r})")


def calibrated_threshold(nmem_scores, fpr):
    """The threshold at a target false-positive rate on non-memorized scores: the smallest of their values with at
    most floor(fpr * N) of them strictly above it (flag: score > threshold). NaN scores are an error."""
    s = np.sort(np.asarray(nmem_scores, dtype=np.float64))[::-1]
    if not np.isfinite(s).all():
        raise UserError("the non-memorized detection scores contain NaN or infinite values; cannot calibrate")
    if not (0 <= fpr < 1):
        raise UserError(f"a target false-positive rate lies in [0, 1), got {fpr}")
    return float(s[min(int(math.floor(fpr * len(s) + 1e-9)), len(s) - 1)])


def gate_prompts(prompts, detection, model_id=None, *, threshold=None, fpr=None, nmem=None):
    """Detect-then-mitigate: which prompts to mitigate. detection: a detect_mem.py result on exactly these
    prompts (in order); threshold: flag scores above it, or else the threshold at false-positive rate fpr on the
    non-memorized result nmem (same detector and model). Returns (flags, scores, info for the manifest header)."""
    from ..cli import warn
    from ..io import sha256_file
    det = read_detection_result(detection, need_sidecar=True)
    scores, meta = det.scores(), det.sidecar  # per prompt: mean over the measured steps, larger = memorized
    check_same_prompts(det.prompts, prompts, detection)
    if meta.get("model_id") not in (None, model_id):
        warn(f"{detection} was computed with {meta.get('model_id')}, this run uses {model_id}")
    info = dict(detection=os.path.abspath(detection), detection_sha256=sha256_file(detection),
                metric=det.metric.get("name"), threshold=threshold)
    if threshold is None:
        nm = read_detection_result(nmem, need_sidecar=True)
        if (nm.metric.get("name"), nm.sidecar.get("model_id")) != (info["metric"], meta.get("model_id")):
            raise UserError(f"{nmem} comes from another detector or model than {detection}; calibrate on the "
                            "same one")
        diff = differences(det, nm)  # seed, n, steps, direction, settings: a threshold only transfers when alike
        if diff:
            raise UserError(f"{detection} and {nmem} come from different settings "
                            f"({describe_differences(det, nm, diff)}); calibrate on a result of the same settings")
        info.update(threshold=calibrated_threshold(nm.scores(), fpr), fpr=fpr, nmem=os.path.abspath(nmem),
                    nmem_sha256=sha256_file(nmem))
    flags = flag_prompts(scores, info["threshold"])
    info["flagged"] = [i for i, f in enumerate(flags) if f]
    return flags, scores, info


def flag_prompts(scores, threshold):
    """Which prompts to mitigate: score > threshold; a NaN score counts as flagged (unknown is mitigated)."""
    return [bool(not math.isfinite(s) or s > threshold) for s in np.asarray(scores, dtype=np.float64)]
