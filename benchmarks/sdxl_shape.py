"""SDXL base 1.0's UNet with random weights, and random inputs of its shape, for the benchmarks.

The configuration is the published one (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json; the same
numbers as Stability's sd_xl_base.yaml: model_channels 320, channel_mult (1, 2, 4), transformer_depth (1, 2, 10),
num_head_channels 64, context_dim 2048, adm_in_channels 2816). In diffusers' naming attention_head_dim
(5, 10, 20) is the number of heads per block (64 channels each). The first down block has no attention; the
deepest runs 10 transformer blocks per layer at a quarter of the latent side. 2,567,463,684 parameters: built with
random weights it costs what the real one does.

Inputs of the paired call (B rows per branch): context (B, 77, 2048), the two text encoders' penultimate states
concatenated (768 + 1280); added conditions text_embeds (B, 1280), the second encoder's pooled projection, and
time_ids (B, 6) = (original h, w, crop top, left, target h, w) in pixels, as StableDiffusionXLPipeline builds them.
"""
import torch

SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)  # 2816 = 1280 (pooled) + 6 time ids x 256
# The same layout at toy widths (1 ResNet per block, 32/32/64 channels, depths (1, 1, 2)): SMOKE=1 runs of
# gpu_check.sh on the CPU, where the real UNet's 10 GB of float32 weights do not fit the time or the memory.
SDXL_TINY = dict(SDXL_UNET, sample_size=8, layers_per_block=1, block_out_channels=(32, 32, 64), norm_num_groups=16,
                 transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), cross_attention_dim=48,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
SDXL_UNETS = {"sdxl": SDXL_UNET, "sdxl_tiny": SDXL_TINY}
SDXL_PREDICTION = "epsilon"
CONTEXT_TOKENS = 77
VAE_FACTOR = 8  # latent side -> pixel side (SDXL's VAE, as SD's)


def sdxl_unet(kind="sdxl", sample_size=None, device="cpu", dtype=torch.float32, seed=0):
    """SDXL base's UNet2DConditionModel (kind 'sdxl', or 'sdxl_tiny' for its layout at toy widths) with random
    weights (seeded), built directly on `device` (the meta device allocates nothing: enough for the memory planner,
    which reads shapes only) and cast to `dtype`, in eval mode. sample_size None keeps the native side (128; tiny:
    8). Returns (unet, prediction_type, cross_attention_dim), as utils.demo.model.sd_shaped_unet does."""
    from diffusers import UNet2DConditionModel
    config = SDXL_UNETS[kind]
    config = dict(config, sample_size=sample_size or config["sample_size"])
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    if dtype != torch.float32:  # built in float32; the cast only when asked (diffusers warns on every .to(dtype))
        unet = unet.to(dtype)
    return unet.eval(), SDXL_PREDICTION, config["cross_attention_dim"]


def sdxl_added(unet, k, side, generator, device="cpu", dtype=torch.float32):
    """Random added conditions of k prompts for `unet` (an SDXL-shaped one) at latents of side `side`, in
    utils.models.conditioning's layout {name: (uncond (1, ...), cond (k, ...))}: text_embeds (k, P) (the pooled
    embedding, random normal; the unconditional row zeros, as SDXL base's force_zeros_for_empty_prompt makes it;
    P = 1280 for SDXL) and time_ids (k, 6) (the pipeline's defaults for a square image of side*8 pixels, no crop;
    the same for both branches)."""
    cfg = unet.config
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    pooled = torch.randn(k, pooled_dim, generator=generator).to(device, dtype)
    px = float(side * VAE_FACTOR)
    ids = torch.tensor([[px, px, 0.0, 0.0, px, px]], device=device, dtype=dtype)
    return {"text_embeds": (torch.zeros_like(pooled[:1]), pooled), "time_ids": (ids, ids.expand(k, -1))}
