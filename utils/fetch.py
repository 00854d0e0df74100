"""Training-image retrieval for the memorized-prompt sets: validated, resumable, concurrent, with a CSV manifest.

Layout of an output folder (what `mitigate_eval.py score --gt` reads; the manifest format: utils/fetch_manifest.py):
    <out>/<index>_<k>.<ext>   image k (0, 1, ...) of the record whose LAION index is <index>, original bytes
    <out>/fetch_manifest.csv  one row per (record, k): index, k, caption, url, status, detail, file, sha256, ...
    <out>/fetch_info.json     arguments, counts by status, library versions
Files on disk are the source of truth: an image is only ever renamed into place after it decoded fully, so a
rerun (or a crash before the manifest was rewritten) trusts them, re-validates them locally and skips the network.
"""
import html
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from .cli import UserError, one_line, warn
from .fetch_manifest import MANIFEST_NAME, write_manifest
from .images import IMAGE_SUFFIXES, MIN_SIDE, inspect_image
from .io import atomic_write_bytes

USER_AGENT = ("memsharp-fetch/1.0 (research tool: retrieves LAION training images of memorized Stable Diffusion "
              "prompts for copy-detection evaluation; python-requests)")


@dataclass
class Item:
    """One image to obtain: image k of record `index`, from a URL or a local file (absolute path)."""
    pos: int
    index: int
    k: int
    caption: str
    url: str = None
    file: str = None
    source: str = None  # what the manifest shows: the URL, or the file path as written in the jsonl


def items_from_records(records, base_dir):
    """Split jsonl records into fetch items; bad records become finished manifest rows instead.

    A record has "caption" (str), "index" (int, the LAION index; its line position if absent) and one source:
    "url" / "urls" (list) or "file" / "files" (paths relative to base_dir, the jsonl's folder).
    Returns (items, rows_for_bad_records).
    """
    items, bad, seen = [], [], set()
    for pos, rec in enumerate(records):
        index = rec.get("index", pos) if isinstance(rec, dict) else pos
        caption = rec.get("caption") if isinstance(rec, dict) else None

        def reject(status, detail):
            bad.append(_row(index if _is_int(index) else pos, 0, caption if isinstance(caption, str) else "",
                            "", status, detail, pos=pos))

        if not isinstance(rec, dict):
            reject("bad_record", f"record {pos + 1} is not a JSON object")
            continue
        if not _is_int(index) or index < 0:
            reject("bad_record", f"record {pos + 1}: index must be a non-negative integer, got {index!r}")
            continue
        if not isinstance(caption, str) or not caption.strip():
            reject("bad_record", f"record {pos + 1}: caption missing or not text")
            continue
        urls = _as_list(rec.get("urls", rec.get("url")))
        files = _as_list(rec.get("files", rec.get("file")))
        if urls is None or files is None or not (urls or files):
            reject("bad_record", f"record {pos + 1}: needs a 'url' or 'file' (text or list of text)")
            continue
        if index in seen:
            reject("duplicate_index", f"record {pos + 1}: index {index} appeared before; only the first is used")
            continue
        seen.add(index)
        for k, url in enumerate(urls):
            items.append(Item(pos, index, k, caption, url=url, source=url))
        for k, f in enumerate(files, start=len(urls)):
            items.append(Item(pos, index, k, caption, file=os.path.normpath(os.path.join(base_dir, f)), source=f))
    return items, bad


