"""Result files: atomic writes, per-item progress logs for resumable runs, run metadata, safe file names."""
import hashlib
import json
import os
import platform
import re
import sys
import tempfile

from .cli import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path, data):
    """Write bytes to path via a temporary file in the same folder and os.replace (never a half-written file)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
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


def read_run_log(path, what="run log"):
    """Parse a JSON-lines run log: line 1 {"header": {...}}, then one record per line with a unique integer
    "index" (the format of ProgressLog, and of mitigate_mem.py's manifest.jsonl).

    Returns (header dict, {index: record}, number of intact lines). A torn last line (a crash mid-write) is
    dropped with a warning; any other unreadable line, a missing header, or a record without an integer index
    is a UserError naming the line. A repeated index keeps the later record, with a warning.
    """
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} {path}: {e}")
    numbered = [(i, ln) for i, ln in enumerate(lines, start=1) if ln.strip()]
    records, good = {}, 0
    header = None
    for pos, (i, line) in enumerate(numbered):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if pos == len(numbered) - 1 and pos > 0:
                from .cli import warn
                warn(f"{path} line {i} is incomplete (interrupted run?); ignored")
                break
            raise UserError(f"{path} line {i} is not valid JSON ({e.msg}); is it a {what} of this tool?")
        if pos == 0:
            if not (isinstance(obj, dict) and isinstance(obj.get("header"), dict)):
                raise UserError(f"{path} is not a {what} of this tool (no header line)")
            header = obj["header"]
        else:
            index = obj.get("index") if isinstance(obj, dict) else None
            if not isinstance(index, int) or isinstance(index, bool):
                raise UserError(f"{path} line {i}: a record needs an integer 'index'")
            if index in records:
                from .cli import warn
                warn(f"{path} line {i}: index {index} repeated; the later record is used")
            records[index] = obj
        good = i
    if header is None:
        raise UserError(f"{path} is empty: not a {what} of this tool")
    return header, records, good


class ProgressLog:
    """Append-only JSONL log of finished items, for resumable runs (format: read_run_log).

    The header holds the run's identity (arguments that change the numbers). Reopening with a different
    identity is refused, so a resumed run can never mix results of two configurations. A torn last line (crash
    mid-write) is dropped and the file rewritten without it.
    """

    def __init__(self, path, identity):
        self.path = os.fspath(path)
        self.identity = identity
        self.done = {}
        if os.path.exists(self.path):
            self._load()
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"header": identity}, ensure_ascii=False) + "\n")

    def _load(self):
        header, self.done, good = read_run_log(self.path, "progress log")
        if header != self.identity:
            diff = sorted(k for k in set(header) | set(self.identity) if header.get(k) != self.identity.get(k))
            raise UserError(
                f"{self.path} belongs to a run with different settings ({', '.join(diff)}); "
                "use another --out_dir, or delete that file to start afresh")
        with open(self.path, "r", encoding="utf-8-sig") as f:
            lines = f.read().split("\n")
        if any(ln.strip() for ln in lines[good:]):  # rewrite without a torn tail so appends start on a clean line
            atomic_write_text(self.path, "\n".join(lines[:good]) + "\n")

    def add(self, record):
        """Append one finished item and flush it to disk at once."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[record["index"]] = record


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
