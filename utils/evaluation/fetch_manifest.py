"""The fetch manifest of a training-image folder: one CSV row per (record, k) with the outcome of obtaining it.

Columns: index, k, caption, url, status, detail, file, sha256, width, height, bytes. Only "ok" rows have a file.
Rows of rejected jsonl records (REJECTED_STATUSES) describe no record: their index (empty when the record had
no valid one) never names a record, so they take nobody's caption or images.
"""
import csv
import io
import os

from ..cli import UserError
from ..io import atomic_write_text, read_text_file

MANIFEST_NAME = "fetch_manifest.csv"
INFO_NAME = "fetch_info.json"
REJECTED_STATUSES = ("bad_record", "duplicate_index")
FIELDS = ["index", "k", "caption", "url", "status", "detail", "file", "sha256", "width", "height", "bytes"]


def write_manifest(path, rows):
    """Write rows (dicts with FIELDS; others ignored) as the manifest CSV, atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})
    atomic_write_text(path, buf.getvalue())


def read_manifest(path):
    """Rows of a fetch manifest (list of dict; index/k as int (index None for a rejected record without one),
    width/height/bytes as int or None, text columns as str). Anything else is a UserError."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `mitigate_eval.py fetch` first to build the training-image folder")
    text = read_text_file(path, "fetch manifest")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = [c for c in ("index", "k", "caption", "status", "file") if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path} is not a fetch manifest (no column {', '.join(missing)})")
        rows = list(reader)
    except csv.Error as e:
        raise UserError(f"{path} is not a readable CSV ({e})")
    for i, r in enumerate(rows, start=2):
        for c in ("caption", "url", "status", "detail", "file", "sha256"):
            r[c] = r.get(c) or ""  # a short row leaves cells None
        try:
            r["k"] = int(r["k"])
            r["index"] = None if r["index"] == "" and r["status"] in REJECTED_STATUSES else int(r["index"])
        except (TypeError, ValueError):
            raise UserError(f"{path} line {i}: index and k must be integers")
        for c in ("width", "height", "bytes"):
            r[c] = int(r[c]) if str(r.get(c) or "").isdigit() else None
    return rows


def shared_bytes(rows):
    """Groups of records whose ok images are byte-identical (sha256): list of sorted index lists, largest first.

    Many records with one identical image often means a site-wide "image unavailable" picture; they are reported,
    not reclassified, because exact duplicates in LAION are also a known cause of memorization.
    """
    by_hash = {}
    for r in rows:
        if r["status"] == "ok" and r.get("sha256"):
            by_hash.setdefault(r["sha256"], set()).add(r["index"])
    return sorted((sorted(v) for v in by_hash.values() if len(v) > 1), key=len, reverse=True)


def usable_count(rows):
    """(records with at least one ok image, records in the manifest); a rejected record without a valid index
    counts once on its own."""
    ok, total = set(), set()
    for pos, r in enumerate(rows):
        total.add(r["index"] if r["index"] is not None else ("row", pos))
        if r["status"] == "ok":
            ok.add(r["index"])
    return len(ok), len(total)
