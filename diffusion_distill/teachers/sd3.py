"""SD3 / SD3.5: SD3Transformer2DModel, rectified flow, pooled text projections."""
from __future__ import annotations

from ..denoiser import Cond, Denoiser
from ..schedules import FlowSchedule
from .base import Teacher, flow_time_shift


def call_sd3(transformer, x_t, model_time, cond: Cond):
    return transformer(hidden_states=x_t, timestep=model_time,
                       encoder_hidden_states=cond.tensors["prompt_embeds"],
                       pooled_projections=cond.tensors["pooled_projections"]).sample


def from_pipeline(pipe, prediction_type=None, guidance_scale=7.0, default_steps=28, path=None,
                  height=None, width=None) -> Teacher:
    device = pipe.transformer.device

    def encode(prompts):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, device=device,
                                                  do_classifier_free_guidance=False)
        return Cond({"prompt_embeds": embeds, "pooled_projections": pooled})

    cfg = pipe.transformer.config
    factor = getattr(pipe, "vae_scale_factor", 8)
    shape = (cfg.in_channels, height // factor if height else cfg.sample_size,
             width // factor if width else cfg.sample_size)
    denoiser = Denoiser(pipe.transformer, FlowSchedule.from_scheduler(pipe.scheduler),
                        prediction_type or "flow", call_sd3, guidance_scale=guidance_scale)
    teacher = Teacher("sd3", denoiser, shape, encode, pipe=pipe, vae=pipe.vae,
                      default_steps=default_steps, default_guidance=guidance_scale, path=path)
    # sample on the pipeline's shifted times (SD3's scheduler shift, 3.0 for SD3-medium)
    teacher.time_shift = flow_time_shift(pipe.scheduler, (shape[1] // 2) * (shape[2] // 2))
    teacher.token_patch = int(cfg.patch_size)
    denoiser.uncond = teacher.prompts([""])
    return teacher


def feature_module(backbone) -> str:
    """The middle transformer block, where a discriminator head reads the critic's features."""
    return f"transformer_blocks.{len(backbone.transformer_blocks) // 2}"
