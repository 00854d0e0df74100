"""Side effects of a mitigation on ordinary prompts: how far its images moved from the unmitigated ones, and what
that did to the CLIP score, image by image against a no-mitigation run of the same prompts with the same noise.

`mitigate_eval.py score --reference NONE_FOLDER` (a `--method none` run of the same prompt file, n and seed):
image k of a prompt under the method is paired with image k of the same prompt without mitigation (both start from
the same seeded x_T, so every difference is the method's). Per prompt: `reference_similarity_per_image` (the copy
measure between the two images: SSCD or pixel cosine; exactly 1 for pixel-identical images), `clip_change` (mean
over its pairs of the CLIP score difference, exactly 0 for pixel-identical images) and `n_identical`. Summary:
the means over prompts with their standard errors (paired: each prompt is one difference), the share of
pixel-identical images and of prompts left entirely unchanged.
"""
import math
import os

import numpy as np
import torch

from ..cli import UserError, warn
from . import matching as M


class Reference:
    """The no-mitigation run a scored run is compared with: its manifest's records by index, and their images."""

    def __init__(self, folder):
        manifest = os.path.join(folder, "manifest.jsonl")
        if not os.path.isfile(manifest):
            raise UserError(f"--reference {folder} has no manifest.jsonl: pass the output folder of a "
                            "`mitigate_mem.py --method none` run of the same prompts")
        self.manifest = os.path.abspath(manifest)
        self.header, records = M.read_generation_manifest(manifest)
        if not (self.header.get("method") == "none" or self.header.get("no_mitigation")):
            raise UserError(f"--reference {folder} is a {self.header.get('method') or 'sail'} run; side effects are "
                            "measured against no mitigation (--method none)")
        present, _, _ = M.check_images(records, folder)
        self.records = {r["index"]: (r, paths) for r, paths in zip(records, present)}

    def check_run(self, header):
        """UserError unless the scored run shares the reference's prompts, seed, n, steps, model and size."""
        for k in ("model", "model_id", "data_sha256", "gen_num", "gen_seed", "num_inference_steps", "height",
                  "width"):
            if header.get(k) != self.header.get(k):
                raise UserError(f"--reference: {k} {self.header.get(k)!r:.60} there vs {header.get(k)!r:.60} in the "
                                "scored run; the images are paired by their shared noise, so the runs must match")

    def compare(self, rec, paths, images, clips, embed, clip, device, batch_size, open_image):
        """Row fields for one prompt: rec (its manifest record), paths/images (its present image files and the
        opened images, same order), clips (their CLIP scores, [] without CLIP). A prompt whose images or reference images are incomplete is not paired
        (fields None, a warning)."""
        from . import similarity as S
        none = {"reference_similarity_per_image": [], "clip_change": None, "n_identical": None}
        ref = self.records.get(rec["index"])
        if ref is None or ref[0]["prompt"] != rec["prompt"]:
            raise UserError(f"--reference has no prompt {rec['index']} {rec['prompt']!r:.60}: another prompt set")
        ref_images = [im for im in map(open_image, ref[1]) if im is not None]
        n = len(rec["images"])
        if not (len(paths) == len(images) == n and len(ref[0]["images"]) == len(ref_images) == n):
            warn(f"prompt {rec['index']}: images missing here or in --reference; not paired")
            return none
        same = [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, ref_images)]
        with torch.no_grad():
            sims = (embed(images).double() * embed(ref_images).double()).sum(-1).tolist()
            sims = [1.0 if s else v for s, v in zip(same, sims)]  # identical pixels: unmoved by definition
            change = None
            if clip and len(clips) == n:
                theirs = S.clip_scores(*clip, ref_images, [rec["prompt"]] * n, device, batch_size).tolist()
                change = sum(0.0 if s else a - b for s, a, b in zip(same, clips, theirs)) / n
        if not all(math.isfinite(v) for v in sims + ([change] if change is not None else [])):
            warn(f"prompt {rec['index']}: a side-effect number is not finite; not paired")
            return none
        return {"reference_similarity_per_image": sims, "clip_change": change, "n_identical": sum(same)}


def mean_se(values):
    """(mean, standard error with ddof 1) of a list of floats; (None, None) if empty, SE None for one value."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def summarize(rows, reference):
    """The side-effect summary over per-prompt rows (those paired): mean ± SE over prompts of the mean similarity to
    the unmitigated image and of the CLIP change, the share of pixel-identical images and of unchanged prompts."""
    paired = [r for r in rows if r.get("n_identical") is not None]
    sim, sim_se = mean_se([sum(r["reference_similarity_per_image"]) / len(r["reference_similarity_per_image"])
                           for r in paired])
    clips = [r["clip_change"] for r in paired if r["clip_change"] is not None]
    clip, clip_se = mean_se(clips)
    n_img = sum(len(r["reference_similarity_per_image"]) for r in paired)
    return {"reference": reference, "n_prompts_paired": len(paired), "n_images_paired": n_img,
            "mean_reference_similarity": sim, "se_reference_similarity": sim_se,
            "mean_clip_change": clip, "se_clip_change": clip_se,
            "frac_identical_images": sum(r["n_identical"] for r in paired) / n_img if n_img else None,
            "frac_unchanged_prompts": (sum(r["n_identical"] == len(r["reference_similarity_per_image"])
                                           for r in paired) / len(paired)) if paired else None}
