"""Sharpness-based memorization detection: ||H_delta s_delta|| at the first sampling steps (Jeon et al., 2025)."""
import torch

from .scores import alpha_sigma, flat_norm, hvp_delta, pair_score_fn, score_difference, score_from_output


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


def sharpness_scores(unet, scheduler, cond, uncond, latents, *, num_inference_steps=50, hvp_sampling_num=1,
                     guidance_scale=7.5, v_score="correct", jvp_unet=None):
    """Detection metric ||H_delta s_delta|| for K prompts x n generations at the first S sampling steps.

    unet: callable with the UNet2DConditionModel signature; scheduler: a DDIM scheduler (its timesteps are set
    here); cond (K, L, D), uncond (1, L, D); latents (n, C, H, W), the same initial noise for every prompt.
    At step i the UNet runs once on [x; x] for both branches, then one JVP gives H_delta s_delta; between
    measured steps x advances by a classifier-free-guided DDIM step. No UNet call is made after the last
    measured step. jvp_unet: optional higher-precision copy of the UNet for the JVP (inputs cast to its dtype); by
    default the JVP runs in the UNet's own dtype. Returns a float32 tensor (K, n, S) and a dict of cost counts.
    """
    if hvp_sampling_num > num_inference_steps:
        raise ValueError("hvp_sampling_num must not exceed num_inference_steps")
    k, n = cond.shape[0], latents.shape[0]
    pred = scheduler.config.prediction_type
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    embeds = cfg_embeddings(cond, uncond, n)
    x = latents.repeat(k, 1, 1, 1)
    out_vals = torch.empty(k * n, hvp_sampling_num)
    cost = {"unet_forwards": 0, "jvps": 0}
    for i, t in enumerate(scheduler.timesteps[:hvp_sampling_num]):
        alpha, sigma = alpha_sigma(scheduler, t)
        xin = scheduler.scale_model_input(x, t)
        xx = torch.cat([xin, xin])
        with torch.no_grad():
            out = unet(xx, t, encoder_hidden_states=embeds, return_dict=False)[0]
        cost["unet_forwards"] += 1
        s_delta = score_difference(score_from_output(out, xx, alpha, sigma, pred, v_score))
        with torch.no_grad():
            if jvp_unet is None:
                h = hvp_delta(pair_score_fn(unet, t, embeds, alpha, sigma, pred, v_score), xin, s_delta)
            else:
                hi = next(jvp_unet.parameters()).dtype
                fn = pair_score_fn(jvp_unet, t, embeds.to(hi), alpha, sigma, pred, v_score)
                h = hvp_delta(fn, xin.to(hi), s_delta.to(hi))
        cost["jvps"] += 1
        out_vals[:, i] = flat_norm(h).cpu()
        if i + 1 < hvp_sampling_num:
            o_uc, o_c = out.chunk(2)
            guided = o_uc + guidance_scale * (o_c - o_uc)
            x = scheduler.step(guided, t, x, eta=0.0, return_dict=False)[0]
    return out_vals.view(k, n, hvp_sampling_num), cost
