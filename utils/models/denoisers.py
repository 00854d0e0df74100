"""A diffusion model seen as a denoiser with a score: the one place that knows the model's parametrization.

Notation (shapes): x is a batch of latents (B, C, H, W); the paired call on [x; x] with a
utils.models.conditioning.Conditioning of B rows per branch returns the model outputs of both branches, unconditional
first, (2B, C, H, W). With alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t) the score of the noisy marginal is
s(x, c) = -eps(x, c) / sigma_t.

The prediction is settled by subclass, once (k-diffusion's wrappers are the example): EpsDenoiser (eps = output)
and VDenoiser (eps = alpha_t v + sigma_t x). `denoiser()` picks the subclass from the scheduler's config; callers
never branch on a prediction type and never spell out the model call. The reference implementation's quirks are
small named strategies: its v-"score" (score_form='reference') and SAIL's difference space (sail_difference).
The functions above the classes are the pure math they use.
"""
import contextlib
import inspect

import torch
from torch.func import jvp

from .autodiff import forward_ad

SCORE_FORMS = ("correct", "reference")
V_SCORE_FORMS = SCORE_FORMS  # the --v_score choices
FD_SCHEMES = ("forward", "central")
FD_PRECISIONS = ("model", "float32", "tf32")


def alpha_sigma(scheduler, t):
    """(alpha_t, sigma_t) as 0-dim float32 tensors for timestep t of a DDPM-family scheduler."""
    abar = scheduler.alphas_cumprod[int(t)]
    return torch.sqrt(abar), torch.sqrt(1 - abar)


def eps_from_v(v, x, alpha, sigma):
    """The noise prediction of a v-prediction output: alpha*v + sigma*x."""
    return alpha * v + sigma * x


def reference_v_score(v, x, alpha, sigma):
    """The reference code's 'score' of a v-prediction output, (alpha*v - x)/sigma^2: it treats v as if it were x0.
    Its score difference is -1/sigma times the correct one, so ||H_delta s_delta|| is 1/sigma^2 times the correct
    value (a per-step constant; rankings at one step are unchanged)."""
    return (alpha * v - x) / sigma ** 2


def score_difference(scores_pair):
    """s_delta = s(x, c) - s(x, uncond) from stacked [uncond; cond] scores (2B, ...) -> (B, ...)."""
    s_uc, s_c = scores_pair.chunk(2)
    return s_c - s_uc


def flat_norm(t):
    """Per-sample L2 norm over all non-batch entries: (B, ...) -> (B,)."""
    return t.reshape(t.shape[0], -1).float().norm(dim=1)


def denoiser(unet, scheduler, **kwargs):
    """The Denoiser subclass for the scheduler's prediction type (ValueError for one that is not supported)."""
    pred = scheduler.config.prediction_type
    cls = PREDICTIONS.get(pred)
    if cls is None:
        raise ValueError(f"unsupported prediction_type {pred!r}; expected one of {tuple(PREDICTIONS)}")
    return cls(unet, scheduler, **kwargs)


