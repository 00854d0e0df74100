"""Matching generated images to prompts and prompts to training images, by caption text (never by line number).

The SD v2.0 prompt file and its jsonl list the same 219 prompts in different orders, and one caption differs
only by a removed '/', so captions are compared after normalize_caption().
"""
import os
import re
import unicodedata

from ..cli import UserError, warn
from .fetch_manifest import REJECTED_STATUSES
from .images import IMAGE_SUFFIXES
from ..io import DataPathError, read_run_log, safe_data_path

# Keywords whose prompts are judged against several training images (the reference README, for SD v2.0): all
# training images whose captions share the keyword, max over them (template-style memorization).
PAPER_SHARED_KEYWORDS = ("design", "designart", "mills", "anderson")


def normalize_caption(text):
    """Comparison key of a caption: NFKC, path separators as spaces, whitespace collapsed, case-folded."""
    t = unicodedata.normalize("NFKC", text).replace("/", " ").replace("\\", " ")
    return " ".join(t.split()).casefold()


def match_captions(prompts, captions):
    """For each prompt, the positions of all captions with the same normalized text.

    prompts, captions: lists of str. Returns (matches: list of lists of int, one per prompt; unmatched: list of
    prompt positions with no caption). Several captions with one key all match (all are ground truth).
    """
    by_key = {}
    for j, c in enumerate(captions):
        by_key.setdefault(normalize_caption(c), []).append(j)
    matches = [list(by_key.get(normalize_caption(p), [])) for p in prompts]
    return matches, [i for i, m in enumerate(matches) if not m]


def keyword_groups(captions, keywords):
    """For each caption, the positions of all captions that share one of the keywords with it (itself included).

    Keywords match whole words of the normalized caption ('design' matches 'Shaw Design Center' and 'Design Art',
    not 'Designart'; list 'designart' for that). Captions without a keyword map to {own position}.
    """
    pats = [re.compile(r"(?<!\w)" + re.escape(normalize_caption(k)) + r"(?!\w)") for k in keywords if k.strip()]
    keys = [normalize_caption(c) for c in captions]
    members = [[j for j, key in enumerate(keys) if p.search(key)] for p in pats]
    groups = []
    for j, key in enumerate(keys):
        g = {j}
        for p, m in zip(pats, members):
            if p.search(key):
                g.update(m)
        groups.append(g)
    return groups


def ground_truth_records(rows, gt_dir):
    """Training-image records of a fetch manifest: list of dict(index, caption, files=[absolute paths]).

    rows: utils.fetch.read_manifest() output. A record's images are its "ok" rows' files, plus any other
    <index>_<k>.<ext> file in gt_dir (extra training images added by hand for the same record); every one must
    pass utils.io.safe_data_path (a regular file inside gt_dir, also after following links), else it is skipped
    with a warning. Rows of rejected jsonl records (REJECTED_STATUSES) are no record: they never lend their
    caption to an index. Records whose images all failed keep files=[] so that their prompts count as "no ground
    truth", not unmatched.
    """
    by_index = {}
    for r in rows:
        if r["status"] in REJECTED_STATUSES or r["index"] is None:
            continue
        rec = by_index.setdefault(r["index"], {"index": r["index"], "caption": r["caption"], "files": []})
        if r["status"] == "ok" and r["file"]:
            path = _training_image(gt_dir, r["file"])
            if path is not None:
                rec["files"].append(path)
    pat = re.compile(r"^(\d+)_(\d+)(\.[A-Za-z0-9]+)$")
    for name in sorted(os.listdir(gt_dir)):
        m = pat.match(name)
        if m and m.group(3).lower() in IMAGE_SUFFIXES and int(m.group(1)) in by_index:
            rec = by_index[int(m.group(1))]
            path = _training_image(gt_dir, name, listed=False)
            if path is not None and path not in rec["files"]:
                rec["files"].append(path)
    return list(by_index.values())


def _training_image(gt_dir, name, listed=True):
    """safe_data_path(gt_dir, name), or None with a warning."""
    try:
        return safe_data_path(gt_dir, name)
    except DataPathError as e:
        if listed and e.status == "missing_file":
            warn(f"{os.path.join(gt_dir, name)} is listed as fetched but is missing; rerun fetch to restore it")
        else:
            warn(f"training image {name!r:.80} skipped: {e.detail}")
        return None


def read_generation_manifest(path):
    """The JSONL manifest written by mitigate_mem.py: (header dict, list of records sorted by index).

    The run-log format of utils.io.read_run_log (its rules for torn last lines, bad lines and repeated indices);
    each record also needs "prompt" (str) and "images" (list of file names relative to the manifest's folder).
    """
    if not os.path.lexists(path):
        raise UserError(f"generation manifest {path} not found: expected the output folder of mitigate_mem.py")
    header, records, _ = read_run_log(path, "generation manifest", fields={"prompt": str, "images": list})
    for index, obj in records.items():
        if not all(isinstance(x, str) for x in obj["images"]):
            raise UserError(f"{path}: record {index} needs text 'prompt' and a list 'images' of file names")
    if not records:
        raise UserError(f"{path} holds no image records")
    return header, [records[k] for k in sorted(records)]


def check_images(records, manifest_dir, images_dir=None, exclude=()):
    """Which listed images can be scored, which cannot, and which image files in images_dir no record lists.

    Every listed name passes utils.io.safe_data_path(manifest_dir, name): a regular file inside the manifest's
    folder (after following links); anything else, and any file in exclude (resolved paths, e.g. the training
    images: a generated image is never one of them), is a problem with its reason, never scored.
    Returns (present: list of lists of resolved paths per record, problems: list of (index, name, reason),
    extra: sorted list of paths relative to images_dir).
    """
    present, problems, listed = [], [], set()
    exclude = set(exclude)
    for rec in records:
        found = []
        for name in rec["images"]:
            try:
                path = safe_data_path(manifest_dir, name)
            except DataPathError as e:
                problems.append((rec["index"], name, "missing" if e.status == "missing_file" else e.detail))
                continue
            listed.add(path)
            if path in exclude:
                problems.append((rec["index"], name, "is a training image, not a generated one"))
            else:
                found.append(path)
        present.append(found)
    extra = []
    images_dir = images_dir or manifest_dir
    for root, dirs, files in os.walk(images_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = os.path.join(root, name)
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".") and \
                    os.path.realpath(path) not in listed:
                extra.append(os.path.relpath(path, images_dir))
    return present, problems, sorted(extra)
