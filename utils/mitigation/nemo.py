"""NeMo (Hintersdorf et al., NeurIPS 2024; ml-research/localizing_memorization_in_diffusion_models): the
cross-attention value neurons of a memorized prompt found and switched off while sampling.

Per prompt (their 3_detect_memorized_neurons.py with utils/activation_detection.py): the memorization strength of
a set of deactivated neurons is the largest SSIM between the conditional noise difference of the model as it is
and with those neurons off (their compute_noise_diff); the initial neurons are the out-of-distribution value
activations (|a - mean| / std > theta over a prompt set's statistics, plus the top-k), theta lowered and k raised
until the strength falls below the threshold; refinement then re-activates whole layers, then single neurons,
while the strength stays below it. Generation (their 4_generate_images.py) zeroes those neurons' value outputs.
"""
import contextlib
import dataclasses
import hashlib
import os

import torch

from .base import Method, Plan, grid_float, hp, is_count, is_finite, problems
from ..cli import UserError, nonneg_float, nonneg_int, positive_float, positive_int
from ..imagemath import minmax_per_channel, ssim_pairs
from ..io import atomic_torch_save, sha256_file

_STATS = {}  # (id of the UNet, statistics key) -> statistics dict, computed or loaded once per run


@dataclasses.dataclass(frozen=True)
class NemoSettings:
    """Their 3_detect_memorized_neurons.py defaults (argparse) and 4_generate_images.py's deactivation."""
    stats_prompts: str = hp(None, flag="--nemo_stats_prompts",
                            help="prompt file (one a line) of the activation statistics, or a statistics .pt "
                                 "written by an earlier run (cached per model under --out_dir)")
    threshold: float = hp(0.428, type=positive_float)       # their SSIM thresholds (pairwise, initial, refinement)
    theta: float = hp(5.0, type=positive_float)             # their --initial_theta (OOD z-score)
    theta_step: float = hp(0.25, type=nonneg_float)         # their --theta_reduction_per_step
    min_theta: float = hp(1.0, type=positive_float)         # their --min_theta
    initial_k: int = hp(0, type=nonneg_int)                 # their --initial_k (top-k absolute activations)
    samples: int = hp(10, type=positive_int)                # their --samples_per_prompt of the detection
    detect_seed: int = hp(1, type=nonneg_int)               # their detection --seed (generation: the run's)
    scaling: float = hp(0.0, type=nonneg_float)             # their --scaling_factor of the deactivated outputs

    def __post_init__(self):
        problems([(self.stats_prompts is None or isinstance(self.stats_prompts, str), "stats_prompts must be a path"),
                  (is_finite(self.threshold) and 0 < self.threshold <= 1, "threshold must lie in (0, 1]"),
                  (is_finite(self.theta) and self.theta > 0, "theta must be a number > 0"),
                  (is_finite(self.theta_step) and self.theta_step >= 0, "theta_step must be a number >= 0"),
                  (is_finite(self.min_theta) and self.min_theta > 0, "min_theta must be a number > 0"),
                  (is_count(self.initial_k) and self.initial_k >= 0, "initial_k must be an integer >= 0"),
                  (is_count(self.samples) and self.samples >= 2, "samples must be an integer >= 2"),
                  (is_count(self.detect_seed) and self.detect_seed >= 0, "detect_seed must be an integer >= 0"),
                  (is_finite(self.scaling) and self.scaling >= 0, "scaling must be a number >= 0")])

    def to_dict(self):
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------ value layers

def value_layers(unet):
    """[(module path, to_v Linear)] of the cross-attention layers in the down blocks and the mid block, in forward
    order (SD v1.x: their seven, down_blocks.{0,1,2}.attentions.{0,1} and the mid block)."""
    from ..models.attention import cross_attention_layers
    return [(layer.path, unet.get_submodule(layer.path).to_v) for layer in cross_attention_layers(unet)
            if layer.path.startswith(("down_blocks", "mid_block"))]


