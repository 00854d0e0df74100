"""le: entropy of the head- and query-averaged cross-attention over the 77 tokens at the first step in one layer
(Ren et al., 2024; forward index 3 in SD v1.4), read by the shared attention instrument."""
import dataclasses

from ..cli import nonneg_int
from ..models import attention as A
from .base import Detector, attention_layers, option, register


@dataclasses.dataclass(frozen=True)
class LeSettings:
    """Options of Ren et al.'s layer entropy."""
    le_layer: int = option(None, type=nonneg_int, help=(  # le: forward index of the layer; None: the family's
        "le: forward index of the cross-attention layer (default: the model family's; Ren et al.'s 3 = "
        "down_blocks.1.attentions.1 on SD 1.x/2.x, the same rule's layer on SDXL: docs/models.md)"))

    def __post_init__(self):
        if self.le_layer is not None and (not isinstance(self.le_layer, int) or self.le_layer < 0):
            raise ValueError("le_layer must be a non-negative integer")


@register
class Le(Detector):
    name = "le"
    Settings = LeSettings
    description = "entropy of the head- and query-averaged cross-attention of one layer at the first step (Ren et al.)"

    def trajectory(self):
        return 1

    def check(self):
        missing = [] if self.settings.le_layer is not None else ["le needs le_layer (detect_mem.py takes the "
                                                                 "model family's)"]
        return super().check() + missing

    def check_model(self, pipe, size):
        A.select_layers(attention_layers(pipe.unet), [self.settings.le_layer])  # raises for a missing layer

    def attention(self, unet, prompt_lengths, n):
        A.select_layers(attention_layers(unet), [self.settings.le_layer])
        return A.TokenRequest(steps=[0], layers=[self.settings.le_layer]), None

    def finish(self, p, images):
        p.values[self.name][:, 0] = A.le_score(p.instrument.token_dists, layer=self.settings.le_layer, step=0).float()
