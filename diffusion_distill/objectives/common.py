"""Pieces several method families share: re-noising, the critic's denoising loss, the
distribution-matching direction, the GAN head on the critic's features; for the consistency
families (ECT, sCM) EDM's noise level and its inverse, and a seeded RNG block (one dropout mask
for two passes).

DMD and SiD both train a critic ("fake score") on the student's own samples and compare it with
the teacher at re-noised student samples; DMD2 and SiDA both put a discriminator head on the
critic's features. Written once here, so no family imports another's classes.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..denoiser import ddim_step
from ..parameterization import add_noise, from_x0
from ..samplers import StudentSampler


def mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample value shaped to broadcast against a batch like ``like``."""
    return v.view(-1, *([1] * (like.ndim - 1)))


def uniform_t(ctx, n: int, lo: float, hi) -> torch.Tensor:
    """``n`` times uniform in [lo, hi] (``hi`` may be per sample), from the step's RNG."""
    return lo + (hi - lo) * ctx.rng.rand(n)


def student_output_at_step(nets, cond, times, ctx, grad: bool, pick_step):
    """``(x0, k)``: the student's x0 at its step ``k = pick_step()`` (backward simulation,
    DMD2 sec. 4.5). Steps before ``k`` run from fresh noise without gradients, each x0
    re-noised with fresh noise to the next time, exactly as the exported multi-step sampler
    does. (``pick_step`` is called after the initial noise is drawn: the RNG order.)"""
    shape = nets.teacher_model.latent_shape
    n = len(cond)
    x = ctx.rng.randn(n, *shape)
    k = pick_step()
    with torch.no_grad():
        for i in range(k):
            x0 = nets.student(x, times[i], cond)
            x = ddim_step(nets.schedule, x0, x, times[i], times[i + 1],
                          noise=ctx.rng.randn(n, *shape))
    with torch.set_grad_enabled(grad):
        return nets.student(x, times[k], cond), k


def renoise(schedule, x0: torch.Tensor, t: torch.Tensor, ctx) -> torch.Tensor:
    """``x_t = alpha_t x0 + sigma_t eps`` with fresh eps from the step's RNG."""
    alpha, sigma = schedule.alpha_sigma(t)
    return add_noise(x0, ctx.rng.randn(*x0.shape), alpha, sigma)


def native_mse(nets, pred_x0, target_x0, x_t, t) -> torch.Tensor:
    """MSE in the backbone's own output space (eps for eps models, velocity for flow, ...).

    Weighting a denoising loss like the loss the teacher was trained with keeps a critic's fit
    of the score comparable to the teacher's, at every t.
    """
    alpha, sigma = nets.schedule.alpha_sigma(t)
    kind = nets.teacher_model.denoiser.prediction_type
    return F.mse_loss(from_x0(pred_x0, x_t, alpha, sigma, kind),
                      from_x0(target_x0, x_t, alpha, sigma, kind))


def native_gain(nets, t) -> torch.Tensor:
    """Per sample, how much the x0 estimate moves per unit of the backbone's own output at
    ``t``: ``sigma / alpha`` for eps models (14.6 at the top of SD's schedule), ``t`` for
    flow velocity, 1 for x0 models. A loss on x0 divided by it is in the backbone's units."""
    alpha, sigma = nets.schedule.alpha_sigma(t)
    kind = nets.teacher_model.denoiser.prediction_type
    one = torch.ones(len(t), 1, dtype=torch.float64, device=t.device)
    per_x0 = from_x0(one, torch.zeros_like(one), alpha.double(), sigma.double(), kind)
    return 1.0 / per_x0.abs().flatten()


def critic_denoising_loss(nets, x0_target, cond, t, ctx, role: str = "critic",
                          guidance: float | None = None) -> torch.Tensor:
    """The critic's denoising loss on (detached) student samples at times ``t``."""
    x_t = renoise(nets.schedule, x0_target, t, ctx)
    pred = nets.x0(role, x_t, t, cond, guidance=guidance)
    return native_mse(nets, pred, x0_target, x_t, t)


@torch.no_grad()
def dm_direction(nets, x0, cond, t, ctx, guidance: float | None = None) -> torch.Tensor:
    """DMD's generator gradient at re-noised ``x0``: ``(x0_fake - x0_real)`` scaled per sample
    by ``1 / mean|x0 - x0_real|`` (DMD eq. 7 and its normaliser); no graph."""
    x_t = renoise(nets.schedule, x0.detach(), t, ctx)
    real = nets.teacher(x_t, t, cond, guidance=guidance)
    fake = nets.critic(x_t, t, cond)
    weight = 1.0 / mean_per_sample((x0.detach() - real).abs()).clamp_min(1e-6)
    return torch.nan_to_num((fake - real) * bcast(weight, x0))


