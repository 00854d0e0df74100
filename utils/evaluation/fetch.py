"""Training-image retrieval for the memorized-prompt sets: validated, resumable, concurrent, with a CSV manifest.

Layout of an output folder (what `mitigate_eval.py score --gt` reads; the manifest format: utils/fetch_manifest.py):
    <out>/<index>_<k>.<ext>   image k (0, 1, ...) of the record whose LAION index is <index>, original bytes
    <out>/fetch_manifest.csv  one row per (record, k): index, k, caption, url, status, detail, file, sha256, ...
    <out>/fetch_info.json     arguments, counts by status, library versions
Files on disk are the source of truth: an image is only ever renamed into place after it decoded fully, so a
rerun (or a crash before the manifest was rewritten) trusts them, re-validates them locally and skips the network.
"""
import hashlib
import html
import http.client
import os
import queue
import re
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..cli import UserError, one_line, warn
from .fetch_manifest import MANIFEST_NAME, write_manifest
from .images import IMAGE_SUFFIXES, MIN_SIDE, inspect_image
from ..io import DataPathError, atomic_write_bytes, read_data_file

USER_AGENT = ("memsharp-fetch/1.0 (research tool: retrieves LAION training images of memorized Stable Diffusion "
              "prompts for copy-detection evaluation; python http.client)")
INDEX_MAX = 2 ** 63 - 1  # LAION indices are below 6e9; a longer number would make an unwritable file name
REDIRECTS = (301, 302, 303, 307, 308)
TRANSIENT_HTTP = (408, 429, 500, 502, 503, 504)


@dataclass
class Item:
    """One image to obtain: image k of record `index`, from a URL or a local file (`file`, relative to `base`, the
    jsonl's folder; read under utils.io.safe_data_path's rule when fetched)."""
    pos: int
    index: int
    k: int
    caption: str
    url: str = None
    file: str = None
    base: str = None
    source: str = None  # what the manifest shows: the URL, or the file path as written in the jsonl


def items_from_records(records, base_dir):
    """Split jsonl records into fetch items; bad records become finished manifest rows instead.

    A record has "caption" (str), "index" (int in [0, 2^63 - 1], the LAION index; required: a record never gets
    an index it does not state, which could be another record's) and one source: "url" / "urls" (list) or
    "file" / "files" (paths relative to base_dir, the jsonl's folder). Returns (items, rows_for_bad_records);
    a rejected record's row carries its index only when the index itself is valid, else None (an empty cell).
    """
    items, bad, seen = [], [], set()
    for pos, rec in enumerate(records):
        problem, status = _record_problem(rec, pos), "bad_record"
        index = rec.get("index") if isinstance(rec, dict) else None
        if problem is None and index in seen:
            problem, status = f"record {pos + 1}: index {index} appeared before; only the first is used", \
                "duplicate_index"
        if problem is not None:
            caption = rec.get("caption") if isinstance(rec, dict) else None
            bad.append(_row(index if _valid_index(index) else None, 0, caption if isinstance(caption, str) else "",
                            "", status, problem, pos=pos))
            continue
        seen.add(index)
        urls, files = _as_list(rec.get("urls", rec.get("url"))), _as_list(rec.get("files", rec.get("file")))
        for k, url in enumerate(urls):
            items.append(Item(pos, index, k, rec["caption"], url=url, source=url))
        for k, f in enumerate(files, start=len(urls)):
            items.append(Item(pos, index, k, rec["caption"], file=f, base=base_dir, source=f))
    return items, bad


def _record_problem(rec, pos):
    """Why a jsonl record cannot be used (text), or None."""
    n = pos + 1
    if not isinstance(rec, dict):
        return f"record {n} is not a JSON object"
    if "index" not in rec:
        return f"record {n} has no 'index' (the LAION index that names its images)"
    if not _valid_index(rec["index"]):
        return f"record {n}: index must be an integer in [0, 2^63 - 1], got {rec['index']!r:.40}"
    caption = rec.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        return f"record {n}: caption missing or not text"
    urls, files = _as_list(rec.get("urls", rec.get("url"))), _as_list(rec.get("files", rec.get("file")))
    if urls is None or files is None or not (urls or files):
        return f"record {n}: needs a 'url' or 'file' (text or list of text)"
    return None


def _valid_index(v):
    return _is_int(v) and 0 <= v <= INDEX_MAX


