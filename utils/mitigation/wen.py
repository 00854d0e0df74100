"""Wen et al. (ICLR 2024): the prompt embedding optimized at the first step down to a target loss."""
import dataclasses

import torch

from .base import Method, Plan, is_count, is_finite, grid_float, hp, problems
from .sail import frozen
from ..cli import finite_float, nonneg_float, nonneg_int, positive_float
from ..models.denoisers import flat_norm


@dataclasses.dataclass(frozen=True)
class WenSettings:
    """Wen et al.'s inference-time mitigation (their inference_mem.py / local_sd_pipeline.aug_prompt).

    The loss is ||out(x_T, e) - out(x_T, empty)|| at the first DDIM timestep, over the n images' fixed initial
    noise; the conditional embedding e (all 77 positions but BOS) is optimized until the loss, evaluated before
    each update, is <= target_loss, for at most max_iters updates.
    """
    target_loss: float = hp(None, type=finite_float)  # l_target (None: the family's; their README's 3 on SD)
    lr: float = hp(0.05, type=positive_float)          # their --optim_lr (the paper: "Adam, lr 0.05")
    max_iters: int = hp(10, type=nonneg_int)           # their --optim_iters
    optimizer: str = hp("adamw", choices=["adamw", "adam"])  # adamw: their code (AdamW); adam: the paper's text
    weight_decay: float = hp(0.01, type=nonneg_float)  # AdamW's default, which their code keeps; unused by adam
    space: str = hp("output", choices=["output", "eps"])  # output: raw model output (v on v-models, theirs); eps
    loss: str = hp("joint", choices=["joint", "mean"])  # joint: one norm over all n images (theirs); mean: per image

    def __post_init__(self):
        problems([(self.target_loss is None or is_finite(self.target_loss), "target_loss must be a finite number"),
                  (is_finite(self.lr) and self.lr > 0, "lr must be a positive number"),
                  (is_count(self.max_iters) and self.max_iters >= 0, "max_iters must be an integer >= 0"),
                  (self.optimizer in ("adamw", "adam"), "optimizer must be adamw or adam"),
                  (is_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be a number >= 0"),
                  (self.space in ("output", "eps"), "space must be output or eps"),
                  (self.loss in ("joint", "mean"), "loss must be joint or mean")])

    def to_dict(self):
        return dataclasses.asdict(self)


def wen_loss(model, t, x_in, cond, settings):
    """Wen's objective at the doubled, scaled model input x_in (2n, ...) and a Conditioning of n rows: the norm of
    cond-minus-uncond (raw output or eps, per settings.space), jointly over the n images or their mean."""
    out = model.output(x_in, t, cond)
    if settings.space == "eps":
        out = model.eps(out, x_in, t)
    uc, c = out.chunk(2)
    d = (c - uc).float()
    return d.norm() if settings.loss == "joint" else flat_norm(d).mean()


def wen_embedding(model, cond, noise, settings, num_inference_steps=50):
    """Wen et al.'s prompt-embedding optimization of the text embedding of cond (a Conditioning of one row; the
    unconditional branch and any added conditions stay fixed); noise: (n, C, H, W) the initial noise that sampling
    will start from. Returns (the Conditioning with the optimized embedding (one row, detached), manifest record).

    Each iteration evaluates the loss of the current embedding and stops if it is <= target_loss (at the first,
    the original embedding is returned unchanged); otherwise one optimizer step with the gradient at position 0
    (BOS) zeroed. After max_iters updates the last embedding is returned without evaluating it, as their code.
    """
    st, n = settings, noise.shape[0]
    if st.target_loss is None:
        raise ValueError("Wen's target_loss is not set: take the family's value first (methods.with_family_defaults)")
    t = model.timesteps(num_inference_steps, device=noise.device)[0]
    x_in = model.scale_input(model.initial(torch.cat([noise, noise])), t)  # the sampler's first model input
    e = cond.cond.detach().clone().requires_grad_(True)
    opt = (torch.optim.AdamW([e], lr=st.lr, weight_decay=st.weight_decay) if st.optimizer == "adamw"
           else torch.optim.Adam([e], lr=st.lr))
    losses, reached, updates = [], False, 0
    with frozen(model.unet), torch.enable_grad():
        for _ in range(st.max_iters):
            loss = wen_loss(model, t, x_in, dataclasses.replace(cond, cond=e).expand(n), st)
            losses.append(float(loss.detach()))
            if losses[-1] <= st.target_loss:
                reached = True
                break
            opt.zero_grad()
            loss.backward()
            e.grad[:, 0] = 0
            opt.step()
            updates += 1
    rec = dict(wen_losses=losses, wen_updates=updates, reached_target=reached,
               search_unet_calls=len(losses), search_backward_calls=updates, search_batch=2 * n)
    return dataclasses.replace(cond, cond=e.detach()), rec


def plan_wen(ctx, index, prompt, settings):
    n = ctx.noise.shape[0]
    emb, rec = wen_embedding(ctx.model, ctx.encode([prompt]), ctx.noise, settings,
                             ctx.num_inference_steps)
    return Plan(ctx.noise, emb, ctx.guidance_scale, [prompt] * n, rec)


METHOD = Method("wen", WenSettings, plan_wen, "target_loss", lambda x: {"target_loss": grid_float(x)},
                label=lambda s: f"l_target={s['target_loss']:g}", flag_prefix="wen_",
                title="wen (Wen et al., ICLR 2024: their inference_mem.py)",
                family_defaults=(("target_loss", "wen_target_loss"),))
# the paper's grids differ per model family: the profiles' hparams 'grids' (utils.models.families)