def surrogate_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 ||x0 - sg(x0 - grad)||^2``: its gradient with respect to x0 is ``grad`` (per
    element, divided by the element count as a mean is)."""
    return 0.5 * F.mse_loss(x0, (x0 - grad).detach())


class GANHead(nn.Module):
    """A discriminator head on the critic's features (DMD2 sec. 4.3, SiDA).

    Features come from a forward hook on one module of the backbone: the teacher family names
    it (``Teacher.feature_module``: the UNet's ``mid_block``, a middle transformer block), or
    the recipe does (``gan_feature_module``). The critic adapter doubles as the trunk.
    """

    def __init__(self, channels: int, spatial: bool):
        super().__init__()
        self.spatial = spatial
        if spatial:
            self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                                     nn.Conv2d(channels, 1, 1))
        else:
            self.net = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(),
                                     nn.Linear(channels, 1))
        self._captured = None
        self._capture = False

    @classmethod
    def attach(cls, nets, module_name: str | None = None, role: str = "critic") -> GANHead:
        teacher = nets.teacher_model
        module = feature_module(nets, role, module_name)
        holder: dict = {}

        def hook(_, __, output):
            feat = output[0] if isinstance(output, tuple) else output
            if holder.get("head") is not None and holder["head"]._capture:
                holder["head"]._captured = feat
            elif "probe" in holder:
                holder["probe"] = feat

        module.register_forward_hook(hook)
        holder["probe"] = None  # one probe pass to learn the feature shape
        with torch.no_grad():
            nets.x0(role, torch.zeros(1, *teacher.latent_shape, device=teacher.device), 0.5,
                    teacher.prompts([""]))
        feat = holder.pop("probe")
        spatial = feat.ndim == 4
        head = cls(feat.shape[1] if spatial else feat.shape[-1], spatial).to(teacher.device)
        head.role = role
        holder["head"] = head
        return head

    def logits(self, nets, x_t, t, cond) -> torch.Tensor:
        self._capture = True
        try:
            nets.x0(getattr(self, "role", "critic"), x_t, t, cond)
        finally:
            self._capture = False
        feat, self._captured = self._captured, None
        return self.net(feat).flatten(1).mean(1)


def feature_module(nets, role: str, name: str | None = None) -> nn.Module:
    """The module of ``role``'s network whose output the GAN head reads."""
    teacher = nets.teacher_model
    network = nets.network(role)
    name = name or getattr(teacher, "feature_module", None)
    if not name:
        raise ValueError(
            f"no feature module for a GAN head on this {teacher.family} teacher "
            f"({type(network).__name__}); set method.gan_feature_module to the name of one of "
            "its modules (see model.named_modules(), e.g. 'mid_block').")
    try:
        return network.get_submodule(name)
    except AttributeError:
        raise ValueError(f"method.gan_feature_module {name!r} is not a module of "
                         f"{type(network).__name__}; pick one of: "
                         f"{[n for n, _ in network.named_modules() if n][:12]} ...") from None


# -- noise levels and repeatable randomness (the consistency families) ---------------------

def edm_sigma(schedule, t):
    """EDM's noise level ``sigma_t / alpha_t`` of time ``t``."""
    alpha, sigma = schedule.alpha_sigma(t)
    return sigma / alpha


def time_of_edm_sigma(schedule, s, iters: int = 24):
    """The time ``t`` with ``sigma_t / alpha_t = s`` (bisection; any monotone schedule)."""
    lo = torch.zeros_like(s)
    hi = torch.ones_like(s)
    for _ in range(iters):
        mid = (lo + hi) / 2
        up = edm_sigma(schedule, mid) < s
        lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
    return torch.where(s <= 0, torch.zeros_like(s), hi)


class MomentumTarget(nn.Module):
    """The consistency models' target network ``theta^- <- mu theta^- + (1 - mu) theta``
    (Song et al. 2023, Algorithm 2; LCM Algorithm 1 with mu = 0.95) over the student's trained
    parameters. Kept by the objective as buffers (checkpointed with the student role through
    ``nets.add_extra``, never optimised, never exported); :meth:`swapped` puts them in place of
    the student's weights for the target's forward pass.

    Why not the student itself under no_grad (LCM-LoRA's script): there the target moves with
    every step, and on the exact 2-D toy that self-target drifts off the data under the
    pseudo-Huber loss (docs/consistency.md, "Diagnosis")."""

    def __init__(self, params, decay: float):
        super().__init__()
        self.decay = float(decay)
        self._tracked = list(params)
        for i, p in enumerate(self._tracked):
            self.register_buffer(f"p{i}", p.detach().clone())

    def _copies(self):
        return [getattr(self, f"p{i}") for i in range(len(self._tracked))]

    @torch.no_grad()
    def update(self):
        for p, copy in zip(self._tracked, self._copies()):
            copy.lerp_(p.detach().to(copy.dtype), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        saved = [p.detach().clone() for p in self._tracked]
        with torch.no_grad():
            for p, copy in zip(self._tracked, self._copies()):
                p.copy_(copy)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, keep in zip(self._tracked, saved):
                    p.copy_(keep)


class seeded:
    """Torch's global RNG forked and seeded for the block (dropout masks), then restored."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


class AnyStepCount:
    """For a consistency function sampled by its default rule (x0, then fresh noise to the next
    time): one student serves any step count, on its ``default_times``, besides its training
    times. ``sample_steps``: the counts its export declares (default 1, 2, 4, 8)."""

    def _serve(self, student_times, student_steps, sample_steps=None):
        self.student_times = self.own_times(student_times, student_steps)
        self._servable = sorted(set(sample_steps or [1, 2, 4, 8]) | {len(self.student_times)})

    def servable_steps(self):
        return list(self._servable)

    def sampler(self, num_steps=None):
        self._check_steps(num_steps)
        if num_steps is None or num_steps == len(self.student_times):
            return StudentSampler(self.student_times)
        return StudentSampler(self.default_times(num_steps))
