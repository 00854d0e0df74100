"""ae: Ren et al. (2024): entropy of the layer-averaged cross-attention over the 77 tokens averaged over the last T/5
steps, plus the change of the summary-token (first EOS onwards) entropy from the first step to those steps; read
by the shared attention instrument in all layers."""
import torch

from ..models import attention as A
from .base import Detector, attention_layers, register


@register
class Ae(Detector):
    name = "ae"
    description = ("mean entropy over the last T/5 steps of the layer-averaged cross-attention plus the change of the "
                   "summary-token entropy from the first step (Ren et al.)")

    def check_model(self, pipe, size):
        attention_layers(pipe.unet)

    def attention(self, unet, prompt_lengths, n):
        attention_layers(unet)
        if prompt_lengths is None:
            raise ValueError("ae and be need the prompts' token counts (prompt_lengths)")
        t_end = self.sampling.num_inference_steps
        return A.TokenRequest(steps=[0] + list(range(t_end - max(1, t_end // 5), t_end))), None

    def finish(self, p, images):
        start = torch.tensor(p.prompt_lengths).repeat_interleave(p.n) - 1  # first EOS, per cond row
        p.values[self.name][:, 0] = A.ae_score(p.instrument.token_dists, self.sampling.num_inference_steps,
                                               start).float()
