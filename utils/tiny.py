"""Tiny Stable-Diffusion-shaped pipelines built in code (random weights): for tests and benchmarks, no download."""
import torch


def tiny_pipeline(prediction_type="epsilon", seed=0, sample_size=8, cross_attention_dim=32, tokenizer=None,
                  block_out_channels=(32, 64), latent_channels=4):
    """A StableDiffusionPipeline with the SD v1 layout at toy size, DDIM scheduler with SD's schedule.

    UNet2DConditionModel (cross-attention down/up blocks), AutoencoderKL (scale factor 2), CLIPTextModel and the
    real CLIP tokenizer rebuilt offline. Weights are random but seeded, so two calls give identical pipelines.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .models import offline_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1,
        block_out_channels=block_out_channels, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=16)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=16, sample_size=sample_size * 2)
    tokenizer = tokenizer or offline_clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408,
        hidden_size=cross_attention_dim, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
