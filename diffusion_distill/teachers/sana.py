"""Sana: SanaTransformer2DModel (linear-attention DiT) on a 32x DC-AE latent, Gemma-2 text.

Specifics kept here:

* Rectified flow, but sampled by a DPM-Solver with ``use_flow_sigmas`` rather than a
  FlowMatch scheduler, so the schedule is read from the scheduler's flow flags.
* The transformer takes ``timestep * timestep_scale`` (1 for Sana; other values for variants).
* Prompts are encoded as the pipeline does by default: Gemma-2 states of the prompt prefixed
  by Sana's "complex human instruction", keeping the first token and the last
  ``max_sequence_length - 1``; the attention mask rides in the Cond.
"""
from __future__ import annotations

import inspect

from ..denoiser import Cond, Denoiser
from ..schedules import FlowSchedule
from .base import Teacher, flow_time_shift
from .pixart import learned_sigma_split


def call_sana(transformer, x_t, model_time, cond: Cond):
    scale = getattr(transformer.config, "timestep_scale", 1.0) or 1.0
    out = transformer(x_t, encoder_hidden_states=cond.tensors["prompt_embeds"],
                      encoder_attention_mask=cond.tensors["prompt_attention_mask"],
                      timestep=model_time * scale, return_dict=False)[0]
    return learned_sigma_split(out, x_t.shape[1])


def _pipeline_default(pipe, name, fallback):
    try:
        default = inspect.signature(type(pipe).__call__).parameters[name].default
    except (KeyError, ValueError, TypeError):
        return fallback
    return fallback if default is inspect.Parameter.empty else default


def from_pipeline(pipe, prediction_type=None, guidance_scale=4.5, default_steps=20, path=None,
                  height=None, width=None, max_sequence_length=300,
                  complex_human_instruction="default") -> Teacher:
    """A Sana teacher. ``complex_human_instruction``: "default" = the pipeline's own prefix,
    None/False/[] = the bare prompt, or a list of lines."""
    if getattr(pipe.transformer.config, "guidance_embeds", False):
        raise ValueError("this Sana transformer has a guidance embedding (Sana-Sprint); only "
                         "classifier-free-guided Sana (SanaPipeline) is supported.")
    device = pipe.transformer.device
    if complex_human_instruction == "default":
        complex_human_instruction = _pipeline_default(pipe, "complex_human_instruction", None)

    def encode(prompts):
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=device, clean_caption=False,
            max_sequence_length=max_sequence_length,
            complex_human_instruction=complex_human_instruction)
        return Cond({"prompt_embeds": embeds, "prompt_attention_mask": mask})

    def encode_negative(prompts):
        # The pipeline encodes the negative prompt without the instruction prefix and keeps
        # all of its max_sequence_length tokens.
        embeds, mask = pipe._get_gemma_prompt_embeds(
            prompts, device=device, dtype=pipe.text_encoder.dtype, clean_caption=False,
            max_sequence_length=max_sequence_length, complex_human_instruction=False)
        return Cond({"prompt_embeds": embeds, "prompt_attention_mask": mask})

    cfg = pipe.transformer.config
    factor = getattr(pipe, "vae_scale_factor", 32)
    shape = (cfg.in_channels, int(height) // factor if height else cfg.sample_size,
             int(width) // factor if width else cfg.sample_size)
    sched_cfg = pipe.scheduler.config
    if "FlowMatch" not in type(pipe.scheduler).__name__ and not sched_cfg.get("use_flow_sigmas"):
        raise ValueError(f"Sana teacher expects a flow scheduler (FlowMatch*, or DPM-Solver with "
                         f"use_flow_sigmas=True); got {type(pipe.scheduler).__name__} with "
                         f"prediction_type={sched_cfg.get('prediction_type')!r}.")
    denoiser = Denoiser(pipe.transformer, FlowSchedule.from_scheduler(pipe.scheduler),
                        prediction_type or "flow", call_sana, guidance_scale=guidance_scale)
    teacher = Teacher("sana", denoiser, shape, encode, pipe=pipe, vae=pipe.vae,
                      default_steps=default_steps, default_guidance=guidance_scale, path=path)
    teacher.time_shift = flow_time_shift(pipe.scheduler)
    denoiser.uncond = encode_negative([""]).to(device)
    return teacher


def feature_module(backbone) -> str:
    """The middle transformer block, where a discriminator head reads the critic's features."""
    return f"transformer_blocks.{len(backbone.transformer_blocks) // 2}"
