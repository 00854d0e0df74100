"""Matching generated images to prompts and prompts to training images, by caption text (never by line number).

The SD v2.0 prompt file and its jsonl list the same 219 prompts in different orders, and one caption differs
only by a removed '/', so captions are compared after normalize_caption().
"""
import glob
import os
import re
import unicodedata

from ..cli import UserError, warn
from .fetch_manifest import REJECTED_STATUSES
from .images import IMAGE_SUFFIXES
from ..io import DataPathError, lock_holder, read_json_file, read_run_log, safe_data_path

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


RUN_INFO = "run.json"  # mitigate_mem.py's description of a generation folder, written before its first image
FINISH_HINT = "rerun the generation command to finish it (it resumes where it stopped)"


def manifest_locks(manifest):
    """The lock files of the progress logs that are (or become) `manifest` (a .jsonl path): its own and those of
    the per-process logs <stem>.<rank>.jsonl of a run under several processes."""
    if not manifest.endswith(".jsonl"):
        return []
    return [manifest + ".lock"] + sorted(glob.glob(glob.escape(manifest[:-len(".jsonl")]) + ".*.jsonl.lock"))


def check_generation_started(manifest):
    """UserError for a manifest that is not there yet: a missing one whose run under several processes left only its
    per-process logs <stem>.<rank>.jsonl (the merged manifest is written when every prompt is done), else the
    ordinary "not found". The still-running check comes next (check_generation_finished)."""
    if os.path.isfile(manifest):
        return
    stem = manifest[:-len(".jsonl")] if manifest.endswith(".jsonl") else None
    parts = [p for p in glob.glob(glob.escape(stem) + ".*.jsonl") if p[len(stem) + 1:-6].isdigit()] if stem else []
    if parts and not os.path.lexists(manifest):
        raise UserError(f"the generation of {manifest} is not finished: its run under several processes left "
                        f"{len(parts)} per-process log(s) ({os.path.basename(sorted(parts)[0])}, ...) and no merged "
                        f"manifest; {FINISH_HINT}")
    raise UserError(f"generation manifest {manifest} " + ("is not a regular file" if os.path.exists(manifest) else
                    "not found (pass --manifest, or --images pointing at the output folder of mitigate_mem.py)"))


def promised_prompts(manifest, header):
    """How many prompts the run writing `manifest` generates, from run.json beside it (mitigate_mem.py records
    `prompts` there before its first image), or None where nothing says (no run.json, or one written before the
    count was recorded). UserError for a run.json that is damaged or whose identity is not the manifest's header
    (edited, or of another run)."""
    path = os.path.join(os.path.dirname(os.path.abspath(manifest)), RUN_INFO)
    if not os.path.lexists(path):
        return None
    info = read_json_file(path, "generation run description")
    if isinstance(info, dict) and "prompts" not in info:
        return None
    count = info.get("prompts") if isinstance(info, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0 or info.get("identity") != header:
        raise UserError(f"{path} does not describe the run of {manifest} (a prompt count and the manifest's header "
                        "as its identity): it was edited or belongs to another run")
    return count


def check_generation_finished(manifest, header, records, allow_incomplete=False):
    """UserError unless the generation that wrote `manifest` (header, records as read_generation_manifest) has
    ended and is complete: a lock of its progress logs held by a live process (it is still writing; always
    refused), or, unless allow_incomplete (then a warning), fewer records than run.json's prompt count, a record
    with fewer images than the header's gen_num, or a lock file left by a run that was killed (the kernel drops a
    dead process's lock, so the file stays, held by nobody; a finished run deletes it)."""
    running = [pid for lock in manifest_locks(manifest) if (pid := lock_holder(lock))]
    if running:  # its manifest is the live progress log: scoring it now would score part of the run
        raise UserError(f"the generation of {manifest} is still running (pid {running[0]}); score it once it ends")
    problems = []
    count = promised_prompts(manifest, header)
    missing = sorted(set(range(count)) - {r["index"] for r in records}) if count is not None else []
    if missing:
        problems.append(f"{len(missing)} of its {count} prompts have no images yet (prompt index "
                        f"{', '.join(map(str, missing[:8]))}{', ...' if len(missing) > 8 else ''})")
    n = header.get("gen_num")
    short = [r["index"] for r in records if len(r["images"]) < n] if type(n) is int else []
    if short:
        problems.append(f"{len(short)} prompt(s) have fewer than the {n} images per prompt its header promises "
                        f"(prompt index {', '.join(map(str, short[:8]))}{', ...' if len(short) > 8 else ''})")
    left = [os.path.basename(lock) for lock in manifest_locks(manifest) if os.path.lexists(lock)]
    if left:
        problems.append(f"its run stopped before it ended ({left[0]} is left behind, held by no process)")
    if problems and not allow_incomplete:
        raise UserError(f"the generation of {manifest} is incomplete: {'; '.join(problems)}; {FINISH_HINT}, or "
                        "score this part on purpose with --allow_incomplete")
    if problems:
        warn(f"scoring an incomplete generation (--allow_incomplete): {'; '.join(problems)}")


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
