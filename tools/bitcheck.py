"""Bit-identical comparison of the project's numbers between two versions of the code (CPU, float32).

    python tools/bitcheck.py --against HEAD~1          # working tree vs a git revision, same machine
    python tools/bitcheck.py --save /tmp/outs          # only run the fixed set with the working tree
    python tools/bitcheck.py --compare /tmp/a /tmp/b   # compare two saved output folders

A change that is not meant to change any number (a refactor, a new option whose default is off) must pass it.
It runs a fixed set of command lines through the top-level scripts, the interface both versions share, on
the same inputs: two tiny random Stable-Diffusion-shaped pipelines (epsilon and v-prediction, built once by the
working tree and saved to a folder) and the bundled demo model. The set covers detection (n = 1 and 4, 1 and 3
steps, both --v_score forms), SAIL (both --miti_form, latents and PNGs), plain sampling, every other mitigation
method (wen, rna, rta, cfg_delay, ren; a --grid of each of the latter two) and a gated run, `mitigate_eval.py score
--similarity pixel`, and eigen-analysis. Compared: every tensor exactly (dtype, shape, bits), PNG pixels, the
generation manifests (header and records), and the numeric fields of the JSON results (timings, paths, versions
and argument echoes are ignored; a key the newer version adds is allowed, a key it drops is a difference). Exit code 0: identical; 1: differences (listed).
Both versions run with one CPU thread; the comparison is only meaningful on one machine.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PROMPTS = ['"A ""quoted"" <i>caption</i> with HTML"', "a red square on a blue field", "digit seven"]
TIMING_KEYS = {"seconds", "search_seconds", "generate_seconds", "seconds_per_prompt", "total_seconds"}
# a manifest header's paths of (and hashes of files that echo) the run's own output folder, and the model's label
# (the demo model is "sddemo" only from the checkout that holds it): the rest is compared
HEADER_PATHS = {"detection", "detection_sha256", "nmem", "nmem_sha256", "model"}


def commands(fx):
    """(name, argv) pairs run from the root of a checkout; fx: dict of fixture paths; {out} is the run's folder."""
    cmds = []
    dev = ["--device", "cpu"]
    for model, vs in (("tiny_eps", ["correct"]), ("tiny_v", ["correct", "reference"]), ("demo", ["correct"])):
        data = fx["demo_prompts"] if model == "demo" else fx["tiny_prompts"]
        for n in (1, 4):
            for steps in (1, 3):
                for v in vs:
                    cmds.append((f"detect_{model}_n{n}_s{steps}_{v}", [
                        "detect_mem.py", "--model_id", fx[model], "--data_path", data, "--gen_num", str(n),
                        "--hvp_sampling_num", str(steps), "--v_score", v, "--out_dir", "{out}", *dev]))
    sail = {"tiny_eps": ["--miti_thres", "0.8", "--miti_lr", "0.2", "--miti_budget", "4", "--miti_max_steps", "3",
                         "--miti_alpha", "0.05", "--miti_max_rounds", "6", "--gen_num", "3"],
            "tiny_v": ["--miti_thres", "0.9", "--miti_lr", "0.2", "--miti_budget", "4", "--miti_max_steps", "3",
                       "--miti_max_rounds", "6", "--gen_num", "3"],
            "demo": ["--miti_thres", "0.6", "--miti_alpha", "0.02", "--gen_num", "2"]}
    for model, hp in sail.items():
        data = fx["demo_mem"] if model == "demo" else fx["tiny_prompts"]
        base = ["mitigate_mem.py", "--model_id", fx[model], "--sd_ver", "1", "--data_path", data,
                "--prompt_type", "p", "--out_dir", "{out}", *dev]
        for form in ("reference", "clean"):
            cmds.append((f"sail_{model}_{form}", [*base, *hp, "--miti_form", form, "--save_latents"]))
        cmds.append((f"plain_{model}", [*base, "--gen_num", "2", "--no_mitigation"]))
    others = {"wen": ["--method", "wen", "--wen_target_loss", "0", "--wen_max_iters", "3"],
              "wen_alt": ["--method", "wen", "--wen_target_loss", "0", "--wen_max_iters", "2", "--wen_optimizer",
                          "adam", "--wen_space", "eps", "--wen_loss", "mean", "--wen_lr", "0.1"],
              "rna": ["--method", "rna", "--aug_count", "2"],
              "rta": ["--method", "rta", "--aug_count", "3", "--aug_per_image", "--rta_vocab", "1000"],
              "cfg_delay": ["--method", "cfg_delay", "--cfg_transition", "600", "--cfg_w_pre", "-2"],
              "cfg_delay_grid": ["--method", "cfg_delay", "--grid", "500,dynamic"],
              "ren": ["--method", "ren", "--ren_factor", "1.5"],
              "ren_grid": ["--method", "ren", "--grid", "1.2", "--ren_no_mask", "--ren_drop_first_eos"]}
    for model in ("tiny_eps", "tiny_v"):  # every other method, few steps
        for name, hp in others.items():
            cmds.append((f"{name}_{model}", ["mitigate_mem.py", "--model_id", fx[model], "--sd_ver", "1", "--data_path",
                                             fx["tiny_prompts"], "--prompt_type", "p", "--out_dir", "{out}",
                                             "--gen_num", "2", "--num_inference_steps", "6", *hp, *dev]))
    for model, which, dense in (("tiny_eps", "cond", "on"), ("tiny_v", "delta", "off"), ("demo", "delta", "off")):
        data = (fx["demo_mem"], fx["demo_nmem"]) if model == "demo" else (fx["tiny_prompts"], fx["tiny_nmem"])
        cmds.append((f"eigen_{model}_{which}", [
            "examples/eigen_analysis.py", "--model_id", fx[model], "--mem_path", data[0], "--nmem_path", data[1],
            "--max_prompts", "2", "--k", "3", "--krylov_dim", "12", "--steps", "0,2", "--which", which,
            "--dense", dense, "--out_dir", "{out}", *dev]))
    return cmds


