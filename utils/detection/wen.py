"""wen: ||out(x_t, c) - out(x_t, empty)|| per generation at each of the first wen_steps steps (Wen et al., 2024; their
code takes the raw model output, which is eps for SD v1.4 and v for SD v2.0), from the shared pair forward."""
import dataclasses

from ..cli import positive_int
from ..models.denoisers import flat_norm
from .base import DifferenceSpace, Detector, option, output_difference, positive_fields, register


@dataclasses.dataclass(frozen=True)
class WenSettings(DifferenceSpace):
    """Options of Wen et al.'s detector (and wen_space, shared with be)."""
    wen_steps: int = option(50, type=positive_int, steps=True)  # wen: first steps measured (Table 1: first 1, 5 or 50)

    def __post_init__(self):
        super().__post_init__()
        positive_fields(self, ("wen_steps",))


@register
class Wen(Detector):
    name = "wen"
    Settings = WenSettings
    description = "||out(x_t, c) - out(x_t, empty)|| (mean over generations), per prompt and sampling step"

    def steps(self):
        return self.settings.wen_steps

    def trajectory(self):
        return self.settings.wen_steps

    def on_step(self, p, s):
        p.values[self.name][:, s.i] = flat_norm(output_difference(p, s, self.settings.wen_space)).cpu()
