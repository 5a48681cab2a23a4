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
by default; so is the prior weighting ``1 / (sd tan s)``. The student is sampled with the
consistency models' multistep sampler (x0, then fresh noise to the next time):
:class:`~diffusion_distill.samplers.StudentSampler` itself, rendered as LCMScheduler without a
boundary condition (VP) or stochastic FlowMatchEulerDiscreteScheduler (flow), the same sampler
ECT exports.

rCM's score regularisation (``score_regularization`` = lambda > 0; Zheng et al. 2025, "Large
Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency", arXiv
2510.08431; 0, the default, is plain sCM with no critic role). The paper's sec. 4.1 adds a
DMD term, its eq. 6, to the sCM loss (its eq. 4)::

    L_rCM = L_sCM + lambda L_DMD,
    L_DMD = || x0 - sg(x0 - (f_fake(x_tD) - f_teacher(x_tD)) / mean|x0 - f_teacher(x_tD)|) ||^2

with x0 the student's own sample re-noised to ``x_tD``, ``tD ~ p_D``, and a fake score
(here the ``critic`` role: a LoRA adapter on the shared frozen base, like DMD's) trained by
denoising on the detached student samples (the paper's flow-matching loss: here
:func:`~.common.critic_denoising_loss`, the backbone's own output space, at ``tD ~ p_D``). The
direction and its normaliser are :func:`~.common.dm_direction` (the teacher guided as in the
sCM term, the critic unguided). Where each default was read:

* ``lambda = 0.01``: sec. 4.1, "we find lambda = 0.01 generalizes across our used models and
  tasks". Both norms in the paper are sums over the D elements; here both terms are means
  (the sCM term already was), so lambda weighs them alike: the DMD term is
  ``mean((x0/sd - sg(x0/sd - grad))^2)`` (= ``2 * surrogate_loss(x0 / sd, grad)``), x0 in
  units of sd as the paper's TrigFlow data ("we absorb sigma_d into x0 itself", its footnote 2)
  and as the sCM term's ``F`` differences are.
* Where the DMD sample comes from: the paper's "rollout strategy" (sec. 4.1, Algorithm 1
  lines 9-11 and 17-19): the student's own multistep sample from pure noise, ``t_1`` = pure
  noise (toolkit u = 1), ``N ~ U{1..N_max}`` steps, ``t_n = min(t^_n, t_{n-1})`` with ``t^_n ~
  p_D`` (monotone, random times: "CM should explore the entire time range"), x0 re-noised with
  fresh noise between steps, gradients only through the last step; ``N_max = 4``
  (``max_simulation_steps``; Table 4, every model). Not the real data the sCM term noises.
  (Through :func:`~.common.student_output_at_step` with per-sample times.)
* ``p_D``: Table 4 (the Cosmos T2I models): ``log tan t ~ N(0.0, 1.6^2)`` for data scaled to
  unit sigma_d; here ``D_mean``, ``D_std`` of EDM's sigma ``sd tan s`` as ``P_mean``, ``P_std``
  are, which is the same for sd = 1 (the embedded recipes). (The paper's p_G, N(-0.8, 1.6^2)
  there, is not made the default: P_mean, P_std stay sCM's.)
* The alternation (Algorithm 1, Table 4's student update frequency F = 5; 10 for Wan 14B):
  after the tangent warm-up every ``critic_steps``-th step is a student step (sCM +
  lambda DMD), and the critic trains on every step, on the student step with the rollout the
  DMD term used (DMD2's arrangement here, so ``critic_steps`` means what it means for
  ``dmd2``: 5 critic updates per student update where the paper's Algorithm 1 makes 4).
  During the warm-up (``r < 1``) every step is a plain sCM student step and the critic does
  not train (Algorithm 1 line 8; the paper's T2I runs have no warm-up, Table 4: H = 0, so
  ``warmup_steps: 0`` follows them). The critic's learning rate is ``train.lr_critic`` (the
  role settings' default for a ``critic``; Table 4: a fifth of the student's).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from . import Objective, choice, counts, flag, integer, number, table
from .common import (
    AnyStepCount,
    bcast,
    critic_denoising_loss,
    dm_direction,
    edm_sigma,
    seeded,
    student_output_at_step,
    surrogate_loss,
    time_of_edm_sigma,
)

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
        score_regularization: rCM's lambda (module docstring; the paper's 0.01); 0 is plain
            sCM and declares no critic role.
        critic_steps: with the regulariser, critic updates per student update after the
            warm-up (the student steps every critic_steps-th step; the paper's F = 5).
        max_simulation_steps: N_max of the DMD term's student rollout (the paper's 4).
        D_mean, D_std: EDM sigma ``sd tan s`` lognormal for the DMD term's and the critic's
            times (the paper's p_D: 0.0, 1.6).
    """

    name = "scm"
    needs_data = True
    options = table(
        sigma_data=number(0, lo_open=True), P_mean=number(),
        P_std=number(0, lo_open=True), tangent=choice(*TANGENTS),
        fd_step=number(0, lo_open=True),
        warmup_steps=integer(0, none=True),  # 0: no warm-up; negative is no count
        tangent_c=number(0), tangent_norm=choice(*TANGENT_NORMS),
        adaptive_weighting=flag(), prior_weighting=flag(), sample_steps=counts(),
        score_regularization=number(0), critic_steps=integer(1),
        max_simulation_steps=integer(1), D_mean=number(),
        D_std=number(0, lo_open=True),
    )

    def __init__(self, sigma_data: float = 0.5, P_mean: float = -1.0, P_std: float = 1.4,
                 tangent: str = "jvp", fd_step: float = 1e-4, warmup_steps: int | None = None,
                 tangent_c: float = 0.1, tangent_norm: str = "l2",
                 adaptive_weighting: bool = False, prior_weighting: bool = False,
                 sample_steps: list[int] | None = None, student_times: list[float] | None = None,
                 score_regularization: float = 0.0, critic_steps: int = 5,
                 max_simulation_steps: int = 4, D_mean: float = 0.0, D_std: float = 1.6,
                 total_steps: int | None = None, student_steps: int = 1):
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
        if not (score_regularization >= 0 and critic_steps >= 1 and max_simulation_steps >= 1
                and D_std > 0):
            raise ValueError(f"need score_regularization >= 0, critic_steps >= 1, "
                             f"max_simulation_steps >= 1 and D_std > 0, got {score_regularization}, "
                             f"{critic_steps}, {max_simulation_steps}, {D_std}")
        self.score_regularization = float(score_regularization)
        self.critic_steps, self.max_simulation_steps = int(critic_steps), int(max_simulation_steps)
        self.D_mean, self.D_std = float(D_mean), float(D_std)
        # plain sCM trains the student alone: no critic adapter, checkpoints and exports as before
        self.roles = ("student", "critic") if self.score_regularization > 0 else ("student",)
        self._serve(student_times, student_steps, sample_steps)

    # -- contract -------------------------------------------------------------------------

    def setup(self, nets):
        if self.tangent == "jvp":
            backend = nets.attention.name
            if backend not in ("native", "math"):
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

    def sample_time(self, schedule, n: int, ctx, device, mean=None, std=None):
        """(u, EDM sigma): ``e^tau``, tau ~ N(P_mean, P_std^2) (or ``mean``, ``std``), on the
        toolkit's axis."""
        mean = self.P_mean if mean is None else mean
        std = self.P_std if std is None else std
        top = float(edm_sigma(schedule, torch.ones(1)))
        top = top if math.isfinite(top) else 1e3  # flow: sigma/alpha is infinite at u = 1
        sigma = (mean + std * ctx.rng.randn(n)).exp()
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

    def regularised_step(self, ctx) -> str:
        """What step ``ctx.step`` is with the score regulariser: ``warmup`` (plain sCM while r
        < 1), ``student`` (sCM + lambda DMD, then the critic) or ``critic``."""
        if ctx.step < self.warmup_steps:
            return "warmup"
        return "student" if (ctx.step - self.warmup_steps) % self.critic_steps == 0 else "critic"

    def critic_time(self, schedule, n: int, ctx, device):
        """Times from the paper's p_D (``D_mean``, ``D_std``), on the toolkit's axis."""
        return self.sample_time(schedule, n, ctx, device, self.D_mean, self.D_std)[0]

    def rollout(self, nets, cond, ctx, grad: bool, device):
        """The student's own sample for the DMD term and the critic (rCM's rollout): from pure
        noise, N ~ U{1..max_simulation_steps} steps at monotone times ``t_n = min(t^_n,
        t_{n-1})``, ``t^_n ~ p_D``, re-noised with fresh noise between steps; a graph only
        through the last step (when ``grad``)."""
        n = len(cond)
        times = [torch.ones(n, device=device)]
        for _ in range(self.max_simulation_steps - 1):
            times.append(torch.minimum(self.critic_time(nets.schedule, n, ctx, device), times[-1]))
        x0, _ = student_output_at_step(nets, cond, times, ctx, grad,
                                       lambda: ctx.rng.choice(self.max_simulation_steps))
        return x0

    def __call__(self, nets, batch, ctx):
        if self.score_regularization <= 0:
            yield "student", self.consistency_loss(nets, batch, ctx)
            return
        cond, device = batch["cond"], batch["x0"].device
        kind = self.regularised_step(ctx)
        if kind == "warmup":  # rCM's Algorithm 1: no DMD term and no critic during the warm-up
            yield "student", self.consistency_loss(nets, batch, ctx)
            return
        if kind == "student":
            loss = self.consistency_loss(nets, batch, ctx)
            x0 = self.rollout(nets, cond, ctx, grad=True, device=device)
            grad = dm_direction(nets, x0, cond, self.critic_time(nets.schedule, len(cond), ctx,
                                                                 device), ctx)
            # ||x0 - sg(x0 - grad)||^2 per element, x0 in units of sd (module docstring)
            dmd = 2 * surrogate_loss(x0 / self.sigma_data, grad)
            ctx.log(dmd=dmd, dmd_grad_norm=grad.flatten(1).norm(dim=1).mean())
            yield "student", loss + self.score_regularization * dmd
            fake = x0.detach()
        else:
            with torch.no_grad():
                fake = self.rollout(nets, cond, ctx, grad=False, device=device)
        critic = critic_denoising_loss(nets, fake, cond,
                                       self.critic_time(nets.schedule, len(cond), ctx, device), ctx)
        ctx.log(critic_denoise=critic)
        yield "critic", critic

    def consistency_loss(self, nets, batch, ctx):
        """The sCM loss (module docstring), logged as ``scm``, ``r``, ``tangent_norm``."""
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
        return loss.mean().float()


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