def eval_commands(fx, sail_out, detection):
    """Scoring of the demo SAIL run (needs its output folder) and a gated run (needs a detection result: the
    prompts scoring above its median are mitigated)."""
    sys.path.insert(0, ROOT)
    from utils.results import read_detection_result
    import numpy as np
    threshold = float(np.median(read_detection_result(detection).scores()))
    return [("eval_demo_pixel", ["mitigate_eval.py", "score", "--images", sail_out, "--gt", fx["demo_gt"],
                                 "--similarity", "pixel", "--clip_model", "none", "--out", "{out}/eval.json"]),
            ("gated_tiny_eps", ["mitigate_mem.py", "--model_id", fx["tiny_eps"], "--sd_ver", "1", "--data_path",
                                fx["tiny_prompts"], "--prompt_type", "p", "--out_dir", "{out}", "--gen_num", "2",
                                "--num_inference_steps", "6", "--method", "rna", "--aug_count", "2", "--flagged_by",
                                detection, "--flag_threshold", repr(threshold), "--device", "cpu"])]


def build_fixtures(folder):
    """Inputs shared by both versions: saved tiny pipelines, prompt files, the demo's training images."""
    sys.path.insert(0, ROOT)
    from utils.demo.model import tiny_pipeline
    fx = {"demo": os.path.join(ROOT, "demo_model")}
    for name, pred in (("tiny_eps", "epsilon"), ("tiny_v", "v_prediction")):
        fx[name] = os.path.join(folder, name)
        tiny_pipeline(prediction_type=pred, seed=0).save_pretrained(fx[name])
    demo_mem = open(os.path.join(ROOT, "prompts", "demo_mem.txt"), encoding="utf-8").read().splitlines()[:3]
    demo_nmem = open(os.path.join(ROOT, "prompts", "demo_nmem.txt"), encoding="utf-8").read().splitlines()[:3]
    files = {"tiny_prompts": TINY_PROMPTS, "tiny_nmem": ["a photo of a cat", "an oil painting"],
             "demo_mem": demo_mem, "demo_nmem": demo_nmem, "demo_prompts": demo_mem + demo_nmem}
    for name, lines in files.items():
        fx[name] = os.path.join(folder, name + ".txt")
        with open(fx[name], "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    fx["demo_gt"] = os.path.join(folder, "demo_gt")
    _run_one(ROOT, ["mitigate_eval.py", "fetch", "--jsonl", os.path.join(ROOT, "prompts", "demo_mem.jsonl"),
                    "--out", fx["demo_gt"]], os.path.join(folder, "fetch.log"))
    return fx


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0",
               TQDM_DISABLE="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run_one(checkout, argv, log):
    r = subprocess.run([sys.executable, *argv], cwd=checkout, env=_env(), capture_output=True, text=True)
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(argv) + "\n" + r.stdout + r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed in {checkout} (exit {r.returncode}); see {log}")


def run_all(checkout, fx, out, workers=2):
    """Run the fixed command set with the code of `checkout`; outputs under out/<name>/."""
    os.makedirs(out, exist_ok=True)

    def job(item):
        name, argv = item
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        _run_one(checkout, [a.replace("{out}", folder) for a in argv], os.path.join(out, name + ".log"))
        return name

    with ThreadPoolExecutor(workers) as pool:
        for name in pool.map(job, commands(fx)):
            print(f"  ran {name}", flush=True)
    manifests = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(out, "sail_demo_reference"))
                 for f in fs if f == "manifest.jsonl"]
    detection = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(out, "detect_tiny_eps_n1_s3_correct"))
                 for f in fs if f.endswith(".pt")]
    for item in eval_commands(fx, os.path.dirname(manifests[0]), detection[0]):
        print(f"  ran {job(item)}", flush=True)


# ------------------------------------------------------------------------------------------------ comparison

def _files(folder):
    """{key: path}: every file under folder, keyed by run name + path relative to the folder of the run's
    manifest.jsonl when there is one (so renamed output sub-folders still pair up)."""
    out = {}
    for run in sorted(os.listdir(folder)):
        top = os.path.join(folder, run)
        if not os.path.isdir(top):
            continue
        anchors = [d for d, _, fs in os.walk(top) if "manifest.jsonl" in fs]
        anchor = anchors[0] if len(anchors) == 1 else top
        for d, _, fs in os.walk(top):
            for f in fs:
                path = os.path.join(d, f)
                rel = os.path.relpath(path, anchor if path.startswith(anchor + os.sep) else top)
                out[f"{run}/{rel}"] = path
    return out


def _strip(obj, also=()):
    """obj without its timing keys (and the keys `also`), at every depth."""
    if isinstance(obj, dict):
        return {k: _strip(v, also) for k, v in obj.items() if k not in TIMING_KEYS and k not in also}
    if isinstance(obj, list):
        return [_strip(v, also) for v in obj]
    return obj


def _json_diff(old, new, where):
    """Differences of new against old: keys of old missing in new or with another value (new keys allowed)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in old:
            out += [f"{where}.{k}: missing"] if k not in new else _json_diff(old[k], new[k], f"{where}.{k}")
        return out
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [f"{where}: length {len(old)} -> {len(new)}"]
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _json_diff(a, b, f"{where}[{i}]")]
    same = old == new or (isinstance(old, float) and isinstance(new, float) and old != old and new != new)
    return [] if same else [f"{where}: {str(old)[:60]} -> {str(new)[:60]}"]


JSON_FIELDS = {  # which parts of a JSON result hold numbers; the rest echoes arguments and versions
    "detect": ("prompts", "values", "per_generation", "shape"),
    "eigen": ("results", "summary", "latent_dim", "krylov_dim"),
    "eval": ("summary", "counts", "per_prompt", "unmatched_prompts", "missing_images", "extra_files"),
}


def compare(a, b):
    """List of differences between two output folders written by run_all()."""
    import torch
    from PIL import Image
    fa, fb = _files(a), _files(b)
    diffs = [f"{k}: only in {a}" for k in sorted(set(fa) - set(fb)) if _compared(k)]
    diffs += [f"{k}: only in {b}" for k in sorted(set(fb) - set(fa)) if _compared(k)]
    n = 0
    for key in sorted(set(fa) & set(fb)):
        if not _compared(key):
            continue
        n += 1
        pa, pb = fa[key], fb[key]
        if key.endswith(".pt"):
            ta, tb = torch.load(pa, weights_only=True), torch.load(pb, weights_only=True)
            if not (ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb)):
                diffs.append(f"{key}: tensors differ")
        elif key.endswith(".png"):
            if not (Image.open(pa).tobytes() == Image.open(pb).tobytes() and Image.open(pa).size == Image.open(pb).size):
                diffs.append(f"{key}: pixels differ")
        elif key.endswith("manifest.jsonl"):
            ra = [json.loads(x) for x in open(pa, encoding="utf-8").read().splitlines() if x.strip()]
            rb = [json.loads(x) for x in open(pb, encoding="utf-8").read().splitlines() if x.strip()]
            diffs += _json_diff(_strip(ra, HEADER_PATHS), _strip(rb, HEADER_PATHS), key)
        elif key.endswith(".csv"):
            if open(pa, "rb").read() != open(pb, "rb").read():
                diffs.append(f"{key}: bytes differ")
        elif key.endswith(".json"):
            kind = key.split("_")[0]
            ja, jb = json.load(open(pa, encoding="utf-8")), json.load(open(pb, encoding="utf-8"))
            for field in JSON_FIELDS[kind]:
                diffs += _json_diff(_strip(ja.get(field)), _strip(jb.get(field)), f"{key}:{field}")
    return diffs, n


def _compared(key):
    """Result files only: progress logs, run.json, logs and the eigen progress file echo settings."""
    name = os.path.basename(key)
    if name.endswith((".log", ".progress.jsonl", ".png.json")) or name in ("run.json", "fetch_info.json"):
        return False
    if name.endswith(".png"):
        return True
    if key.startswith(("detect_", "eigen_", "eval_")) and name.endswith(".json"):
        return not name.endswith(".roc.json")
    return name.endswith((".pt", "manifest.jsonl", ".csv"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--against", metavar="REV", help="git revision to compare the working tree with")
    g.add_argument("--save", metavar="DIR", help="only run the fixed set with the working tree, into DIR")
    g.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two folders written by --save")
    p.add_argument("--keep", metavar="DIR", help="work folder to keep (default: a temporary one, removed)")
    p.add_argument("--workers", type=int, default=2, help="commands run at once (one thread each)")
    args = p.parse_args(argv)
    if args.compare:
        diffs, n = compare(*args.compare)
        return _report(diffs, n)
    work = args.keep or tempfile.mkdtemp(prefix="bitcheck-")
    os.makedirs(work, exist_ok=True)
    try:
        print("building fixtures ...", flush=True)
        fx = build_fixtures(os.path.join(work, "fixtures"))
        if args.save:
            run_all(ROOT, fx, args.save, args.workers)
            print(f"saved outputs of the working tree in {args.save}")
            return 0
        ref = os.path.join(work, "ref_checkout")
        if os.path.exists(ref):
            subprocess.run(["git", "worktree", "remove", "--force", ref], cwd=ROOT, capture_output=True)
        subprocess.run(["git", "worktree", "add", "--detach", ref, args.against], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            print(f"running {args.against} ...", flush=True)
            run_all(ref, fx, os.path.join(work, "old"), args.workers)
            print("running the working tree ...", flush=True)
            run_all(ROOT, fx, os.path.join(work, "new"), args.workers)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", ref], cwd=ROOT, capture_output=True)
        diffs, n = compare(os.path.join(work, "old"), os.path.join(work, "new"))
        return _report(diffs, n)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _report(diffs, n):
    for d in diffs[:200]:
        print("DIFF", d)
    print(f"{n} result files compared: " + ("bit-identical" if not diffs else f"{len(diffs)} difference(s)"))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
