"""Per-prompt labels of a memorized prompt set, and the subsets of it that detection can be evaluated on.

A labels file is a CSV with a header and one row per memorized prompt, in the prompt file's order: `prompt` (the
caption, verbatim), `status` (copies / does not copy / no training image: whether its generations copy a training
image) and `source_label` (the published memorization type: SD v2.0's overfit_type MV/RV/TV, Webster's matching,
retrieval and template verbatim; NeMo's VM / TM for SD v1.4; or verbatim / template). A subset needs only its own
column.
"""
import csv

import numpy as np

from ..cli import UserError

SUBSETS = ("all", "copies", "verbatim", "template")
STATUSES = ("copies", "does not copy", "no training image")
# Webster (2023)'s types as SD v2.0's prompt file names them: matching (MV) and retrieval (RV) verbatim copy one
# image; template verbatim (TV) copies a layout shared by many images with varying details.
# NeMo's memorized_laion_prompts.csv (SD v1.4) says VM (verbatim) or TM (template memorization).
SOURCE_KINDS = {"mv": "verbatim", "rv": "verbatim", "vm": "verbatim", "verbatim": "verbatim", "tv": "template",
                "tm": "template", "template": "template"}
_COLUMN = {"copies": "status", "verbatim": "source_label", "template": "source_label"}


def read_labels(path):
    """The rows of a labels CSV as a list of dicts (header names stripped). A missing, undecodable or header-less
    file is a UserError."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read the labels file {path}: {' '.join(str(e).split())}") from None
    if not rows or "prompt" not in rows[0]:
        raise UserError(f"the labels file {path} has no rows or no 'prompt' column (a CSV with a header)")
    return rows


def subset_mask(rows, prompts, subset, path="the labels file"):
    """Boolean mask over the memorized prompts (1-D array, len(prompts)) of those in `subset`.

    rows: read_labels(path); prompts: the memorized prompts of the result, in order. The labels must be for
    exactly these prompts: a different count or the first differing caption is a UserError naming its line."""
    if subset not in SUBSETS:
        raise UserError(f"unknown subset {subset!r}; one of {', '.join(SUBSETS)}")
    if prompts is None:
        raise UserError("the memorized result records no prompts (a result older than sidecars); labels cannot be "
                        "matched to it")
    for k, (row, prompt) in enumerate(zip(rows, prompts)):
        if (row.get("prompt") or "") != prompt:
            raise UserError(f"{path} is for another prompt set: its line {k + 2} reads {row.get('prompt')!r:.80} "
                            f"where prompt {k + 1} of the result is {prompt!r:.80}")
    if len(rows) != len(prompts):
        raise UserError(f"{path} has {len(rows)} labelled prompts and the result {len(prompts)}: it is for another "
                        "prompt set")
    if subset == "all":
        return np.ones(len(prompts), bool)
    col = _COLUMN[subset]
    if col not in rows[0]:
        raise UserError(f"{path} has no '{col}' column, which the subset {subset!r} needs")
    if subset == "copies":
        bad = next((k for k, r in enumerate(rows) if (r[col] or "").strip() not in STATUSES), None)
        if bad is not None:
            raise UserError(f"{path} line {bad + 2}: status {rows[bad][col]!r} is not one of {', '.join(STATUSES)}")
        return np.array([r[col].strip() == "copies" for r in rows])
    return np.array([SOURCE_KINDS.get((r[col] or "").strip().lower()) == subset for r in rows])


def labelled_subset(path, prompts, subset, n_nmem):
    """subset_mask of the labels file at `path`; a subset that leaves fewer than 2 prompts in a class (n_nmem: the
    non-memorized prompts) is a UserError: no ROC curve can be drawn from it."""
    mask = subset_mask(read_labels(path), prompts, subset, path)
    if mask.sum() < 2 or n_nmem < 2:
        raise UserError(f"the subset {subset} leaves {int(mask.sum())} memorized and {n_nmem} non-memorized "
                        "prompt(s); each class needs at least 2")
    return mask