class Fetcher:
    """Downloads with hard time bounds, retries with back-off, a size cap and prompt cancellation.

    Time: each URL gets one deadline, total_timeout seconds after get() starts, shared by its retries, redirects
    and back-off waits. Every socket operation waits at most min(timeout, time left), the deadline is checked
    before every read, and a watchdog shuts the socket down when the deadline passes: a server that sends one
    byte every half second (each read returns in time, the whole never ends) is cut off at the deadline, also
    while it trickles headers or a TLS handshake. Only name resolution (getaddrinfo) cannot be interrupted.
    cancel() ends every running download at once (Ctrl-C). Proxies come from the environment (http_proxy,
    https_proxy, no_proxy; http:// proxies, HTTPS through CONNECT). One fetcher serves many threads.
    """

    def __init__(self, timeout=15.0, retries=2, backoff=1.0, max_bytes=30 << 20, total_timeout=60.0,
                 user_agent=USER_AGENT, max_redirects=5):
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_bytes, self.total_timeout, self.user_agent = max_bytes, total_timeout, user_agent
        self.max_redirects = max_redirects
        self.stop = threading.Event()
        self._lines, self._lock = set(), threading.Lock()
        self._proxies = urllib.request.getproxies()
        self._tls = _tls_context()

    def cancel(self):
        """Stop all downloads now: running ones end with status "pending" (their sockets are shut down)."""
        self.stop.set()
        with self._lock:
            lines = list(self._lines)
        for line in lines:
            line.shutdown()

    def get(self, url):
        """Bytes of url, or raise FetchError(status, detail). Transient failures are retried with backoff."""
        if not isinstance(url, str) or not re.match(r"^https?://", url, flags=re.I):
            raise FetchError("bad_url", f"not an http(s) URL: {str(url)[:80]!r}")
        deadline = time.monotonic() + self.total_timeout
        # LAION stores some URLs HTML-escaped ('&amp;'); try the literal URL first, as scraped, then unescaped.
        candidates = [url] + ([html.unescape(url)] if html.unescape(url) != url else [])
        err = None
        for cand in candidates:
            try:
                return self._get_retrying(cand, deadline)
            except FetchError as e:
                err = err or e
                if e.status != "http_error":
                    break
        raise err

    def _get_retrying(self, url, deadline):
        for attempt in range(self.retries + 1):
            try:
                return self._get_following(url, deadline)
            except FetchError as e:
                left = deadline - time.monotonic()
                if not e.transient or attempt == self.retries or left <= 0:
                    raise
                wait = min(self.backoff * 2.0 ** min(attempt, 60), left)
            if self.stop.wait(wait):
                raise FetchError("pending", "cancelled")

    def _get_following(self, url, deadline):
        for _ in range(self.max_redirects + 1):
            location, body = self._get_once(url, deadline)
            if location is None:
                return body
            url = urllib.parse.urljoin(url, location)
            if not re.match(r"^https?://", url, flags=re.I):
                raise FetchError("bad_url", f"redirected to a non-http(s) URL: {url[:80]!r}")
        raise FetchError("bad_url", f"more than {self.max_redirects} redirects")

    def _get_once(self, url, deadline):
        """One request: (redirect location, None) or (None, body bytes); FetchError otherwise."""
        scheme, host, port, target = _split_url(url)
        if self.stop.is_set():
            raise FetchError("pending", "cancelled")
        raw = sock = line = None
        try:
            proxy = self._proxy(scheme, host)
            raw = sock = self._connect(*(proxy[:2] if proxy else (host, port)), deadline)
            line = _Line(raw, deadline)
            with self._lock:
                self._lines.add(line)
            if self.stop.is_set():  # cancel() ran before this connection was registered
                line.shutdown()
            if proxy and scheme == "https":
                _tunnel(sock, host, port, proxy[2])
            if scheme == "https":  # the handshake runs under the watchdog too: it shuts the descriptor down
                sock = self._tls.wrap_socket(sock, server_hostname=host)
            return self._exchange(sock, scheme, host, port, target if not (proxy and scheme == "http") else url,
                                  proxy[2] if proxy and scheme == "http" else None, deadline, line)
        except FetchError:
            raise
        except Exception as e:  # socket, TLS and protocol errors: classified, never a crash of the run
            raise self._classify(e, deadline, line) from e
        finally:
            if line is not None:
                line.close()
                with self._lock:
                    self._lines.discard(line)
            for s in (sock, raw):  # after wrap_socket, raw is detached and closing it does nothing
                if s is not None:
                    s.close()

    def _connect(self, host, port, deadline):
        """A TCP socket connected to host:port. Each address of the host is tried with min(timeout, time left),
        recomputed per address, so a host with many unreachable addresses cannot outlast the deadline."""
        err = None
        for family, kind, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            wait = self._wait(deadline)
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(wait)
                sock.connect(addr)
                return sock
            except OSError as e:  # refused, unreachable, timed out: try the next address
                sock.close()
                err = e
        raise err or OSError(f"no address for {host}")

    def _exchange(self, sock, scheme, host, port, target, proxy_auth, deadline, line):
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = cls(host, port)
        conn.sock = sock  # already connected (and wrapped): http.client only speaks HTTP over it
        headers = {"User-Agent": self.user_agent, "Accept": "image/*,*/*;q=0.8", "Connection": "close"}
        if proxy_auth:
            headers["Proxy-Authorization"] = proxy_auth
        sock.settimeout(self._wait(deadline))
        conn.request("GET", target, headers=headers)
        r = conn.getresponse()
        if r.status in REDIRECTS and r.getheader("Location"):
            return r.getheader("Location"), None
        if r.status != 200:
            raise FetchError("http_error", f"HTTP {r.status}", transient=r.status in TRANSIENT_HTTP)
        length = r.getheader("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise FetchError("too_large", f"Content-Length {int(length)} > {self.max_bytes} bytes")
        buf = bytearray()
        while True:
            sock.settimeout(self._wait(deadline))  # never block past the deadline, whatever the server does
            chunk = r.read1(1 << 16)
            if self.stop.is_set():
                raise FetchError("pending", "cancelled")
            if line.fired.is_set():
                raise self._over_time()
            if not chunk:
                break
            buf += chunk
            if len(buf) > self.max_bytes:
                raise FetchError("too_large", f"body exceeds {self.max_bytes} bytes")
        if r.length:  # the server closed the connection before sending Content-Length bytes
            raise FetchError("connection_error", f"connection closed after {len(buf)} of {len(buf) + r.length} "
                                                 "bytes", transient=True)
        return None, bytes(buf)

    def _wait(self, deadline):
        """Seconds one socket operation may block: min(timeout, time left); FetchError once the time is up."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._over_time()
        return min(self.timeout, left)

    def _over_time(self):
        return FetchError("timeout", f"download took over {self.total_timeout:g} s", transient=True)

    def _classify(self, e, deadline, line):
        """The FetchError for an exception of one request (socket, TLS, HTTP protocol, URL)."""
        if self.stop.is_set():
            return FetchError("pending", "cancelled")
        if (line is not None and line.fired.is_set()) or time.monotonic() >= deadline:
            return self._over_time()
        if isinstance(e, TimeoutError):
            return FetchError("timeout", f"no answer within {self.timeout:g} s", transient=True)
        if isinstance(e, (http.client.InvalidURL, UnicodeError, ValueError)):
            return FetchError("bad_url", one_line(e)[:200])
        if isinstance(e, ssl.SSLCertVerificationError):
            return FetchError("connection_error", "certificate verify failed")
        if isinstance(e, (OSError, ssl.SSLError)):  # refused, reset, unreachable, unknown host, TLS failure
            return FetchError("connection_error", _short_conn(e), transient=True)
        if isinstance(e, http.client.HTTPException):  # a malformed answer: bad status line, overlong headers
            return FetchError("request_error", f"{type(e).__name__}: {one_line(e)}"[:200], transient=True)
        raise e  # anything else is a bug

    def _proxy(self, scheme, host):
        """(proxy host, port, Proxy-Authorization value or None) for this URL, or None for a direct connection."""
        spec = self._proxies.get(scheme)
        if not spec or urllib.request.proxy_bypass_environment(host, self._proxies):
            return None
        p = urllib.parse.urlsplit(spec if "://" in spec else "http://" + spec)
        if p.scheme != "http" or not p.hostname:
            raise FetchError("connection_error", f"unsupported proxy {spec!r} (only http:// proxies)")
        auth = None
        if p.username:
            import base64
            creds = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
            auth = "Basic " + base64.b64encode(creds.encode()).decode()
        return p.hostname, p.port or 80, auth


def _split_url(url):
    """(scheme, ASCII host, port, request target) of an http(s) URL; spaces and non-ASCII characters of the path
    and query are percent-encoded (as browsers send them), existing escapes kept."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
        host = (parts.hostname or "").encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as e:
        raise FetchError("bad_url", f"{one_line(e)}: {url[:80]!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host:
        raise FetchError("bad_url", f"not an http(s) URL with a host: {url[:80]!r}")
    safe = "!#$%&'()*+,/:;=?@[]~"
    target = urllib.parse.quote(parts.path or "/", safe=safe)
    if parts.query:
        target += "?" + urllib.parse.quote(parts.query, safe=safe)
    return scheme, host, port or (443 if scheme == "https" else 80), target


def _tunnel(sock, host, port, auth):
    """Open an HTTPS tunnel through an HTTP proxy on the connected socket (CONNECT host:port)."""
    lines = [f"CONNECT {host}:{port} HTTP/1.1", f"Host: {host}:{port}"] + (
        [f"Proxy-Authorization: {auth}"] if auth else [])
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
    r = http.client.HTTPResponse(sock, method="CONNECT")
    r.begin()
    if r.status != 200:
        raise FetchError("connection_error", f"the proxy refused the tunnel: HTTP {r.status}",
                         transient=r.status in TRANSIENT_HTTP)


def _tls_context():
    try:
        import certifi  # the CA bundle requests uses; the system's otherwise
        return ssl.create_default_context(cafile=certifi.where())
    except (ImportError, OSError):
        return ssl.create_default_context()


class _Line:
    """One request's connection as other threads see it: a watchdog shuts it down at the deadline (fired is then
    set), cancel() may shut it down at any time. The shutdown goes to the descriptor (through a duplicate), so it
    also reaches a socket wrapped for TLS meanwhile, and happens under a lock with close(), so it never reaches a
    descriptor number that was closed and reused."""

    def __init__(self, sock, deadline):
        self.fd, self.fired, self._lock, self._open = sock.fileno(), threading.Event(), threading.Lock(), True
        self._watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _fire(self):
        self.fired.set()
        self.shutdown()

    def shutdown(self):
        """End the connection now: a read blocked on it returns at once."""
        with self._lock:
            if not self._open:
                return
            try:
                dup = socket.socket(fileno=os.dup(self.fd))
            except OSError:
                return
            try:
                dup.shutdown(socket.SHUT_RDWR)  # shuts the connection, which every duplicate shares
            except OSError:  # not connected (any more)
                pass
            finally:
                dup.close()  # closes only the duplicate

    def close(self):
        """Called before the socket is closed: no shutdown after this."""
        self._watchdog.cancel()
        with self._lock:
            self._open = False


class Offline(UserError):
    """The first downloads all failed to connect: the machine looks offline (fetch_all's offline_after)."""


class FetchError(Exception):
    """A download or local read that failed for a reason of the record or the server: status (a manifest
    status word), detail (text), transient (worth retrying)."""

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
    """Obtain one image into out_dir/<index>_<k><ext> and return its manifest row (never raises for bad data).

    A local `file` is read under the data-path rule (utils.io.read_data_file: inside the jsonl's folder, a
    regular file, at most fetcher.max_bytes read); a refusal is the row's status (bad_path, missing_file,
    not_file, too_large, unreadable).
    """
    row = _row(item.index, item.k, item.caption, item.source, "pending", "", pos=item.pos)
    present = _already_present(item, out_dir, fetcher.max_bytes, min_side)
    if present is not None:
        return dict(row, **present)
    try:
        if item.url is not None:
            data = fetcher.get(item.url)
        else:
            _, data = read_data_file(item.base, item.file, fetcher.max_bytes)
    except (FetchError, DataPathError) as e:
        return dict(row, status=e.status, detail=e.detail)
    info = inspect_image(data, min_side=min_side)
    if info["status"] != "ok":
        return dict(row, status=info["status"], detail=info["detail"], width=info["width"], height=info["height"],
                    bytes=len(data))
    name = f"{item.index}_{item.k}{info['ext']}"
    atomic_write_bytes(os.path.join(out_dir, name), data)  # temp file + rename: never a half-written image
    return dict(row, **_ok_fields(name, data, info))


def _already_present(item, out_dir, max_bytes, min_side):
    """Manifest fields of a valid image of this item already in out_dir (resume), or None. Files on disk are
    trusted but re-checked: one that no longer validates (or is no regular file) is removed and fetched again."""
    for name in existing_files(out_dir, item.index, item.k):
        path = os.path.join(out_dir, name)
        try:
            _, data = read_data_file(out_dir, name, max_bytes)
        except DataPathError as e:
            problem = e.detail
        else:
            info = inspect_image(data, min_side=min_side)
            if info["status"] == "ok":
                return dict(_ok_fields(name, data, info), detail="already present")
            problem = f"{info['status']}: {info['detail']}"
        warn(f"{path} is not a valid image any more ({problem}); fetching it again")
        if not os.path.isdir(path):
            os.remove(path)  # a link is removed, never what it points to
    return None


def _ok_fields(name, data, info):
    return dict(status="ok", detail="", file=name, sha256=hashlib.sha256(data).hexdigest(), width=info["width"],
                height=info["height"], bytes=len(data))


def fetch_all(records, base_dir, out_dir, fetcher, workers=8, min_side=MIN_SIDE, progress=True,
              save_every_s=2.0, offline_after=24):
    """Fetch every record's images into out_dir with `workers` threads; keeps out_dir/fetch_manifest.csv current.

    The manifest is rewritten atomically at most every save_every_s seconds and at the end (also on Ctrl-C or
    an error), so it is always a complete, readable CSV; rows not reached yet say "pending".
    If the first offline_after downloads all fail to connect (or time out), the machine is taken to be offline
    and a UserError stops the run instead of waiting on every URL (0 disables the check).
    On Ctrl-C or an error, fetcher.cancel() ends the running downloads at once, and the worker threads are daemon
    threads: nothing keeps the process alive after the manifest is saved.
    Returns the list of rows in record order.
    """
    from tqdm import tqdm
    items, bad = items_from_records(records, base_dir)
    rows = {(r["_pos"], r["k"], r["status"]): r for r in bad}
    for it in items:
        rows[(it.pos, it.k, "item")] = _row(it.index, it.k, it.caption, it.source, "pending", "", pos=it.pos)
    manifest = os.path.join(out_dir, MANIFEST_NAME)
    last = [0.0]
    net = {"down": 0, "other": 0}

    def save(force=False):
        if force or time.monotonic() - last[0] >= save_every_s:
            write_manifest(manifest, _ordered(rows))
            last[0] = time.monotonic()

    save(force=True)  # creates out_dir, or stops with one error line when it cannot be written
    done = queue.SimpleQueue()
    try:  # from the moment the manifest exists: a Ctrl-C while the workers start also cancels the started ones
        _remove_stale_temp(out_dir)
        _start_workers(lambda it: fetch_item(it, out_dir, fetcher, min_side), items, workers, done, fetcher.stop)
        with tqdm(total=len(items), desc="fetch", unit="img", disable=not progress) as bar:
            for _ in range(len(items)):
                it, row, error = _next_result(done)
                if error is not None:
                    if isinstance(error, OSError):  # removing a stale file: our side, not the record's
                        raise UserError(f"cannot write into {out_dir}: {error.strerror or error}") from None
                    raise error
                rows[(it.pos, it.k, "item")] = row
                bar.update()
                save()
                if it.url is not None and row["detail"] != "already present":
                    net["down" if row["status"] in ("connection_error", "timeout") else "other"] += 1
                    if offline_after and net["other"] == 0 and net["down"] >= offline_after:
                        raise Offline(f"the first {net['down']} downloads all failed to connect ({row['detail']})"
                                        ": no network? Rows so far are in the manifest; run the same command again "
                                        "when online, or switch the offline check off to try every URL anyway")
    except BaseException:
        fetcher.cancel()  # Ctrl-C or an error: running downloads end now, queued ones never start
        raise
    finally:
        save(force=True)
    return _ordered(rows)


def _start_workers(func, items, workers, done, stop):
    """Run func over items in min(workers, len(items)) daemon threads; each outcome goes to the queue done as
    (item, result, None) or (item, None, exception). Threads stop taking items once stop is set. Daemon threads,
    unlike ThreadPoolExecutor's, never hold the interpreter open at exit (e.g. one stuck in name resolution)."""
    todo = queue.SimpleQueue()
    for it in items:
        todo.put(it)

    def work():
        while not stop.is_set():
            try:
                it = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((it, func(it), None))
            except BaseException as e:  # handed to the main thread, which decides
                done.put((it, None, e))

    for _ in range(min(max(1, workers), len(items))):
        threading.Thread(target=work, daemon=True, name="fetch-worker").start()


def _next_result(done):
    """The next outcome from the workers; waits in short steps so that Ctrl-C is seen at once."""
    while True:
        try:
            return done.get(timeout=0.2)
        except queue.Empty:
            continue


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
    """A short, stable text for a connection failure (the classic causes by name)."""
    msg = f"{type(e).__name__} {one_line(e)}"
    for key in ("Name or service not known", "Temporary failure in name resolution", "Connection refused",
                "Network is unreachable", "No route to host", "Connection reset", "certificate verify failed",
                "RemoteDisconnected"):
        if key.lower() in msg.lower():
            return key
    return one_line(e)[:200]
