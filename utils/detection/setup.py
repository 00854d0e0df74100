"""What detect_mem.py builds from its flags before and around the detection loop: the --metrics type, the
detectors with their settings, and the per-prompt outputs of one batch (images, localization maps, records)."""
import dataclasses
import os

import torch

from ..cli import UserError, raise_arg, settings_from, warn
from ..io import atomic_save_image
from .base import DETECTORS
from .maps import map_dir, save_maps, take_maps
from .records import prompt_record


def metric_list(text):
    """argparse type: comma-separated metric names, each known, none twice."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in DETECTORS]
    if bad or not names or len(set(names)) != len(names):
        raise_arg(f"expected comma-separated metrics from {', '.join(DETECTORS)} (each once), got {text!r}")
    return names


def build_detectors(metrics, values, flags, sampling, hparam=None):
    """{metric: Detector} with settings from the flag values (`values`: flag dest -> value; `flags`: per metric,
    its (field, dest) pairs). With the model family's `hparam`, a field left None takes the family's hyperparameter
    of the same name (anisotropy's aniso_weights). Settings are checked against the schedule: complete ones always,
    those waiting for a family value once `hparam` is given. UserError for a problem."""
    out = {}
    for m in metrics:
        st = settings_from(DETECTORS[m].Settings, values, flags[m])
        if hparam:
            try:
                family = {f.name: hparam(f.name) for f in dataclasses.fields(st) if getattr(st, f.name) is None}
            except ValueError as e:  # a rule on the model that this model does not satisfy (e.g. a missing layer)
                raise UserError(f"{m}: {' '.join(str(e).split())[:400]}") from None
            st = dataclasses.replace(st, **{k: v for k, v in family.items() if v is not None})
        out[m] = DETECTORS[m](st, sampling)
        # settings with no field left for the family are checked now (before the model loads: --check_only sees it)
        complete = all(getattr(st, f.name) is not None for f in dataclasses.fields(st))
        problems = out[m].check() if hparam or complete else []
        if problems:
            raise UserError("; ".join(problems))
    return out


def save_batch(idx, prompts, metrics, logs, vals, extras, images, *, cost, seconds, forward_seconds, out_dir, stem,
               gen_num):
    """Write one batch's outputs, prompt by prompt: its generated images (tiled_l2: <stem>_gen<n>_images/), the
    localization maps of the metrics that make them (files of their own, not the record), and a progress record per
    metric not yet done for the prompt. vals[m][j]: (steps,) values of prompt idx[j]."""
    image_dir = os.path.join(out_dir, f"{stem}_gen{gen_num}_images")
    for j, i in enumerate(idx):
        if images is not None:
            for k, im in enumerate(images[j]):
                atomic_save_image(os.path.join(image_dir, f"{i:05d}_{k}.png"), im)
        for m in metrics:
            if i in logs[m].done:
                continue
            maps = take_maps(extras[m][j])
            if maps is not None:
                save_maps(map_dir(out_dir, stem, gen_num, m), i, maps)
                extras[m][j] = extras[m][j] or None
            if not torch.isfinite(vals[m][j]).all():
                warn(f"prompt {i + 1} gave a non-finite {m} value; saved as NaN: {prompts[i][:80]!r}")
            logs[m].add(prompt_record(i, prompts[i], vals[m][j], extras[m][j], cost[m], seconds, len(idx),
                                      forward_seconds))
