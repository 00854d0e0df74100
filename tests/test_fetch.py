"""Training-image fetcher against a local HTTP server: every failure kind is classified, nothing half-written is
left behind, and a second run skips what succeeded."""
import collections
import hashlib
import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from utils.evaluation import fetch as F
from utils.evaluation import fetch_manifest as FM
from utils.evaluation.images import inspect_image


def _png(color_fn, size=(48, 40), fmt="PNG"):
    im = Image.new("RGB", size)
    im.putdata([color_fn(x, y) for y in range(size[1]) for x in range(size[0])])
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=90) if fmt == "JPEG" else im.save(buf, format=fmt)
    return buf.getvalue()


GRADIENT = _png(lambda x, y: (x * 5, y * 6, 100))
GRADIENT_JPG = _png(lambda x, y: ((x * 7) % 256, (y * 3) % 256, (x + y) % 256), size=(64, 64), fmt="JPEG")
BLACK = _png(lambda x, y: (0, 0, 0), size=(64, 64))
TINY = _png(lambda x, y: (x * 30, y * 30, 0), size=(8, 8))
TRUNCATED = GRADIENT_JPG[: len(GRADIENT_JPG) // 2]
BIG = b"\xff" * 200_000
HTML = b"<!DOCTYPE html><html><head><title>Not found</title></head><body>gone</body></html>"

ROUTES = {  # path -> (status, content type, body, send Content-Length, delay s)
    "/good.png": (200, "image/png", GRADIENT, True, 0),
    "/good.jpg": (200, "image/jpeg", GRADIENT_JPG, True, 0),
    "/missing.jpg": (404, "text/html", b"not here", True, 0),
    "/slow.jpg": (200, "image/jpeg", GRADIENT_JPG, True, 1.5),
    "/page.jpg": (200, "text/html", HTML, True, 0),
    "/trunc.jpg": (200, "image/jpeg", TRUNCATED, True, 0),
    "/big.jpg": (200, "image/jpeg", BIG, True, 0),
    "/bigstream.jpg": (200, "image/jpeg", BIG, False, 0),
    "/black.png": (200, "image/png", BLACK, True, 0),
    "/tiny.png": (200, "image/png", TINY, True, 0),
    "/busy.png": (503, "text/plain", b"busy", True, 0),
    "/amp.png?a=1&b=2": (200, "image/png", GRADIENT, True, 0),
}


@pytest.fixture()
def server():
    hits = collections.Counter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            status, ctype, body, length, delay = ROUTES.get(self.path, (404, "text/plain", b"no", True, 0))
            time.sleep(delay)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()
    srv.server_close()


def _closed_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


EXPECTED = {  # record index -> status
    1: "ok", 2: "ok", 3: "http_error", 4: "timeout", 5: "not_image", 6: "truncated", 7: "too_large",
    8: "too_large", 9: "placeholder", 10: "placeholder", 11: "http_error", 12: "connection_error", 13: "bad_url",
    14: "ok", 15: "ok", 16: "missing_file", 17: "not_image",
}


def _records(base, tmp_path):
    paths = ["/good.png", "/good.jpg", "/missing.jpg", "/slow.jpg", "/page.jpg", "/trunc.jpg", "/big.jpg",
             "/bigstream.jpg", "/black.png", "/tiny.png", "/busy.png"]
    recs = [{"caption": f"caption {i}", "index": i, "url": base + p} for i, p in enumerate(paths, start=1)]
    recs.append({"caption": "no server", "index": 12, "url": f"http://127.0.0.1:{_closed_port()}/x.jpg"})
    recs.append({"caption": "ftp", "index": 13, "url": "ftp://example.org/x.jpg"})
    # LAION stores some URLs HTML-escaped: the literal one 404s here, the unescaped one works.
    recs.append({"caption": "escaped", "index": 14, "url": base + "/amp.png?a=1&amp;b=2"})
    # Local-file records (the offline demo set), relative to the jsonl's folder.
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.png").write_bytes(GRADIENT)
    (tmp_path / "train" / "junk.png").write_bytes(b"GIF89a not really")
    recs.append({"caption": "local", "index": 15, "file": "train/a.png"})
    recs.append({"caption": "local missing", "index": 16, "file": "train/none.png"})
    recs.append({"caption": "local junk", "index": 17, "file": "train/junk.png"})
    recs.append({"caption": "no source", "index": 18})
    recs.append({"caption": "dup", "index": 1, "url": base + "/good.png"})
    return recs


def _fetcher():
    return F.Fetcher(timeout=0.5, retries=1, backoff=0.01, max_bytes=100_000, total_timeout=5)


def test_fetch_classifies_every_failure_and_resumes(server, tmp_path):
    base, hits = server
    recs = _records(base, tmp_path)
    out = tmp_path / "out"
    rows = F.fetch_all(recs, str(tmp_path), str(out), _fetcher(), workers=4, progress=False)
    got = {r["index"]: r["status"] for r in rows if r["status"] != "duplicate_index"}
    assert got == {**EXPECTED, 18: "bad_record"}
    assert [r["status"] for r in rows if r["index"] == 1] == ["ok", "duplicate_index"]

    by = {r["index"]: r for r in rows if r["status"] != "duplicate_index"}
    assert by[5]["detail"] == "an HTML page, not an image"
    assert by[3]["detail"] == "HTTP 404" and by[11]["detail"] == "HTTP 503"
    assert by[9]["detail"].startswith("single colour") and "8x8" in by[10]["detail"]
    # Files: exactly the good ones, named <index>_<k><ext>, byte-identical, hashes in the manifest; no temp files.
    assert sorted(os.listdir(out)) == sorted(["1_0.png", "2_0.jpg", "14_0.png", "15_0.png", FM.MANIFEST_NAME])
    assert (out / "2_0.jpg").read_bytes() == GRADIENT_JPG
    assert by[2]["sha256"] == hashlib.sha256(GRADIENT_JPG).hexdigest()
    assert (by[1]["width"], by[1]["height"]) == (48, 40)
    # Retries: transient errors are tried twice (retries=1), permanent ones once.
    assert hits["/slow.jpg"] == 2 and hits["/busy.png"] == 2
    assert hits["/missing.jpg"] == 1 and hits["/page.jpg"] == 1 and hits["/good.png"] == 1
    # The manifest on disk says the same as the returned rows.
    disk = FM.read_manifest(str(out / FM.MANIFEST_NAME))
    assert [(r["index"], r["status"], r["file"], r["sha256"]) for r in disk] == \
           [(r["index"], r["status"], r["file"], r["sha256"]) for r in rows]
    assert FM.usable_count(disk) == (4, 18)
    assert FM.shared_bytes(disk) == [[1, 14, 15]]  # the same gradient PNG from three sources

    # Second run, after losing the manifest (as after a crash): good files are re-validated locally, not fetched.
    os.remove(out / FM.MANIFEST_NAME)
    (out / ".tmp-leftover.jpg").write_bytes(b"half")  # debris of a run killed mid-write
    before = dict(hits)
    rows2 = F.fetch_all(recs, str(tmp_path), str(out), _fetcher(), workers=4, progress=False)
    for p in ("/good.png", "/good.jpg", "/amp.png?a=1&b=2"):
        assert hits[p] == before[p], p
    assert hits["/missing.jpg"] == before["/missing.jpg"] + 1  # failures are tried again
    assert [(r["index"], r["status"], r["sha256"]) for r in rows2] == [(r["index"], r["status"], r["sha256"])
                                                                        for r in rows]
    assert not (out / ".tmp-leftover.jpg").exists()


def test_offline_stops_early_with_manifest(tmp_path):
    port = _closed_port()
    recs = [{"caption": f"c{i}", "index": i, "url": f"http://127.0.0.1:{port}/{i}.jpg"} for i in range(40)]
    with pytest.raises(F.UserError, match="first 5 downloads all failed to connect"):
        F.fetch_all(recs, str(tmp_path), str(tmp_path / "o"), _fetcher(), workers=1, progress=False,
                    offline_after=5)
    rows = FM.read_manifest(str(tmp_path / "o" / FM.MANIFEST_NAME))
    assert len(rows) == 40 and [r["status"] for r in rows[:5]] == ["connection_error"] * 5
    assert {r["status"] for r in rows[6:]} == {"pending"}


def test_inspect_image_kinds():
    assert inspect_image(GRADIENT)["status"] == "ok"
    assert inspect_image(GRADIENT_JPG)["ext"] == ".jpg"
    assert inspect_image(TRUNCATED)["status"] == "truncated"
    assert inspect_image(b"")["status"] == "not_image"
    assert inspect_image(b"\x00\x01binary")["detail"].startswith("unknown format")
    assert inspect_image(BLACK)["status"] == "placeholder"
    assert inspect_image(GRADIENT, max_pixels=100)["status"] == "too_large"
    # A transparent PNG is judged on white, as a browser shows it: fully transparent = a white placeholder.
    im = Image.new("RGBA", (40, 40), (10, 200, 30, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    assert inspect_image(buf.getvalue())["detail"] == "single colour #ffffff"


def test_items_from_records_sources(tmp_path):
    recs = [{"caption": "a", "index": 5, "urls": ["http://h/1.jpg", "http://h/2.jpg"]},
            {"caption": "b", "index": 6, "file": "x/y.png"},
            {"caption": "", "index": 7, "url": "http://h/3.jpg"},
            {"caption": "c", "index": -1, "url": "http://h/3.jpg"},
            {"caption": "d", "index": 8, "url": 5}]
    items, bad = F.items_from_records(recs, str(tmp_path))
    assert [(i.index, i.k, i.url) for i in items[:2]] == [(5, 0, "http://h/1.jpg"), (5, 1, "http://h/2.jpg")]
    assert (items[2].file, items[2].base) == ("x/y.png", str(tmp_path))  # resolved under the rule when read
    assert [b["status"] for b in bad] == ["bad_record"] * 3
    assert [b["index"] for b in bad] == [7, None, 8]  # an invalid index is no index, never the line position


def test_demo_style_jsonl_via_cli(tmp_path, capsys):
    """`mitigate_eval.py fetch` on a jsonl of local files: copies, manifest, info file and the usable count."""
    import mitigate_eval
    (tmp_path / "demo_train").mkdir()
    (tmp_path / "demo_train" / "00000.png").write_bytes(GRADIENT)
    (tmp_path / "demo_train" / "00001.png").write_bytes(BLACK)
    jsonl = tmp_path / "demo_mem.jsonl"
    jsonl.write_text("\n".join(json.dumps({"caption": f"digit {i}", "index": i, "file": f"demo_train/{i:05d}.png"})
                               for i in range(2)) + "\n")
    out = tmp_path / "gt"
    mitigate_eval.main(["fetch", "--jsonl", str(jsonl), "--out", str(out)])
    text = capsys.readouterr().out
    assert "usable: 1/2 records" in text
    info = json.loads((out / FM.INFO_NAME).read_text())
    assert info["status_counts"] == {"ok": 1, "placeholder": 1}
    assert (out / "0_0.png").read_bytes() == GRADIENT and not (out / "1_0.png").exists()
