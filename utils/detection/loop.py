"""The detection harness: the registered detectors (utils.detection.DETECTORS) computed in one pass over shared
UNet calls; it knows no detector by name (utils/detection/base.py: the hooks it calls).

Every detector sees the same prompts, the same initial noise, the same DDIM schedule and the same UNet calls:
the step-i forward on [x; x] with [uncond; cond] embeddings serves every detector that measures step i (sharpness,
wen, the anisotropy norm term at step 1, be's output difference); one classifier-free-guided DDIM trajectory
serves them all, and its end the one VAE decode of the image detectors (tiled_l2). The attention detectors (le,
ae, be) read the UNet's cross-attention through one utils.models.attention.CrossAttentionInstrument, which leaves
the UNet's outputs bit-identical, so they share the trajectory with the others. Shapes: K prompts x n generations.
"""
import contextlib
import dataclasses
import time

import torch

from ..models import attention as A
from .base import DETECTORS, Pass, Sampling, Step

OPTIONAL_KINDS = ("vjps", "probes")  # cost kinds that appear in a summary only when a detector used them


def settings_for(**options):
    """{detector name: its settings} for every registered detector, each from the options that are its fields
    (e.g. settings_for(wen_steps=3, tile_px=4)); ValueError for an option no detector has."""
    out, used = {}, set()
    for name, cls in DETECTORS.items():
        fields = {f.name for f in dataclasses.fields(cls.Settings)}
        out[name] = cls.Settings(**{k: v for k, v in options.items() if k in fields})
        used |= fields
    unknown = sorted(set(options) - used)
    if unknown:
        raise ValueError(f"no detector has the option(s) {unknown}")
    return out


class CostMeter:
    """Counts, seconds and peak memory of the pass's units of work, each tagged with the metrics that use it.

    A unit used by several metrics is counted once in the totals and in full in each of its metrics (so the
    per-metric numbers are what each metric costs alone, and they do not add up to the total).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.units = []  # (kind, metrics, seconds, peak bytes or None, sampling step or None, count)

    @contextlib.contextmanager
    def unit(self, kind, metrics, step=None, count=1):
        """Time the block as `count` units of `kind`: unet_forwards (pair forwards in the model's dtype, the unit
        of the cost ratios), fd_forwards (the finite-difference forwards; also counted as unet_forwards in the
        summary), jvps, vjps (one backward pass through a graph built by a counted forward; a Hutchinson probe is
        one), probes (Hutchinson probes, counted beside their vjps) or vae_decodes."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        self.units.append((kind, tuple(metrics), time.perf_counter() - t0, peak, step, count))

    def count(self, kind, metrics, step=None, count=1):
        """Record `count` units of `kind` without timing them (probes: their time is in their vjps' unit)."""
        self.units.append((kind, tuple(metrics), 0.0, None, step, count))

    def summary(self, metrics):
        """{metric: {unet_forwards, jvps, vae_decodes, seconds, peak_bytes, shared_with, step_seconds}, total: {...}};
        step_seconds[i]: the seconds of the metric's units at sampling step i (what its first k steps cost)."""
        def tally(units):
            out = {"unet_forwards": 0, "jvps": 0, "vae_decodes": 0, "seconds": 0.0, "peak_bytes": None}
            for kind, _, secs, peak, _, count in units:
                if kind == "fd_forwards":
                    out["fd_forwards"] = out.get("fd_forwards", 0) + count
                    kind = "unet_forwards"
                if kind in OPTIONAL_KINDS:  # absent unless used: the older detectors' cost records are unchanged
                    out[kind] = out.get(kind, 0) + count
                else:
                    out[kind] += count
                out["seconds"] += secs
                if peak is not None:
                    out["peak_bytes"] = max(out["peak_bytes"] or 0, peak)
            return out
        res = {}
        for m in metrics:
            mine = [u for u in self.units if m in u[1]]
            steps = [u[4] for u in mine if u[4] is not None]
            per_step = [0.0] * (max(steps) + 1 if steps else 0)
            for u in mine:
                if u[4] is not None:
                    per_step[u[4]] += u[2]
            res[m] = dict(tally(mine), shared_with=sorted({o for u in mine for o in u[1] if o != m}),
                          step_seconds=per_step)
        res["total"] = tally(self.units)
        return res


