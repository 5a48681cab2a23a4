"""Stable Diffusion 1.x / 2.x: UNet2DConditionModel on VAE latents; epsilon or v prediction."""
from __future__ import annotations

from ..denoiser import Cond, Denoiser
from ..schedules import schedule_from_scheduler
from .base import Teacher


def call_unet(unet, x_t, model_time, cond: Cond):
    extra = {}
    if "text_embeds" in cond.tensors:  # SDXL's micro-conditioning rides along in the Cond
        extra["added_cond_kwargs"] = {"text_embeds": cond.tensors["text_embeds"],
                                      "time_ids": cond.tensors["time_ids"]}
    return unet(x_t, model_time, encoder_hidden_states=cond.tensors["prompt_embeds"],
                **extra).sample


def latent_shape(pipe, height=None, width=None):
    factor = getattr(pipe, "vae_scale_factor", 8)
    sample_size = pipe.unet.config.sample_size
    h = height // factor if height else sample_size
    w = width // factor if width else sample_size
    return (pipe.unet.config.in_channels, h, w)


def from_pipeline(pipe, prediction_type=None, guidance_scale=7.5, default_steps=50, path=None,
                  height=None, width=None) -> Teacher:
    device = pipe.unet.device

    def encode(prompts):
        embeds, _ = pipe.encode_prompt(prompts, device, 1, do_classifier_free_guidance=False)
        return Cond({"prompt_embeds": embeds})

    prediction_type = prediction_type or pipe.scheduler.config.prediction_type
    denoiser = Denoiser(pipe.unet, schedule_from_scheduler(pipe.scheduler), prediction_type,
                        call_unet, guidance_scale=guidance_scale)
    teacher = Teacher("sd", denoiser, latent_shape(pipe, height, width), encode, pipe=pipe,
                      vae=pipe.vae, default_steps=default_steps,
                      default_guidance=guidance_scale, path=path)
    denoiser.uncond = teacher.prompts([""])
    return teacher


def feature_module(backbone) -> str:
    """The UNet's bottleneck, where a discriminator head reads the critic's features."""
    return "mid_block"
