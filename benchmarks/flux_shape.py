"""Flux-dev's transformer with random weights, and random inputs of its shape, for the benchmarks.

The configuration is the published one (black-forest-labs/FLUX.1-dev, transformer/config.json, in flow_shape.py): 19 double-stream
and 38 single-stream blocks, 24 heads of 128 channels (width 3072), in_channels 64 (16 latent channels packed
2 x 2), joint_attention_dim 4096 (T5-XXL), pooled_projection_dim 768 (CLIP-L), guidance_embeds, rotary axes
(16, 56, 56). About 11.9 billion parameters: built with random weights it costs what the real one does (bfloat16:
about 24 GB of weights, so the real shape is for a GPU only). 'flux_tiny' is the layout at toy widths (one block
of each kind, head width 8), for CPU smoke runs.

Inputs of the paired call (B rows per branch), as FluxPipeline builds them at 1024 px: latents (B, 16, 128, 128)
unpacked (the denoiser packs them into 4096 tokens of 64), context (B, 512, 4096) (T5's max_sequence_length),
pooled projections (B, 768); the scheduler is FLUX.1-dev's (dynamic shifting) and the guidance embedding gets 7.5,
the harness's guidance. "uncond" is a random context like the prompts' (Flux's ∅ is the empty prompt, docs/flow.md;
its cost is that of any prompt).
"""
import torch

from benchmarks.flow_shape import FLUX_DEV  # the published config, declared once beside SD3-medium's
FLUX_TINY = dict(FLUX_DEV, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
FLUX_TRANSFORMERS = {"flux": FLUX_DEV, "flux_tiny": FLUX_TINY}
NATIVE_SIDE = {"flux": 128, "flux_tiny": 8}  # latent side: 1024 px for Flux-dev (VAE factor 8)
TEXT_TOKENS = 512  # FluxPipeline's default T5 max_sequence_length
GUIDANCE = 7.5


def flux_parts(kind, side, n, k, generator, device="cpu", dtype=torch.float32, seed=0, **denoiser_kwargs):
    """(transformer, scheduler, make_denoiser, conds (k, 512, D), uncond (1, 512, D), latents (n, C, S, S),
    added {'pooled_projections': (uncond (1, P), cond (k, P))}) of a Flux-shaped transformer (`kind` in
    FLUX_TRANSFORMERS, random weights seeded by `seed`) at latent side `side` (None: native). make_denoiser(**kw):
    a utils.models.flux.FluxDenoiser on them (kw: the Denoiser's, e.g. jvp_unet, fd_unet)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from utils.models.flux import FluxDenoiser
    config = FLUX_TRANSFORMERS[kind]
    side = side or NATIVE_SIDE[kind]
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**config)
    if dtype != torch.float32:
        transformer = transformer.to(dtype)
    transformer.eval()
    # black-forest-labs/FLUX.1-dev scheduler_config.json
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    dim, pooled_dim = config["joint_attention_dim"], config["pooled_projection_dim"]
    conds = torch.randn(k, TEXT_TOKENS, dim, generator=generator).to(device, dtype)
    uncond = torch.randn(1, TEXT_TOKENS, dim, generator=generator).to(device, dtype)
    latents = torch.randn(n, config["in_channels"] // 4, side, side, generator=generator).to(device, dtype)
    pooled = torch.randn(k + 1, pooled_dim, generator=generator).to(device, dtype)
    added = {"pooled_projections": (pooled[:1], pooled[1:])}

    def make_denoiser(**kwargs):
        return FluxDenoiser(transformer, sched, guidance=GUIDANCE, image_seq_len=(side // 2) ** 2,
                            **dict(denoiser_kwargs, **kwargs))
    return transformer, sched, make_denoiser, conds, uncond, latents, added
