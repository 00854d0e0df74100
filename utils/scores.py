"""Scores, score differences and Hessian-vector products of a diffusers UNet seen as a score function.

Notation (shapes): x is a batch of latents (B, C, H, W); a UNet call on [x; x] with embeddings [uncond; cond]
(2B, L, D) returns the model outputs of both branches (2B, C, H, W). With alpha_t = sqrt(abar_t) and
sigma_t = sqrt(1 - abar_t) the score of the noisy marginal is s(x, c) = -eps(x, c) / sigma_t.
"""
import contextlib

import torch
from torch.func import jvp

PREDICTION_TYPES = ("epsilon", "v_prediction")
V_SCORE_FORMS = ("correct", "reference")


def alpha_sigma(scheduler, t):
    """(alpha_t, sigma_t) as 0-dim float32 tensors for timestep t of a DDPM-family scheduler."""
    abar = scheduler.alphas_cumprod[int(t)]
    return torch.sqrt(abar), torch.sqrt(1 - abar)


def eps_from_output(out, x, alpha, sigma, prediction_type):
    """The noise prediction eps for a model output: itself for epsilon, alpha*v + sigma*x for v-prediction."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return alpha * out + sigma * x
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def score_from_output(out, x, alpha, sigma, prediction_type, v_score="correct"):
    """Score s = -eps/sigma from a model output (B, C, H, W).

    v_score="reference" reproduces the paper's code for v-prediction, (alpha*v - x)/sigma^2, which treats v as
    if it were x0; its score difference is -1/sigma times the correct one, so ||H_delta s_delta|| is 1/sigma^2
    times the correct value (a per-step constant; rankings at one step are unchanged).
    """
    if prediction_type == "v_prediction" and v_score == "reference":
        return (alpha * out - x) / sigma ** 2
    if v_score not in V_SCORE_FORMS:
        raise ValueError(f"v_score must be one of {V_SCORE_FORMS}, got {v_score!r}")
    return -eps_from_output(out, x, alpha, sigma, prediction_type) / sigma


def unet_pair(unet, x, t, embeds):
    """Model outputs of both branches at the same latents: UNet([x; x], t, embeds) -> (2B, C, H, W)."""
    return unet(torch.cat([x, x]), t, encoder_hidden_states=embeds, return_dict=False)[0]


def pair_score_fn(unet, t, embeds, alpha, sigma, prediction_type, v_score="correct"):
    """x (B, C, H, W) -> [s(x, uncond); s(x, cond)] (2B, C, H, W): the function whose Jacobian we probe."""

    def fn(x):
        xx = torch.cat([x, x])
        out = unet(xx, t, encoder_hidden_states=embeds, return_dict=False)[0]
        return score_from_output(out, xx, alpha, sigma, prediction_type, v_score)

    return fn


def score_difference(scores_pair):
    """s_delta = s(x, c) - s(x, uncond) from stacked [uncond; cond] scores (2B, ...) -> (B, ...)."""
    s_uc, s_c = scores_pair.chunk(2)
    return s_c - s_uc


@contextlib.contextmanager
def forward_ad_attention():
    """Route scaled-dot-product attention to the math kernel, the only one with forward-mode AD.

    The CPU flash kernel and the CUDA flash / memory-efficient kernels raise on dual tensors.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        yield


def low_precision_jvp(x):
    """Autocast to x's own half-precision dtype around a JVP on CUDA; a no-op for float32/float64 or on CPU.

    With bfloat16 weights on CUDA, some forward-AD formulas in current torch hand a float32 tensor to the next
    layer (seen on an H200: a dtype mismatch in the cross-attention's linear layer); autocast casts it back, so
    the JVP still runs in bfloat16, as the reference's did.
    """
    if x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=x.dtype)
    return contextlib.nullcontext()


def hvp_delta(score_pair, x, v):
    """H_delta v = J_cond v - J_uncond v with ONE forward-mode JVP of x -> [s(x, uncond); s(x, cond)].

    score_pair: function (B, C, H, W) -> (2B, C, H, W); x, v: (B, C, H, W). Returns (B, C, H, W).
    """
    with forward_ad_attention(), low_precision_jvp(x):
        _, tangent = jvp(score_pair, (x,), (v.to(x.dtype),))
    return score_difference(tangent)


def flat_norm(t):
    """Per-sample L2 norm over all non-batch entries: (B, ...) -> (B,)."""
    return t.reshape(t.shape[0], -1).float().norm(dim=1)

