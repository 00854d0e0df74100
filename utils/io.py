"""Files: atomic writes (single files and whole folders), per-item progress logs for resumable runs with a lock
against a second live run, run metadata, safe file names, and the rules for paths that come from data files and
for outputs that must never replace inputs.
"""
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import sys
import tempfile

from .cli import UserError, one_line, warn

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def writing(path, what="output"):
    """Turn an OSError raised inside (permission denied, disk full, a path that is a folder or lies under a file)
    into a UserError naming the output: the user's environment, not a bug. Wrap every write of a result, e.g.
        with writing(out_dir, "model folder"):
            pipe.save_pretrained(tmp)
    """
    try:
        yield
    except OSError as e:
        if isinstance(e, (BlockingIOError, InterruptedError)):
            raise
        raise UserError(f"cannot write {what} {path}: {e.strerror or one_line(e)}") from None


def prepare_dir(path, what="output folder", inside=None):
    """Create folder path (and parents) if needed, at the start of a run: a path that is a file, lies under a
    file or cannot be created is one UserError now, not after hours of computing. inside: the output folder the
    user named, when path is a folder the tool names under it: no part of path below inside may be a symbolic
    link (a link there would take the run's writes outside the output folder). Returns path."""
    if inside is not None:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(inside))
        part = os.path.abspath(inside)
        for name in ([] if rel == os.curdir else rel.split(os.sep)):
            part = os.path.join(part, name)
            refuse_link(part, what)
    with writing(path, what):
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", path)
    return path


