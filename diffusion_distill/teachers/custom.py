"""A custom teacher: any callable ``x0 = f(x_t, t, cond)`` on a named schedule.

For research on toy problems and for teachers that are not diffusers pipelines. The student
and critic are networks the user supplies (there is no shared base to put adapters on), and
``cond`` is whatever tensor the user's networks take (class labels, features, or nothing).
"""
from __future__ import annotations

import torch
from torch import nn

from ..denoiser import Cond, Denoiser
from ..schedules import FlowSchedule, VPSchedule
from .base import Teacher


def make_schedule(schedule: str, alphas_cumprod=None, num_train_timesteps: int = 1000):
    if schedule == "flow":
        return FlowSchedule(num_train_timesteps)
    if schedule == "vp":
        if alphas_cumprod is None:
            # DDPM's linear betas, the default of every SD-family scheduler.
            betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)
            alphas_cumprod = torch.cumprod(1 - betas, 0)
        return VPSchedule(alphas_cumprod)
    raise ValueError(f"unknown schedule {schedule!r}; supported: 'vp' (alphas_cumprod) or "
                     "'flow' (rectified flow).")


class _CallableModule(nn.Module):
    """Holds a plain function (or module) so it can sit where a backbone goes."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        if isinstance(fn, nn.Module):
            self.net = fn
        else:
            self.register_buffer("_device_anchor", torch.zeros(()))

    def forward(self, x_t, t, cond):
        return self.fn(x_t, t, cond)


def call_custom(module, x_t, t, cond: Cond):
    return module(x_t, t, cond.tensors.get("cond"))


def custom_denoiser(fn, schedule: str = "vp", prediction_type: str = "sample",
                    alphas_cumprod=None, guidance_scale=None) -> Denoiser:
    """Wrap ``fn(x_t, t, cond)``; ``t`` is passed on the [0, 1] axis (0 = clean)."""
    sched = make_schedule(schedule, alphas_cumprod)
    return Denoiser(_CallableModule(fn), _Identity(sched), prediction_type, call_custom,
                    guidance_scale=guidance_scale)


class _Identity:
    """The schedule with ``model_time = t``: custom networks take the continuous time."""

    def __init__(self, schedule):
        self._s = schedule
        self.kind = schedule.kind

    def alpha_sigma(self, t):
        return self._s.alpha_sigma(t)

    def model_time(self, t):
        return t

    def snr(self, t):
        return self._s.snr(t)

    def t_from_model_time(self, timestep):
        return timestep


def custom_teacher(fn, shape: tuple[int, ...], schedule: str = "vp",
                   prediction_type: str = "sample", alphas_cumprod=None,
                   guidance_scale=None, default_steps: int = 50, encode=None,
                   uncond=None) -> Teacher:
    """A teacher from a callable ``fn(x_t, t, cond)``.

    Args:
        encode: ``encode(prompts) -> tensor`` with the batch on dim 0: how the recipe's
            prompts (strings: captions, or class labels written as text such as ``"3"``)
            become the ``cond`` that ``fn`` and the user's student/critic networks take.
            Without it ``cond`` is None (an unconditional teacher).
        uncond: the unconditional condition for classifier-free guidance: a prompt to
            encode (e.g. ``""`` or a null-class label) or one sample's tensor. Needed for any
            guidance other than 1.
    """
    if uncond is not None and encode is None and isinstance(uncond, str):
        raise ValueError(f"uncond={uncond!r} is a prompt, but there is no encode= to turn it "
                         "into a condition; pass encode=..., or uncond as a tensor.")

    def encode_prompts(prompts):
        cond = torch.as_tensor(encode(list(prompts)))
        if cond.ndim == 0 or cond.shape[0] != len(prompts):
            raise ValueError(f"custom_teacher's encode returned shape {tuple(cond.shape)} for "
                             f"{len(prompts)} prompts; it must return one row per prompt.")
        return Cond({"cond": cond})

    teacher = Teacher("custom", custom_denoiser(fn, schedule, prediction_type, alphas_cumprod,
                                                guidance_scale),
                      shape, encode_prompts if encode is not None else None,
                      default_steps=default_steps, default_guidance=guidance_scale)
    if uncond is not None:
        if isinstance(uncond, str):
            teacher.denoiser.uncond = teacher.prompts([uncond])
        else:
            # one sample's condition, with or without its batch dimension of 1
            cond = torch.as_tensor(uncond)
            teacher.denoiser.uncond = Cond({"cond": cond if cond.ndim and cond.shape[0] == 1
                                            else cond[None]})
    return teacher