class Fetcher:
    """Downloads with a thread-local requests session: per-request timeout, total deadline, retries, size cap."""

    def __init__(self, timeout=15.0, retries=2, backoff=1.0, max_bytes=30 << 20, total_timeout=60.0,
                 user_agent=USER_AGENT):
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_bytes, self.total_timeout, self.user_agent = max_bytes, total_timeout, user_agent
        self._local = threading.local()
        self.stop = threading.Event()

    def _session(self):
        import requests
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.headers["User-Agent"] = self.user_agent
        return s

    def get(self, url):
        """Bytes of url, or raise FetchError(status, detail). Transient failures are retried with backoff."""
        if not re.match(r"^https?://", url, flags=re.I):
            raise FetchError("bad_url", f"not an http(s) URL: {url[:80]!r}")
        # LAION stores some URLs HTML-escaped ('&amp;'); try the literal URL first, as scraped, then unescaped.
        candidates = [url] + ([html.unescape(url)] if html.unescape(url) != url else [])
        err = None
        for cand in candidates:
            try:
                return self._get_retrying(cand)
            except FetchError as e:
                err = err or e
                if e.status != "http_error":
                    break
        raise err

    def _get_retrying(self, url):
        for attempt in range(self.retries + 1):
            try:
                return self._get_once(url)
            except FetchError as e:
                if not e.transient or attempt == self.retries:
                    raise
            if self.stop.wait(self.backoff * 2 ** attempt):
                raise FetchError("pending", "cancelled")

    def _get_once(self, url):
        import requests
        start = time.monotonic()
        try:
            with self._session().get(url, timeout=self.timeout, stream=True) as r:
                if r.status_code != 200:
                    raise FetchError("http_error", f"HTTP {r.status_code}",
                                     transient=r.status_code in (408, 429, 500, 502, 503, 504))
                length = r.headers.get("Content-Length", "")
                if length.isdigit() and int(length) > self.max_bytes:
                    raise FetchError("too_large", f"Content-Length {int(length)} > {self.max_bytes} bytes")
                buf = bytearray()
                for chunk in r.iter_content(1 << 16):
                    if self.stop.is_set():
                        raise FetchError("pending", "cancelled")
                    buf += chunk
                    if len(buf) > self.max_bytes:
                        raise FetchError("too_large", f"body exceeds {self.max_bytes} bytes")
                    if time.monotonic() - start > self.total_timeout:
                        raise FetchError("timeout", f"download took over {self.total_timeout:g} s", transient=True)
                return bytes(buf)
        except FetchError:
            raise
        except requests.exceptions.Timeout as e:
            raise FetchError("timeout", f"no answer within {self.timeout:g} s", transient=True) from e
        except requests.exceptions.ConnectionError as e:
            # A read timeout while streaming the body surfaces as a ConnectionError.
            if "timed out" in str(e).lower() or "timeout" in type(e).__name__.lower():
                raise FetchError("timeout", f"no data within {self.timeout:g} s", transient=True) from e
            raise FetchError("connection_error", _short_conn(e), transient=True) from e
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema, requests.exceptions.TooManyRedirects) as e:
            raise FetchError("bad_url", one_line(e)[:200]) from e
        except requests.exceptions.RequestException as e:
            raise FetchError("request_error", one_line(e)[:200], transient=True) from e


class FetchError(Exception):
    def __init__(self, status, detail, transient=False):
        super().__init__(detail)
        self.status, self.detail, self.transient = status, detail, transient


def existing_files(out_dir, index, k=None):
    """Image files already in out_dir for record index (all k, or one k), sorted by k: list of file names."""
    pat = re.compile(rf"^{index}_(\d+)(\.[A-Za-z0-9]+)$")
    found = []
    try:
        names = os.listdir(out_dir)
    except FileNotFoundError:
        return []
    for name in names:
        m = pat.match(name)
        if m and m.group(2).lower() in IMAGE_SUFFIXES and (k is None or int(m.group(1)) == k):
            found.append((int(m.group(1)), name))
    return [name for _, name in sorted(found)]


def fetch_item(item, out_dir, fetcher, min_side=MIN_SIDE):
    """Obtain one image into out_dir/<index>_<k><ext> and return its manifest row (never raises for bad data)."""
    import hashlib
    row = _row(item.index, item.k, item.caption, item.source, "pending", "", pos=item.pos)
    for name in existing_files(out_dir, item.index, item.k):  # resume: trust but re-check what is on disk
        path = os.path.join(out_dir, name)
        with open(path, "rb") as f:
            data = f.read()
        info = inspect_image(data, min_side=min_side)
        if info["status"] == "ok":
            return dict(row, status="ok", detail="already present", file=name, sha256=hashlib.sha256(data).hexdigest(),
                        width=info["width"], height=info["height"], bytes=len(data))
        warn(f"{path} no longer validates ({info['status']}: {info['detail']}); fetching it again")
        os.remove(path)
    try:
        data = fetcher.get(item.url) if item.url is not None else _read_local(item.file, fetcher.max_bytes)
    except FetchError as e:
        return dict(row, status=e.status, detail=e.detail)
    info = inspect_image(data, min_side=min_side)
    if info["status"] != "ok":
        return dict(row, status=info["status"], detail=info["detail"], width=info["width"], height=info["height"],
                    bytes=len(data))
    name = f"{item.index}_{item.k}{info['ext']}"
    atomic_write_bytes(os.path.join(out_dir, name), data)  # temp file + rename: never a half-written image
    return dict(row, status="ok", detail="", file=name, sha256=hashlib.sha256(data).hexdigest(),
                width=info["width"], height=info["height"], bytes=len(data))


