"""The one calling convention: every network is ``x0 = net(x_t, t, cond)``.

A :class:`Denoiser` joins a backbone (UNet, transformer, or any module), a
:class:`~diffusion_distill.schedules.Schedule`, a prediction type and a family-specific call
function. Classifier-free guidance happens here, in x0 space (which equals guidance in eps or
velocity space, since each is affine in x0 at fixed ``x_t``), so objectives only ever choose a
scale.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .parameterization import check_prediction_type, eps_from_x0, to_x0
from .schedules import Schedule


@dataclass
class Cond:
    """A batch of conditioning tensors (text states, pooled embeds, ...), keyed by name.

    Every tensor has the batch on dim 0, so a Cond can be sliced, concatenated and
    repeated like one tensor. ``Cond({})`` means unconditional.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    batch: int | None = None  # the batch size of an unconditional (empty) Cond

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0] if self.tensors else (self.batch or 0)

    def __getitem__(self, index) -> Cond:
        if not self.tensors:
            return Cond({}, batch=len(range(len(self))[index]) if isinstance(index, slice) else 1)
        return Cond({k: v[index] for k, v in self.tensors.items()})

    def to(self, *args, **kwargs) -> Cond:
        return Cond({k: v.to(*args, **kwargs) for k, v in self.tensors.items()}, self.batch)

    def expand(self, batch: int) -> Cond:
        """A batch of ``batch`` copies of a single-sample Cond (used for the empty prompt)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"can only expand a Cond of batch 1, got batch {len(self)}")
        if not self.tensors:
            return Cond({}, batch=batch)
        return Cond({k: v.expand(batch, *v.shape[1:]) for k, v in self.tensors.items()})

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        keys = conds[0].tensors.keys()
        if not keys:
            return Cond({}, batch=sum(len(c) for c in conds))
        return Cond({k: torch.cat([c.tensors[k] for c in conds]) for k in keys})


CallFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Cond], torch.Tensor]


class Denoiser(nn.Module):
    """``x0 = denoiser(x_t, t, cond, guidance=w)``.

    Args:
        backbone: the network. Its LoRA adapters (student, critic, EMA) are switched outside.
        schedule: maps ``t`` in [0, 1] to alpha, sigma and the backbone's own time value.
        prediction_type: what the backbone outputs (see ``parameterization.PREDICTION_TYPES``).
        call: ``call(backbone, x_t, model_time, cond) -> raw output``; the family adapter.
            A call function with ``call.embedded_guidance = True`` belongs to a
            guidance-distilled model (Flux-dev): there ``guidance`` is not CFG but an input,
            passed to the call as ``cond.tensors["guidance"]`` in one pass. The flag sits on
            the function so that every Denoiser built from it (student, critic) inherits it.
        uncond: the single-sample condition for the empty (or negative) prompt, for CFG.
        guidance_scale: default CFG scale; 1.0 (or None) means a single conditional pass.
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: Schedule,
        prediction_type: str,
        call: CallFn,
        uncond: Cond | None = None,
        guidance_scale: float | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.call = call
        self.uncond = uncond
        self.guidance_scale = guidance_scale
        self.embedded_guidance = bool(getattr(call, "embedded_guidance", False))

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The backbone's own output at continuous time ``t``.

        A low-precision base (``train.base_dtype: bfloat16``) gets its inputs in its own dtype
        and gives float32 back: everything outside the backbone (the schedule's arithmetic,
        the losses, the samplers) stays float32.
        """
        t = _as_batch_time(t, x_t)
        dtype = _base_dtype(self.backbone)
        if dtype in (None, x_t.dtype):
            return self.call(self.backbone, x_t, self.schedule.model_time(t), cond)
        cond = Cond({k: v.to(dtype) if v.is_floating_point() else v
                     for k, v in cond.tensors.items()}, cond.batch)
        out = self.call(self.backbone, x_t.to(dtype), self.schedule.model_time(t), cond)
        return out.to(x_t.dtype)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: Cond,
        guidance: float | None = None,
        negative: Cond | None = None,
    ) -> torch.Tensor:
        t = _as_batch_time(t, x_t)
        alpha, sigma = self.schedule.alpha_sigma(t)
        w = self.guidance_scale if guidance is None else guidance
        if self.embedded_guidance:
            if w is not None:
                # a scalar or one value per sample
                g = torch.as_tensor(w, dtype=torch.float32, device=x_t.device)
                g = g.expand(x_t.shape[0]) if g.ndim == 0 else g
                cond = Cond({**cond.tensors, "guidance": g})
            return to_x0(self.raw(x_t, t, cond), x_t, alpha, sigma, self.prediction_type)
        if w is None or w == 1.0:
            return to_x0(self.raw(x_t, t, cond), x_t, alpha, sigma, self.prediction_type)
        negative = negative if negative is not None else self.uncond
        if negative is None:
            raise ValueError(
                f"guidance {w} needs an unconditional (empty-prompt) condition; this denoiser "
                "has none. Build it with uncond=..., or pass guidance=1.0."
            )
        b = x_t.shape[0]
        # One batched pass for the conditional and unconditional halves.
        both = Cond.cat([cond, negative.expand(b)])
        out = self.raw(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        x0_c, x0_u = to_x0(out, torch.cat([x_t, x_t]), torch.cat([alpha, alpha]),
                           torch.cat([sigma, sigma]), self.prediction_type).chunk(2)
        return x0_u + w * (x0_c - x0_u)

    def eps(self, x_t, t, x0):
        alpha, sigma = self.schedule.alpha_sigma(_as_batch_time(t, x_t))
        return eps_from_x0(x0, x_t, alpha, sigma)


def _base_dtype(backbone: nn.Module) -> torch.dtype | None:
    """The dtype of the backbone's own (non-LoRA) weights; None for a weightless callable."""
    for name, p in backbone.named_parameters():
        if "lora_" not in name:
            return p.dtype
    return None


def _as_batch_time(t, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t


def ddim_step(schedule: Schedule, x0, x_t, t, s, noise=None):
    """Move from time ``t`` to ``s < t`` given the predicted ``x0``.

    With ``noise=None`` this is DDIM (eta=0): the implied eps is reused, which equals
    diffusers' DDIMScheduler / FlowMatchEulerDiscreteScheduler step. With fresh ``noise`` it is
    the consistency-model / DMD2 multi-step sampler (LCMScheduler, stochastic flow Euler).
    """
    t = _as_batch_time(t, x_t)
    s = _as_batch_time(s, x_t)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    eps = noise if noise is not None else eps_from_x0(x0, x_t, alpha_t, sigma_t)
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    return alpha_s.view(shape) * x0 + sigma_s.view(shape) * eps
