"""GUARD (Zhao, Triantafillou & Triantafillou, ICML 2026; kairanzhao/GUARD): attractive-repulsive guidance with the
prompt's attention-spike tokens attenuated, through utils.models.attention's instrument."""
import dataclasses
import math

import torch

from .base import Method, Plan, grid_float, hp, is_finite, problems
from ..cli import finite_float, nonneg_float, positive_float

BLOCK_GROUPS = ("early", "all")  # early: their BLOCKS_EARLY (down blocks and the mid block); all: every layer


@dataclasses.dataclass(frozen=True)
class GuardSettings:
    """GUARD as their README's CA-in-GUARD command runs it (inference_mem.py, local_sd_pipeline.py:
    dual_guidance_call with the attention-spike edit of _XAttnLogger).

    Per step i of S, with u, p, g the outputs of the unconditional, attracting and repelling branches (one UNet
    call on [x; x; x]): eps = u + w (p - u) - r cos(pi i / 2S) (g - u); w is the run's guidance scale. Both the
    attracting and the repelling branch are the prompt itself (their code's combined mode, `paraphrased_neighbors
    = [gt_prompt]`); only the attracting rows get the edit: in the chosen cross-attention layers, per row and
    head, the logit of every key token whose maximum logit over the queries has a z-score (over the keys but
    the start token) above spike_threshold is multiplied by spike_scale (alpha). repulsion = 0 drops the repelling
    branch (their "CA attenuation" command: plain guidance with the edit on the conditional rows); alpha = 1
    installs no edit.
    """
    repulsion: float = hp(2.0, type=nonneg_float)  # r, their --repulsion_scale (README: 2.0; argparse default 3.0)
    spike_scale: float = hp(0.3, type=positive_float)  # alpha, their --spike_scale: the spike tokens' logit factor
    spike_threshold: float = hp(0.1, type=finite_float)  # their --spike_threshold: z-score of a token's max logit
    blocks: str = hp("early", choices=BLOCK_GROUPS)  # their --intervention_blocks BLOCKS_EARLY (README)

    def __post_init__(self):
        problems([(is_finite(self.repulsion) and self.repulsion >= 0, "repulsion must be a number >= 0"),
                  (is_finite(self.spike_scale) and self.spike_scale > 0, "spike_scale (alpha) must be a number > 0"),
                  (is_finite(self.spike_threshold), "spike_threshold must be a finite number"),
                  (self.blocks in BLOCK_GROUPS, f"blocks must be one of {', '.join(BLOCK_GROUPS)}")])

    def to_dict(self):
        return dataclasses.asdict(self)


class GuardEdit:
    """Their spike attenuation as an edit of utils.models.attention.CrossAttentionInstrument: applied in `layers`
    (forward indices) to the rows [n, 2n) of a batch of `branches` x n rows (the conditional / attracting rows).
    Counts the flagged (row, head, token) triples for the manifest."""

    def __init__(self, layers, branches, threshold, scale):
        self.layers, self.branches, self.threshold, self.scale = set(layers), branches, threshold, scale
        self.flagged = self.checked = 0

    def edit_logits(self, z):
        """z (B, heads, N, K) float32 -> z with the spike tokens' logits scaled on the attracting rows."""
        if z.shape[0] % self.branches:
            raise ValueError(f"GuardEdit expects {self.branches} row blocks, got {z.shape[0]} rows")
        n = z.shape[0] // self.branches
        rows = z[n:2 * n]
        peak = rows.max(dim=2).values                                   # (n, heads, K): max over the queries
        content = peak[..., 1:]                                         # their statistics skip the start token
        score = (peak - content.mean(-1, keepdim=True)) / (content.std(-1, keepdim=True) + 1e-6)
        spike = score > self.threshold
        spike[..., 0] = False
        self.flagged += int(spike.sum())
        self.checked += spike.numel()
        edited = torch.where(spike[:, :, None, :], rows * self.scale, rows)
        return torch.cat([z[:n], edited, z[2 * n:]])

    def report(self):
        return dict(spike_fraction=self.flagged / self.checked if self.checked else 0.0)


