"""A rectified-flow model (SD3/SD3.5, Flux) seen as a denoiser: the velocity parametrization.

diffusers' flow-matching schedulers put x_sigma = (1 - sigma) x0 + sigma eps and the transformer predicts the
velocity v = eps - x0; the Euler step is x <- x + (sigma_next - sigma) v. From v (shapes as in
utils.models.denoisers: x and v (B, C, H, W)):
    eps_hat = x + (1 - sigma) v,   x0_hat = x - sigma v,   s = -eps_hat / sigma,
so s_delta = -((1 - sigma) / sigma) v_delta with v_delta = v(x, c) - v(x, uncond). At sigma = 1 (the first step
of every flow sampler) s = -x for every condition, so s_delta and every score-space metric vanish there.

FlowDenoiser keeps the Denoiser interface; what it probes is set by flow_space:
- 'velocity' (default): the probed function is v itself, so score_delta() is v_delta and hvp_delta(v_delta) is
  J_{v_delta} v_delta (one JVP; hvp_delta_fd the finite-difference form). For sigma < 1 this is
  (sigma / (1 - sigma))^2 H_delta s_delta, a per-step constant (docs/flow.md).
- 'score': the probed function is s = -(x + (1 - sigma) v) / sigma, giving H_delta s_delta itself; undefined at
  sigma = 1 (ValueError).
The timestep passed to the model is the scheduler's (sigma * num_train_timesteps); the schedule comes from the
pipeline's own functions (retrieve_timesteps, calculate_shift) so shift and dynamic shifting are the pipeline's.
"""
import torch

from .denoisers import Denoiser

FLOW_SPACES = ("velocity", "score")


def eps_from_velocity(v, x, sigma):
    """The noise estimate of a velocity output: x + (1 - sigma) v."""
    return x + (1 - sigma) * v


def x0_from_velocity(v, x, sigma):
    """The data estimate of a velocity output: x - sigma v."""
    return x - sigma * v


def flow_score(v, x, sigma):
    """The score of p_sigma from a velocity output: -(x + (1 - sigma) v) / sigma (ValueError at sigma = 1, where it
    is -x whatever the condition and every difference of it is 0)."""
    if float(sigma) >= 1:
        raise ValueError("the score-space flow metric (--flow_space score) is 0 at sigma = 1 (the first step of a "
                         "flow sampler): measure at a step with sigma < 1, or use --flow_space velocity")
    return -eps_from_velocity(v, x, sigma) / sigma


