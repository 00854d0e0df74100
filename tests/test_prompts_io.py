"""Prompt files (fetch by name with hash checks, reading rules) and result-file helpers."""
import hashlib
import io
import json
import os

import pytest

from utils.cli import UserError
from utils.io import ProgressLog, atomic_write_json, safe_filename
from utils.prompts import KNOWN_FILES, SOURCES, ensure_prompt_file, read_prompts, truncated_prompts


def test_every_benchmark_file_comes_from_the_mirror_hash_checked(prompt_mirror, tmp_path):
    for name, digest in KNOWN_FILES.items():
        if name in SOURCES and not os.path.isfile(os.path.join(prompt_mirror, name)):
            continue  # another release than the paper's (the label sources): the mirror may not carry it
        path = ensure_prompt_file(tmp_path / name, mirror=prompt_mirror)
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    assert len(read_prompts(tmp_path / "sd1_mem.txt")) == 500
    assert len(read_prompts(tmp_path / "sd2_mem.txt")) == 219


def test_tampered_mirror_is_refused_and_nothing_written(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "sd1_mem.txt").write_text("not the benchmark\n")
    monkeypatch.delenv("MEMSHARP_PROMPT_MIRROR", raising=False)
    with pytest.raises(UserError, match="SHA-256"):
        ensure_prompt_file(tmp_path / "out" / "sd1_mem.txt", mirror=str(mirror))
    assert not (tmp_path / "out" / "sd1_mem.txt").exists()


def test_missing_unknown_file_and_offline_fetch_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMSHARP_PROMPT_MIRROR", raising=False)
    with pytest.raises(UserError, match="not found"):
        ensure_prompt_file(tmp_path / "mine.txt")
    # A known name with no mirror: the network is tried; an unreachable URL gives advice, not a traceback.
    monkeypatch.setattr("utils.prompts.UPSTREAM", "http://127.0.0.1:9/")
    with pytest.raises(UserError, match="prompt_mirror"):
        ensure_prompt_file(tmp_path / "sd1_nmem.txt", timeout=2)


def test_label_source_is_fetched_from_its_own_pinned_release_hash_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMSHARP_PROMPT_MIRROR", raising=False)
    seen = []

    class Reply(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout):
        seen.append(url)
        return Reply(b"Caption;type\nnot NeMo's file;VM\n")
    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    with pytest.raises(UserError, match="SHA-256"):
        ensure_prompt_file(tmp_path / "memorized_laion_prompts.csv")
    assert seen == [SOURCES["memorized_laion_prompts.csv"] + "memorized_laion_prompts.csv"]
    assert "/f952eded64fca0bcf42e0bb3be9a01d64653cfdb/" in seen[0]  # a commit, not a branch: the hash stays valid
    assert not (tmp_path / "memorized_laion_prompts.csv").exists()


def test_reading_rules_bom_crlf_blank_lines_and_verbatim_text(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_bytes('\ufeff  "A ""quoted"" <b>tag</b>"  \r\n\r\nsecond\r\n'.encode())
    assert read_prompts(f) == ['"A ""quoted"" <b>tag</b>"', "second"]
    assert "skipped 1 blank line" in capsys.readouterr().err


def test_long_prompts_are_reported(tiny_eps):
    long = " ".join(["word"] * 80)
    assert truncated_prompts(tiny_eps.tokenizer, ["short", long, "x " * 75 + "x"]) == [1, 2]


def test_safe_filename_is_bounded_unique_and_clean():
    names = [safe_filename(i, p, suffix="_0.png") for i, p in enumerate(
        ['"Quoted" <i>tag</i> a/b\\c', '"Quoted" <i>tag</i> a/b\\c', "ünïcödé " * 40, "..", "\x00\n"])]
    assert len(set(names)) == len(names)
    for n in names:
        assert len(n.encode()) <= 120 and n.endswith("_0.png") and not n.startswith(".")
        assert not any(c in n for c in '/\\"<>:*?|\n\x00')
    assert names[0] == "00000_Quoted_tag_a_b_c_0.png"


def test_progress_log_survives_a_torn_line_and_refuses_other_settings(tmp_path):
    path = tmp_path / "log.jsonl"
    log = ProgressLog(path, {"seed": 1})
    log.add({"index": 0, "v": 1.5})
    with open(path, "a") as f:
        f.write('{"index": 1, "v": 2')  # crash mid-write
    again = ProgressLog(path, {"seed": 1})
    assert set(again.done) == {0}
    again.add({"index": 1, "v": 2.0})
    assert [json.loads(x)["index"] for x in path.read_text().splitlines()[1:]] == [0, 1]
    with pytest.raises(UserError, match="different settings"):
        ProgressLog(path, {"seed": 2})


def test_atomic_json_has_normal_permissions(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
