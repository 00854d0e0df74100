"""Matching generated images to prompts and prompts to training images, by caption text (never by line number).

The SD v2.0 prompt file and its jsonl list the same 219 prompts in different orders, and one caption differs
only by a removed '/', so captions are compared after normalize_caption().
"""
import os
import re
import unicodedata

from .cli import UserError, warn
from .images import IMAGE_SUFFIXES
from .io import read_run_log

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

    rows: utils.fetch.read_manifest() output. A record's images are its "ok" rows' files that still exist, plus
    any other <index>_<k>.<ext> file in gt_dir (extra training images added by hand for the same record).
    Records whose images all failed keep files=[] so that their prompts count as "no ground truth", not unmatched.
    """
    by_index = {}
    for r in rows:
        rec = by_index.setdefault(r["index"], {"index": r["index"], "caption": r["caption"], "files": []})
        if r["status"] == "ok" and r["file"]:
            path = os.path.join(gt_dir, r["file"])
            if os.path.isfile(path):
                rec["files"].append(path)
            else:
                warn(f"{path} is listed as fetched but is missing; rerun fetch to restore it")
    pat = re.compile(r"^(\d+)_(\d+)(\.[A-Za-z0-9]+)$")
    for name in sorted(os.listdir(gt_dir)):
        m = pat.match(name)
        if m and m.group(3).lower() in IMAGE_SUFFIXES and int(m.group(1)) in by_index:
            path = os.path.join(gt_dir, name)
            rec = by_index[int(m.group(1))]
            if path not in rec["files"]:
                rec["files"].append(path)
    return list(by_index.values())


def read_generation_manifest(path):
    """The JSONL manifest written by mitigate_mem.py: (header dict, list of records sorted by index).

    The run-log format of utils.io.read_run_log (its rules for torn last lines, bad lines and repeated indices);
    each record also needs "prompt" (str) and "images" (list of file names relative to the manifest's folder).
    """
    try:
        header, records, _ = read_run_log(path, "generation manifest")
    except UserError as e:
        if not os.path.exists(path):
            raise UserError(f"generation manifest {path} not found: expected the output folder of "
                            "mitigate_mem.py") from None
        raise e
    for index, obj in records.items():
        if not (isinstance(obj.get("prompt"), str) and isinstance(obj.get("images"), list)
                and all(isinstance(x, str) for x in obj["images"])):
            raise UserError(f"{path}: record {index} needs text 'prompt' and a list 'images'")
    if not records:
        raise UserError(f"{path} holds no image records")
    return header, [records[k] for k in sorted(records)]


def check_images(records, manifest_dir, images_dir=None):
    """Which listed images exist, and which image files in images_dir no record lists.

    Returns (present: list of lists of absolute paths per record, missing: list of (index, name),
    extra: sorted list of paths relative to images_dir).
    """
    present, missing, listed = [], [], set()
    for rec in records:
        found = []
        for name in rec["images"]:
            path = os.path.normpath(os.path.join(manifest_dir, name))
            listed.add(os.path.abspath(path))
            (found.append(path) if os.path.isfile(path) else missing.append((rec["index"], name)))
        present.append(found)
    extra = []
    images_dir = images_dir or manifest_dir
    for root, dirs, files in os.walk(images_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = os.path.abspath(os.path.join(root, name))
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".") and path not in listed:
                extra.append(os.path.relpath(path, images_dir))
    return present, missing, sorted(extra)