class FlowDenoiser(Denoiser):
    """A flow-matching transformer (velocity output) and a FlowMatchEulerDiscreteScheduler.

    flow_space: 'velocity' or 'score' (module docstring). image_seq_len: the transformer's token count of the image
    (needed only when the scheduler uses dynamic shifting: its mu). sigma_spacing: None to let the scheduler space
    the sigmas (StableDiffusion3Pipeline), or a function num_inference_steps -> sigmas (FluxPipeline's linspace).
    The other keywords are the Denoiser's (score_form must stay 'correct': the reference's v-"score" is an SD 2.x
    quirk)."""
    prediction_type = "flow"

    def __init__(self, unet, scheduler, *, flow_space="velocity", image_seq_len=None, sigma_spacing=None, **kwargs):
        if flow_space not in FLOW_SPACES:
            raise ValueError(f"flow_space must be one of {FLOW_SPACES}, got {flow_space!r}")
        if kwargs.get("score_form", "correct") != "correct":
            raise ValueError("the reference v-score form (--v_score reference) is not defined for flow models")
        if getattr(scheduler.config, "stochastic_sampling", False):
            raise ValueError("a stochastic flow-matching scheduler is not supported (the Euler step is deterministic)")
        super().__init__(unet, scheduler, **kwargs)
        self.flow_space, self.image_seq_len, self.sigma_spacing = flow_space, image_seq_len, sigma_spacing
        self._score = self._flow_score if flow_space == "score" else self._velocity

    # ---------------------------------------------------------------- the parametrization

    @staticmethod
    def _velocity(out, x, alpha, sigma):
        return out

    @staticmethod
    def _flow_score(out, x, alpha, sigma):
        return flow_score(out, x, sigma)

    def _eps(self, out, x, alpha, sigma):
        return eps_from_velocity(out, x, sigma)

    def _sail_space(self, out, x, alpha, sigma):
        return out  # SAIL's code form takes the raw model-output difference: here the velocity difference

    def authors_output(self, out, x, t):
        return out

    def x0(self, out, x, t):
        """Data estimates x0_hat = x - sigma v of outputs `out` at model inputs x (same shape)."""
        return x0_from_velocity(out, x, self.sigma(t))

    # ---------------------------------------------------------------- the schedule

    def timesteps(self, num_inference_steps, device=None):
        """The pipeline's schedule: retrieve_timesteps with the pipeline's sigmas and, under dynamic shifting, its
        mu = calculate_shift(image_seq_len, ...) from the scheduler's config. Returns the timesteps (first = sigma 1)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (calculate_shift,
                                                                                        retrieve_timesteps)
        cfg, kwargs = self.scheduler.config, {}
        if cfg.get("use_dynamic_shifting", False):
            if self.image_seq_len is None:
                raise ValueError("this scheduler shifts its sigmas by the image size: the denoiser needs image_seq_len")
            kwargs["mu"] = calculate_shift(self.image_seq_len, cfg.get("base_image_seq_len", 256),
                                           cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                           cfg.get("max_shift", 1.16))
        sigmas = self.sigma_spacing(num_inference_steps) if self.sigma_spacing else None
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, **kwargs)
        return timesteps

    def index(self, t):
        """The schedule index of timestep t (as the scheduler's own step() finds it)."""
        return self.scheduler.index_for_timestep(t)

    def sigma(self, t):
        """sigma at timestep t, a 0-dim float32 tensor (the scheduler's own value)."""
        return self.scheduler.sigmas[self.index(t)]

    def alpha_sigma(self, t):
        """(1 - sigma, sigma): the coefficients of x0 and eps in x_sigma."""
        s = self.sigma(t)
        return 1 - s, s

    def scale_input(self, x, t):
        return x  # flow pipelines feed the latents unscaled

    # ---------------------------------------------------------------- model calls

    def call(self, model, x, t, kwargs):
        """One transformer call on x (N, ...) with the conditioning keywords of N rows (SD3Transformer2DModel's
        signature: encoder_hidden_states and the pooled projections; the timestep broadcast to N rows, as the
        pipeline). Families with another signature (Flux) override it."""
        added = kwargs.pop("added_cond_kwargs", {})
        return model(hidden_states=x, timestep=t.expand(x.shape[0]), **kwargs, **added, return_dict=False)[0]

    def output(self, x, t, cond, unet=None):
        return self.call(unet or self.unet, x, t, cond.stacked())

    def branch_output(self, x, t, cond, which, unet=None):
        return self.call(unet or self.unet, x, t, cond.branch(which))

    def jvp_plan(self, x, cond):
        """The utils.models.jvp_memory.JvpPlan of a JVP at latents x (B, C, h, w) with cond (context (B, L, D)), or
        None without a cap. The planner reads the transformer's config (joint attention over the (h / p)(w / p)
        image tokens and the L text tokens); the chunked plans run through its joint-attention processor."""
        if self.jvp_memory is None:
            return None
        return self.jvp_memory.plan(self.jvp_unet or self.unet, x.shape[0], self.latent_grid(x), cond.cond.shape[1],
                                    x.dtype, x.device)

    def latent_grid(self, x):
        """(h, w) of the VAE latents behind model inputs x: SD3 takes them as they are, (B, C, h, w). A family whose
        transformer takes packed tokens (Flux: (B, N, 64)) overrides this."""
        if x.dim() != 4:
            raise ValueError(f"latents of shape {tuple(x.shape)} are packed: the family's denoiser must give the "
                             "latent grid (latent_grid) for the JVP memory planner")
        return tuple(x.shape[-2:])

    # ---------------------------------------------------------------- sampling

    def guided_step(self, out, t, x, guidance_scale):
        """One classifier-free-guided Euler step x + (sigma_next - sigma) v_guided from latents x (B, ...) with pair
        outputs out (2B, ...): the scheduler's arithmetic (float32 update, cast back to the output's dtype), with the
        step found from t rather than from the scheduler's step counter, so a step may be taken at any t of the
        schedule. guidance_scale: a number or a (B,) tensor."""
        o_uc, o_c = out.chunk(2)
        if torch.is_tensor(guidance_scale):
            guidance_scale = guidance_scale.to(o_c.dtype).view(-1, *[1] * (o_c.dim() - 1))
        guided = o_uc + guidance_scale * (o_c - o_uc)
        i = self.index(t)
        dt = self.scheduler.sigmas[i + 1] - self.scheduler.sigmas[i]
        return (x.to(torch.float32) + dt * guided).to(guided.dtype)
