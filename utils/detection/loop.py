"""The detection harness: the field's memorization detectors computed in one pass over shared UNet calls.

Every metric sees the same prompts, the same initial noise, the same DDIM schedule and the same UNet calls:
the step-i forward on [x; x] with [uncond; cond] embeddings serves the sharpness metric at step i, Wen et al.'s
metric at step i and (at step 1) the anisotropy norm term; one classifier-free-guided DDIM trajectory serves
Wen et al. at all steps and the images of the tiled l2 distance. Shapes: K prompts x n generations.

Metrics (higher = memorized unless `DIRECTION` says lower):
- sharpness  ||H_delta s_delta|| (Jeon et al., 2025) at each of the first hvp_sampling_num steps;
- wen        ||out(x_t, c) - out(x_t, empty)|| per generation at each of the first wen_steps steps (Wen et al.,
             2024; their code takes the raw model output, which is eps for SD v1.4 and v for SD v2.0);
- anisotropy g1 * ||D_1|| + g2 * cos_low (Asthana & Belagiannis, 2026): D_1 the cond-minus-uncond output at the
             first timestep, cos_low the per-pixel cosine (over latent channels) between the unconditional output
             and the guidance direction at a low-noise timestep, evaluated on the same initial noise x_T, averaged
             over pixels;
- tiled_l2   pairwise distance between the n generated images (Carlini et al., 2023, as the sharpness paper uses
             it): the largest RMS pixel difference over co-located tile_px x tile_px tiles, aggregated over the
             n(n-1)/2 pairs; lower = memorized (generations that all look alike);
- le, ae     Ren et al. (2024): entropy of the head- and query-averaged cross-attention over the 77 tokens; le at
             the first step in one layer (forward index 3), ae averaged over all layers in the last T/5 steps plus
             the change of the summary-token (first EOS onwards) entropy from the first step to those steps;
- be         Chen et al. (2025), Bright Ending: ||m * (out_c - out_u)|| / mean(m) averaged over all steps, m the
             end-token (first EOS) attention map of the first down block's cross-attention at the last step.
The attention metrics read the UNet's cross-attention through utils.attention.CrossAttentionInstrument, which
leaves the UNet's outputs bit-identical, so they share the trajectory with the others.
"""
import contextlib
import dataclasses
import itertools
import math
import time

import torch

from ..models import attention as A
from ..models.denoisers import FD_PRECISIONS, FD_SCHEMES, flat_norm, score_difference

METRICS = ("sharpness", "wen", "anisotropy", "tiled_l2", "le", "ae", "be")
ATTENTION_METRICS = ("le", "ae", "be")
DIRECTION = {"tiled_l2": "lower"}  # all others: higher = memorized
ANISO_MODES = ("x,c|x", "x,x|c", "x|c,c|x")
SPACES = ("output", "eps")
ANISO_SPACES = ("output", "score")
TILED_AGGS = ("mean", "min")
HVP_METHODS = ("jvp", "fd")  # sharpness: exact forward-mode JVP, or finite differences of s_delta
FD_STEP = 1e-3  # default fd step: per-entry RMS of the displacement along s_delta (README "Cost", the frontier)
# Weights (norm, cosine) of the anisotropy score per model, from the authors' evaluation script.
ANISO_WEIGHTS = {"sd1": (1.0, 2.0), "sd2": (1.0, 0.1)}


