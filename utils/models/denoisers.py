"""A diffusers UNet and its scheduler seen as a score function: scores, score differences, Hessian-vector products.

Notation (shapes): x is a batch of latents (B, C, H, W); a UNet call on [x; x] with embeddings [uncond; cond]
(2B, L, D) returns the model outputs of both branches (2B, C, H, W). With alpha_t = sqrt(abar_t) and
sigma_t = sqrt(1 - abar_t) the score of the noisy marginal is s(x, c) = -eps(x, c) / sigma_t, where
eps = output for epsilon-prediction and eps = alpha_t v + sigma_t x for v-prediction.

ScoreModel settles these conventions once (k-diffusion's external wrappers are the model): callers never branch on
the prediction type and never spell out the UNet call. The functions above it are the pure math it uses.
"""
import contextlib

import torch
from torch.func import jvp

from .loading import PREDICTION_TYPES
from .autodiff import forward_ad

V_SCORE_FORMS = ("correct", "reference")
FD_SCHEMES = ("forward", "central")
FD_PRECISIONS = ("model", "float32", "tf32")


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


def score_difference(scores_pair):
    """s_delta = s(x, c) - s(x, uncond) from stacked [uncond; cond] scores (2B, ...) -> (B, ...)."""
    s_uc, s_c = scores_pair.chunk(2)
    return s_c - s_uc


def reference_guidance_difference(out, x, alpha, sigma, prediction_type):
    """Cond-minus-uncond of a [uncond; cond] model output (2B, ...) in the space SAIL's reference code uses.

    epsilon: in eps space. v-prediction: in the reference's 'score' space -(alpha*v - x)/sigma, where x is the
    (2B, ...) model input; x cancels in the difference, so this is -alpha/sigma times the v difference.
    """
    if prediction_type == "v_prediction":
        out = -(alpha * out - x) / sigma
    uc, c = out.chunk(2)
    return c - uc


def flat_norm(t):
    """Per-sample L2 norm over all non-batch entries: (B, ...) -> (B,)."""
    return t.reshape(t.shape[0], -1).float().norm(dim=1)


