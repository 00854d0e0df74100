"""CFG delay (Jain et al., CVPR 2025): no guidance until a transition point (static timestep or dynamic rule)."""
import dataclasses
from typing import Optional

import torch

from .base import Method, Plan, grid_float, hp, is_finite, problems
from ..cli import finite_float
from ..models.denoisers import flat_norm


CFG_RULES = ("static", "dynamic")


@dataclasses.dataclass(frozen=True)
class CfgDelaySettings:
    """Jain et al.'s delayed classifier-free guidance (SonyResearch/mitigating_memorization).

    static: steps whose timestep t > transition use w_pre, the others w_post (generate_test_dataset_stp.py).
    dynamic: per image, d_j = ||out_uncond - out_cond|| at step j; guidance switches to w_post at the first step
    j with d_j > d_{j-1} and d_{j-2} > d_{j-1} (one step after the first strict local minimum; that step included;
    generate_test_dataset_dtp.py). w_pre None: their value, 0 for static (unconditional) and 1 for dynamic
    (conditional only). A negative w_pre is their opposite guidance (README: -2 until t = 650).
    """
    rule: str = hp("static", choices=CFG_RULES)  # static: a timestep; dynamic: per image, after the first minimum
    transition: float = hp(500.0, type=finite_float)  # static: steps with t > it use w_pre (not a step index)
    w_pre: Optional[float] = hp(None, type=finite_float)  # guidance before (None: 0 static, 1 dynamic; < 0: opposite)
    w_post: float = hp(7.5, type=finite_float)  # guidance after the transition (the harness's guidance scale)

    def __post_init__(self):
        problems([(self.rule in CFG_RULES, f"rule must be one of {', '.join(CFG_RULES)}"),
                  (is_finite(self.transition), "transition must be a finite timestep"),
                  (self.w_pre is None or is_finite(self.w_pre), "w_pre must be a finite number"),
                  (is_finite(self.w_post), "w_post must be a finite number")])

    @property
    def pre_scale(self):
        return self.w_pre if self.w_pre is not None else (0.0 if self.rule == "static" else 1.0)

    def to_dict(self):
        return dataclasses.asdict(self)


class StaticDelay:
    """Guidance w_pre while the timestep t > transition, then w_post (Jain's static transition point)."""

    def __init__(self, transition, w_pre, w_post):
        self.transition, self.w_pre, self.w_post, self.pre_steps = transition, w_pre, w_post, 0

    def __call__(self, i, t, out):
        if float(t) > self.transition:
            self.pre_steps += 1
            return self.w_pre
        return self.w_post

    def report(self):
        return dict(pre_steps=self.pre_steps)


class DynamicDelay:
    """Jain's dynamic transition point, per image: w_pre until one step after the first strict local minimum of
    d_j = ||out_uncond - out_cond|| (flattened per image), w_post from that step on. Never fires on a plateau;
    the earliest firing step is 2 (the previous values start at -1, as their code)."""

    def __init__(self, w_pre, w_post):
        self.w_pre, self.w_post = w_pre, w_post
        self.prev = self.prev2 = self.fired = None
        self.fire_step, self.fire_t = [], []

    def __call__(self, i, t, out):
        uc, c = out.chunk(2)
        d = flat_norm(uc - c)
        if self.fired is None:
            self.prev = self.prev2 = torch.full_like(d, -1.0)
            self.fired = torch.zeros_like(d, dtype=torch.bool)
            self.fire_step, self.fire_t = [None] * d.numel(), [None] * d.numel()
        new = ~self.fired & (d > self.prev) & (self.prev2 > self.prev)
        for k in torch.where(new)[0].tolist():
            self.fire_step[k], self.fire_t[k] = i, int(t)
        self.fired = self.fired | new
        self.prev2, self.prev = self.prev, d
        return torch.full_like(d, float(self.w_pre)).masked_fill(self.fired, float(self.w_post))

    def report(self):
        return dict(transition_step=self.fire_step, transition_t=self.fire_t)


def plan_cfg_delay(ctx, index, prompt, settings):
    n = ctx.noise.shape[0]
    rule = (StaticDelay(settings.transition, settings.pre_scale, settings.w_post) if settings.rule == "static"
            else DynamicDelay(settings.pre_scale, settings.w_post))
    return Plan(ctx.noise, ctx.encode([prompt]), rule, [prompt] * n)


def _grid_transition(text):
    return {"rule": "dynamic"} if text.strip() == "dynamic" else {"rule": "static", "transition": grid_float(text)}


def _sort_key(s):
    """Static settings by transition, the dynamic rule last."""
    return (s.get("rule") == "dynamic", s.get("transition") or 0.0, s.get("w_pre") or 0.0)


# Jain et al.'s settings (README): static transition at t = 500, 600, 700 with no guidance before, the opposite-
# guidance variant (-2 until 650), and the dynamic rule; their code uses these on every model.
_CFG_GRID = [{"rule": "static", "transition": 500.0, "w_pre": 0.0}, {"rule": "static", "transition": 600.0,
             "w_pre": 0.0}, {"rule": "static", "transition": 700.0, "w_pre": 0.0},
             {"rule": "static", "transition": 650.0, "w_pre": -2.0}, {"rule": "dynamic", "w_pre": None}]

METHOD = Method("cfg_delay", CfgDelaySettings, plan_cfg_delay, "transition", _grid_transition, _CFG_GRID,
                lambda s: "dynamic" if s["rule"] == "dynamic" else
                f"t={s['transition']:g}, w={0.0 if s['w_pre'] is None else s['w_pre']:g}",
                sort_key=_sort_key, flag_prefix="cfg_", title="cfg_delay (Jain et al., CVPR 2025)",
                author=lambda family: dict(sampler="dpmsolver", source="SonyResearch/mitigating_memorization "
                                           "generate_test_dataset_stp.py/_dtp.py: DPMSolverMultistepScheduler from "
                                           "the model's scheduler config, every model"))
