"""SDXL: UNet2DConditionModel with two CLIP text encoders and "text_time" added conditions.

Beyond SD 1.x the UNet needs, per sample, the pooled projection of the second text encoder
(``text_embeds``) and six "micro-conditioning" numbers (``time_ids``: original size, crop
top-left, target size, in pixels). Both ride in the Cond, so ``sd.call_unet`` serves SDXL too
and the objectives never see the difference.
"""
from __future__ import annotations

import torch

from ..denoiser import Cond, Denoiser
from ..schedules import schedule_from_scheduler
from .base import Teacher
from .sd import call_unet


def resolution(pipe, height=None, width=None) -> tuple[int, int]:
    """The pixel size the teacher works at: given, or the pipeline's own default."""
    factor = getattr(pipe, "vae_scale_factor", 8)
    default = pipe.unet.config.sample_size * factor
    return int(height or default), int(width or default)


def time_ids(pipe, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped image generated at its own size.

    This is what ``StableDiffusionXLPipeline`` passes by default: original size = target size
    = (height, width), crop corner (0, 0).
    """
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype)
    pooled_dim = _pooled_dim(pipe)
    expected = pipe.unet.add_embedding.linear_1.in_features
    got = pipe.unet.config.addition_time_embed_dim * ids.shape[1] + pooled_dim
    if got != expected:
        raise ValueError(
            f"SDXL UNet expects an added-condition vector of length {expected}, but 6 time ids "
            f"x addition_time_embed_dim {pipe.unet.config.addition_time_embed_dim} + pooled text "
            f"dim {pooled_dim} = {got}. Is this an SDXL refiner (5 time ids)? Only the base "
            "model's 6-id layout is supported."
        )
    return ids


def _pooled_dim(pipe) -> int:
    if pipe.text_encoder_2 is not None:
        return int(pipe.text_encoder_2.config.projection_dim)
    return int(pipe.text_encoder.config.projection_dim)


def from_pipeline(pipe, prediction_type=None, guidance_scale=5.0, default_steps=50, path=None,
                  height=None, width=None) -> Teacher:
    device = pipe.unet.device
    height, width = resolution(pipe, height, width)
    factor = getattr(pipe, "vae_scale_factor", 8)
    ids = time_ids(pipe, height, width)

    def encode(prompts):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device,
                                                  num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return Cond({"prompt_embeds": embeds, "text_embeds": pooled,
                     "time_ids": ids.to(device, embeds.dtype).repeat(len(prompts), 1)})

    prediction_type = prediction_type or pipe.scheduler.config.prediction_type
    denoiser = Denoiser(pipe.unet, schedule_from_scheduler(pipe.scheduler), prediction_type,
                        call_unet, guidance_scale=guidance_scale)
    shape = (pipe.unet.config.in_channels, height // factor, width // factor)
    teacher = Teacher("sdxl", denoiser, shape, encode, pipe=pipe, vae=pipe.vae,
                      default_steps=default_steps, default_guidance=guidance_scale, path=path)
    uncond = teacher.prompts([""])
    if pipe.config.get("force_zeros_for_empty_prompt", False):
        # SDXL base was trained with zeroed text for the unconditional branch, and its pipeline
        # guides against zeros rather than against the encoded empty prompt.
        uncond = Cond({"prompt_embeds": torch.zeros_like(uncond.tensors["prompt_embeds"]),
                       "text_embeds": torch.zeros_like(uncond.tensors["text_embeds"]),
                       "time_ids": uncond.tensors["time_ids"]})
    denoiser.uncond = uncond
    return teacher


def feature_module(backbone) -> str:
    """The UNet's bottleneck, where a discriminator head reads the critic's features."""
    return "mid_block"
