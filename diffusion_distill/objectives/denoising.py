"""Plain denoising: how a teacher (or a critic, from scratch) is trained.

* VP / epsilon models: DDPM's "simple" loss ``|eps_hat - eps|^2`` (Ho et al. 2020, eq. 14)
  at uniformly drawn timesteps.
* Flow models: rectified-flow / conditional flow matching ``|v_hat - (eps - x0)|^2``
  (Lipman et al. 2023; Liu et al. 2023) with t drawn logit-normal (SD3, Esser et al. 2024,
  sec. 3.1), which spends the samples at the middle times where the task is hardest.
* Any other prediction type is trained in its own output space the same way.

Captions are dropped to the empty prompt with probability ``p_uncond`` so that the one network
is also the unconditional model classifier-free guidance needs (Ho & Salimans 2022).

The loss is taken on the backbone's raw output (not on x0), so it is exactly the loss the
diffusers training scripts use and stays well-conditioned at both ends of the time axis.
"""
from __future__ import annotations

import torch

from ..denoiser import Cond
from ..parameterization import add_noise, from_x0
from . import Objective, choice, number, table

T_SAMPLINGS = ("uniform", "logit_normal")
LOSS_WEIGHTS = ("simple", "v")


class Denoising(Objective):
    """Train role ``student`` to denoise ``batch["x0"]`` given ``batch["cond"]``.

    Args:
        t_sampling: "uniform" or "logit_normal"; "auto" picks logit-normal for flow schedules
            and uniform for VP ones (what SD3 and SD were trained with).
        logit_mean, logit_std: the logit-normal's parameters (SD3 uses 0 and 1).
        p_uncond: probability of replacing a caption with the empty prompt (CFG dropout).
        t_min: smallest t drawn; VP epsilon targets are meaningless at exactly t = 0.
        loss_weight: "simple" (every t alike in the network's output space, DDPM's choice)
            or "v": the v-prediction loss (Salimans & Ho 2022) whatever the network predicts,
            i.e. for VP models the epsilon loss times ``1 / alpha(t)^2 = 1 + 1/SNR(t)`` (x0
            outputs: times ``1 / sigma(t)^2``). The "simple" epsilon loss weights an x0 error
            by SNR(t), next to nothing at high noise, which is where the layout of an image
            (where things go) is decided: a teacher trained with it learns shape and colour
            from its prompts but not position. Flow models: the flow loss already weights x0
            errors as v does, so "v" leaves it unchanged.
    """

    name = "denoising"
    options = table(
        t_sampling=choice(*T_SAMPLINGS, "auto"), logit_mean=number(),
        logit_std=number(0, lo_open=True), p_uncond=number(0, 1, hi_open=True),
        t_min=number(0, 1, hi_open=True), loss_weight=choice(*LOSS_WEIGHTS),
    )

    roles = ("student",)
    needs_data = True

    def __init__(self, t_sampling: str = "auto", logit_mean: float = 0.0,
                 logit_std: float = 1.0, p_uncond: float = 0.1, t_min: float = 1e-3,
                 loss_weight: str = "simple"):
        if t_sampling not in T_SAMPLINGS + ("auto",):
            raise ValueError(f"t_sampling must be one of {T_SAMPLINGS} or 'auto', got "
                             f"{t_sampling!r}")
        if loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight must be one of {LOSS_WEIGHTS}, got {loss_weight!r}")
        self.loss_weight = loss_weight
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond is a probability in [0, 1), got {p_uncond}")
        self.t_sampling = t_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.p_uncond = p_uncond
        self.t_min = t_min

    def sample_t(self, n: int, kind: str, rng) -> torch.Tensor:
        mode = self.t_sampling
        if mode == "auto":
            mode = "logit_normal" if kind == "flow" else "uniform"
        if mode == "uniform":
            t = rng.rand(n)
        else:
            t = torch.sigmoid(self.logit_mean + self.logit_std * rng.randn(n))
        return t.clamp(self.t_min, 1.0)

    def drop_captions(self, cond: Cond, uncond: Cond | None, rng) -> Cond:
        if self.p_uncond == 0 or uncond is None or not cond.tensors:
            return cond
        n = len(cond)
        drop = rng.rand(n) < self.p_uncond
        if not drop.any():
            return cond
        empty = uncond.expand(n)
        out = {}
        for k, v in cond.tensors.items():
            mask = drop.view((n,) + (1,) * (v.ndim - 1)).to(v.device)
            out[k] = torch.where(mask, empty.tensors[k].to(v), v)
        return Cond(out)

    def __call__(self, nets, batch, ctx):
        x0 = batch["x0"]
        rng = ctx.rng
        schedule = nets.schedule
        denoiser = _role_denoiser(nets, "student")
        t = self.sample_t(x0.shape[0], schedule.kind, rng).to(x0.device)
        eps = rng.randn(*x0.shape).to(x0)
        alpha, sigma = schedule.alpha_sigma(t)
        x_t = add_noise(x0, eps, alpha, sigma)
        cond = self.drop_captions(batch["cond"], denoiser.uncond, rng)
        with nets.roles.use("student"):
            out = denoiser.raw(x_t, t, cond)
        target = from_x0(x0, x_t, alpha, sigma, denoiser.prediction_type)
        per_sample = ((out.float() - target.float()) ** 2).flatten(1).mean(1)
        if self.loss_weight == "v":
            per_sample = per_sample * v_weight(denoiser.prediction_type, alpha, sigma)
        loss = per_sample.mean()
        ctx.log(loss_denoise=loss.detach(), t_mean=t.mean())
        yield "student", loss


def v_weight(prediction_type: str, alpha, sigma) -> torch.Tensor | float:
    """The factor that turns a squared error in ``prediction_type``'s output space into the
    squared error of v = alpha eps - sigma x0 (for a fixed x_t, alpha^2 + sigma^2 = 1)."""
    alpha, sigma = alpha.float().reshape(-1), sigma.float().reshape(-1)
    if prediction_type == "epsilon":
        return 1.0 / alpha**2  # v error = eps error / alpha
    if prediction_type == "sample":
        return 1.0 / sigma**2  # v error = -x0 error / sigma
    return 1.0  # v_prediction is v; flow (eps - x0) already weights x0 errors as v does


def _role_denoiser(nets, role):
    """The Denoiser object that runs ``role`` (its own network, or the shared base)."""
    return nets.denoiser(role)
