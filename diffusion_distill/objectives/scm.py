"""Continuous-time consistency distillation: sCM / sCD (Lu & Song 2024, "Simplifying,
stabilizing and scaling continuous-time consistency models", Algorithm 1 with the teacher's
PF-ODE: sCD).

TrigFlow. ``x = cos(s) x0 + sin(s) z`` with ``z ~ N(0, sd^2 I)`` (``sd`` = sigma_data),
``s`` in [0, pi/2]; the consistency model ``f(x, s) = cos(s) x - sin(s) sd F(x / sd, s)``
and the PF-ODE ``dx/ds = sd F_teacher``. The paper's loss (its Algorithm 1)::

    L = || F_theta - F_theta^- - g ||^2 / D,
    g = -cos^2(s) (sd F^- - dx/ds) - r cos(s) sin(s) (x + sd dF^-/ds),   g <- g / (||g|| + c)

with ``^-`` the stop-gradient student and r the tangent warm-up, ramped 0 -> 1.

The toolkit's side. Every network here is a denoiser returning x0 at the toolkit's time ``u``
in [0, 1] (``x_u = alpha_u x0 + sigma_u eps``), and that x0 *is* the consistency function f:
the same clean estimate whatever coordinates the noisy point is written in. The two time axes
meet where the signal-to-noise ratios do::

    s = atan2(sigma_u, alpha_u sd)      (tan s = (sigma_u / alpha_u) / sd: EDM's sigma over sd)
    x_trig = x_u cos(s) / alpha_u       (the same point, rescaled)

For a rectified-flow teacher (SD3, Flux: ``alpha = 1 - u``, ``sigma = u``) that is
``tan s = u / ((1 - u) sd)``; for a DDPM (epsilon or v) teacher the alphas_cumprod table gives
alpha_u, sigma_u. So nothing needs F itself:

* ``F_theta - F^- = (f^- - f_theta) / (sd sin s)`` (x_trig cancels; for a flow backbone this is
  ``sqrt(u^2 + (1-u)^2 sd^2) / sd`` times the velocity difference: finite at s -> 0);
* ``-cos(s) (sd F^- - dx/ds) = cos(s) (f^- - x0_teacher) / sin(s)`` (dx/ds is the teacher's
  guided x0 written as a TrigFlow velocity);
* ``df/ds`` (the total derivative along the teacher's trajectory) is
  ``df/du / (ds/du)``; ``df/du`` is one JVP of the student's x0 in (x_u, u) with tangent
  ``(dx_u/du, 1)``, ``dx_u/du = alpha'_u x0_T + sigma'_u eps_T`` from the teacher's guided x0,
  and ``df/ds = -cos(s) (sd F^- - dx/ds) - sin(s) (x + sd dF^-/ds)`` gives the warm-up split:
  ``g = cos(s) (term1 + r (df/ds - term1))``, ``term1 = cos(s) (f^- - x0_T) / sin(s)``.

Tangent (``tangent``): ``jvp`` is ``torch.func.jvp`` through the student (LoRA adapter active)
under ``no_grad`` and torch's math SDPA kernel (forward-mode AD does not run through the fused
flash / efficient kernels; a run whose ``train.attention`` pins one of them is refused with
what to set instead); ``finite_difference`` is the central difference of the same directional
derivative, ``(f(x + h v, u + h) - f(x - h v, u - h)) / 2h`` with ``h = fd_step`` (1e-4: a tenth
of a DDPM timestep, below the period of a backbone's sinusoidal time embedding; float32
rounding costs ~1e-3 relative there; one-sided at u = 0 or 1), each pass under the same seeded RNG (identical dropout), for networks where
forward-mode AD fails. The loss arithmetic is float64 (METHODS.md; FastGen does the same).

Time sampling: ``tan(s) = e^tau / sd``, ``tau ~ N(P_mean, P_std^2)``: EDM's sigma lognormal
(the paper's -1.0, 1.4), clipped to [2e-3, the schedule's largest] and mapped to u by bisection.
Adaptive weighting (the paper's learned ``w_phi(s)``, loss ``e^{-w} L + w``) is optional and off
by default; so is the prior weighting ``1 / (sd tan s)``. rCM's score regulariser is not
implemented. The student is sampled with the consistency models' multistep sampler (x0, then
fresh noise to the next time): :class:`~diffusion_distill.samplers.StudentSampler` itself,
rendered as LCMScheduler without a boundary condition (VP) or stochastic
FlowMatchEulerDiscreteScheduler (flow), the same sampler ECT exports.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from . import Objective
from .common import AnyStepCount, bcast, edm_sigma, seeded, time_of_edm_sigma

TANGENTS = ("jvp", "finite_difference")
TANGENT_NORMS = ("l2", "rms", "none")
MIN_EDM_SIGMA = 2e-3  # below it x_u and the teacher's x0 agree to float32 precision


class LogVariance(nn.Module):
    """The adaptive weighting ``w_phi(s)``: Fourier features of EDM's log-sigma, one linear
    layer, initialised to 0 (EDM2's / sCM's uncertainty weighting)."""

    def __init__(self, features: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", torch.randn(features, generator=g))
        self.register_buffer("phases", torch.rand(features, generator=g))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, log_sigma: torch.Tensor) -> torch.Tensor:
        c = log_sigma.float()[:, None] / 4
        feats = torch.cos(2 * math.pi * (c * self.freqs + self.phases)) * math.sqrt(2)
        return self.linear(feats).squeeze(1)


class SCM(AnyStepCount, Objective):
    """sCM consistency distillation from the teacher's PF-ODE (sCD; module docstring).

    Args:
        sigma_data: TrigFlow's sd (the data's std; the paper's 0.5).
        P_mean, P_std: ``tan(s) sd = e^tau``, tau normal (the paper's -1.0, 1.4).
        tangent: ``jvp`` (torch.func.jvp, math attention) or ``finite_difference``.
        fd_step: the finite difference's step h in the toolkit's time u.
        warmup_steps: r ramps from 0 to 1 over these steps (default: a quarter of
            train.steps, at most the paper's 10k); 0 switches the warm-up off.
        tangent_c: c of the normalisation ``g / (||g|| + c)`` (the paper's 0.1).
        tangent_norm: ``l2`` (the paper's per-sample norm), ``rms`` (the norm over sqrt(D),
            FastGen's size-invariant option) or ``none``.
        adaptive_weighting: learn ``w_phi(s)`` with the student (loss ``e^{-w} L + w``).
        prior_weighting: weight each sample by ``1 / (sd tan s)``.
        sample_steps: step counts the export serves (evenly spaced times, re-noised between).
    """

    name = "scm"
    needs_data = True

    def __init__(self, sigma_data: float = 0.5, P_mean: float = -1.0, P_std: float = 1.4,
                 tangent: str = "jvp", fd_step: float = 1e-4, warmup_steps: int | None = None,
                 tangent_c: float = 0.1, tangent_norm: str = "l2",
                 adaptive_weighting: bool = False, prior_weighting: bool = False,
                 sample_steps: list[int] | None = None, student_times: list[float] | None = None,
                 total_steps: int | None = None):
        if tangent not in TANGENTS:
            raise ValueError(f"tangent must be one of {TANGENTS} (jvp: torch.func.jvp; "
                             f"finite_difference: where forward-mode AD fails), got {tangent!r}")
        if tangent_norm not in TANGENT_NORMS:
            raise ValueError(f"tangent_norm must be one of {TANGENT_NORMS}, got {tangent_norm!r}")
        if sigma_data <= 0 or P_std <= 0 or fd_step <= 0 or tangent_c < 0:
            raise ValueError(f"need sigma_data, P_std, fd_step > 0 and tangent_c >= 0, got "
                             f"{sigma_data}, {P_std}, {fd_step}, {tangent_c}")
        self.sigma_data, self.P_mean, self.P_std = float(sigma_data), float(P_mean), float(P_std)
        self.tangent, self.fd_step = tangent, float(fd_step)
        if warmup_steps is None:
            warmup_steps = min(10_000, max(1, (total_steps or 1000) // 4))
        self.warmup_steps = int(warmup_steps)
        self.tangent_c, self.tangent_norm = float(tangent_c), tangent_norm
        self.adaptive_weighting, self.prior_weighting = adaptive_weighting, prior_weighting
        self._serve(student_times, sample_steps)

    # -- contract -------------------------------------------------------------------------

    def setup(self, nets):
        if self.tangent == "jvp":
            backend = getattr(nets.network("student"), "_dd_attention", None)
            if backend not in (None, "", "native", "math"):
                raise ValueError(
                    f"sCM's JVP tangent needs torch's math attention kernel, and "
                    f"train.attention={backend!r} pins another one around every backbone call "
                    "(forward-mode AD does not run through fused kernels); set "
                    "train.attention to native or math, or method.tangent=finite_difference.")
        if self.adaptive_weighting:
            device = nets.teacher_model.device
            nets.add_extra("student", "scm_logvar", LogVariance().to(device))

    # -- pieces ---------------------------------------------------------------------------
    def warmup(self, step: int) -> float:
        """The tangent warm-up r at ``step``."""
        return 1.0 if self.warmup_steps <= 0 else min(1.0, step / self.warmup_steps)

    def sample_time(self, schedule, n: int, ctx, device):
        """(u, EDM sigma): ``e^tau``, tau ~ N(P_mean, P_std^2), on the toolkit's axis."""
        top = float(edm_sigma(schedule, torch.ones(1)))
        top = top if math.isfinite(top) else 1e3  # flow: sigma/alpha is infinite at u = 1
        sigma = (self.P_mean + self.P_std * ctx.rng.randn(n)).exp()
        sigma = sigma.clamp(MIN_EDM_SIGMA, top).to(device)
        return time_of_edm_sigma(schedule, sigma), sigma

    def trig(self, schedule, u):
        """``(alpha, sigma, s)`` at u and their derivatives in u (float64)."""
        sd = self.sigma_data

        def values(u):
            alpha, sigma = schedule.alpha_sigma(u)
            return alpha, sigma, torch.atan2(sigma, alpha * sd)

        u = u.to(torch.float64)
        return torch.func.jvp(values, (u,), (torch.ones_like(u),))

    def tangent_du(self, nets, x_t, u, v, cond, seed: int):
        """``df/du`` of the student's x0 along ``(dx/du, du/du) = (v, 1)``, no graph."""
        def f(x, t):
            return nets.student(x, t, cond)

        with torch.no_grad():
            if self.tangent == "jvp":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                # the adapter switched on outside the transform: peft's switch flips
                # requires_grad, which torch.func refuses inside it (inside, it is a no-op)
                with nets.roles.use("student"), sdpa_kernel([SDPBackend.MATH]), seeded(seed), \
                        contiguous_group_norm_inputs(nets.network("student")):
                    return torch.func.jvp(f, (x_t, u), (v, torch.ones_like(u)))[1]
            h = self.fd_step
            u_hi, u_lo = (u + h).clamp_max(1.0), (u - h).clamp_min(0.0)
            with seeded(seed):
                hi = f(x_t + bcast(u_hi - u, x_t) * v, u_hi)
            with seeded(seed):
                lo = f(x_t + bcast(u_lo - u, x_t) * v, u_lo)
            return (hi.double() - lo.double()) / bcast((u_hi - u_lo).double(), x_t)

    def normalise(self, g):
        if self.tangent_norm == "none":
            return g
        norm = g.flatten(1).norm(dim=1)
        if self.tangent_norm == "rms":
            norm = norm / math.sqrt(g[0].numel())
        return g / bcast(norm + self.tangent_c, g)

    def __call__(self, nets, batch, ctx):
        cond, x0 = batch["cond"], batch["x0"]
        n, sched, sd = x0.shape[0], nets.schedule, self.sigma_data
        u, sigma_edm = self.sample_time(sched, n, ctx, x0.device)
        (alpha, sigma, s), (d_alpha, d_sigma, d_s) = self.trig(sched, u)
        eps = ctx.rng.randn(*x0.shape)
        x_t = (bcast(alpha, x0) * x0.double() + bcast(sigma, x0) * eps.double()).to(x0.dtype)
        seed = ctx.rng.seed()  # one dropout mask for the online pass and the tangent
        with torch.no_grad():
            x0_T = nets.teacher(x_t, u, cond).double()  # the recipe's guidance
            eps_T = (x_t.double() - bcast(alpha, x0) * x0_T) / bcast(sigma, x0)
            v = (bcast(d_alpha, x0) * x0_T + bcast(d_sigma, x0) * eps_T).to(x0.dtype)
        with seeded(seed):
            f = nets.student(x_t, u, cond)
        f_minus = f.detach().double()
        df_du = self.tangent_du(nets, x_t, u, v, cond, seed).double()
        df_ds = df_du / bcast(d_s, x0)
        cos, sin = bcast(s.cos(), x0), bcast(s.sin(), x0)
        term1 = cos * (f_minus - x0_T) / sin  # -cos s (sd F^- - dx/ds)
        r = self.warmup(ctx.step)
        g = cos * (term1 + r * (df_ds - term1))
        g_norm = g.flatten(1).norm(dim=1)
        g = self.normalise(g)
        diff = (f_minus - f.double()) / (sd * sin)  # F_theta - F^-
        per_sample = ((diff - g) ** 2).flatten(1).mean(1)
        loss = per_sample
        if self.prior_weighting:
            loss = loss / sigma_edm.double()  # 1 / (sd tan s)
        if self.adaptive_weighting:
            w = nets.extra["student"]["scm_logvar"](sigma_edm.log()).double()
            loss = loss * torch.exp(-w) + w
        ctx.log(scm=per_sample.mean(), r=r, tangent_norm=g_norm.mean())
        yield "student", loss.mean().float()


@contextlib.contextmanager
def contiguous_group_norm_inputs(module: nn.Module):
    """GroupNorm's forward-mode AD formula views its input, which fails on a non-contiguous
    one (the UNet's resnets see one after an attention block's permute): for the duration,
    every GroupNorm of ``module`` gets a contiguous input (the same values)."""
    def pre_hook(_, args):
        return tuple(a.contiguous() if torch.is_tensor(a) else a for a in args)

    handles = [m.register_forward_pre_hook(pre_hook) for m in module.modules()
               if isinstance(m, nn.GroupNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