@dataclasses.dataclass(frozen=True)
class DetectSettings:
    """Settings of one detection pass; every metric's options (only the requested metrics' options matter)."""
    num_inference_steps: int = 50     # DDIM steps of the sampling schedule (the paper's 50)
    guidance_scale: float = 7.5       # CFG scale of the trajectory between measured steps
    hvp_sampling_num: int = 1         # sharpness: first S steps measured
    wen_steps: int = 50               # wen: first S steps measured (Table 1 averages the first 1, 5 or 50)
    wen_space: str = "output"         # output: raw model output (Wen's code); eps: noise prediction
    aniso_mode: str = "x,c|x"         # which pair the cosine compares (the authors' default: uncond vs guidance)
    aniso_space: str = "output"       # output: the authors' code; score: ||s_delta|| and cosine of eps (paper text)
    aniso_low_index: int = -3         # schedule index of the low-noise timestep (code: timesteps[-3], t = 41)
    aniso_weights: tuple = (1.0, 2.0)  # (norm, cosine) weights
    tile_px: int = 128                # tile side of the tiled l2 distance, in pixels
    tiled_agg: str = "mean"           # aggregate over pairs: mean (default) or min
    le_layer: int = 3                 # le: forward index of the cross-attention layer (Ren et al.'s, SD v1.4)
    be_layers: tuple = ()             # be: forward indices of the mask layers; () = the first down block's
    hvp: str = "jvp"                  # sharpness: jvp = exact forward-mode JVP; fd = finite differences
    fd_step: float = FD_STEP          # fd: per-entry RMS of the displacement (h = fd_step * sqrt(C*H*W))
    fd_precision: str = "float32"     # fd: float32 (a float32 UNet copy if the model is not), model, tf32 (CUDA)
    fd_scheme: str = "forward"        # fd: forward (1 extra forward) or central (2 extra forwards)

    def __post_init__(self):
        problems = [f"{k} must be a positive integer" for k in ("num_inference_steps", "hvp_sampling_num",
                                                               "wen_steps", "tile_px")
                    if not (isinstance(getattr(self, k), int) and getattr(self, k) > 0)]
        for k, allowed in (("wen_space", SPACES), ("aniso_mode", ANISO_MODES), ("aniso_space", ANISO_SPACES),
                           ("tiled_agg", TILED_AGGS)):
            if getattr(self, k) not in allowed:
                problems.append(f"{k} must be one of {allowed}")
        for k, allowed in (("hvp", HVP_METHODS), ("fd_precision", FD_PRECISIONS), ("fd_scheme", FD_SCHEMES)):
            if getattr(self, k) not in allowed:
                problems.append(f"{k} must be one of {allowed}")
        if not (isinstance(self.fd_step, (int, float)) and 0 < self.fd_step < float("inf")):
            problems.append("fd_step must be a positive finite number")
        if len(self.aniso_weights) != 2:
            problems.append("aniso_weights needs two numbers")
        if not isinstance(self.le_layer, int) or self.le_layer < 0:
            problems.append("le_layer must be a non-negative integer")
        if problems:
            raise ValueError("; ".join(problems))

    def check(self, metrics):
        """ValueError if a requested metric needs more sampling steps than the schedule has."""
        n = self.num_inference_steps
        problems = [f"{m} needs {self.trajectory(m)} sampling steps; the schedule has {n}" for m in metrics
                    if self.trajectory(m) > n]
        if "anisotropy" in metrics and not -n <= self.aniso_low_index < n:
            problems.append(f"the anisotropy low-noise index {self.aniso_low_index} is outside the {n}-step schedule")
        if problems:
            raise ValueError("; ".join(problems))

    def steps(self, metric):
        """Columns the metric's result has: measured steps, or 1 for a single-number metric."""
        return {"sharpness": self.hvp_sampling_num, "wen": self.wen_steps}.get(metric, 1)

    def trajectory(self, metric):
        """Sampling steps (UNet forwards along the trajectory) the metric needs."""
        return {"sharpness": self.hvp_sampling_num, "wen": self.wen_steps, "anisotropy": 1, "le": 1}.get(
            metric, self.num_inference_steps)

    def for_metric(self, metric):
        """The settings that change the metric's numbers (its identity for resuming)."""
        own = {"sharpness": ("hvp_sampling_num",), "wen": ("wen_steps", "wen_space"),
               "anisotropy": ("aniso_mode", "aniso_space", "aniso_low_index", "aniso_weights"),
               "tiled_l2": ("tile_px", "tiled_agg"), "le": ("le_layer",), "ae": (),
               "be": ("be_layers", "wen_space")}[metric]
        if metric == "sharpness" and self.hvp != "jvp":  # the default adds nothing: old logs still resume
            own += ("hvp", "fd_step", "fd_precision", "fd_scheme")
        common = ("num_inference_steps", "guidance_scale")
        out = {k: getattr(self, k) for k in common + own}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


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
        summary), jvps or vae_decodes."""
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

    def summary(self, metrics):
        """{metric: {unet_forwards, jvps, vae_decodes, seconds, peak_bytes, shared_with, step_seconds}, total: {...}};
        step_seconds[i]: the seconds of the metric's units at sampling step i (what its first k steps cost)."""
        def tally(units):
            out = {"unet_forwards": 0, "jvps": 0, "vae_decodes": 0, "seconds": 0.0, "peak_bytes": None}
            for kind, _, secs, peak, _, count in units:
                if kind == "fd_forwards":
                    out["fd_forwards"] = out.get("fd_forwards", 0) + count
                    kind = "unet_forwards"
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


