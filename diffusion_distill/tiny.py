"""Tiny random-config pipelines of each family, built in code (no downloads).

For tests and for trying the toolkit without weights, in the spirit of diffusers'
``get_dummy_components``. Each builder returns a real diffusers pipeline that
``save_pretrained`` / ``from_pretrained`` round-trips.
"""
from __future__ import annotations

import torch

from .world.tokenizer import make_clip_tokenizer

WORDS = "a an the red green blue yellow small large circle square triangle left right of above " \
        "below one two three cat dog photo".split()


def tiny_clip(hidden=32, layers=2, projection=False, vocab_words=WORDS, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = make_clip_tokenizer(vocab_words)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                            num_hidden_layers=layers, num_attention_heads=2,
                            max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1,
                            pad_token_id=len(tok) - 1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    return tok, model


def tiny_vae(latent_channels=4, block_out=(16, 32), seed=0, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=block_out, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, norm_num_groups=8, **kw)


def tiny_sd(prediction_type="epsilon", sample_size=8, seed=0):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok, text = tiny_clip(seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4,
                                block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False,
                              set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=1)
    return StableDiffusionPipeline(vae=tiny_vae(seed=seed), text_encoder=text, tokenizer=tok,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def tiny_sd3(sample_size=8, seed=0):
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    tok, text = tiny_clip(projection=True, seed=seed)
    tok2, text2 = tiny_clip(projection=True, seed=seed + 1)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=1, in_channels=4,
                                        out_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64,
                                        pos_embed_max_size=32)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed=seed, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=text, tokenizer=tok, text_encoder_2=text2, tokenizer_2=tok2,
        text_encoder_3=None, tokenizer_3=None)
