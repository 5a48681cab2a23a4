"""Fresh (untrained) pipelines of the two embedded teachers, built in code.

Both use the world's trained VAE (16x16x4 latents for 32x32 images) and a tiny CLIP text
encoder whose vocabulary is the world's words. The text encoders stay at their random
initialisation and frozen: a random transformer still maps different captions to different,
position-aware token states, and the denoiser's cross-attention learns to read them. Keeping
them frozen is what lets training encode every caption once (``PromptCache``) and is the same
situation the distillation methods meet with real teachers (frozen text encoders).

Sizes are chosen for CPU training in minutes: ~2M-parameter denoisers, every file < 20 MB.
"""
from __future__ import annotations

import os

import torch

from ..tokenizer import make_clip_tokenizer
from .data import WORDS

# Captions are at most ~12 tokens; a short CLIP context keeps the denoisers' cross-attention
# (and the SD3 joint attention) cheap. Longer prompts are truncated by the pipeline, with its
# own warning.
TEXT_MAX_LENGTH = 16
LATENT_SIZE = 16


def world_clip(hidden: int, layers: int = 2, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = make_clip_tokenizer(WORDS, max_length=TEXT_MAX_LENGTH)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                            num_hidden_layers=layers, num_attention_heads=2,
                            max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=hidden,
                            bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1,
                            pad_token_id=len(tok) - 1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()
    return tok, model


def load_world_vae(path: str | None = None):
    """The trained world VAE (shipped under assets/vae, or a folder written by world.vae)."""
    from diffusers import AutoencoderKL

    path = path or os.path.join(os.path.dirname(__file__), "assets", "vae")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"no trained world VAE at {path!r}. Train one with `python -m "
            "diffusion_distill.world.vae --out runs/world_vae` and pass vae_path=runs/world_vae."
        )
    return AutoencoderKL.from_pretrained(path, local_files_only=True)


def build_sd(vae_path: str | None = None, seed: int = 0):
    """StableDiffusionPipeline: epsilon-prediction UNet2DConditionModel, DDIM sampler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok, text = world_clip(hidden=64, seed=seed)
    vae = load_world_vae(vae_path)
    vae.register_to_config(shift_factor=None)  # SD's decode ignores shift_factor; keep it unset
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        # Three levels: 16x16 convolutions, then 8x8 and 4x4 with self- and cross-attention;
        # the UNet has no positional embedding, and at 4x4 every cell sees the border's zero
        # padding within two convolutions. What made it follow position words, though, was
        # the loss weighting (recipes/teachers/sd_unet.yaml: method.loss_weight v): with the
        # plain epsilon loss both this and a two-level 16/8 UNet put shapes anywhere.
        block_out_channels=(32, 64, 96), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="epsilon", clip_sample=False,
                              set_alpha_to_one=False, timestep_spacing="trailing",
                              steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def null_t5(d_model: int):
    """A placeholder third text encoder whose output is exactly zero, and its tokenizer.

    StableDiffusion3Pipeline runs without T5 when ``text_encoder_3=None`` (it feeds zeros in
    its place), but such a folder does not load with a plain ``from_pretrained``: diffusers
    requires every component it does not list as optional. A one-layer T5 encoder whose final
    RMS norm has weight 0 outputs those same zeros, so the pipeline computes exactly what it
    would without T5, and the folder loads anywhere.
    """
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=16, num_layers=1,
                      num_heads=1, pad_token_id=0, eos_token_id=1)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        model.encoder.final_layer_norm.weight.zero_()
    return tok, model


def attach_null_t5(pipe):
    """Give an SD3 pipeline built with ``text_encoder_3=None`` the zero-output T5 above."""
    if pipe.text_encoder_3 is None:
        tok, t5 = null_t5(pipe.transformer.config.joint_attention_dim)
        pipe.register_modules(text_encoder_3=t5, tokenizer_3=tok)
    return pipe


def build_sd3(vae_path: str | None = None, seed: int = 0):
    """StableDiffusion3Pipeline: SD3Transformer2DModel, rectified flow, and in place of T5 a
    placeholder encoder that outputs zeros (see :func:`null_t5`)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tok, text = world_clip(hidden=32, projection=True, seed=seed)
    tok2, text2 = world_clip(hidden=32, projection=True, seed=seed + 1)
    vae = load_world_vae(vae_path)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
        caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=LATENT_SIZE)
    # shift 1: at 16x16 latents there is little low-frequency redundancy to push noise onto
    # (SD3's shift=3 is for 1024 px).
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok,
        text_encoder_2=text2, tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None)
    return attach_null_t5(pipe)


BUILDERS = {"sd": build_sd, "sd3": build_sd3}


# -- training the SD3 teacher cheaply ---------------------------------------------------------
# Without T5 (or with the null T5), StableDiffusion3Pipeline feeds 256 identical all-zero tokens after the CLIP
# tokens. Identical context tokens stay identical through every joint block (per-token layers,
# no positional embedding on the context stream), so in attention k copies of one token act
# exactly like a single copy whose attention logit is raised by log(k). Training with one copy
# and that bias is the same function as the pipeline's 272-token context at ~1/5 of the cost;
# the saved weights are used with the ordinary processors and the full context.
class RepeatedTokenJointAttention:
    """Joint (image + context) attention where the last context token stands for ``repeat``
    identical copies of itself."""

    def __init__(self, repeat: int):
        self.log_repeat = float(torch.log(torch.tensor(float(repeat))))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        import torch.nn.functional as F

        b, n_img = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x, norm=None):
            x = x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        q = heads(attn.to_q(hidden_states), attn.norm_q)
        k = heads(attn.to_k(hidden_states), attn.norm_k)
        v = heads(attn.to_v(hidden_states))
        c = encoder_hidden_states
        q = torch.cat([q, heads(attn.add_q_proj(c), attn.norm_added_q)], dim=2)
        k = torch.cat([k, heads(attn.add_k_proj(c), attn.norm_added_k)], dim=2)
        v = torch.cat([v, heads(attn.add_v_proj(c))], dim=2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_repeat
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        img, ctx = out[:, :n_img], out[:, n_img:]
        img = attn.to_out[1](attn.to_out[0](img))
        if attn.context_pre_only:
            return img, ctx
        return img, attn.to_add_out(ctx)


def collapse_repeated_context(cond, num_text_tokens: int = TEXT_MAX_LENGTH):
    """The SD3 Cond with its trailing all-zero T5 tokens reduced to one; returns (cond, k)."""
    from ..denoiser import Cond

    embeds = cond.tensors["prompt_embeds"]
    tail = embeds[:, num_text_tokens:]
    if tail.shape[1] < 1 or tail.abs().max() != 0:
        raise ValueError("expected the pipeline's all-zero T5 tokens after the CLIP tokens; "
                         "this trick only applies to SD3 pipelines with text_encoder_3=None")
    return Cond(dict(cond.tensors, prompt_embeds=embeds[:, :num_text_tokens + 1])), tail.shape[1]
