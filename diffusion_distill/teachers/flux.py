"""Flux (dev / schnell): FluxTransformer2DModel, rectified flow on packed 2x2 latents.

Three things differ from SD3, and all stay in this file:

* The transformer sees the latent as a sequence of 2x2 patches ("packed", 4x the channels)
  with 3-axis position ids for image tokens (``img_ids``) and zeros for text (``txt_ids``).
  The Denoiser's space is the *unpacked* (C, H, W) latent, so objectives see image-like
  tensors; packing and the ids are made on every call from the shape, which is cheap.
* The transformer takes ``timestep / 1000`` (the pipeline divides before calling).
* Flux-dev is guidance-distilled: the guidance scale is an input of the network (embedded
  like the timestep), not classifier-free guidance. ``call_flux_guided`` carries
  ``embedded_guidance = True`` so the Denoiser passes ``guidance=w`` in through the Cond in
  one pass instead of running a conditional and an unconditional branch. Flux-schnell has no
  guidance embedding; it gets ordinary (true) CFG against the empty prompt, off by default.
"""
from __future__ import annotations

import numpy as np
import torch

from ..denoiser import Cond, Denoiser
from ..schedules import FlowSchedule
from .base import Teacher, flow_time_shift


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): one token per 2x2 patch, channels-major inside."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width, got {h}x{w}; use an image "
                         "size divisible by 2 x the VAE's scale factor (16 for Flux).")
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for a (C, h, w) latent."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids (0, row, col) of each packed token, for Flux's rotary embedding."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=dtype)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)


def call_flux(transformer, x_t, model_time, cond: Cond):
    h, w = x_t.shape[2:]
    embeds = cond.tensors["prompt_embeds"]
    guidance = cond.tensors.get("guidance")
    if guidance is not None and not transformer.config.guidance_embeds:
        guidance = None  # a model without the embedding (schnell) has nothing to feed it to
    out = transformer(
        hidden_states=pack(x_t),
        # FluxPipeline divides the scheduler's timestep (sigma * 1000) by 1000 before the call.
        timestep=model_time.to(x_t.dtype) / 1000,
        guidance=None if guidance is None else guidance.to(torch.float32),
        pooled_projections=cond.tensors["pooled_projections"],
        encoder_hidden_states=embeds,
        # ids are shared by the batch; text tokens all sit at position 0
        txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
        img_ids=image_ids(h, w, device=x_t.device, dtype=x_t.dtype),
        return_dict=False,
    )[0]
    return unpack(out, h, w)


def call_flux_guided(transformer, x_t, model_time, cond: Cond):
    if "guidance" not in cond.tensors:
        raise ValueError("this Flux model is guidance-distilled and needs a guidance value; "
                         "call the denoiser with guidance=w (Flux-dev's default is 3.5).")
    return call_flux(transformer, x_t, model_time, cond)


call_flux_guided.embedded_guidance = True


def latent_shape(pipe, height=None, width=None) -> tuple[int, int, int]:
    factor = getattr(pipe, "vae_scale_factor", 8)
    default = getattr(pipe, "default_sample_size", 128) * factor
    height, width = int(height or default), int(width or default)
    # As the pipeline does: the latent must split into whole 2x2 patches.
    h, w = 2 * (height // (factor * 2)), 2 * (width // (factor * 2))
    return (pipe.transformer.config.in_channels // 4, h, w)


def from_pipeline(pipe, prediction_type=None, guidance_scale=None, default_steps=None,
                  path=None, height=None, width=None, max_sequence_length=512) -> Teacher:
    """A Flux teacher. ``guidance_scale`` is the embedded guidance for Flux-dev (default 3.5)
    and the true-CFG scale for models without a guidance embedding (default 1.0: off)."""
    device = pipe.transformer.device
    guided = bool(pipe.transformer.config.guidance_embeds)
    if guidance_scale is None:
        guidance_scale = 3.5 if guided else 1.0
    default_steps = default_steps or (28 if guided else 4)

    def encode(prompts):
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=prompts, device=device,
                                               max_sequence_length=max_sequence_length)
        return Cond({"prompt_embeds": embeds, "pooled_projections": pooled})

    shape = latent_shape(pipe, height, width)
    denoiser = Denoiser(pipe.transformer, FlowSchedule.from_scheduler(pipe.scheduler),
                        prediction_type or "flow", call_flux_guided if guided else call_flux,
                        guidance_scale=guidance_scale)
    teacher = Teacher("flux", denoiser, shape, encode, pipe=pipe, vae=pipe.vae,
                      default_steps=default_steps, default_guidance=guidance_scale, path=path)
    teacher.time_shift = flow_time_shift(pipe.scheduler, (shape[1] // 2) * (shape[2] // 2))
    teacher.extra_timestep_kwargs = flux_sigmas
    if not guided:
        denoiser.uncond = teacher.prompts([""])
    return teacher


def flux_sigmas(steps: int, scheduler) -> dict:
    """FluxPipeline hands its scheduler an explicit linear grid from 1 to 1/steps (then the
    scheduler shifts it by the call's ``mu``), unless the scheduler makes its own flow sigmas."""
    if scheduler.config.get("use_flow_sigmas", False):
        return {}
    return {"sigmas": np.linspace(1.0, 1 / steps, steps)}


def feature_module(backbone) -> str:
    """The middle transformer block, where a discriminator head reads the critic's features."""
    return f"transformer_blocks.{len(backbone.transformer_blocks) // 2}"
