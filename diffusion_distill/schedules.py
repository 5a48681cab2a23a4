"""Noise schedules on one continuous time axis.

Every objective works with ``t`` in [0, 1] (0 = clean, 1 = pure noise) and
``x_t = alpha(t) * x0 + sigma(t) * eps``. A schedule also says what time value the backbone
itself was trained on (``model_time``): DDPM's integer step index for VP models, ``sigma *
1000`` for SD3/Flux-style flow transformers. Keeping that conversion here is why objectives
never branch on the model family.
"""
from __future__ import annotations

import torch


class Schedule:
    """alpha(t), sigma(t) and the backbone's own time value for continuous ``t``."""

    kind: str = ""

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t_from_model_time(self, timestep: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return (alpha / sigma.clamp_min(1e-12)) ** 2


class VPSchedule(Schedule):
    """Variance-preserving schedule given by a DDPM ``alphas_cumprod`` table.

    ``t = k / (T - 1)`` for the integer step ``k``, so at integer steps the values are exactly
    the scheduler's own; between them ``alphas_cumprod`` is interpolated linearly.
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
            raise ValueError(
                f"alphas_cumprod must be a 1-D table of at least 2 values, got shape "
                f"{tuple(alphas_cumprod.shape)}; pass scheduler.alphas_cumprod."
            )
        self.alphas_cumprod = alphas_cumprod
        self.num_train_timesteps = len(alphas_cumprod)

    @classmethod
    def from_scheduler(cls, scheduler) -> VPSchedule:
        return cls(scheduler.alphas_cumprod)

    def _alphas_cumprod_at(self, t: torch.Tensor) -> torch.Tensor:
        k = t.to(torch.float64).clamp(0, 1) * (self.num_train_timesteps - 1)
        lo = k.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = k - lo
        table = self.alphas_cumprod.to(k.device)
        return table[lo] * (1 - w) + table[lo + 1] * w

    def alpha_sigma(self, t):
        acp = self._alphas_cumprod_at(t)
        return acp.sqrt().to(t.dtype), (1 - acp).sqrt().to(t.dtype)

    def model_time(self, t):
        return t * (self.num_train_timesteps - 1)

    def t_from_model_time(self, timestep):
        return torch.as_tensor(timestep, dtype=torch.float32) / (self.num_train_timesteps - 1)


class FlowSchedule(Schedule):
    """Rectified flow: ``x_t = (1 - t) x0 + t eps``; the backbone sees ``t * num_train_timesteps``.

    Time shifting (SD3's ``shift``, Flux's resolution-dependent ``mu``) only decides which
    ``t`` are visited; it does not change this map, so it lives with the samplers.
    """

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps

    @classmethod
    def from_scheduler(cls, scheduler) -> FlowSchedule:
        return cls(int(scheduler.config.num_train_timesteps))

    def alpha_sigma(self, t):
        return 1 - t, t

    def model_time(self, t):
        return t * self.num_train_timesteps

    def t_from_model_time(self, timestep):
        return torch.as_tensor(timestep, dtype=torch.float32) / self.num_train_timesteps


SCHEDULES = {"vp": VPSchedule, "flow": FlowSchedule}


def schedule_from_scheduler(scheduler) -> Schedule:
    """The schedule a diffusers scheduler samples, read from its config."""
    name = type(scheduler).__name__
    cfg = scheduler.config
    # DPM-Solver and UniPC sample flow models too (Sana): they also carry an alphas_cumprod
    # table, so their flow flags must be checked before falling back to VP.
    if ("FlowMatch" in name or cfg.get("use_flow_sigmas", False)
            or cfg.get("prediction_type") == "flow_prediction"):
        return FlowSchedule.from_scheduler(scheduler)
    if hasattr(scheduler, "alphas_cumprod"):
        return VPSchedule.from_scheduler(scheduler)
    raise ValueError(
        f"scheduler {name} is neither a flow-matching scheduler nor a DDPM-family scheduler "
        "with alphas_cumprod; supported: FlowMatchEulerDiscreteScheduler and the DDPM family "
        "(DDPM, DDIM, Euler, DPM-Solver, LCM, TCD, ...)."
    )


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift ``s t / (1 + (s - 1) t)``: more time spent at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def student_timesteps(num_steps: int, schedule: Schedule | None = None,
                      t_max: float = 1.0) -> list[float]:
    """Evenly spaced times for a few-step student, starting at pure noise (DMD2's choice)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [t_max * (1 - i / num_steps) for i in range(num_steps)]