class ScoreModel:
    """A UNet (callable with UNet2DConditionModel's signature) and a DDIM-family scheduler as a score model.

    v_score: 'correct' or 'reference' (see score_from_output). jvp_unet: optional copy of the UNet in another
    dtype (utils.models.jvp_unet_copy) that JVPs run through, inputs cast to its dtype. fd_unet: likewise for the
    finite-difference H_delta s_delta (hvp_delta_fd), e.g. a float32 copy of a bfloat16 model; fd_precision
    'tf32' lets those forwards use TF32 on CUDA. jvp_memory: a utils.jvp_memory.JvpMemory that bounds the JVP's
    working set (None: one unchunked JVP, as always). The prediction type is read from the scheduler's config
    and checked here, once.
    """

    def __init__(self, unet, scheduler, *, v_score="correct", jvp_unet=None, fd_unet=None, fd_precision="model",
                 jvp_memory=None):
        pred = scheduler.config.prediction_type
        if pred not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {pred!r}; expected one of {PREDICTION_TYPES}")
        if v_score not in V_SCORE_FORMS:
            raise ValueError(f"v_score must be one of {V_SCORE_FORMS}, got {v_score!r}")
        if fd_precision not in FD_PRECISIONS:
            raise ValueError(f"fd_precision must be one of {FD_PRECISIONS}, got {fd_precision!r}")
        self.unet, self.scheduler, self.prediction_type = unet, scheduler, pred
        self.v_score, self.jvp_unet = v_score, jvp_unet
        self.fd_unet, self.fd_precision, self.jvp_memory = fd_unet, fd_precision, jvp_memory

    def timesteps(self, num_inference_steps, device=None):
        """Set the scheduler's sampling schedule and return its timesteps (first = noisiest)."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    def alpha_sigma(self, t):
        return alpha_sigma(self.scheduler, t)

    def scale_input(self, x, t):
        return self.scheduler.scale_model_input(x, t)

    def output(self, x, t, embeds, unet=None):
        """Raw model output (B, C, H, W) for latents x (B, ...) and embeddings (B, L, D): the one UNet call site."""
        return (unet or self.unet)(x, t, encoder_hidden_states=embeds, return_dict=False)[0]

    def pair(self, x, t, embeds):
        """Outputs of both branches at the same latents: [x; x] with embeddings [uncond; cond] -> (2B, ...)."""
        return self.output(torch.cat([x, x]), t, embeds)

    def eps(self, out, x, t):
        """Noise predictions of outputs `out` at model inputs x (same shape)."""
        a, s = self.alpha_sigma(t)
        return eps_from_output(out, x, a, s, self.prediction_type)

    def score(self, out, x, t):
        """Scores (in the v_score form) of outputs `out` at model inputs x (same shape)."""
        a, s = self.alpha_sigma(t)
        return score_from_output(out, x, a, s, self.prediction_type, self.v_score)

    def score_delta(self, out, x, t):
        """s_delta (B, ...) from pair outputs `out` (2B, ...) at the pair's model input x (2B, ...)."""
        return score_difference(self.score(out, x, t))

    def pair_score_fn(self, t, embeds, unet=None):
        """x (B, C, H, W) -> [s(x, uncond); s(x, cond)] (2B, ...): the function whose Jacobian we probe."""
        a, s = self.alpha_sigma(t)

        def fn(x):
            xx = torch.cat([x, x])
            out = self.output(xx, t, embeds, unet)
            return score_from_output(out, xx, a, s, self.prediction_type, self.v_score)

        return fn

    def hvp_delta(self, x, t, embeds, v):
        """H_delta v = J_cond v - J_uncond v at x (B, ...) with ONE forward-mode JVP through the pair call.

        Runs through jvp_unet (inputs cast to its dtype) when one was given. With a jvp_memory cap whose plan is
        not the plain JVP, the JVP runs per group of generations and/or with the chunked attention
        (utils.jvp_memory; equal within float tolerance). Returns (B, ...)."""
        unet = self.jvp_unet
        if unet is not None:
            hi = next(unet.parameters()).dtype
            x, embeds, v = x.to(hi), embeds.to(hi), v.to(hi)
        plan = self.jvp_plan(x, embeds)
        if plan is None or plan.unchanged:
            fn = self.pair_score_fn(t, embeds, unet)
            with torch.no_grad(), forward_ad(x):
                _, tangent = jvp(fn, (x,), (v.to(x.dtype),))
            return score_difference(tangent)
        return torch.cat([self._hvp_rows(x, t, embeds, v, rows, unet, plan.query_chunk)
                          for rows in plan.row_slices()])

    def jvp_plan(self, x, embeds):
        """The utils.jvp_memory.JvpPlan of a JVP at x (B, C, H, W) with embeds (2B, L, D), or None without a cap."""
        if self.jvp_memory is None:
            return None
        unet = self.jvp_unet or self.unet
        return self.jvp_memory.plan(unet, x.shape[0], tuple(x.shape[-2:]), embeds.shape[1], x.dtype, x.device)

    def _hvp_rows(self, x, t, embeds, v, rows, unet, query_chunk):
        """H_delta v for the generations `rows` (a slice of x's B rows) in one JVP call, with the chunked
        attention (utils.jvp_memory) when query_chunk is set. Returns (len(rows), ...)."""
        from .jvp_memory import chunked_attention
        b = x.shape[0]
        e = torch.cat([embeds[:b][rows], embeds[b:][rows]])
        fn = self.pair_score_fn(t, e, unet)
        chunked = chunked_attention(unet or self.unet, query_chunk) if query_chunk else contextlib.nullcontext()
        with torch.no_grad(), forward_ad(x), chunked:
            _, tangent = jvp(fn, (x[rows],), (v[rows].to(x.dtype),))
        return score_difference(tangent)

    def hvp_delta_fd(self, x, t, embeds, h, s_delta=None, scheme="forward"):
        """H_delta s_delta by finite differences of s_delta along its own direction, per row (no forward AD).

        With u = s_delta / ||s_delta|| (unit norm over all latent entries of a row), H_delta s_delta =
        ||s_delta|| * H_delta u ~ ||s_delta|| * (s_delta(x + h u) - s_delta(x)) / h  (scheme 'forward'), or
        ||s_delta|| * (s_delta(x + h u) - s_delta(x - h u)) / (2 h)  (scheme 'central': one more forward,
        second-order truncation error). x: model input (B, C, H, W); embeds (2B, L, D) [uncond; cond]; h: the
        displacement's norm (a float, or a (B,) tensor: one per row); s_delta (B, ...): s_delta at x from a pair
        forward of the same UNet in the same precision (the detection step's shared forward), or None to compute
        it here (one more forward). Runs through fd_unet when one was given (inputs cast to its dtype), with
        TF32 matmuls/convolutions when fd_precision is 'tf32'. Plain forwards, so the fused attention kernels
        are used. Differences are taken in float32 (float64 for a float64 UNet); returns that dtype (B, ...). A row
        with s_delta = 0 gives 0.
        """
        if scheme not in FD_SCHEMES:
            raise ValueError(f"scheme must be one of {FD_SCHEMES}, got {scheme!r}")
        unet = self.fd_unet
        if unet is not None:
            lo = next(unet.parameters()).dtype
            x, embeds = x.to(lo), embeds.to(lo)
        w = torch.float32 if torch.finfo(x.dtype).bits < 32 else x.dtype  # the differences' dtype
        with torch.no_grad(), _tf32(self.fd_precision == "tf32" and x.device.type == "cuda"):
            if s_delta is None:
                s_delta = self.pair_score_delta(x, t, embeds, unet)
            s_delta = s_delta.to(w)
            shape = (-1,) + (1,) * (x.dim() - 1)
            norm = s_delta.flatten(1).norm(dim=1).view(shape)
            u = s_delta / norm.clamp_min(torch.finfo(w).tiny)
            hh = torch.as_tensor(h, dtype=w, device=x.device).reshape(-1).expand(x.shape[0]).view(shape)
            plus = self.pair_score_delta((x.to(w) + hh * u).to(x.dtype), t, embeds, unet).to(w)
            if scheme == "central":
                minus = self.pair_score_delta((x.to(w) - hh * u).to(x.dtype), t, embeds, unet).to(w)
                diff = (plus - minus) / (2 * hh)
            else:
                diff = (plus - s_delta) / hh
        return diff * norm

    def pair_score_delta(self, x, t, embeds, unet=None):
        """s_delta (B, ...) at model input x (B, ...) from one pair forward [x; x] with embeds [uncond; cond]."""
        xx = torch.cat([x, x])
        return self.score_delta(self.output(xx, t, embeds, unet), xx, t)

    def guided_step(self, out, t, x, guidance_scale):
        """One classifier-free-guided DDIM step (eta = 0) from latents x (B, ...) with pair outputs out (2B, ...).

        guidance_scale: a number, or a (B,) tensor of per-sample scales (w = 0: unconditional, 1: conditional)."""
        o_uc, o_c = out.chunk(2)
        if torch.is_tensor(guidance_scale):
            guidance_scale = guidance_scale.to(o_c.dtype).view(-1, *[1] * (o_c.dim() - 1))
        guided = o_uc + guidance_scale * (o_c - o_uc)
        return self.scheduler.step(guided, t, x, eta=0.0, return_dict=False)[0]

    def sample(self, x, embeds, num_inference_steps, guidance):
        """Classifier-free-guided DDIM sampling (eta = 0) from initial latents x (B, C, H, W): the denoising loop of
        StableDiffusionPipeline (same UNet batch [x; x], same arithmetic), with a guidance scale per step.

        embeds: (2B, L, D) [uncond; cond]. guidance: a number, or callable(i, t, out) -> a number or (B,) tensor for
        step i, where out is that step's pair output (2B, ...). Returns the final latents (B, C, H, W); call it
        under torch.no_grad()."""
        for i, t in enumerate(self.timesteps(num_inference_steps, device=x.device)):
            out = self.output(self.scale_input(torch.cat([x, x]), t), t, embeds)
            x = self.guided_step(out, t, x, guidance(i, t, out) if callable(guidance) else guidance)
        return x

    def sail_difference(self, out, x, t):
        """Cond-minus-uncond of pair outputs in SAIL's reference space (reference_guidance_difference)."""
        a, s = self.alpha_sigma(t)
        return reference_guidance_difference(out, x, a, s, self.prediction_type)


@contextlib.contextmanager
def _tf32(enabled):
    """Allow TF32 in CUDA matmuls and cuDNN convolutions inside the block (restored after); no-op if not enabled."""
    if not enabled:
        yield
        return
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv
