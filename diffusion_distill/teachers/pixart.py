"""PixArt-Sigma / PixArt-Alpha: PixArtTransformer2DModel (DiT) with a T5 text encoder.

Specifics kept here:

* The T5 states come with an attention mask (prompts are padded to a fixed length); both
  ride in the Cond so CFG batches of prompt and empty prompt line up.
* The transformer predicts eps *and* a learned variance (``out_channels = 2 x in_channels``);
  samplers and objectives only need eps, so the call keeps the first half of the channels,
  as the pipeline does.
* PixArt-Alpha at 1024 px (``use_additional_conditions``) also takes the resolution and aspect
  ratio; they are fixed by the teacher's resolution and ride in the Cond.
"""
from __future__ import annotations

import torch

from ..denoiser import Cond, Denoiser
from ..schedules import schedule_from_scheduler
from .base import Teacher


def call_pixart(transformer, x_t, model_time, cond: Cond):
    added = {"resolution": cond.tensors.get("resolution"),
             "aspect_ratio": cond.tensors.get("aspect_ratio")}
    out = transformer(x_t, encoder_hidden_states=cond.tensors["prompt_embeds"],
                      encoder_attention_mask=cond.tensors["prompt_attention_mask"],
                      timestep=model_time, added_cond_kwargs=added, return_dict=False)[0]
    return learned_sigma_split(out, x_t.shape[1])


def learned_sigma_split(out: torch.Tensor, channels: int) -> torch.Tensor:
    """The prediction part of a (prediction, learned variance) output."""
    if out.shape[1] == 2 * channels:
        return out[:, :channels]
    return out


def from_pipeline(pipe, prediction_type=None, guidance_scale=4.5, default_steps=20, path=None,
                  height=None, width=None, max_sequence_length=None) -> Teacher:
    device = pipe.transformer.device
    sigma = type(pipe).__name__ == "PixArtSigmaPipeline"
    # The pipelines' own defaults: PixArt-Sigma was trained with 300 T5 tokens, Alpha with 120.
    max_sequence_length = max_sequence_length or (300 if sigma else 120)
    cfg = pipe.transformer.config
    factor = getattr(pipe, "vae_scale_factor", 8)
    height = int(height or cfg.sample_size * factor)
    width = int(width or cfg.sample_size * factor)
    extra = {}
    if getattr(pipe.transformer, "use_additional_conditions", False):
        extra = {"resolution": torch.tensor([[height, width]], dtype=torch.float32),
                 "aspect_ratio": torch.tensor([[height / width]], dtype=torch.float32)}

    def encode(prompts):
        # clean_caption=False: the pipeline's cleaning needs bs4 and ftfy, which are optional;
        # without them the pipeline itself falls back to no cleaning.
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                device=device, clean_caption=False,
                                                max_sequence_length=max_sequence_length)
        tensors = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        for k, v in extra.items():
            tensors[k] = v.to(device, embeds.dtype).repeat(len(prompts), 1)
        return Cond(tensors)

    prediction_type = prediction_type or pipe.scheduler.config.prediction_type
    denoiser = Denoiser(pipe.transformer, schedule_from_scheduler(pipe.scheduler),
                        prediction_type, call_pixart, guidance_scale=guidance_scale)
    shape = (cfg.in_channels, height // factor, width // factor)
    teacher = Teacher("pixart" if sigma else "pixart_alpha", denoiser, shape, encode, pipe=pipe,
                      vae=pipe.vae, default_steps=default_steps,
                      default_guidance=guidance_scale, path=path)
    denoiser.uncond = teacher.prompts([""])
    return teacher


def feature_module(backbone) -> str:
    """The middle transformer block, where a discriminator head reads the critic's features."""
    return f"transformer_blocks.{len(backbone.transformer_blocks) // 2}"
