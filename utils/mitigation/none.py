"""No mitigation: plain sampling (the 'before' of every comparison, and the prompts a gate does not flag)."""
import dataclasses

from .base import Method, Plan


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """`none` has no hyperparameters."""

    def to_dict(self):
        return {}


def plan_none(ctx, index, prompt, settings=None):
    n = ctx.noise.shape[0]
    return Plan(ctx.noise, ctx.encode([prompt]), ctx.guidance_scale, [prompt] * n)


METHOD = Method("none", NoSettings, plan_none, label=lambda s: "no mitigation")
