"""The rectified-flow transformers at their published shapes with random weights, and random inputs of their shape,
for the benchmarks and the memory planner (no weights downloaded: built on the meta device they allocate nothing).

Configurations, as published in the models' diffusers folders (transformer/config.json):
- SD3-medium: stabilityai/stable-diffusion-3-medium-diffusers, an SD3Transformer2DModel (MMDiT): 2 x 2 patches of
  16-channel latents, 24 joint-attention blocks of 24 heads x 64, T5's 4096-wide context projected to 1536, pooled
  CLIP-L + CLIP-G projections (768 + 1280 = 2048). 2,028,328,000 parameters (the published "2B"; counted by
  parameter_count on the meta device).
- Flux-dev: black-forest-labs/FLUX.1-dev, a FluxTransformer2DModel: 19 double-stream and 38 single-stream blocks of
  24 heads x 128 (width 3072), 2 x 2-packed latents (64 channels per token, 1 x 1 patches), T5 context 4096 wide,
  CLIP-L's pooled 768, a guidance embedding, rotary axes (16, 56, 56). 11,901,408,320 parameters (the published
  "12B").
The text context of a 1024 x 1024 image: SD3's pipeline puts the CLIP tokens (77) and T5's (max_sequence_length 256,
utils/models/sd3.py) in one sequence: 333 tokens; FluxPipeline's T5 reads 512 tokens for dev (256 for schnell).
FLOW_TRANSFORMERS is the table the benchmarks read: a Flux-dev bench branch adds its builder next to SD3's.
"""
import torch

SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
# SD3's layout at toy widths (2 blocks of 2 heads x 16): SMOKE=1 runs of gpu_check.sh and bench.py on the CPU
SD3_TINY = dict(SD3_MEDIUM, sample_size=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=16)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# kind: (transformer class, config, text tokens at the pipeline's defaults, native latent side (1024 px / 8))
FLOW_TRANSFORMERS = {"sd3_medium": ("SD3Transformer2DModel", SD3_MEDIUM, 77 + 256, 128),
                     "sd3_tiny": ("SD3Transformer2DModel", SD3_TINY, 77 + 8, 8),
                     "flux_dev": ("FluxTransformer2DModel", FLUX_DEV, 512, 128)}
PUBLISHED_PARAMETERS = {"sd3_medium": 2.03e9, "flux_dev": 11.9e9}  # the sizes the model cards state


def flow_transformer(kind, device="cpu", dtype=torch.float32, seed=0):
    """The transformer `kind` (a FLOW_TRANSFORMERS key) with random weights (seeded), built directly on `device`
    (meta: nothing allocated; enough for the planner, which reads shapes only), cast to `dtype`, in eval mode."""
    import diffusers
    cls, config, _, _ = FLOW_TRANSFORMERS[kind]
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(diffusers, cls)(**config)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def text_encoders(kind):
    """The pipeline's other parts on the meta device (their parameters count toward the resident memory):
    CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders with projections (SD3; Flux: CLIP-L only), the T5 v1.1
    XXL encoder, the 16-channel VAE. Configurations from the published folders' text_encoder*/ and vae/."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    with torch.device("meta"):
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                            num_hidden_layers=12, num_attention_heads=12,
                                                            projection_dim=768, hidden_act="quick_gelu"))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            projection_dim=1280, hidden_act="gelu"))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu"))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            use_quant_conv=False, use_post_quant_conv=False)
    return [clip_l, clip_g, t5, vae] if kind.startswith("sd3") else [clip_l, t5, vae]


def sd3_inputs(model, k, context_len, generator, device="cpu", dtype=torch.float32):
    """Random conditions of k prompts for an SD3-shaped transformer, in utils.models.conditioning's layout: context
    (k, L, joint_attention_dim) and uncond (1, L, .), added {'pooled_projections': (uncond (1, P), cond (k, P))}
    (random normal; the pipeline's empty prompt is just another embedding)."""
    cfg = model.config
    ctx = torch.randn(k + 1, context_len, cfg.joint_attention_dim, generator=generator).to(device, dtype)
    pooled = torch.randn(k + 1, cfg.pooled_projection_dim, generator=generator).to(device, dtype)
    return ctx[1:], ctx[:1], {"pooled_projections": (pooled[:1], pooled[1:])}
