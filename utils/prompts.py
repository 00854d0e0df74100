"""Benchmark prompt files: fetched by name with SHA-256 checks (never committed), read with clear errors."""
import json
import os
import urllib.request

from .cli import UserError, warn
from .io import atomic_write_bytes, sha256_file

# The paper's benchmark prompt sets (third-party data), fetched on first use from the paper's code release.
UPSTREAM = "https://raw.githubusercontent.com/Dongjae0324/sharpness_memorization_diffusion/main/prompts/"
KNOWN_FILES = {
    "sd1_mem.txt": "6f11239c621a7846979170c79d79f86a31441e044a7bc0b5d952ba8a5ca0fb56",
    "sd1_nmem.txt": "628796e195391501591859f55e249cca70e8fcaa7ceb33aac1d753fbfe4d8a4c",
    "sd2_mem.txt": "02f212d64767b4f066ca1c9ddc161a6ea5cf717aadf7f45e44bfe21856563e8d",
    "sd2_nmem.txt": "628796e195391501591859f55e249cca70e8fcaa7ceb33aac1d753fbfe4d8a4c",
    "sd1_mem.jsonl": "b882b7d82b3fb603769beced712c327e47f7899dfa7c483e0183ec133c221580",
    "sd2_mem.jsonl": "fc2f6553f676e8fb94bf5b2eddfef80915131aeca23fa44e49c54edd6968ca74",
    "sample_mitigation.txt": "617387b617cab8f07397b89b1105794d1d4d09655d993ba9a8ddd89c7d183728",
}
MIRROR_ENV = "MEMSHARP_PROMPT_MIRROR"  # a folder holding verified copies, for machines without internet
CLIP_MAX_TOKENS = 77


def ensure_prompt_file(path, mirror=None, timeout=30):
    """Return path, fetching it first if it is missing and its file name is a known benchmark file.

    Source order: an existing file at path (checked against its hash when its name is known), then the mirror
    folder (argument or $MEMSHARP_PROMPT_MIRROR), then the upstream URL. Every copy is hash-checked before it is
    written (atomically) to path.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    if os.path.isfile(path):
        if name in KNOWN_FILES and os.path.abspath(os.path.dirname(path)) == _project_prompt_dir():
            if sha256_file(path) != KNOWN_FILES[name]:
                raise UserError(f"{path} does not match the published {name} (SHA-256 differs); delete it to "
                                "fetch a fresh copy")
        return path
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a prompt file")
    if name not in KNOWN_FILES:
        raise UserError(f"prompt file {path} not found")
    mirror = mirror or os.environ.get(MIRROR_ENV)
    data, source = None, None
    if mirror:
        src = os.path.join(mirror, name)
        if os.path.isfile(src):
            with open(src, "rb") as f:
                data, source = f.read(), src
        else:
            warn(f"mirror {mirror} has no {name}; trying the network")
    if data is None:
        url = UPSTREAM + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                data, source = r.read(), url
        except Exception as e:
            raise UserError(f"{path} is missing and could not be fetched from {url} ({e}); on a machine without "
                            f"internet, point --prompt_mirror or ${MIRROR_ENV} to a folder with a verified copy")
    import hashlib
    digest = hashlib.sha256(data).hexdigest()
    if digest != KNOWN_FILES[name]:
        raise UserError(f"{name} from {source} has SHA-256 {digest}, expected {KNOWN_FILES[name]}; not saved")
    atomic_write_bytes(path, data)
    return path


def _project_prompt_dir():
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prompts")


def read_prompts(path, mirror=None):
    """Prompts of a text file, one per line: list of str.

    Accepts CRLF and a UTF-8 BOM; strips surrounding whitespace (as the reference's line.strip()); skips blank
    lines with a warning; keeps the text otherwise verbatim (doubled quotes and HTML tags are part of the
    benchmark). Missing, empty or undecodable files raise UserError.
    """
    path = ensure_prompt_file(path, mirror)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}, line {line})")
    prompts, blank = [], []
    for i, line in enumerate(text.splitlines(), start=1):
        p = line.strip()
        if p:
            prompts.append(p)
        else:
            blank.append(i)
    if blank and len(blank) < len(text.splitlines()):
        warn(f"{path}: skipped {len(blank)} blank line(s) (line {', '.join(map(str, blank[:5]))}"
             f"{', ...' if len(blank) > 5 else ''})")
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def read_jsonl(path, mirror=None):
    """Records of a JSON-lines file (list of dict); a malformed line raises UserError naming it."""
    path = ensure_prompt_file(path, mirror)
    out = []
    with open(path, "r", encoding="utf-8-sig") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {i} is not valid JSON ({e.msg})")
    if not out:
        raise UserError(f"{path} holds no records")
    return out


def truncated_prompts(tokenizer, prompts, max_tokens=CLIP_MAX_TOKENS):
    """Indices of prompts longer than the text encoder's window (start and end tokens included)."""
    ids = tokenizer(prompts, truncation=False)["input_ids"]
    return [i for i, t in enumerate(ids) if len(t) > max_tokens]


__all__ = ["KNOWN_FILES", "MIRROR_ENV", "ensure_prompt_file", "read_prompts", "read_jsonl", "truncated_prompts"]