class Denoiser:
    """A denoiser (callable with UNet2DConditionModel's signature) and a DDIM-family scheduler as a score model.

    Subclasses settle the prediction: eps(out, x, t) and the reference's output spaces. score_form: 'correct'
    (s = -eps/sigma) or 'reference' (the reference's v-"score", reference_v_score; the same as 'correct' for
    epsilon models). jvp_unet: optional copy of the model in another dtype (utils.models.autodiff.jvp_unet_copy)
    that JVPs run through, inputs cast to its dtype. fd_unet: likewise for the finite-difference H_delta s_delta
    (hvp_delta_fd), e.g. a float32 copy of a bfloat16 model; fd_precision 'tf32' lets those forwards use TF32 on
    CUDA. jvp_memory: a utils.models.jvp_memory.JvpMemory that bounds the JVP's working set (None: one unchunked
    JVP, as always).
    """
    prediction_type = None  # the scheduler config's name, recorded in result files

    def __init__(self, unet, scheduler, *, score_form="correct", jvp_unet=None, fd_unet=None, fd_precision="model",
                 jvp_memory=None):
        if score_form not in SCORE_FORMS:
            raise ValueError(f"score_form must be one of {SCORE_FORMS}, got {score_form!r}")
        if fd_precision not in FD_PRECISIONS:
            raise ValueError(f"fd_precision must be one of {FD_PRECISIONS}, got {fd_precision!r}")
        self.unet, self.scheduler = unet, scheduler
        self.score_form, self.jvp_unet = score_form, jvp_unet
        self.fd_unet, self.fd_precision, self.jvp_memory = fd_unet, fd_precision, jvp_memory
        self._score = self._reference_score if score_form == "reference" else self._correct_score
        # DDIM's step takes eta (0: deterministic, as the pipeline's default); DPM-Solver's and Euler's do not
        # (utils.models.samplers), and the pipeline passes it only to a step that accepts it
        step = getattr(scheduler, "step", None)
        self._step_kwargs = {"eta": 0.0} if step is None or "eta" in inspect.signature(step).parameters else {}

    # ---------------------------------------------------------------- the parametrization (subclasses)

    def _eps(self, out, x, alpha, sigma):
        raise NotImplementedError

    def _reference_score(self, out, x, alpha, sigma):
        raise NotImplementedError

    def _sail_space(self, out, x, alpha, sigma):
        raise NotImplementedError

    def authors_output(self, out, x, t):
        """The output space of the baselines' released code (anisotropy): the raw output for epsilon models, the
        reference's v-"score" (alpha v - x)/sigma^2 for v-prediction."""
        raise NotImplementedError

    def _correct_score(self, out, x, alpha, sigma):
        return -self._eps(out, x, alpha, sigma) / sigma

    # ------------------------------------------------------------------------------- conversions

    def timesteps(self, num_inference_steps, device=None):
        """Set the scheduler's sampling schedule and return its timesteps (first = noisiest)."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    def alpha_sigma(self, t):
        return alpha_sigma(self.scheduler, t)

    def initial(self, x):
        """The sampler's starting latents for unit-variance noise x (B, ...): x times the scheduler's
        init_noise_sigma, as the pipeline's prepare_latents (call after timesteps(): Euler's depends on the
        schedule). DDIM's and DPM-Solver's is 1: x itself, the same tensor."""
        s = getattr(self.scheduler, "init_noise_sigma", 1)
        return x if not torch.is_tensor(s) and s == 1 else x * s

    def scale_input(self, x, t):
        return self.scheduler.scale_model_input(x, t)

    def eps(self, out, x, t):
        """Noise predictions of outputs `out` at model inputs x (same shape)."""
        a, s = self.alpha_sigma(t)
        return self._eps(out, x, a, s)

    def score(self, out, x, t):
        """Scores (in the score_form) of outputs `out` at model inputs x (same shape)."""
        a, s = self.alpha_sigma(t)
        return self._score(out, x, a, s)

    def score_at(self, out, x, alpha, sigma):
        """Scores (in the score_form) with given alpha_t, sigma_t (e.g. float64 ones of a closed-form model)."""
        return self._score(out, x, alpha, sigma)

    def score_delta(self, out, x, t):
        """s_delta (B, ...) from pair outputs `out` (2B, ...) at the pair's model input x (2B, ...)."""
        return score_difference(self.score(out, x, t))

    def sail_difference(self, out, x, t):
        """Cond-minus-uncond of pair outputs (2B, ...) at model inputs x (2B, ...) in the space SAIL's reference
        code uses (epsilon: eps; v-prediction: its 'score' -(alpha v - x)/sigma, -alpha/sigma times the v
        difference since x cancels). Returns (B, ...)."""
        a, s = self.alpha_sigma(t)
        uc, c = self._sail_space(out, x, a, s).chunk(2)
        return c - uc

    # --------------------------------------------------------------------------------- model calls

    def output(self, x, t, cond, unet=None, branches=None):
        """Raw outputs (2B, C, H, W) of the paired call: x (2B, ...) holds [x_uncond; x_cond] model inputs and
        cond (a Conditioning of B rows) both branches' conditions. The one call site of the model. branches: other
        row blocks than ('uncond', 'cond'), e.g. GUARD's ('uncond', 'cond', 'cond') with x of 3B rows."""
        kwargs = cond.stacked() if branches is None else cond.stacked_as(branches)
        return (unet or self.unet)(x, t, **kwargs, return_dict=False)[0]

    def branch_output(self, x, t, cond, which, unet=None):
        """Raw outputs (B, ...) of one branch ('cond' or 'uncond') at model inputs x (B, ...)."""
        return (unet or self.unet)(x, t, **cond.branch(which), return_dict=False)[0]

    def pair(self, x, t, cond):
        """Outputs of both branches at the same latents: [x; x] -> (2B, ...)."""
        return self.output(torch.cat([x, x]), t, cond)

    def pair_score_fn(self, t, cond, unet=None):
        """x (B, C, H, W) -> [s(x, uncond); s(x, cond)] (2B, ...): the function whose Jacobian we probe."""
        a, s = self.alpha_sigma(t)

        def fn(x):
            xx = torch.cat([x, x])
            return self._score(self.output(xx, t, cond, unet), xx, a, s)

        return fn

    def branch_score_fn(self, t, cond, which, unet=None):
        """x (B, ...) -> s(x, branch) (B, ...) for which = 'cond' or 'uncond' (half the cost of the pair)."""
        return lambda x: self.score(self.branch_output(x, t, cond, which, unet), x, t)

    def pair_score_delta(self, x, t, cond, unet=None):
        """s_delta (B, ...) at model input x (B, ...) from one pair forward [x; x]."""
        xx = torch.cat([x, x])
        return self.score_delta(self.output(xx, t, cond, unet), xx, t)

    # ------------------------------------------------------------------------ H_delta products

    def hvp_delta(self, x, t, cond, v):
        """H_delta v = J_cond v - J_uncond v at x (B, ...) with ONE forward-mode JVP through the pair call.

        Runs through jvp_unet (inputs cast to its dtype) when one was given. With a jvp_memory cap whose plan is
        not the plain JVP, the JVP runs per group of generations and/or with the chunked attention
        (utils.models.jvp_memory; equal within float tolerance). Returns (B, ...)."""
        unet = self.jvp_unet
        if unet is not None:
            hi = next(unet.parameters()).dtype
            x, cond, v = x.to(hi), cond.to(hi), v.to(hi)
        plan = self.jvp_plan(x, cond)
        if plan is None or plan.unchanged:
            fn = self.pair_score_fn(t, cond, unet)
            with torch.no_grad(), forward_ad(x):
                _, tangent = jvp(fn, (x,), (v.to(x.dtype),))
            return score_difference(tangent)
        return torch.cat([self._hvp_rows(x, t, cond, v, rows, unet, plan.query_chunk)
                          for rows in plan.row_slices()])

    def jvp_plan(self, x, cond):
        """The utils.models.jvp_memory.JvpPlan of a JVP at x (B, C, H, W) with cond, or None without a cap."""
        if self.jvp_memory is None:
            return None
        unet = self.jvp_unet or self.unet
        return self.jvp_memory.plan(unet, x.shape[0], tuple(x.shape[-2:]), cond.cond.shape[1], x.dtype, x.device)

    def _hvp_rows(self, x, t, cond, v, rows, unet, query_chunk):
        """H_delta v for the generations `rows` (a slice of x's B rows) in one JVP call, with the chunked
        attention (utils.models.jvp_memory) when query_chunk is set. Returns (len(rows), ...)."""
        from .jvp_memory import chunked_attention
        fn = self.pair_score_fn(t, cond.rows(rows), unet)
        chunked = chunked_attention(unet or self.unet, query_chunk) if query_chunk else contextlib.nullcontext()
        with torch.no_grad(), forward_ad(x), chunked:
            _, tangent = jvp(fn, (x[rows],), (v[rows].to(x.dtype),))
        return score_difference(tangent)

    def hvp_delta_fd(self, x, t, cond, h, s_delta=None, scheme="forward"):
        """H_delta s_delta by finite differences of s_delta along its own direction, per row (no forward AD).

        With u = s_delta / ||s_delta|| (unit norm over all latent entries of a row), H_delta s_delta =
        ||s_delta|| * H_delta u ~ ||s_delta|| * (s_delta(x + h u) - s_delta(x)) / h  (scheme 'forward'), or
        ||s_delta|| * (s_delta(x + h u) - s_delta(x - h u)) / (2 h)  (scheme 'central': one more forward,
        second-order truncation error). x: model input (B, C, H, W); cond: Conditioning of B rows; h: the
        displacement's norm (a float, or a (B,) tensor: one per row); s_delta (B, ...): s_delta at x from a pair
        forward of the same model in the same precision (the detection step's shared forward), or None to compute
        it here (one more forward). Runs through fd_unet when one was given (inputs cast to its dtype), with
        TF32 matmuls/convolutions when fd_precision is 'tf32'. Plain forwards, so the fused attention kernels
        are used. Differences are taken in float32 (float64 for a float64 model); returns that dtype (B, ...). A
        row with s_delta = 0 gives 0.
        """
        if scheme not in FD_SCHEMES:
            raise ValueError(f"scheme must be one of {FD_SCHEMES}, got {scheme!r}")
        unet = self.fd_unet
        if unet is not None:
            lo = next(unet.parameters()).dtype
            x, cond = x.to(lo), cond.to(lo)
        w = torch.float32 if torch.finfo(x.dtype).bits < 32 else x.dtype  # the differences' dtype
        with torch.no_grad(), _tf32(self.fd_precision == "tf32" and x.device.type == "cuda"):
            if s_delta is None:
                s_delta = self.pair_score_delta(x, t, cond, unet)
            s_delta = s_delta.to(w)
            shape = (-1,) + (1,) * (x.dim() - 1)
            norm = s_delta.flatten(1).norm(dim=1).view(shape)
            u = s_delta / norm.clamp_min(torch.finfo(w).tiny)
            hh = torch.as_tensor(h, dtype=w, device=x.device).reshape(-1).expand(x.shape[0]).view(shape)
            plus = self.pair_score_delta((x.to(w) + hh * u).to(x.dtype), t, cond, unet).to(w)
            if scheme == "central":
                minus = self.pair_score_delta((x.to(w) - hh * u).to(x.dtype), t, cond, unet).to(w)
                diff = (plus - minus) / (2 * hh)
            else:
                diff = (plus - s_delta) / hh
        return diff * norm

    # -------------------------------------------------------------------------------- sampling

    def guided_step(self, out, t, x, guidance_scale):
        """One classifier-free-guided DDIM step (eta = 0) from latents x (B, ...) with pair outputs out (2B, ...).

        guidance_scale: a number, or a (B,) tensor of per-sample scales (w = 0: unconditional, 1: conditional)."""
        o_uc, o_c = out.chunk(2)
        if torch.is_tensor(guidance_scale):
            guidance_scale = guidance_scale.to(o_c.dtype).view(-1, *[1] * (o_c.dim() - 1))
        guided = o_uc + guidance_scale * (o_c - o_uc)
        return self.step(guided, t, x)

    def step(self, guided, t, x):
        """One scheduler step from latents x (B, ...) with the guided prediction (B, ...) (DDIM: eta = 0)."""
        return self.scheduler.step(guided, t, x, **self._step_kwargs, return_dict=False)[0]

    def sample(self, x, cond, num_inference_steps, guidance):
        """Classifier-free-guided sampling with the scheduler (DDIM: eta = 0) from unit-variance initial latents x
        (B, C, H, W), scaled by the scheduler's init_noise_sigma (self.initial): the denoising loop of
        StableDiffusionPipeline (same batch [x; x], same arithmetic), with a guidance scale per step.

        cond: Conditioning of B rows. guidance: a number, or callable(i, t, out) -> a number or (B,) tensor for
        step i, where out is that step's pair output (2B, ...). Returns the final latents (B, C, H, W); call it
        under torch.no_grad()."""
        timesteps = self.timesteps(num_inference_steps, device=x.device)
        x = self.initial(x)
        for i, t in enumerate(timesteps):
            out = self.output(self.scale_input(torch.cat([x, x]), t), t, cond)
            x = self.guided_step(out, t, x, guidance(i, t, out) if callable(guidance) else guidance)
        return x


class EpsDenoiser(Denoiser):
    """epsilon-prediction: the output is eps (SD v1.x, SD 2.x base)."""
    prediction_type = "epsilon"

    def _eps(self, out, x, alpha, sigma):
        return out

    def _reference_score(self, out, x, alpha, sigma):
        return self._correct_score(out, x, alpha, sigma)

    def _sail_space(self, out, x, alpha, sigma):
        return out

    def authors_output(self, out, x, t):
        return out


class VDenoiser(Denoiser):
    """v-prediction: the output is v = alpha*eps - sigma*x0, so eps = alpha*v + sigma*x (SD 2.0/2.1 768)."""
    prediction_type = "v_prediction"

    def _eps(self, out, x, alpha, sigma):
        return eps_from_v(out, x, alpha, sigma)

    def _reference_score(self, out, x, alpha, sigma):
        return reference_v_score(out, x, alpha, sigma)

    def _sail_space(self, out, x, alpha, sigma):
        return -(alpha * out - x) / sigma

    def authors_output(self, out, x, t):
        a, s = self.alpha_sigma(t)
        return reference_v_score(out, x, a, s)


PREDICTIONS = {"epsilon": EpsDenoiser, "v_prediction": VDenoiser}


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