def run_detectors(model, cond, latents, metrics, settings, *, decode=None, prompt_lengths=None):
    """Compute the requested metrics for K prompts x n generations in one pass.

    model: utils.models.denoisers.Denoiser; cond: Conditioning of K prompts; latents (n, C, H, W), the initial noise
    shared by every prompt; decode: latents (B, C, H, W) -> list of B PIL images (needed for tiled_l2, see
    utils.models.decode_latents); prompt_lengths: K token counts incl. BOS and the first EOS (needed for ae and
    be, see utils.attention.prompt_lengths). Returns (values, extras, images, meter): values[m] a float32 tensor
    (K, n, settings.steps(m)) of per-generation values (tiled_l2: (K, 1, 1), the aggregate over pairs);
    extras[m] per-prompt details (anisotropy: per-generation norm and cosine terms; tiled_l2: the pairwise
    distance matrix; be: per-generation values at each step); images: K lists of n PIL images when the
    trajectory ran to the end, else None.
    """
    st = settings
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {METRICS}")
    st.check(metrics)
    k, n = len(cond), latents.shape[0]
    if "tiled_l2" in metrics and (n < 2 or decode is None):
        raise ValueError("tiled_l2 compares generations: it needs n >= 2 and a decoder")
    timesteps = model.timesteps(st.num_inference_steps, device=latents.device)
    embeds = cond.repeat_each(n)
    x = latents.repeat(k, 1, 1, 1)
    need = max(st.trajectory(m) for m in metrics)
    complete = need == st.num_inference_steps and "tiled_l2" in metrics  # images need the whole trajectory
    vals = {m: torch.empty(k if m == "tiled_l2" else k * n, st.steps(m)) for m in metrics}
    extras = {m: [None] * k for m in metrics}
    meter = CostMeter(latents.device)
    inst = attention_instrument(model.unet, metrics, st, prompt_lengths, n)
    be_diffs = []
    with inst or contextlib.nullcontext():
        pause = inst.paused if inst else contextlib.nullcontext
        for i, t in enumerate(timesteps[:need]):
            xin = model.scale_input(x, t)
            xx = torch.cat([xin, xin])
            users = [m for m in metrics if i < st.trajectory(m)]
            if inst:
                inst.step = i
            with torch.no_grad(), meter.unit("unet_forwards", users, i):
                out = model.output(xx, t, embeds)
            if "sharpness" in metrics and i < st.hvp_sampling_num:
                with pause():
                    h = _sharpness_hvp(model, out, xx, xin, t, embeds, st, meter, i)
                vals["sharpness"][:, i] = flat_norm(h).cpu()
            if ("wen" in metrics and i < st.wen_steps) or "be" in metrics:
                diff = score_difference(out if st.wen_space == "output" else model.eps(out, xx, t))
                if "wen" in metrics and i < st.wen_steps:
                    vals["wen"][:, i] = flat_norm(diff).cpu()
                if "be" in metrics:
                    be_diffs.append(diff.float().cpu())  # weighted by the mask known only at the last step
            if "anisotropy" in metrics and i == 0:
                with torch.no_grad(), pause():
                    norm, cos = _anisotropy(model, out, xx, t, timesteps[st.aniso_low_index], x, embeds, st, meter)
                vals["anisotropy"][:, 0] = (st.aniso_weights[0] * norm + st.aniso_weights[1] * cos).cpu()
                for j in range(k):
                    extras["anisotropy"][j] = dict(norm=norm[j * n:(j + 1) * n].tolist(),
                                                   cosine=cos[j * n:(j + 1) * n].tolist())
            if i + 1 < need or complete:
                with torch.no_grad():
                    x = model.guided_step(out, t, x, st.guidance_scale)
    if inst:
        _attention_scores(inst, metrics, st, prompt_lengths, n, be_diffs, vals, extras)
    images = None
    if complete:
        with torch.no_grad(), meter.unit("vae_decodes", ["tiled_l2"]):
            flat = decode(x)
        images = [flat[j * n:(j + 1) * n] for j in range(k)]
        for j, ims in enumerate(images):
            d = pairwise_tiled_l2(images_to_tensor(ims), st.tile_px)
            pairs = d[torch.triu_indices(n, n, 1).unbind()]
            vals["tiled_l2"][j, 0] = float(pairs.mean() if st.tiled_agg == "mean" else pairs.min())
            extras["tiled_l2"][j] = dict(pairwise=d.tolist())
    return {m: v.view(k, -1, v.shape[1]) for m, v in vals.items()}, extras, images, meter


def _sharpness_hvp(model, out, xx, xin, t, embeds, st, meter, i):
    """H_delta s_delta (B, ...) at step i from the step's pair forward `out` (2B, ...) at xx = [xin; xin]:
    the exact JVP (settings.hvp 'jvp'), or finite differences ('fd') that reuse `out` when it was computed in the
    fd precision (else one more pair forward at xin through model.fd_unet), plus one (forward) or two (central)
    displaced pair forwards."""
    if st.hvp == "jvp":
        s_delta = model.score_delta(out, xx, t)
        with meter.unit("jvps", ["sharpness"], i):
            return model.hvp_delta(xin, t, embeds, s_delta)
    shared = model.fd_unet is None and st.fd_precision != "tf32"
    s_delta = model.score_delta(out, xx, t) if shared else None
    h = st.fd_step * math.sqrt(xin[0].numel())
    count = (0 if shared else 1) + (2 if st.fd_scheme == "central" else 1)
    with meter.unit("fd_forwards", ["sharpness"], i, count=count):
        return model.hvp_delta_fd(xin, t, embeds, h, s_delta=s_delta, scheme=st.fd_scheme)


def attention_layers(unet, st):
    """(le layer, be layers) as forward indices for this UNet; ValueError if its attention layout lacks them."""
    layers = A.cross_attention_layers(unet) if hasattr(unet, "named_modules") else []
    if not layers:
        raise ValueError("the attention metrics need a UNet with cross-attention layers (diffusers Attention)")
    be = list(st.be_layers) or [l.index for l in layers if l.path.startswith("down_blocks.0.")]
    if not be:
        raise ValueError("be: the UNet's first down block has no cross-attention; choose the mask layers")
    A.select_layers(layers, [st.le_layer] + be)  # raises for an index the UNet does not have
    return st.le_layer, be


def attention_instrument(unet, metrics, st, prompt_lengths, n):
    """The CrossAttentionInstrument the requested attention metrics need (None if none is requested): token
    distributions at the first step (le: its layer; ae: all layers) and in ae's window, and the end-token maps of
    be's layers at the last step; the conditional rows only."""
    want = [m for m in metrics if m in ATTENTION_METRICS]
    if not want:
        return None
    le_layer, be_layers = attention_layers(unet, st)
    if prompt_lengths is None and ("ae" in want or "be" in want):
        raise ValueError("ae and be need the prompts' token counts (prompt_lengths)")
    t_end = st.num_inference_steps
    tokens = None
    if "ae" in want:
        tokens = A.TokenRequest(steps=[0] + list(range(t_end - max(1, t_end // 5), t_end)))
    elif "le" in want:
        tokens = A.TokenRequest(steps=[0], layers=[le_layer])
    query = None
    if "be" in want:
        ends = torch.tensor(prompt_lengths).repeat_interleave(n) - 1  # first EOS, per cond row
        query = A.QueryMapRequest(token_index=ends.tolist(), steps=[t_end - 1], layers=be_layers)
    return A.CrossAttentionInstrument(unet, tokens=tokens, query_map=query, branch="cond")


def _attention_scores(inst, metrics, st, prompt_lengths, n, be_diffs, vals, extras):
    """le, ae and be per generation from the instrument's recordings (rows = the K*n conditional rows)."""
    le_layer, be_layers = attention_layers(inst.unet, st)
    if "le" in metrics:
        vals["le"][:, 0] = A.le_score(inst.token_dists, layer=le_layer, step=0).float()
    if "ae" in metrics:
        start = torch.tensor(prompt_lengths).repeat_interleave(n) - 1
        vals["ae"][:, 0] = A.ae_score(inst.token_dists, st.num_inference_steps, start).float()
    if "be" in metrics:
        mask = A.be_mask(inst.query_maps, st.num_inference_steps - 1, be_layers)
        per_step = torch.stack([A.be_step_score(mask, d) for d in be_diffs], dim=1)  # (K*n, T)
        vals["be"][:, 0] = per_step.mean(dim=1).float()
        for j in range(len(extras["be"])):
            extras["be"][j] = dict(per_step=per_step[j * n:(j + 1) * n].tolist())


def _anisotropy(model, out, xx, t, t_low, x, embeds, st, meter):
    """Norm term at the first timestep (from the shared forward) and cosine term at t_low on the same x_T (one
    more pair forward). Returns two float32 tensors (B,)."""
    if st.aniso_space == "score":
        norm = flat_norm(model.score_delta(out, xx, t))
    else:  # the authors' code: eps models the raw output; their v branch (alpha v - x) / sigma^2
        norm = flat_norm(score_difference(model.authors_output(out, xx, t)))
    xl = model.scale_input(x, t_low)
    xxl = torch.cat([xl, xl])
    with meter.unit("unet_forwards", ["anisotropy"]):
        low = model.output(xxl, t_low, embeds)
    if st.aniso_space == "score":
        low = model.eps(low, xxl, t_low)  # the cosine of scores equals that of eps (same -1/sigma on both)
    u, c = low.float().chunk(2)
    a_vec, b_vec = {"x,c|x": (u, c - u), "x,x|c": (c, u), "x|c,c|x": (c, c - u)}[st.aniso_mode]
    cos = torch.nn.functional.cosine_similarity(a_vec, b_vec, dim=1)  # over channels, per pixel: (B, H, W)
    return norm, cos.flatten(1).mean(dim=1)


def images_to_tensor(images):
    """PIL images -> float64 tensor (N, 3, H, W) in [0, 1] (the 8-bit images as saved)."""
    import numpy as np
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0).permute(2, 0, 1)
                        for im in images])


def pairwise_tiled_l2(images, tile_px):
    """Tiled l2 distances between all pairs of images (N, C, H, W): (N, N), zero diagonal.

    d(a, b) = max over the non-overlapping tile_px x tile_px tiles of sqrt(mean((a - b)^2)) over the tile's
    pixels and channels (Carlini et al.'s tiled distance; images in [0, 1]). H and W must be multiples of tile_px.
    """
    n, c, h, w = images.shape
    if h % tile_px or w % tile_px:
        raise ValueError(f"the tile size {tile_px} px does not divide the image size {h}x{w}")
    tiles = images.reshape(n, c, h // tile_px, tile_px, w // tile_px, tile_px)
    d = torch.zeros(n, n, dtype=images.dtype)
    for i, j in itertools.combinations(range(n), 2):
        rms = (tiles[i] - tiles[j]).pow(2).mean(dim=(0, 2, 4)).sqrt()
        d[i, j] = d[j, i] = rms.max()
    return d


def sharpness_scores(model, cond, latents, *, num_inference_steps=50, hvp_sampling_num=1,
                     guidance_scale=7.5):
    """Detection metric ||H_delta s_delta|| for K prompts x n generations at the first S sampling steps.

    model: utils.models.denoisers.Denoiser (its scheduler's timesteps are set here); cond: Conditioning of K prompts;
    latents (n, C, H, W), the same initial noise for every prompt. At step i the UNet runs once on [x; x] for
    both branches, then one JVP gives H_delta s_delta; between measured steps x advances by a classifier-free-
    guided DDIM step. No UNet call is made after the last measured step. Returns a float32 tensor (K, n, S) and
    a dict of cost counts. (The 'sharpness' metric of run_detectors, which this calls.)
    """
    if hvp_sampling_num > num_inference_steps:
        raise ValueError("the number of measured steps must not exceed the number of sampling steps")
    st = DetectSettings(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        hvp_sampling_num=hvp_sampling_num)
    vals, _, _, meter = run_detectors(model, cond, latents, ["sharpness"], st)
    tally = meter.summary(["sharpness"])["sharpness"]
    return vals["sharpness"], {"unet_forwards": tally["unet_forwards"], "jvps": tally["jvps"]}