def run_detectors(model, cond, latents, metrics, settings=None, sampling=None, *, decode=None,
                  prompt_lengths=None, companions=None):
    """Compute the requested detectors for K prompts x n generations in one pass.

    model: utils.models.denoisers.Denoiser; cond: Conditioning of K prompts; latents (n, C, H, W), the initial noise
    shared by every prompt; metrics: detector names; settings: {name: its settings dataclass} (missing: the
    defaults; see settings_for); sampling: base.Sampling (default: 50 steps, CFG 7.5); decode: latents (B, C, H, W)
    -> list of B PIL images (for detectors that want images, see utils.models.decode_latents); prompt_lengths: K
    token counts incl. BOS and the first EOS (for ae and be, see utils.models.attention.prompt_lengths);
    companions: {model id: Denoiser} of the second models detectors compare with (Detector.companion()).
    Returns (values, extras, images, meter): values[m] a float32 tensor (K, n, steps) of per-generation values
    (per-prompt detectors such as tiled_l2: (K, 1, 1)); extras[m] K per-prompt details (or None); images: K lists
    of n PIL images when the trajectory ran to the end for a detector that wants them, else None.
    """
    sampling = sampling or Sampling()
    unknown = [m for m in metrics if m not in DETECTORS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {tuple(DETECTORS)}")
    order = list(DETECTORS)
    dets = [DETECTORS[m]((settings or {}).get(m), sampling) for m in metrics]
    problems = [q for d in dets for q in d.check()]
    if problems:
        raise ValueError("; ".join(problems))
    hooks = sorted(dets, key=lambda d: order.index(d.name))  # registration order: the detectors' own calls' order
    imaging = [d.name for d in dets if d.wants_images]
    if imaging and decode is None:
        raise ValueError(f"{', '.join(imaging)} compare(s) generated images: a decoder is needed")
    k, n = len(cond), latents.shape[0]
    timesteps = model.timesteps(sampling.num_inference_steps, device=latents.device)
    x = latents.repeat(k, 1, 1, 1)
    need = max(d.trajectory() for d in dets)
    complete = need == sampling.num_inference_steps and bool(imaging)  # images need the whole trajectory
    inst = attention_instrument(model.unet, dets, prompt_lengths, n)
    p = Pass(model=model, sampling=sampling, timesteps=timesteps, k=k, n=n, embeds=cond.repeat_each(n),
             prompt_lengths=prompt_lengths, meter=CostMeter(latents.device), instrument=inst,
             values={d.name: torch.empty(k if d.per_prompt else k * n, d.steps()) for d in dets},
             extras={d.name: [None] * k for d in dets}, scratch={}, companions=dict(companions or {}))
    for d in hooks:
        d.prepare(p)
    with inst or contextlib.nullcontext():
        for i, t in enumerate(timesteps[:need]):
            xin = model.scale_input(x, t)
            xx = torch.cat([xin, xin])
            users = [d for d in dets if i < d.trajectory()]
            if inst:
                inst.step = i
            with torch.no_grad(), p.meter.unit("unet_forwards", [d.name for d in users], i):
                out = model.output(xx, t, p.embeds)
            s = Step(i=i, t=t, x=x, xin=xin, xx=xx, out=out)
            for d in hooks:
                if i < d.trajectory():
                    d.on_step(p, s)
            if i + 1 < need or complete:
                with torch.no_grad():
                    x = model.guided_step(out, t, x, sampling.guidance_scale)
    images = None
    if complete:
        with torch.no_grad(), p.meter.unit("vae_decodes", imaging):
            images = p.split(decode(x))
    for d in hooks:
        d.finish(p, images if d.wants_images else None)
    return {m: v.view(k, -1, v.shape[1]) for m, v in p.values.items()}, p.extras, images, p.meter


def attention_instrument(unet, dets, prompt_lengths, n):
    """The one CrossAttentionInstrument the detectors' requests need (None if none requests): token distributions
    at the union of their steps and layers, and the one query-map request; the conditional rows only."""
    tokens, queries = [], []
    for d in dets:
        tok, query = d.attention(unet, prompt_lengths, n)
        tokens += [tok] if tok else []
        queries += [query] if query else []
    if not tokens and not queries:
        return None
    if len(queries) > 1:
        raise ValueError("the attention instrument records one query map: one such detector per pass")
    union = lambda sets: None if any(v is None for v in sets) else list(dict.fromkeys(v for s in sets for v in s))
    token = A.TokenRequest(steps=union([r.steps for r in tokens]), layers=union([r.layers for r in tokens])) \
        if tokens else None
    return A.CrossAttentionInstrument(unet, tokens=token, query_map=queries[0] if queries else None, branch="cond")


