"""Tiny random-config pipelines of each family, built in code (no downloads).

For tests and for trying the toolkit without weights, in the spirit of diffusers'
``get_dummy_components``. Each builder returns a real diffusers pipeline that
``save_pretrained`` / ``from_pretrained`` round-trips.
"""
from __future__ import annotations

import torch

from .tokenizer import make_clip_tokenizer

WORDS = ["a", "an", "the", "red", "green", "blue", "yellow", "small", "large", "circle", "square", "triangle", "left", "right", "of", "above", "below", "one", "two", "three", "cat", "dog", "photo"]


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
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

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


def tiny_t5(d_model=32, layers=2, vocab_words=WORDS, seed=0):
    """A T5 encoder and a Unigram T5Tokenizer built from a word list (no sentencepiece file).

    Every known word is one piece; letters and a bare word-start mark keep anything else
    tokenizable, as a real Unigram vocabulary would.
    """
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(vocab_words)]
    vocab += [(c, -5.0) for c in letters]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=d_model * 2,
                      num_layers=layers, num_heads=2, relative_attention_num_buckets=8,
                      relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    return tok, T5EncoderModel(config).eval()


def tiny_sdxl(prediction_type="epsilon", sample_size=8, seed=0):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok, text = tiny_clip(seed=seed)
    tok2, text2 = tiny_clip(projection=True, seed=seed + 1)
    torch.manual_seed(seed)
    time_dim = 8
    # SDXL's added condition: 6 Fourier-embedded time ids next to the pooled text projection.
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text.config.hidden_size + text2.config.hidden_size,
        attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text2.config.projection_dim)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False,
                              set_alpha_to_one=False, timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(vae=tiny_vae(seed=seed), text_encoder=text, tokenizer=tok,
                                     text_encoder_2=text2, tokenizer_2=tok2, unet=unet,
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True)


def tiny_flux(guidance_embeds=True, seed=0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, text = tiny_clip(projection=False, seed=seed)
    tok2, text2 = tiny_t5(seed=seed + 1)
    torch.manual_seed(seed)
    # in_channels is that of the *packed* 2x2 latent: 4 latent channels -> 16.
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text2.config.d_model,
        pooled_projection_dim=text.config.hidden_size, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096, shift=3.0)
    vae = tiny_vae(seed=seed, shift_factor=0.1159, scaling_factor=0.3611)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text,
                        tokenizer=tok, text_encoder_2=text2, tokenizer_2=tok2)


def tiny_pixart(sample_size=8, seed=0, alpha=False):
    """PixArt-Sigma, or with ``alpha=True`` PixArt-Alpha with its 1024-px micro-conditions
    (resolution and aspect ratio), which the real model only uses at sample_size 128."""
    from diffusers import (
        DDIMScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    tok, text = tiny_t5(seed=seed)
    torch.manual_seed(seed)
    # out_channels = 2 x in_channels: PixArt predicts eps and a learned variance.
    # the micro-condition embedding splits the width in 3: 2 x 12 for Alpha
    head_dim = 12 if alpha else 8
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=2, patch_size=1, attention_head_dim=head_dim,
        num_attention_heads=2, in_channels=4, out_channels=8, cross_attention_dim=2 * head_dim,
        caption_channels=text.config.d_model, norm_type="ada_norm_single",
        use_additional_conditions=alpha, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                              prediction_type="epsilon", clip_sample=False,
                              set_alpha_to_one=True, timestep_spacing="trailing")
    cls = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    return cls(tokenizer=tok, text_encoder=text, vae=tiny_vae(seed=seed),
               transformer=transformer, scheduler=scheduler)


def tiny_gemma2(hidden=32, layers=2, vocab_words=WORDS, seed=0):
    """A Gemma2 model and a byte-free BPE GemmaTokenizer holding ``vocab_words`` whole."""
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    merges = []
    for c in "abcdefghijklmnopqrstuvwxyz0123456789\u2581":
        vocab.setdefault(c, len(vocab))
    # One merge chain per word so that each known word ends up a single token.
    for word in dict.fromkeys("\u2581" + w for w in vocab_words):
        current = word[0]
        for ch in word[1:]:
            merges.append((current, ch))
            current += ch
            vocab.setdefault(current, len(vocab))
    tok = GemmaTokenizer(vocab=vocab, merges=merges)
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, max_position_embeddings=4096, pad_token_id=0,
                          eos_token_id=1, bos_token_id=2, sliding_window=64)
    return tok, Gemma2Model(config).eval()


def tiny_sana(sample_size=8, seed=0):
    from diffusers import (
        AutoencoderDC,
        DPMSolverMultistepScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )

    tok, text = tiny_gemma2(seed=seed)
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=text.config.hidden_size, sample_size=sample_size, patch_size=1)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                        decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    # Sana samples its flow model with a flow-sigma DPM-Solver (prediction 'flow_prediction').
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=3.0)
    return SanaPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer,
                        scheduler=scheduler)