def atomic_write_bytes(path, data):
    """Write bytes to path via a temporary file in the same folder and os.replace (never a half-written file).
    An unwritable path is a UserError (see writing)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path)[-40:])
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give results the usual permissions
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=True) + "\n")


def atomic_torch_save(path, obj):
    """torch.save through a temporary file, so a crash never leaves a truncated .pt."""
    import io as _io
    import torch
    buf = _io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_image(path, image):
    """Save a PIL image atomically (format from the extension)."""
    import io as _io
    buf = _io.BytesIO()
    fmt = os.path.splitext(path)[1].lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    image.save(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())


def library_versions():
    """Versions of the libraries that determine the numbers, saved beside every result."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "diffusers", "transformers", "numpy", "sklearn", "open_clip", "PIL", "requests"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "unknown")
        except Exception:
            out[name] = None
    try:
        import torch
        out["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return out


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_sidecar(path, arguments, **extra):
    """A result's self-description beside it: JSON with the fields given, the run's arguments (a dict, e.g.
    vars(args)) and the library versions. Written atomically."""
    atomic_write_json(path, dict(extra, arguments=dict(arguments), versions=library_versions()))


def figure_png(fig, dpi=100):
    """PNG bytes of a matplotlib figure, which is closed afterwards."""
    import io as _io

    import matplotlib.pyplot as plt
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def read_run_log(path, what="run log", fields=None):
    """Parse a JSON-lines run log: line 1 {"header": {...}}, then one record per line with a unique integer
    "index" (the format of ProgressLog, and of mitigate_mem.py's manifest.jsonl).

    fields: optional {name: type or tuple of types} every record must have (bool never counts as int), e.g.
    {"prompt": str, "images": list}, or a pydantic model (utils.schemas) every record must be of; a record
    without them is a UserError naming its line and field, so a corrupted log stops the run with one message instead of a KeyError deep inside it.
    Returns (header dict, {index: record}, number of intact lines). A torn last line (a crash mid-write) is
    dropped with a warning; any other unreadable line (binary garbage, not UTF-8, not JSON), a missing header,
    or a record without an integer index is a UserError naming the line. A repeated index keeps the later
    record, with a warning.
    """
    if not os.path.lexists(path):
        raise UserError(f"{what} {path} not found")
    check_link(path, what)
    lines = read_text_file(path, what).split("\n")
    numbered = [(i, ln) for i, ln in enumerate(lines, start=1) if ln.strip()]
    records, good = {}, 0
    header = None
    for pos, (i, line) in enumerate(numbered):
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:  # ValueError: also integers of over 4,300 digits
            if pos == len(numbered) - 1 and pos > 0:
                warn(f"{path} line {i} is incomplete (interrupted run?); ignored")
                break
            raise UserError(f"{path} line {i} is not valid JSON ({getattr(e, 'msg', type(e).__name__)}); "
                            f"is it a {what} of this tool?")
        if lone_surrogate(obj) is not None:
            raise UserError(f"{path} line {i} holds a lone surrogate escape (\\ud800-\\udfff), which is not text")
        if pos == 0:
            if not (isinstance(obj, dict) and isinstance(obj.get("header"), dict)):
                raise UserError(f"{path} is not a {what} of this tool (no header line)")
            header = obj["header"]
        else:
            index = obj.get("index") if isinstance(obj, dict) else None
            if not _is_int(index):
                raise UserError(f"{path} line {i}: a record needs an integer 'index'")
            _check_fields(obj, fields, f"{path} line {i} (record {index})")
            if index in records:
                warn(f"{path} line {i}: index {index} repeated; the later record is used")
            records[index] = obj
        good = i
    if header is None:
        raise UserError(f"{path} is empty: not a {what} of this tool")
    return header, records, good


def lone_surrogate(obj):
    """The first string in parsed JSON obj (nested lists and dicts, keys too) that holds a lone surrogate
    ("\\ud800": valid JSON, but no text: it cannot be written as UTF-8, printed or tokenized), or None."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return v
        elif isinstance(v, dict):
            stack += list(v.keys()) + list(v.values())
        elif isinstance(v, list):
            stack += v
    return None


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check_fields(obj, fields, where):
    """UserError unless obj has every field of {name: type or tuple of types} (bool is not an int here), or, when
    fields is a pydantic model (utils.schemas), unless obj is of that type."""
    if fields is not None and not isinstance(fields, dict):
        check_type(obj, fields, where)
        return
    for name, types in (fields or {}).items():
        v = obj.get(name)
        types = types if isinstance(types, tuple) else (types,)
        if name not in obj or not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise UserError(f"{where}: '{name}' missing or not {' or '.join(t.__name__ for t in types)}; "
                            "the log is damaged (delete it to start afresh)")


def _log_line(obj):
    """One line of a run log (read_run_log's format)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=True) + "\n"


def write_run_log(path, header, records):
    """A whole run log at once, atomically, as ProgressLog writes it line by line (e.g. several processes' logs
    merged into one generation manifest)."""
    atomic_write_text(path, "".join(_log_line(r) for r in [{"header": header}, *records]))


class ProgressLog:
    """Append-only JSONL log of finished items, for resumable runs (format: read_run_log).

    The header holds the run's identity (arguments that change the numbers). Reopening with a different
    identity is refused, so a resumed run can never mix results of two configurations. A torn last line (crash
    mid-write) is dropped and the file rewritten without it. fields: what every record must hold (read_run_log).
    While the log is open, a lock (RunLock on <path>.lock) refuses a second process that would write the same
    log: two identical runs in one folder would otherwise both compute every item and write it twice.
    close() (or the end of the process) releases it; the object is also a context manager.
    """

    def __init__(self, path, identity, fields=None):
        self.path = os.fspath(path)
        self.identity = identity
        self.fields = fields
        self.done = {}
        with writing(self.path, "progress log"):
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._lock = RunLock(self.path + ".lock", what=f"progress log {self.path}")
        try:
            refuse_link(self.path, "progress log")
            if os.path.exists(self.path):
                self._load()
            else:
                with writing(self.path, "progress log"), _open_new(self.path, "w") as f:
                    f.write(_log_line({"header": identity}))
        except BaseException:
            self.close()
            raise

    def _load(self):
        header, self.done, good = read_run_log(self.path, "progress log", self.fields)
        if header != self.identity:
            diff = sorted(k for k in set(header) | set(self.identity) if header.get(k) != self.identity.get(k))
            raise UserError(
                f"{self.path} belongs to a run with different settings ({', '.join(diff)}); "
                "use another --out_dir, or delete that file to start afresh")
        lines = read_text_file(self.path, "progress log").split("\n")
        if any(ln.strip() for ln in lines[good:]):  # rewrite without a torn tail so appends start on a clean line
            atomic_write_text(self.path, "\n".join(lines[:good]) + "\n")

    def add(self, record):
        """Append one finished item and flush it to disk at once; a record that is not of the log's type (e.g. no
        values) is a UserError and is never written."""
        _check_fields(record, self.fields, f"{self.path} (new record {record.get('index')})")
        with writing(self.path, "progress log"), _open_new(self.path, "a") as f:
            f.write(_log_line(record))
            f.flush()
            os.fsync(f.fileno())
        self.done[record["index"]] = record

    def close(self):
        """Release the lock (idempotent); the log file stays."""
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # a log dropped without close(), e.g. a script's main() returning
        try:
            self._lock.release()
        except Exception:  # __init__ failed before the lock, or the interpreter is shutting down
            pass


def _open_new(path, mode):
    """A text file opened for writing ("w": created, never an existing file) or appending ("a"), never through a
    symbolic link (O_NOFOLLOW: a link put in its place is an error, not followed)."""
    flags = os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | (os.O_CREAT | os.O_EXCL if mode == "w" else os.O_APPEND)
    return os.fdopen(os.open(path, flags, 0o666), mode, encoding="utf-8")


class RunLock:
    """An exclusive lock on a lock file for as long as a run writes somewhere; a second process asking for the
    same lock gets a UserError at once (never waits).

    POSIX record locks (fcntl.lockf) belong to the process: the kernel drops them when the process ends, however
    it ends (SIGKILL included), so a stale lock file never blocks a later run; and one process may take the same
    lock twice (tests that run a script's main() twice in one interpreter). The file holds the owner's pid, for
    the message; release() deletes it when it is still ours. Without fcntl (Windows) there is no lock.
    """

    def __init__(self, path, what="output"):
        self.path, self.what, self.fd = os.fspath(path), what, None
        try:
            import fcntl
        except ImportError:
            return
        while self.fd is None:
            refuse_link(self.path, "lock file")  # a link here would have its target truncated and overwritten
            with writing(self.path, "lock file"):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise UserError(f"another run (pid {owner}) is writing {self.what}; wait for it to end, or use "
                                f"another output folder (if no such run exists, delete {self.path})") from None
            if _same_inode(fd, self.path):  # else the previous owner deleted the file meanwhile: lock a fresh one
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
            else:
                os.close(fd)

    def release(self):
        """Unlock and delete the lock file (when it is still the one locked); idempotent."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if _same_inode(fd, self.path):
                os.remove(self.path)  # before unlocking: a process that opened it meanwhile sees it replaced, retries
        except OSError:
            pass
        os.close(fd)  # closing the descriptor drops the process's lock on the file


def lock_holder(path):
    """The pid text of the live process that holds the RunLock on lock file path, or None (no such file, or
    nobody holds it). Probes with a non-blocking lock; POSIX locks belong to the process, so call it only where
    this process holds no lock on that file (closing the probe would drop it)."""
    try:
        import fcntl
    except ImportError:
        return None
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _same_inode(fd, path):
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# ---- Paths that come from data files ------------------------------------------------------------------------
# A jsonl record's "file", a generation manifest's image names, a fetch manifest's "file": all follow one rule,
# safe_data_path + read_limited (or read_data_file for both). The data file's author must not be able to make the
# tool read outside the data file's folder, block on a FIFO, or exhaust memory on a device or a huge file.


class DataPathError(ValueError):
    """A path from a data file was refused. status: "bad_path" (absolute, empty, or leads outside the folder),
    "missing_file", "not_file" (a folder, FIFO, device or socket), "too_large" or "unreadable"; detail: why."""

    def __init__(self, status, detail):
        super().__init__(detail)
        self.status, self.detail = status, detail


def safe_data_path(base_dir, relative):
    """The resolved absolute path of `relative` (a path read from a data file in base_dir), if it is a regular
    file inside base_dir; otherwise DataPathError.

    The path is taken relative to base_dir, resolved (symbolic links and '..' followed: os.path.realpath) and
    must stay inside realpath(base_dir); absolute paths are refused. Checked before existence, so a refusal never
    says whether a file outside the folder exists.
    """
    if not isinstance(relative, str) or not relative.strip() or "\x00" in relative:
        raise DataPathError("bad_path", f"not a usable file name: {relative!r:.80}")
    if os.path.isabs(relative):
        raise DataPathError("bad_path", f"{relative!r:.80} is an absolute path; names must be relative to the "
                                        "data file's folder")
    base = os.path.realpath(base_dir)
    path = os.path.realpath(os.path.join(base, relative))
    if path == base or os.path.commonpath([base, path]) != base:
        raise DataPathError("bad_path", f"{relative!r:.80} leads outside {base_dir}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataPathError("missing_file", f"no file {relative!r:.80} in {base_dir}") from None
    except OSError as e:
        raise DataPathError("unreadable", f"cannot read {relative!r:.80}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataPathError("not_file", f"{relative!r:.80} is {_file_kind(st.st_mode)}, not a regular file")
    return path


def read_limited(path, max_bytes):
    """The bytes of the regular file at path, at most max_bytes; DataPathError otherwise.

    The limit is enforced while reading (a file that grows, or lies about its size, cannot exhaust memory); the
    file is opened without blocking and checked on the open descriptor, so a FIFO or device swapped in after a
    check is refused instead of hanging or streaming forever.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise DataPathError("missing_file", f"no file {path}") from None
    except OSError as e:
        raise DataPathError("unreadable", f"cannot read {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DataPathError("not_file", f"{path} is {_file_kind(mode)}, not a regular file")
        chunks, total = [], 0
        while True:
            b = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not b:
                return b"".join(chunks)
            chunks.append(b)
            total += len(b)
            if total > max_bytes:
                raise DataPathError("too_large", f"{path} is larger than {max_bytes} bytes")
    except OSError as e:
        raise DataPathError("unreadable", f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def read_text_file(path, what="file", max_bytes=1 << 30):
    """The UTF-8 text (a BOM dropped) of a file a run reads (a log, a manifest), under read_limited's rules; any
    failure (missing, a FIFO or device, over max_bytes, not UTF-8) is a UserError naming what it is."""
    try:
        raw = read_limited(path, max_bytes)
    except DataPathError as e:
        raise UserError(f"cannot read {what} {path}: {e.detail}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{what} {path} is not UTF-8 text (bad byte at offset {e.start}, line {line})") from None


MAX_JSON_BYTES = 256 << 20  # a sidecar or score result is read whole; real ones are a few MB


def refuse_link(path, what="output"):
    """UserError when path is a symbolic link (dangling or not): a file or folder the tool writes is never
    reached through a link, which could lead anywhere on disk."""
    if os.path.islink(path):
        raise UserError(f"{what} {path} is a symbolic link (to {os.readlink(path)}); the tool never writes through "
                        "a link: remove it, or choose another output folder")


def check_link(path, what="file"):
    """UserError when path is a symbolic link that leads out of its own folder (a link inside it is fine)."""
    if os.path.islink(path):
        folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        target = os.path.realpath(path)
        if not _inside(target, folder):
            raise UserError(f"{what} {path} is a link to {target}, outside its folder; refusing to follow it")


def check_type(obj, model, where):
    """Validate parsed JSON obj against a pydantic model (utils.schemas); the first problem is a UserError that
    names where (file, line) and the field."""
    from pydantic import ValidationError
    try:
        model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "top level"
        raise UserError(f"{where}: {loc}: {err['msg']}; the file is damaged or was edited by hand "
                        "(rerun the command that wrote it)") from None
    return obj


def read_json_file(path, what="JSON file", model=None, max_bytes=MAX_JSON_BYTES):
    """The one way in for a JSON file a run reads back (sidecars, score results): not a link out of its folder,
    a regular file (a FIFO or device is refused without blocking), at most max_bytes, UTF-8, valid JSON, and of
    the type `model` (a pydantic model of utils.schemas) when given. Returns the parsed JSON as it is; any
    failure is one UserError naming what the file is."""
    check_link(path, what)
    text = read_text_file(path, what, max_bytes)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None
    if lone_surrogate(obj) is not None:
        raise UserError(f"{what} {path} holds a lone surrogate escape (\\ud800-\\udfff), which is not text")
    return obj if model is None else check_type(obj, model, f"{what} {path}")


def read_data_file(base_dir, relative, max_bytes):
    """safe_data_path then read_limited: (resolved path, bytes), or DataPathError."""
    path = safe_data_path(base_dir, relative)
    return path, read_limited(path, max_bytes)


def _file_kind(mode):
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a link")):
        if test(mode):
            return name
    return "not a regular file"


# ---- Outputs -------------------------------------------------------------------------------------------------


def check_outputs(outputs, inputs):
    """Refuse (UserError) outputs that would replace an input; call it before any work.

    outputs, inputs: {label: path} dicts or iterables of (label, path) pairs; label names the flag for the
    message; a path of None is skipped. Refused: an output that resolves to the same file as an input (same
    path after symbolic links, or a hard link to it), an output inside an input that is a folder (a folder input
    protects everything under it), and an input inside an output (an output folder replaced as a whole would take
    it along). E.g. check_outputs({"--out": a.out}, {"--mem": a.mem, "--nmem": a.nmem}).
    """
    outs, ins = _labelled(outputs), _labelled(inputs)
    for olabel, out in outs:
        ro = os.path.realpath(out)
        for ilabel, inp in ins:
            ri = os.path.realpath(inp)
            if ro == ri or _same_file(out, inp):
                raise UserError(f"{olabel} {out} is {ilabel} {inp}: an output never replaces an input; choose "
                                "another output path")
            if os.path.isdir(ri) and _inside(ro, ri):
                raise UserError(f"{olabel} {out} lies inside {ilabel} {inp}, an input folder; choose another "
                                "output path")
            if _inside(ri, ro):
                raise UserError(f"{ilabel} {inp} lies inside {olabel} {out}: an output folder never holds the "
                                "run's inputs (it may be replaced as a whole); choose another output path")


def _labelled(pairs):
    items = pairs.items() if isinstance(pairs, dict) else pairs
    return [(label, os.fspath(p)) for label, p in items if p is not None]


def _inside(child, parent):
    """True when the resolved path child lies strictly under the resolved folder parent."""
    return child != parent and os.path.commonpath([child, parent]) == parent


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


@contextlib.contextmanager
def staged_dir(target, marker=None):
    """Write a multi-file result (a model folder) into a fresh temporary folder beside target, which replaces
    target only when the block completes: a crash, Ctrl-C or kill inside leaves target as it was (never new
    files beside old ones). Yields the temporary folder's path.

    The replacement is one atomic rename when target does not exist yet, and an atomic exchange
    (renameat2 RENAME_EXCHANGE) where the kernel and file system support it. Elsewhere it is two renames: a kill
    between them leaves target absent and the previous version in .old-<name>-* beside it, never a mixture.
    marker: a file name an existing non-empty target must contain to be replaced (e.g. "model_index.json"), so
    that a mistyped path never swaps away an unrelated folder. Temporary folders of killed runs
    (.tmp-<name>-*) are deleted first. An unwritable place is a UserError.
    """
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(target)
    check_replaceable(target, marker)
    with writing(target, "output folder"):
        os.makedirs(parent, exist_ok=True)
        _remove_stale(parent, f".tmp-{name}-")
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-")
    try:
        yield tmp
        with writing(target, "output folder"):
            os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700; give results the usual permissions
            _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(target, marker=None):
    """UserError unless staged_dir may replace target: absent, or a folder that is empty or holds marker. Call
    it before long work, so that a wrong output path stops the run at once."""
    if os.path.lexists(target) and not os.path.isdir(target):
        raise UserError(f"{target} exists and is not a folder; choose another output folder")
    if marker and os.path.isdir(target) and os.listdir(target) and not os.path.exists(os.path.join(target, marker)):
        raise UserError(f"{target} is a non-empty folder without {marker}: not an earlier result of this tool, "
                        "so it is not replaced; choose another output folder or empty it")


def _swap_in(tmp, target):
    """Put the complete folder tmp at target; afterwards tmp holds the previous version (or nothing)."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        return
    old = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".old-{os.path.basename(target)}-")
    os.rmdir(old)
    os.rename(target, old)
    os.rename(tmp, target)
    os.rename(old, tmp)  # the caller deletes tmp


def _exchange(a, b):
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where that is unavailable."""
    import ctypes
    import errno
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _remove_stale(folder, prefix):
    for entry in os.listdir(folder):
        if entry.startswith(prefix):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def safe_component(name, what="name"):
    """name, unchanged, if it can be one path component under an output folder; else a UserError naming what.

    Refused: empty, '.', '..', a path separator (so also absolute paths), control characters, more than 255
    bytes. Use it on every name that becomes part of an output path (a --prompt_type, a model label).
    """
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{what} must not be empty")
    problem = ("is '.' or '..'" if name in (".", "..") else
               "contains a path separator" if any(s in name for s in ("/", "\\", os.sep, os.altsep or "/")) else
               "contains control characters" if any(ord(c) < 32 or ord(c) == 127 for c in name) else
               "is longer than 255 bytes" if len(name.encode("utf-8", "surrogateescape")) > 255 else None)
    if problem:
        raise UserError(f"{what} {name!r:.80} {problem}: it must be a plain name (it becomes part of an output path)")
    return name


def safe_join(base_dir, *names, what="name"):
    """os.path.join(base_dir, *names) after safe_component on every name: the result always lies under base_dir.
    E.g. folder = safe_join(args.out_dir, label, args.prompt_type, what="--prompt_type / model label")."""
    return os.path.join(base_dir, *(safe_component(n, what) for n in names))


_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]+')
_TAGS = re.compile(r"<[^>]*>")


def safe_filename(index, text, max_bytes=120, suffix=""):
    """A file name that shows the prompt: '00012_<cleaned text><suffix>', at most max_bytes bytes in UTF-8.

    Removes HTML tags, path separators, quotes and control characters; collapses whitespace; never starts with
    a dot; the index prefix keeps names unique even when two prompts clean to the same text.
    """
    body = _TAGS.sub(" ", text)
    body = _UNSAFE.sub(" ", body).replace("'", " ")
    body = re.sub(r"\s+", "_", body.strip()).strip("._-") or "prompt"
    head = f"{index:05d}_"
    room = max_bytes - len(head.encode()) - len(suffix.encode())
    enc = body.encode("utf-8")[:max(room, 1)]
    body = enc.decode("utf-8", errors="ignore").rstrip("._-") or "prompt"
    return head + body + suffix
