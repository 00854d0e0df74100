"""Caption matching (on the real SD v2.0 files), keyword groups, ground-truth layout and generation manifests."""
import json
import os

import pytest

from utils.evaluation import matching as M
from utils.cli import UserError
from utils.prompts import ensure_prompt_file, read_jsonl, read_prompts


def test_normalize_caption():
    assert M.normalize_caption("  DEATH METAL! (Funny Unicorn / Rainbow)\tT-Shirt ") == \
        M.normalize_caption("death metal! (funny unicorn rainbow) t-shirt")
    assert M.normalize_caption("a\\b") == "a b"
    assert M.normalize_caption("Ａ") == "a"  # NFKC: full-width letters compare equal
    assert M.normalize_caption("Lilah Gray Area Rug by Andover Mills") != \
        M.normalize_caption("Lilah Gray Area Rug By Andover Mills.")  # punctuation is kept: different records


def test_sd2_every_prompt_finds_its_record(prompt_mirror, tmp_path):
    """SD v2.0: the .txt and the .jsonl list the 219 prompts in different orders, one with a removed '/'."""
    txt = ensure_prompt_file(str(tmp_path / "sd2_mem.txt"), mirror=prompt_mirror)
    jsonl = ensure_prompt_file(str(tmp_path / "sd2_mem.jsonl"), mirror=prompt_mirror)
    prompts, records = read_prompts(txt), read_jsonl(jsonl)
    assert len(prompts) == len(records) == 219
    captions = [r["caption"] for r in records]
    matches, unmatched = M.match_captions(prompts, captions)
    assert unmatched == []
    assert all(len(m) == 1 for m in matches)
    assert sorted(m[0] for m in matches) == list(range(219))  # a bijection
    assert sum(m[0] != i for i, m in enumerate(matches)) > 100  # and not the line order
    slash = [i for i, p in enumerate(prompts) if "Unicorn Rainbow" in p]
    assert len(slash) == 1 and captions[matches[slash[0]][0]] != prompts[slash[0]]
    assert "/" in captions[matches[slash[0]][0]]


def test_sd1_every_prompt_finds_its_record(prompt_mirror, tmp_path):
    prompts = read_prompts(ensure_prompt_file(str(tmp_path / "sd1_mem.txt"), mirror=prompt_mirror))
    records = read_jsonl(ensure_prompt_file(str(tmp_path / "sd1_mem.jsonl"), mirror=prompt_mirror))
    matches, unmatched = M.match_captions(prompts, [r["caption"] for r in records])
    assert unmatched == [] and [m for m in matches] == [[i] for i in range(500)]


def test_sd2_paper_keywords_groups(prompt_mirror, tmp_path):
    records = read_jsonl(ensure_prompt_file(str(tmp_path / "sd2_mem.jsonl"), mirror=prompt_mirror))
    captions = [r["caption"] for r in records]
    groups = M.keyword_groups(captions, M.PAPER_SHARED_KEYWORDS)
    designart = [j for j, c in enumerate(captions) if c.lower().startswith("designart ")]
    assert len(designart) > 10
    for j in designart:
        assert set(designart) <= groups[j]
    plain = [j for j, c in enumerate(captions) if "design" not in c.lower()]
    assert all(groups[j] == {j} for j in plain)


def test_match_and_keyword_groups_small():
    caps = ["Red Rug by Andover Mills", "Blue rug by andover mills", "Shaw Design Center X", "Designart Y",
            "Other", "other"]
    matches, unmatched = M.match_captions(["other", "nothing", "blue RUG by Andover  Mills"], caps)
    assert matches == [[4, 5], [], [1]] and unmatched == [1]
    g = M.keyword_groups(caps, ["mills", "design"])
    assert g[0] == g[1] == {0, 1}
    assert g[2] == {2} and g[3] == {3}  # whole words: 'design' does not match 'Designart'
    assert M.keyword_groups(caps, [])[0] == {0}


def test_ground_truth_records_include_hand_added_images(tmp_path):
    rows = [{"index": 7, "k": 0, "caption": "a", "status": "ok", "file": "7_0.jpg"},
            {"index": 8, "k": 0, "caption": "b", "status": "http_error", "file": ""}]
    for name in ("7_0.jpg", "7_1.png", "8_3.webp", "9_0.png", "7_x.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    recs = {r["index"]: r for r in M.ground_truth_records(rows, str(tmp_path))}
    assert sorted(recs) == [7, 8]  # 9 has no manifest row (no caption): not a record
    assert [os.path.basename(f) for f in recs[7]["files"]] == ["7_0.jpg", "7_1.png"]
    assert [os.path.basename(f) for f in recs[8]["files"]] == ["8_3.webp"]


def test_generation_manifest_and_image_check(tmp_path, capsys):
    lines = [json.dumps({"header": {"sd_ver": "1"}}),
             json.dumps({"index": 0, "prompt": "p0", "images": ["0_a.png", "0_b.png"]}),
             json.dumps({"index": 1, "prompt": "p1", "images": ["sub/1_a.png"]}),
             '{"index": 2, "prompt": "p2", "ima']  # torn last line
    m = tmp_path / "manifest.jsonl"
    m.write_text("\n".join(lines))
    header, recs = M.read_generation_manifest(str(m))
    assert header == {"sd_ver": "1"} and [r["index"] for r in recs] == [0, 1]
    assert "incomplete" in capsys.readouterr().err
    (tmp_path / "sub").mkdir()
    for name in ("0_a.png", "sub/1_a.png", "stray.png", "sub/stray2.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    present, missing, extra = M.check_images(recs, str(tmp_path))
    assert [len(p) for p in present] == [1, 1]
    assert missing == [(0, "0_b.png", "missing")]
    assert extra == ["stray.png", os.path.join("sub", "stray2.jpg")]


def test_generation_manifest_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        M.read_generation_manifest(str(tmp_path / "none.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"header": {}}\n{"index": "x", "prompt": "p", "images": []}\n{"index": 1}\n')
    with pytest.raises(UserError, match="line 2"):
        M.read_generation_manifest(str(bad))
    bad.write_text('{"header": {}}\nnot json\n{"index": 1, "prompt": "p", "images": []}\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        M.read_generation_manifest(str(bad))