def model_fingerprint(unet):
    """SHA-256 of the value layers' weights: which model a statistics file belongs to."""
    h = hashlib.sha256()
    for path, lin in value_layers(unet):
        h.update(path.encode())
        h.update(lin.weight.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def value_activations(unet, emb):
    """Per value layer, the mean over the token positions of |to_v(e)| of one prompt embedding emb (1, L, D):
    [(out_features,)] float32 (their 1_compute_activations_statistics.py)."""
    with torch.no_grad():
        return [lin(emb)[0].abs().float().mean(dim=0).cpu() for _, lin in value_layers(unet)]


@contextlib.contextmanager
def deactivated(unet, neurons, scaling=0.0):
    """Multiply the outputs of the chosen value neurons by `scaling` (their RescaleLinearActivations: every row of
    the batch, both branches) while inside; neurons: {layer path: [indices]}. Nothing installed for none."""
    handles = []
    try:
        for path, lin in value_layers(unet):
            idx = neurons.get(path) or []
            if idx:
                def hook(module, args, out, idx=list(idx)):
                    out = out.clone()
                    out[..., idx] = out[..., idx] * scaling
                    return out
                handles.append(lin.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------ statistics

def activation_statistics(model, encode, source, cache_dir, model_id):
    """Mean and std over a prompt set of value_activations, {'mean': [...], 'std': [...], 'fingerprint', ...}:
    from a .pt statistics file (UserError when it belongs to another model), or computed from a prompt file and
    cached in cache_dir under the file's SHA-256 (reused by later runs of the same model)."""
    unet = model.unet
    fp = model_fingerprint(unet)
    if source.endswith(".pt"):
        key = ("file", os.path.abspath(source))
    else:
        key = ("prompts", sha256_file(source))
    if (id(unet), key) in _STATS:
        return _STATS[(id(unet), key)]
    path = source if key[0] == "file" else os.path.join(cache_dir, f"nemo_stats_{key[1][:16]}.pt")
    if os.path.isfile(path):
        try:
            stats = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"--nemo_stats_prompts {source}: not a statistics file ({type(e).__name__})") from None
        if not isinstance(stats, dict) or stats.get("fingerprint") != fp:
            raise UserError(f"--nemo_stats_prompts {source}: statistics of another model (value-layer weights "
                            f"differ from {model_id}'s); compute them from a prompt file")
    elif key[0] == "file":
        raise UserError(f"--nemo_stats_prompts {source}: no such statistics file")
    else:
        from ..prompts import read_prompts
        prompts = read_prompts(source)
        if len(prompts) < 2:
            raise UserError(f"--nemo_stats_prompts {source}: needs at least 2 prompts for a standard deviation")
        acts = [value_activations(unet, encode([p]).cond) for p in prompts]
        stats = dict(mean=[torch.stack(layer).mean(0) for layer in zip(*acts)],
                     std=[torch.stack(layer).std(0) for layer in zip(*acts)], fingerprint=fp,
                     layers=[p for p, _ in value_layers(unet)], prompts_sha256=key[1], n_prompts=len(prompts),
                     model_id=model_id)
        atomic_torch_save(path, stats)
    _STATS[(id(unet), key)] = stats
    return stats


def prepare(loaded, settings, cache_dir):
    """Before any image: the statistics of the run's model (UserError when they cannot be had)."""
    if not settings.stats_prompts:
        raise UserError("nemo: give --nemo_stats_prompts (a prompt file of non-memorized prompts; their shipped "
                        "statistics come from 'additional_laion_prompts.csv' on SD v1.4)")
    if not os.path.isfile(settings.stats_prompts):
        raise UserError(f"--nemo_stats_prompts {settings.stats_prompts}: no such file")
    model = loaded.denoiser()
    stats = activation_statistics(model, loaded.encode, settings.stats_prompts, cache_dir, loaded.model_id)
    _STATS[(id(model.unet), "source", os.path.abspath(settings.stats_prompts))] = stats


# ------------------------------------------------------------------------------------------ the strength

def noise_difference(model, cond, latents, steps, neurons=None, scaling=0.0):
    """Their compute_noise_diff with guidance 0: the conditional prediction at the second timestep on the initial
    noise (the loop never steps), minus that noise, min-max scaled per sample and channel. (k, C, H, W)."""
    ts = model.timesteps(steps, device=latents.device)
    t = ts[min(1, len(ts) - 1)]
    with torch.no_grad(), deactivated(model.unet, neurons or {}, scaling):
        pred = model.branch_output(model.scale_input(latents, t), t, cond.expand(latents.shape[0]), "cond")
    return minmax_per_channel(pred - latents)


def ssim(a, b):
    """Per-pair SSIM of (k, C, H, W) batches: their multi-scale SSIM (kernel 11, betas 0.33 x 3) where the latent
    is large enough (> 40 pixels a side), else single-scale SSIM with the largest odd kernel <= 11 that fits."""
    side = min(a.shape[-2:])
    if side > 40:
        return ssim_pairs(a, b, "ms", 11, (0.33, 0.33, 0.33))
    return ssim_pairs(a, b, "single", min(11, side if side % 2 else side - 1))


def max_pairwise_ssim(d):
    """Their calculate_max_pairwise_ssim: per sample, the largest SSIM to any other sample. (k,)"""
    pairs = torch.combinations(torch.arange(len(d)), r=2)
    s = ssim(d[pairs[:, 0]], d[pairs[:, 1]])
    return torch.stack([s[(pairs == i).any(-1)].max() for i in range(len(d))])


# ------------------------------------------------------------------------------------------ localization

def initial_neurons(model, cond, stats, theta, k):
    """{layer path: [indices]}: |a - mean| / std > theta, plus the k largest |a| (their initial_neuron_selection)."""
    acts = value_activations(model.unet, cond.cond)
    out = {}
    for (path, _), a, mean, std in zip(value_layers(model.unet), acts, stats["mean"], stats["std"]):
        idx = ((a - mean).abs() / std > theta).nonzero().flatten().tolist()
        idx += a.abs().topk(k=min(k, a.numel())).indices.tolist()
        out[path] = idx
    return out


def localize(model, cond, stats, settings, steps):
    """Their detection for one prompt: (neurons {path: [indices]}, record). No neurons when no sample's pairwise
    SSIM exceeds the threshold (the prompt does not look memorized)."""
    st = settings
    lat = torch.randn((st.samples, *model_latent_shape(model)), generator=torch.Generator().manual_seed(st.detect_seed))
    lat = lat.to(model.unet.device, model.unet.dtype)
    calls = [0]

    def diff(neurons=None, keep=None):
        calls[0] += 1
        d = noise_difference(model, cond, lat, steps, neurons, st.scaling)
        return d if keep is None else d[keep]

    plain = diff()
    keep = max_pairwise_ssim(plain) > st.threshold
    rec = dict(nemo_samples_kept=int(keep.sum()))
    if not keep.any():
        return {}, dict(rec, nemo_memorized=False, search_unet_calls=calls[0], search_batch=st.samples)
    plain = plain[keep]

    def strength(neurons):
        return float(ssim(plain, diff(neurons, keep)).max())

    theta, k, refine_at = st.theta, st.initial_k, st.threshold
    s = 1.0
    while s > st.threshold:
        neurons = initial_neurons(model, cond, stats, theta, k)
        s = strength(neurons)
        if s > st.threshold:
            if theta > st.min_theta:
                theta -= st.theta_step
            k += 1
        if theta == 1 or k >= 1280:  # their stop (a literal 1, not --min_theta); refinement then keeps this s
            refine_at = s
            break
    initial = {p: list(v) for p, v in neurons.items()}
    # refinement: layers first (last layer first), then single neurons, re-activated while the strength stays low
    for path in reversed(list(neurons)):
        if neurons[path] and strength(dict(neurons, **{path: []})) < refine_at:
            neurons[path] = []
    for path in reversed(list(neurons)):
        for idx in list(neurons[path]):  # one occurrence at a time, as their list.remove (top-k may repeat one)
            kept = list(neurons[path])
            kept.remove(idx)
            trial = dict(neurons, **{path: kept})
            if strength(trial) < refine_at:
                neurons = trial
    found = {p: v for p, v in neurons.items() if v}
    rec.update(nemo_memorized=True, nemo_initial={p: v for p, v in initial.items() if v}, nemo_neurons=found,
               nemo_initial_theta=theta, nemo_initial_k=k, nemo_refine_threshold=refine_at,
               nemo_refined_ssim=strength(found),
               search_unet_calls=calls[0], search_batch=st.samples)
    return found, rec


def model_latent_shape(model):
    """(C, H, W) of the model's latents at its configured sample size."""
    c, size = model.unet.config.in_channels, model.unet.config.sample_size
    return (c, *((size, size) if isinstance(size, int) else size))


def plan_nemo(ctx, index, prompt, settings):
    n = ctx.noise.shape[0]
    cond = ctx.encode([prompt])
    stats = _STATS.get((id(ctx.model.unet), "source", os.path.abspath(settings.stats_prompts or "")))
    if stats is None:
        raise ValueError("nemo's statistics are not loaded: call prepare() first (mitigate_mem.py does)")
    neurons, rec = localize(ctx.model, cond, stats, settings, ctx.num_inference_steps)
    rec.setdefault("nemo_neurons", {})
    context = (lambda: deactivated(ctx.model.unet, neurons, settings.scaling)) if neurons else None
    return Plan(ctx.noise, cond, ctx.guidance_scale, [prompt] * n, rec, context)


def _grid_threshold(text):
    v = grid_float(text)
    if not 0 < v <= 1:
        raise ValueError("outside (0, 1]")
    return {"threshold": v}


# Their code has one threshold (0.428); the grid around it is this project's (docs/mitigation.md).
METHOD = Method("nemo", NemoSettings, plan_nemo, "threshold", _grid_threshold,
                [{"threshold": v} for v in (0.3, 0.36, 0.428, 0.5, 0.6)],
                lambda s: f"ssim={s['threshold']:g}", flag_prefix="nemo_",
                title="nemo (Hintersdorf et al., NeurIPS 2024: memorization neurons deactivated)", prepare=prepare,
                author=lambda family: dict(guidance_scale=7.0, source="ml-research/localizing_memorization_in_"
                                           "diffusion_models 4_generate_images.py: guidance 7, DDIMScheduler"))