def fetch_all(records, base_dir, out_dir, fetcher, workers=8, min_side=MIN_SIDE, progress=True,
              save_every_s=2.0, offline_after=24):
    """Fetch every record's images into out_dir with a thread pool; keeps out_dir/fetch_manifest.csv current.

    The manifest is rewritten atomically at most every save_every_s seconds and at the end (also on Ctrl-C or
    an error), so it is always a complete, readable CSV; rows not reached yet say "pending".
    If the first offline_after downloads all fail to connect (or time out), the machine is taken to be offline
    and a UserError stops the run instead of waiting on every URL (0 disables the check).
    Returns the list of rows in record order.
    """
    from tqdm import tqdm
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale_temp(out_dir)
    items, bad = items_from_records(records, base_dir)
    rows = {(r["_pos"], r["k"], r["status"]): r for r in bad}
    pending = {}
    for it in items:
        pending[(it.pos, it.k, "item")] = _row(it.index, it.k, it.caption, it.source, "pending", "", pos=it.pos)
    rows.update(pending)
    manifest = os.path.join(out_dir, MANIFEST_NAME)
    last = [0.0]
    net = {"down": 0, "other": 0}

    def save(force=False):
        if force or time.monotonic() - last[0] >= save_every_s:
            write_manifest(manifest, _ordered(rows))
            last[0] = time.monotonic()

    save(force=True)
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = {pool.submit(fetch_item, it, out_dir, fetcher, min_side): it for it in items}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="fetch", unit="img", disable=not progress):
            it = futures[fut]
            try:
                row = rows[(it.pos, it.k, "item")] = fut.result()
            except OSError as e:  # disk full, permissions: our side, not the record's
                raise UserError(f"cannot write into {out_dir}: {e.strerror or e}") from None
            save()
            if it.url is not None and row["detail"] != "already present":
                net["down" if row["status"] in ("connection_error", "timeout") else "other"] += 1
                if offline_after and net["other"] == 0 and net["down"] >= offline_after:
                    raise UserError(f"the first {net['down']} downloads all failed to connect ({row['detail']}): "
                                    "no network? Rows so far are in the manifest; run the same command again when "
                                    "online, or switch the offline check off to try every URL anyway")
    except BaseException:
        fetcher.stop.set()  # Ctrl-C or an error: running downloads give up at their next chunk
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        save(force=True)
    return _ordered(rows)


def _read_local(path, max_bytes):
    try:
        size = os.path.getsize(path)
    except OSError:
        raise FetchError("missing_file", f"no file {path}")
    if size > max_bytes:
        raise FetchError("too_large", f"{size} bytes > {max_bytes}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FetchError("missing_file", f"cannot read {path}: {e.strerror}")


def _row(index, k, caption, url, status, detail, pos=0):
    return {"index": index, "k": k, "caption": caption, "url": url or "", "status": status, "detail": detail,
            "file": "", "sha256": "", "width": None, "height": None, "bytes": None, "_pos": pos}


def _ordered(rows):
    return [rows[key] for key in sorted(rows, key=lambda t: (t[0], t[1]))]


def _remove_stale_temp(out_dir):
    """Delete temporary files left by a run killed in the middle of an atomic write."""
    for name in os.listdir(out_dir):
        if name.startswith(".tmp-"):
            try:
                os.remove(os.path.join(out_dir, name))
            except OSError:
                pass


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _as_list(v):
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v.strip() else None
    if isinstance(v, list) and v and all(isinstance(x, str) and x.strip() for x in v):
        return list(v)
    return None


def _short_conn(e):
    msg = one_line(e)
    for key in ("Name or service not known", "Temporary failure in name resolution", "Connection refused",
                "Network is unreachable", "No route to host", "Connection reset", "certificate verify failed",
                "RemoteDisconnected"):
        if key.lower() in msg.lower():
            return key
    return msg[:200]