def guard_prediction(out, scale, repulsion_t):
    """The three-way prediction from outputs [u; p; g] (3n, ...): u + scale (p - u) - repulsion_t (g - u)."""
    u, p, g = out.chunk(3)
    return u + scale * (p - u) - repulsion_t * (g - u)


def repulsion_at(repulsion, i, steps):
    """Their 'cosine' decay of the repulsive weight: r cos(pi/2 * i / S) at step i of S."""
    return repulsion * math.cos(i / steps * math.pi / 2)


class ThreeWay:
    """GUARD's sampling loop: one UNet call on [x; x; x] per step with [uncond; cond; cond] conditions, the
    three-way prediction, the sampler's step."""

    def __init__(self, scale, repulsion, edit=None):
        self.scale, self.repulsion, self.edit = scale, repulsion, edit

    def __call__(self, model, x, cond, steps):
        timesteps = model.timesteps(steps, device=x.device)
        x = model.initial(x)
        for i, t in enumerate(timesteps):
            out = model.output(model.scale_input(torch.cat([x, x, x]), t), t, cond, branches=("uncond", "cond", "cond"))
            x = model.step(guard_prediction(out, self.scale, repulsion_at(self.repulsion, i, len(timesteps))), t, x)
        return x

    def report(self):
        return self.edit.report() if self.edit else {}


def guard_layers(unet, blocks):
    """Forward indices of the cross-attention layers of a block group ('early': down blocks and mid block)."""
    from ..models.attention import cross_attention_layers
    return [layer.index for layer in cross_attention_layers(unet)
            if blocks == "all" or layer.path.startswith(("down_blocks", "mid_block"))]


def plan_guard(ctx, index, prompt, settings):
    """GUARD for one prompt; with alpha = 1 no edit is installed, with r = 0 the call is the ordinary pair (so
    alpha = 1, r = 0 is plain sampling, bit for bit)."""
    from ..models.attention import CrossAttentionInstrument
    st, n = settings, ctx.noise.shape[0]
    branches = 3 if st.repulsion > 0 else 2
    edit = (GuardEdit(guard_layers(ctx.model.unet, st.blocks), branches, st.spike_threshold, st.spike_scale)
            if st.spike_scale != 1 else None)
    context = (lambda: CrossAttentionInstrument(ctx.model.unet, edit=edit)) if edit else None
    sample = ThreeWay(ctx.guidance_scale, st.repulsion, edit) if branches == 3 else None
    guidance = ctx.guidance_scale if sample or edit is None else _Reporting(ctx.guidance_scale, edit)
    # sample_branches: rows per image in each sampling call (utils.evaluation.cost: 3 = 1.5 x plain generation)
    return Plan(ctx.noise, ctx.encode([prompt]), guidance, [prompt] * n, dict(sample_branches=branches), context,
                sample)


class _Reporting:
    """The run's constant guidance scale, carrying the edit's report (r = 0: the pair call with the edit)."""

    def __init__(self, scale, edit):
        self.scale, self.edit = scale, edit

    def __call__(self, i, t, out):
        return self.scale

    def report(self):
        return self.edit.report()


def _grid_repulsion(text):
    v = grid_float(text)
    if v < 0:
        raise ValueError("negative")
    return {"repulsion": v}


# Their README gives one setting (r = 2 with alpha = 0.3); the grid over r is this project's (docs/mitigation.md).
METHOD = Method("guard", GuardSettings, plan_guard, "repulsion", _grid_repulsion,
                [{"repulsion": v} for v in (0.5, 1.0, 2.0, 3.0, 4.0)],
                lambda s: f"r={s['repulsion']:g}, alpha={s['spike_scale']:g}", flag_prefix="guard_",
                title="guard (Zhao et al., ICML 2026: attractive-repulsive guidance, attention spikes attenuated)")
