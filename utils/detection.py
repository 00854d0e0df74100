"""Sharpness-based memorization detection: ||H_delta s_delta|| at the first sampling steps (Jeon et al., 2025)."""
import torch


def initial_latents(pipe, n, seed, height=None, width=None, dtype=None, device=None):
    """Initial noise exactly as the pipeline draws it with no generator, after torch.manual_seed(seed).

    Returns (n, C, H/f, W/f) latents scaled by the scheduler's init_noise_sigma.
    """
    height = height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    torch.manual_seed(seed)
    return pipe.prepare_latents(n, pipe.unet.config.in_channels, height, width,
                                dtype or pipe.unet.dtype, device or pipe.unet.device, None)


def cfg_embeddings(cond, uncond, n):
    """[uncond x K*n; cond_1 x n, ..., cond_K x n] for K prompts with n generations each.

    cond: (K, L, D) prompt embeddings; uncond: (1, L, D) embedding of the empty prompt. Returns (2*K*n, L, D).
    """
    k = cond.shape[0]
    return torch.cat([uncond.expand(k * n, -1, -1), cond.repeat_interleave(n, dim=0)])


def sharpness_scores(model, cond, uncond, latents, *, num_inference_steps=50, hvp_sampling_num=1,
                     guidance_scale=7.5):
    """Detection metric ||H_delta s_delta|| for K prompts x n generations at the first S sampling steps.

    model: utils.scores.ScoreModel (its scheduler's timesteps are set here); cond (K, L, D), uncond (1, L, D);
    latents (n, C, H, W), the same initial noise for every prompt. At step i the UNet runs once on [x; x] for
    both branches, then one JVP gives H_delta s_delta; between measured steps x advances by a classifier-free-
    guided DDIM step. No UNet call is made after the last measured step. Returns a float32 tensor (K, n, S) and
    a dict of cost counts. (The 'sharpness' metric of utils.detectors.run_detectors, which this calls.)
    """
    from .detectors import DetectSettings, run_detectors
    if hvp_sampling_num > num_inference_steps:
        raise ValueError("the number of measured steps must not exceed the number of sampling steps")
    st = DetectSettings(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        hvp_sampling_num=hvp_sampling_num)
    vals, _, _, meter = run_detectors(model, cond, uncond, latents, ["sharpness"], st)
    tally = meter.summary(["sharpness"])["sharpness"]
    return vals["sharpness"], {"unet_forwards": tally["unet_forwards"], "jvps": tally["jvps"]}
