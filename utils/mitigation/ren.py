"""Ren et al. (ECCV 2024): cross-attention edit while sampling (summary tokens masked, the start token's logit
scaled by C on the conditional branch), through utils.models.attention."""
import dataclasses

from .base import Method, Plan, grid_float, hp, is_finite, problems
from ..cli import finite_float


@dataclasses.dataclass(frozen=True)
class RenSettings:
    """Ren et al.'s inference-time mitigation (renjie3/MemAttn: local_cmd_inference_time_mitigation.sh, the
    attention processor): in every cross-attention layer at every step, the logits of the summary tokens (after
    the prompt's first end-of-text token) are masked in both branches and the start token's logit is multiplied
    by C on the conditional branch. Their README's setting: C = 1.25 with the mask; the sharpness paper's grid:
    C in {1.1, 1.2, 1.25, 1.3, 1.5}."""
    factor: float = hp(1.25, type=finite_float)  # C, their --c1: multiplies the start token's logit (cond branch)
    # mask positions >= L = BOS + prompt + first EOS, as their --cross_attn_mask; --ren_no_mask turns it off
    mask: bool = hp(True, flag="--ren_no_mask", negate=True,
                    help="do not mask the summary tokens (their code masks them)")
    drop_first_eos: bool = False  # also mask the first end-of-text token (their --mask_length_minis1; off in README)

    def __post_init__(self):
        problems([(is_finite(self.factor), "factor must be a finite number"),
                  (isinstance(self.mask, bool), "mask must be true or false"),
                  (isinstance(self.drop_first_eos, bool), "drop_first_eos must be true or false")])

    def to_dict(self):
        return dataclasses.asdict(self)


def plan_ren(ctx, index, prompt, settings):
    """Sampling with Ren et al.'s attention edit installed on the UNet (utils.attention.RenEdit; removed after
    sampling, also after an error). Their code scales "odd batch rows", the conditional row only when n = 1; the
    edit here scales every conditional row. With C = 1 and no mask nothing is installed: plain sampling, bit for bit."""
    from ..models.attention import CrossAttentionInstrument, RenEdit, prompt_lengths
    n = ctx.noise.shape[0]
    length = prompt_lengths(ctx.tokenizer, [prompt])[0]
    edit = RenEdit(keep_len=length if settings.mask else None, factor=settings.factor, tokens=(0,),
                   drop_first_eos=settings.drop_first_eos)
    active = settings.mask or settings.factor != 1
    context = (lambda: CrossAttentionInstrument(ctx.model.unet, edit=edit)) if active else None
    return Plan(ctx.noise, ctx.encode([prompt]), ctx.guidance_scale, [prompt] * n,
                dict(prompt_length=length, kept_tokens=length - int(settings.drop_first_eos) if settings.mask
                     else None), context)


def _author(family):
    """Ren et al.'s text2img.py: EulerDiscreteScheduler (the model's own scheduler config) for
    stabilityai/stable-diffusion-2 (the sd2 family here), DDIM from the config otherwise."""
    euler = family.name == "sd2"
    return dict(sampler="euler" if euler else "ddim",
                source="renjie3/MemAttn text2img.py: " + ("EulerDiscreteScheduler on SD v2.0" if euler else
                                                          "DDIMScheduler from the model's config"))


# the sharpness paper's Appendix D: the same five C values for SD v1.4 and v2.0 (the demo uses them too)
METHOD = Method("ren", RenSettings, plan_ren, "factor", lambda x: {"factor": grid_float(x)},
                [{"factor": v} for v in (1.1, 1.2, 1.25, 1.3, 1.5)],
                lambda s: f"C={s['factor']:g}" + ("" if s.get("mask", True) else ", no mask"), flag_prefix="ren_",
                title="ren (Ren et al., ECCV 2024: their inference-time attention mitigation)", author=_author)
