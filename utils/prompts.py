"""Benchmark prompt files: fetched by name with SHA-256 checks (never committed), read with clear errors."""
import json
import os
import urllib.request

from .cli import UserError, warn
from .io import atomic_write_bytes, lone_surrogate, read_text_file, sha256_file

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
    # SD v1.4's verbatim (VM) / template (TM) labels of the same 500 captions: NeMo's release (Hintersdorf et al.)
    "memorized_laion_prompts.csv": "0b527a5965dc463e7a3e0d234ff7fd5489b1a76869c456dbb209dc753cb4af25",
}
# Files that come from elsewhere than UPSTREAM (pinned to a commit, so the hash stays valid).
SOURCES = {"memorized_laion_prompts.csv": "https://raw.githubusercontent.com/ml-research/"
           "localizing_memorization_in_diffusion_models/f952eded64fca0bcf42e0bb3be9a01d64653cfdb/prompts/"}
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
    if os.path.exists(path):  # a FIFO, device or socket: reading it could block or never end
        raise UserError(f"{path} is not a regular file")
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
        url = SOURCES.get(name, UPSTREAM) + name
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


def split_lines(text):
    """Lines of text split on newlines only (\n and \r\n): list of str without their line ends.

    Never str.splitlines(), which also splits on U+2028, U+2029, \x0b, \x0c, \x1c-\x1e and \x85: characters
    that may sit inside one prompt (a caption scraped from the web) and must not cut it in two.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line does not start another one
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def read_text(path, mirror=None):
    """The UTF-8 text of a prompt file (a BOM dropped), fetched first if it is a known benchmark file; a missing,
    unreadable or non-UTF-8 file is one UserError (utils.io.read_text_file)."""
    return read_text_file(ensure_prompt_file(path, mirror), "prompt file")


def read_prompt_lines(path, mirror=None):
    """Prompts of a text file with their line numbers: list of (line number, prompt), for messages that name
    both ("prompt 3 (line 5)"). Rules of read_prompts."""
    text = read_text(path, mirror)
    lines = split_lines(text)
    out, blank = [], []
    for i, line in enumerate(lines, start=1):
        p = line.strip()
        (out.append((i, p)) if p else blank.append(i))
    if blank and out:
        warn(f"{path}: skipped {len(blank)} blank line(s) (line {', '.join(map(str, blank[:5]))}"
             f"{', ...' if len(blank) > 5 else ''})")
    if not out:
        raise UserError(f"{path} holds no prompts")
    return out


def read_prompts(path, mirror=None):
    """Prompts of a text file, one per line: list of str.

    Lines end at \n or \r\n only (split_lines: a U+2028 inside a prompt stays in it). Accepts a UTF-8 BOM;
    strips surrounding whitespace (as the reference's line.strip()); skips blank lines with a warning that names
    their line numbers; keeps the text otherwise verbatim (doubled quotes and HTML tags are part of the
    benchmark). Missing, empty or undecodable files raise UserError. Messages about a prompt name its position,
    "prompt i" (1-based), which differs from its line number when blank lines were skipped (read_prompt_lines).
    """
    return [p for _, p in read_prompt_lines(path, mirror)]


def read_jsonl(path, mirror=None):
    """Records of a JSON-lines file (list of parsed values, normally dicts; blank lines skipped). Not UTF-8, a
    line that is not JSON, or no record at all: a UserError naming the file (and line)."""
    text = read_text(path, mirror)
    out = []
    for i, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except (ValueError, RecursionError) as e:  # ValueError: also over-long integers; RecursionError: nesting
            raise UserError(f"{path} line {i} is not valid JSON ({getattr(e, 'msg', type(e).__name__)})") from None
        if lone_surrogate(out[-1]) is not None:
            raise UserError(f"{path} line {i} holds a lone surrogate escape (\\ud800-\\udfff), which is not text")
    if not out:
        raise UserError(f"{path} holds no records")
    return out


def truncated_prompts(tokenizer, prompts, max_tokens=CLIP_MAX_TOKENS):
    """Indices of prompts longer than the text encoder's window (start and end tokens included)."""
    ids = tokenizer(prompts, truncation=False)["input_ids"]
    return [i for i, t in enumerate(ids) if len(t) > max_tokens]


__all__ = ["KNOWN_FILES", "MIRROR_ENV", "ensure_prompt_file", "read_jsonl", "read_prompt_lines", "read_prompts",
           "split_lines", "truncated_prompts"]
