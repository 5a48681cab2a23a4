"""Consistency models: LCM / LCM-LoRA, TCD and PCM (distilled from a teacher) and ECT (tuned
from data, no teacher).

Notation: ``x_t = alpha_t x0 + sigma_t eps``; ``t`` is the toolkit's continuous time, and for
the distillation methods it always sits on the integer train-timestep grid ``t = k / (N - 1)``
(``N = num_train_timesteps``, 1000), which is what lets stock diffusers schedulers sample the
exports.

* LCM (Luo et al. 2023, "Latent Consistency Models"; LCM-LoRA, Luo et al. 2023b): a
  skipping-step teacher solver on the grid ``k_n = n * skip - 1``, ``n = 1..S``
  (``skip = N // S``; S = 50 gives 19, 39, ..., 999). For ``x_{t_n}`` (real data noised), the
  guided teacher takes one DDIM step (an Euler step for flow teachers: the same update) to
  ``t_{n-1} = max(k_n - skip, 0)``; the consistency loss compares the student's
  ``f(x_{t_n}, t_n)`` with the target network's ``f(x_{t_{n-1}}, t_{n-1})`` (LCM paper
  Algorithm 1, diffusers ``examples/consistency_distillation``).
* TCD (Zheng et al. 2024, "Trajectory Consistency Distillation"): the same pair, but both sides
  are carried by DDIM (the exponential-integrator form of the consistency function, no
  c_skip/c_out) to a random earlier grid time ``s <= t_{n-1}``; sampled by TCDScheduler with
  ``eta = gamma``.
* PCM (Wang et al. 2024, "Phased Consistency Model"): the time axis split into K phases at the
  edges LCMScheduler would visit with K steps; within a phase the consistency function maps to
  the phase's lower edge (DDIM, as in TCD with s fixed at the edge). Sampled deterministically:
  DDIM between edges (TCDScheduler with eta 0, or FlowMatchEulerDiscreteScheduler); any
  multiple of K steps visits every edge, so one export serves K, 2K, 3K, ... steps.
* ECT (Geng et al. 2024, "Consistency Models Made Easy", locuslab/ect ``training/loss.py``):
  consistency training from data, in EDM's sigma ``s = sigma_t / alpha_t``: ``s`` lognormal,
  ``r = s (1 - q^-(stage+1) (1 + k sigmoid(-b s)))``, both noised with the same eps, the target
  the student itself under no_grad (iCT: no EMA), pseudo-Huber on the per-sample squared L2
  sum, weight ``(s^2 + sd^2) / (s sd)^2``; initialised from the teacher (the LoRA starts at 0).

Guidance. The recipe's ``w_min`` / ``w_max`` are in the LCM paper's (and diffusers' scripts')
convention ``x0 = cond + w (cond - uncond)``. The toolkit's ``nets.x0(..., guidance=g)`` is the
usual CFG ``uncond + g (cond - uncond)``, so the teacher is called with ``g = w + 1``
(w = 0: the plain conditional teacher). One w is drawn per micro-batch (diffusers draws one per
sample; one per batch keeps one batched CFG pass and works for every family). The student is
not w-conditioned (LCM-LoRA): sample the export with ``guidance_scale`` 1.

Flow teachers (SD3, Flux): the solver is Euler on the same grid (``t = k / (N - 1)`` as sigma).
LCM's boundary condition there is the flow parameterisation itself: no c_skip / c_out (stock
FlowMatchEulerDiscreteScheduler has none), ``x0 = x_t - t v`` gives ``f(x, 0) = x`` for velocity
backbones, and the loss enforces ``f(x, 0) = x`` explicitly (target = x_{t_{n-1}} where
t_{n-1} = 0) for any backbone. Exports: FlowMatchEulerDiscreteScheduler on the student's sigmas,
``stochastic_sampling`` for LCM and ECT (x0 re-noised with fresh noise), deterministic for PCM;
TCD on a flow teacher exports only gamma 0 (deterministic) or 1 (stochastic): no stock flow
scheduler has TCD's partial re-noising.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..denoiser import ddim_step
from ..parameterization import add_noise
from ..samplers import StudentSampler, vp_timesteps
from . import Objective, choice, counts, integer, number, recipe_student_steps, table
from .common import (
    AnyStepCount,
    MomentumTarget,
    bcast,
    edm_sigma,
    native_gain,
    seeded,
    time_of_edm_sigma,
)

DEFAULT_STEPS = (1, 2, 4, 8)


# -- the grid ------------------------------------------------------------------------------

class SolverGrid:
    """The skipping-step solver's grid: integer train timesteps ``k_n = n * skip - 1``.

    The same grid as diffusers' LCMScheduler / TCDScheduler (``original_inference_steps``):
    their default schedule for ``m`` steps is what :meth:`inference` returns.
    """

    def __init__(self, solver_steps: int = 50, num_train_timesteps: int = 1000):
        if not 1 <= solver_steps <= num_train_timesteps:
            raise ValueError(f"solver_steps must be in [1, num_train_timesteps="
                             f"{num_train_timesteps}], got {solver_steps}")
        self.steps = int(solver_steps)
        self.num_train_timesteps = int(num_train_timesteps)
        self.skip = self.num_train_timesteps // self.steps
        self.k = [n * self.skip - 1 for n in range(1, self.steps + 1)]

    def t(self, k):
        """Continuous time of integer timestep(s) ``k``."""
        return k / (self.num_train_timesteps - 1)

    def inference_timesteps(self, num_steps: int) -> list[int]:
        """LCMScheduler's default timesteps for ``num_steps`` (highest first)."""
        if not 1 <= num_steps <= self.steps:
            raise ValueError(f"{num_steps} steps: a consistency student on a {self.steps}-step "
                             f"solver grid samples with 1 to {self.steps} steps")
        grid = self.k[::-1]
        index = np.floor(np.linspace(0, self.steps, num=num_steps, endpoint=False)).astype(int)
        return [grid[i] for i in index]

    def inference(self, num_steps: int) -> list[float]:
        return [self.t(k) for k in self.inference_timesteps(num_steps)]


def _train_timesteps(schedule) -> int | None:
    return getattr(schedule, "num_train_timesteps", None)


def integer_timestep(t, num_train_timesteps: int):
    """The DDPM timestep of continuous ``t`` (exact on the grid)."""
    return torch.round(torch.as_tensor(t, dtype=torch.float64) * (num_train_timesteps - 1))


def lcm_scalings(k, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCMScheduler.get_scalings_for_boundary_condition_discrete at integer timestep(s) k."""
    scaled = torch.as_tensor(k, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2)
    c_out = scaled / (scaled ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def safe_ddim(schedule, x0, x_t, t, s):
    """DDIM from ``t`` to ``s`` that returns ``x_t`` itself where ``s == t`` (also at
    ``t = 0`` of a flow schedule, where sigma is 0 and the implied eps undefined)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
    s = torch.as_tensor(s, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    eps = (x_t - bcast(alpha_t, x_t) * x0) / bcast(sigma_t.clamp_min(1e-12), x_t)
    out = bcast(alpha_s, x_t) * x0 + bcast(sigma_s, x_t) * eps
    return torch.where(bcast(s == t, x_t), x_t, out)


# -- samplers ------------------------------------------------------------------------------

class LCMSampler(StudentSampler):
    """LCM's multistep sampler: the boundary condition ``c_skip x_t + c_out x0`` at each step
    (VP teachers; at the integer timestep, scaled by ``timestep_scaling``), then x0 re-noised
    with fresh noise. Rendered as stock LCMScheduler (default schedule for the step count);
    flow teachers: stochastic FlowMatchEulerDiscreteScheduler (no boundary scalings there)."""

    def __init__(self, times, grid: SolverGrid, sigma_data: float = 0.5,
                 timestep_scaling: float = 10.0):
        super().__init__(times, stochastic=True)
        self.grid = grid
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def denoise(self, schedule, x0, x_t, t):
        if schedule.kind != "vp":
            return x0
        k = integer_timestep(t, self.grid.num_train_timesteps).to(x0.device)
        c_skip, c_out = lcm_scalings(k, self.sigma_data, self.timestep_scaling)
        if c_skip.ndim:
            c_skip, c_out = bcast(c_skip, x0), bcast(c_out, x0)
        return c_skip.to(x0.dtype) * x_t + c_out.to(x0.dtype) * x0

    def render(self, teacher):
        if teacher.schedule.kind == "flow":
            return super().render(teacher)
        from diffusers import LCMScheduler

        config = dict(LCMScheduler.from_config(teacher.pipe.scheduler.config).config)
        config.update(timestep_scaling=self.timestep_scaling,
                      original_inference_steps=self.grid.steps,
                      num_train_timesteps=self.grid.num_train_timesteps,
                      prediction_type=teacher.denoiser.prediction_type)
        _check_default_schedule(LCMScheduler, config, vp_timesteps(teacher.schedule, self.times))
        # no timesteps: the scheduler's own default schedule for num_inference_steps
        return {"scheduler": {"class": "LCMScheduler", "config": config}, "call": {}}


class TCDSampler(StudentSampler):
    """TCD's strategic stochastic sampling: DDIM from t to ``s = (1 - gamma) t_next`` (floored
    to an integer timestep on VP, as TCDScheduler does), re-noised from s to t_next; the last
    step DDIM to timestep 0. gamma 0: deterministic DDIM; gamma 1: LCM-like re-noising."""

    def __init__(self, times, grid: SolverGrid, gamma: float = 0.3):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma (TCDScheduler's eta) must be in [0, 1], got {gamma}")
        super().__init__(times, stochastic=gamma > 0)
        self.grid, self.gamma = grid, float(gamma)

    def _s(self, schedule, t_next: float) -> float:
        if schedule.kind == "vp":
            n = self.grid.num_train_timesteps
            k = round(t_next * (n - 1))
            return math.floor((1 - self.gamma) * k) / (n - 1)
        return (1 - self.gamma) * t_next

    def step(self, schedule, x0, x_t, t, s_next, noise):
        s = self._s(schedule, float(s_next))
        x_s = safe_ddim(schedule, x0, x_t, t, s)
        if self.gamma == 0 or noise is None:
            return x_s
        return forward_noise(schedule, x_s, s, float(s_next), noise)

    def finish(self, schedule, x0, x_t, t):
        return ddim_step(schedule, x0, x_t, t, 0.0)

    def render(self, teacher):
        if teacher.schedule.kind == "flow":
            if self.gamma not in (0.0, 1.0):
                raise ValueError(
                    f"TCD with gamma {self.gamma} on a flow teacher has no stock diffusers "
                    "scheduler (FlowMatchEulerDiscreteScheduler re-noises fully or not at all); "
                    "train flow teachers with method.gamma=0 (deterministic) or 1 (stochastic).")
            return StudentSampler(self.times, stochastic=self.gamma == 1.0).render(teacher)
        from diffusers import TCDScheduler

        config = dict(TCDScheduler.from_config(teacher.pipe.scheduler.config).config)
        config.update(original_inference_steps=self.grid.steps,
                      num_train_timesteps=self.grid.num_train_timesteps,
                      prediction_type=teacher.denoiser.prediction_type)
        _check_default_schedule(TCDScheduler, config, vp_timesteps(teacher.schedule, self.times))
        return {"scheduler": {"class": "TCDScheduler", "config": config},
                "call": {"eta": self.gamma}}

    def describe(self):
        return {**super().describe(), "gamma": self.gamma}


def forward_noise(schedule, x_s, s, t, noise):
    """``x_t`` from ``x_s`` (s < t) by the forward process: ``a x_s + sqrt(sigma_t^2 -
    a^2 sigma_s^2) noise`` with ``a = alpha_t / alpha_s`` (TCDScheduler's re-noising on VP)."""
    s = torch.as_tensor(s, dtype=torch.float32, device=x_s.device).expand(x_s.shape[0])
    t = torch.as_tensor(t, dtype=torch.float32, device=x_s.device).expand(x_s.shape[0])
    alpha_s, sigma_s = schedule.alpha_sigma(s)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    a = alpha_t / alpha_s
    var = (sigma_t ** 2 - a ** 2 * sigma_s ** 2).clamp_min(0)
    return bcast(a, x_s) * x_s + bcast(var.sqrt(), x_s) * noise


def _check_default_schedule(cls, config, timesteps):
    """The scheduler's default schedule for this step count must be the student's times."""
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(len(timesteps))
    theirs = [int(k) for k in scheduler.timesteps]
    if theirs != list(timesteps):
        raise ValueError(f"{cls.__name__} would visit {theirs}, the student was trained for "
                         f"{list(timesteps)}; check num_train_timesteps / solver_steps.")


# -- consistency distillation ----------------------------------------------------------------

class _ConsistencyDistillation(Objective):
    """What LCM, TCD and PCM share: data noised at a grid time, one guided teacher solver step,
    the target network, the metric. Subclasses say where both sides are carried (``_carry``)."""

    needs_data = True
    options = table(
        solver_steps=integer(1), w_min=number(0), w_max=number(0),
        target=choice("momentum", "student", "ema"), target_decay=number(0, 1, hi_open=True),
        loss=choice("l2", "huber"),
        huber_c=number(0, lo_open=True), sample_steps=counts(),
        num_train_timesteps=integer(2),
    )

    @classmethod
    def plan(cls, o, recipe):
        given = recipe["student"].get("timesteps")
        if given:
            # refused, never dropped: the student is trained at every grid time and sampled
            # by the stock scheduler's default schedule, which only the count chooses
            yield ("student.timesteps", given,
                   (f"null for method {cls.name!r}: a consistency student samples on its "
                    "solver's grid (the stock diffusers scheduler's default schedule for the "
                    "step count), so explicit times cannot be honoured; set student.num_steps "
                    f"to {len(given)} instead"))
        if o["solver_steps"] > o["num_train_timesteps"]:
            yield ("solver_steps", o["solver_steps"],
                   f"at most method.num_train_timesteps ({o['num_train_timesteps']})")
        if o["w_max"] < o["w_min"]:
            yield "w_max", o["w_max"], f"at least method.w_min ({o['w_min']})"
        too_many = [n for n in o.get("sample_steps") or () if n > o["solver_steps"]]
        if too_many:
            yield ("sample_steps", o["sample_steps"],
                   (f"step counts of at most method.solver_steps ({o['solver_steps']}): the "
                   f"student samples on the solver's grid, so {too_many} cannot be served"))
        n = recipe_student_steps(recipe)
        if n > o["solver_steps"]:
            yield ("student.num_steps", n,
                   (f"at most method.solver_steps ({o['solver_steps']}): a consistency student "
                   "samples on the teacher solver's grid"))

    def __init__(self, solver_steps: int = 50, w_min: float = 3.0, w_max: float = 15.0,
                 target: str = "student", loss: str = "l2", huber_c: float = 0.001,
                 sample_steps: list[int] | None = None, num_train_timesteps: int = 1000,
                 student_steps: int = 1, total_steps: int | None = None,
                 *, target_decay: float = 0.95, trained_steps: int | None = None):
        if target not in ("momentum", "student", "ema"):
            raise ValueError(f"target must be 'momentum' (the papers' target network, an EMA "
                             f"of the student with decay target_decay), 'student' (LCM-LoRA's "
                             f"script: the student under no_grad) or 'ema' (the loop's EMA "
                             f"adapter, train.ema_decay), got {target!r}")
        if not 0 <= target_decay < 1:
            raise ValueError(f"target_decay must be in [0, 1), got {target_decay}")
        self.target_decay = float(target_decay)
        if loss not in ("l2", "huber"):
            raise ValueError(f"loss must be 'l2' or 'huber' (pseudo-Huber), got {loss!r}")
        if w_max < w_min or w_min < 0:
            raise ValueError(f"need 0 <= w_min <= w_max (LCM convention, teacher guidance w + 1)"
                             f", got {w_min}, {w_max}")
        self.grid = SolverGrid(solver_steps, num_train_timesteps)
        self.w_min, self.w_max = float(w_min), float(w_max)
        self.target, self.loss, self.huber_c = target, loss, float(huber_c)
        # the count alone: the times are the grid's (explicit times are refused in plan, and
        # by build_objective: this constructor takes none)
        self.trained_steps = trained_steps or student_steps
        steps = sorted(set(sample_steps or DEFAULT_STEPS) | {self.trained_steps})
        self._servable = [n for n in steps if n <= self.grid.steps]
        self.student_times = self.default_times(self.trained_steps)

    # -- contract -------------------------------------------------------------------------
    def default_times(self, num_steps):
        # the stock scheduler's default schedule for the count, on the solver's grid
        return self.grid.inference(num_steps)

    def servable_steps(self):
        return list(self._servable)

    def setup(self, nets):
        found = _train_timesteps(nets.schedule)
        if found is not None and found != self.grid.num_train_timesteps:
            raise ValueError(f"the teacher has {found} train timesteps; set "
                             f"method.num_train_timesteps={found}")
        if self.target == "ema" and getattr(nets.roles, "ema_of", None) != "student":
            raise ValueError("method.target=ema needs the student's EMA adapter: set "
                             "train.ema_decay (e.g. 0.95, LCM's), or use target=momentum.")
        if self.w_max > 0 and nets.teacher_model.denoiser.uncond is None:
            raise ValueError(
                f"method.w_min={self.w_min:g}, w_max={self.w_max:g} ask for a guided teacher "
                f"(CFG at w + 1, up to {self.w_max + 1:g}), but this teacher has no "
                "unconditional condition; set method.w_min=0 method.w_max=0 for an "
                "unconditional teacher (w = 0 is the plain teacher), or give a custom teacher "
                "its uncond= (and encode=)")
        if self.target == "momentum":
            self.momentum = MomentumTarget(nets.params("student"), self.target_decay)
            nets.add_extra("student", "consistency_target", self.momentum)

    # -- pieces ---------------------------------------------------------------------------
    def sample_w(self, ctx) -> float:
        # one w for the global batch (rand(1) would give each process its own)
        return self.w_min + (self.w_max - self.w_min) * ctx.rng.uniform()

    def metric(self, a, b):
        if self.loss == "l2":
            return F.mse_loss(a.float(), b.float())
        c = self.huber_c
        return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()

    def _carry(self, nets, x0, x, t, k, k_end, ctx):
        """The consistency function's output for the network's ``x0`` at (x, t); ``k`` the
        integer timestep of t, ``k_end`` the per-sample end timestep (None for LCM)."""
        raise NotImplementedError

    def _end(self, index, ctx):
        """Per-sample integer end timestep of both sides (None: LCM's boundary condition)."""

    def __call__(self, nets, batch, ctx):
        cond, x0 = batch["cond"], batch["x0"]
        n, grid, sched = x0.shape[0], self.grid, nets.schedule
        index = ctx.rng.randint(grid.steps, n)
        k_start = torch.as_tensor(grid.k, device=x0.device)[index]
        k_end = self._end(index, ctx)
        floor = torch.zeros_like(k_start) if k_end is None else k_end
        k_prev = torch.maximum(k_start - grid.skip, floor)
        t, t_prev = grid.t(k_start.float()), grid.t(k_prev.float())
        alpha, sigma = sched.alpha_sigma(t)
        x_t = add_noise(x0, ctx.rng.randn(*x0.shape), alpha, sigma)
        w = self.sample_w(ctx)
        with torch.no_grad():
            guided = nets.teacher(x_t, t, cond, guidance=w + 1.0)
            x_prev = ddim_step(sched, guided, x_t, t, t_prev)  # DDIM / flow Euler
            role = "ema" if self.target == "ema" else "student"
            momentum = self.target == "momentum"
            if momentum and ctx.micro == 0:
                self.momentum.update()  # the student as the last optimizer step left it
            with self.momentum.swapped() if momentum else contextlib.nullcontext():
                target_x0 = nets.x0(role, x_prev, t_prev, cond)
            target = self._carry(nets, target_x0, x_prev, t_prev, k_prev, k_end, ctx)
        online = self._carry(nets, nets.student(x_t, t, cond), x_t, t, k_start, k_end, ctx)
        loss = self.metric(online, target)
        ctx.log(consistency=loss, w=w)
        yield "student", loss


class LCM(_ConsistencyDistillation):
    """LCM / LCM-LoRA consistency distillation (see the module docstring).

    Args:
        solver_steps: S, the teacher solver's grid (50: timesteps 19, 39, ..., 999).
        w_min, w_max: range of the teacher's guidance w, LCM convention (teacher CFG g = w + 1).
        target: ``student`` (default, LCM-LoRA's script: the student itself under no_grad;
            on the 2-D toy it drifts off the data under pseudo-Huber, docs/consistency.md),
            ``momentum`` (the LCM / CM papers' target network: an EMA of the student with
            decay ``target_decay``, 0.95 as LCM's Algorithm 1, kept by the objective; it fixes
            the toy, and is slower on the embedded teachers at the tests' short budgets) or
            ``ema`` (the loop's EMA adapter, train.ema_decay).
        loss: ``l2`` or ``huber`` (pseudo-Huber ``sqrt((a-b)^2 + c^2) - c``, c = huber_c).
        sigma_data, timestep_scaling: the boundary condition ``c_skip = sd^2 / ((k ts)^2 +
            sd^2)``, ``c_out = k ts / sqrt((k ts)^2 + sd^2)`` at integer timestep k, on both
            sides (LCMScheduler's defaults 0.5 and 10, so stock LCMScheduler samples it).
        sample_steps: the step counts the export serves (any of 1..S works; these are listed).
    """

    name = "lcm"
    options = table(_ConsistencyDistillation.options, sigma_data=number(0, lo_open=True),
                    timestep_scaling=number(0, lo_open=True))

    def __init__(self, solver_steps: int = 50, w_min: float = 3.0, w_max: float = 15.0,
                 target: str = "student", loss: str = "l2", huber_c: float = 0.001,
                 sigma_data: float = 0.5, timestep_scaling: float = 10.0,
                 sample_steps: list[int] | None = None, num_train_timesteps: int = 1000,
                 student_steps: int = 1, total_steps: int | None = None,
                 target_decay: float = 0.95):
        super().__init__(solver_steps, w_min, w_max, target, loss, huber_c, sample_steps,
                         num_train_timesteps, student_steps, total_steps,
                         target_decay=target_decay)
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def sampler(self, num_steps=None):
        self._check_steps(num_steps)
        return LCMSampler(self.grid.inference(num_steps or self.trained_steps), self.grid,
                          self.sigma_data, self.timestep_scaling)

    def _carry(self, nets, x0, x, t, k, k_end, ctx):
        if nets.schedule.kind == "vp":
            c_skip, c_out = lcm_scalings(k.to(torch.float64), self.sigma_data,
                                         self.timestep_scaling)
            return (bcast(c_skip, x).to(x.dtype) * x + bcast(c_out, x).to(x.dtype) * x0)
        # flow: f(x, 0) = x (the flow parameterisation gives it for velocity backbones; here
        # for any backbone)
        return torch.where(bcast(k == 0, x), x, x0)


class TCD(_ConsistencyDistillation):
    """Trajectory consistency distillation: both sides carried by DDIM to a random earlier
    grid time s (``s = k_m - skip``, m uniform in [0, n], so ``s <= t_{n-1}``).

    Args (beyond LCM's): gamma: TCDScheduler's ``eta`` at sampling (0.3 the usual default;
    higher for more steps). Serves 1-8 steps by default.
    """

    name = "tcd"
    options = table(_ConsistencyDistillation.options, gamma=number(0, 1))

    def __init__(self, gamma: float = 0.3, solver_steps: int = 50, w_min: float = 3.0,
                 w_max: float = 15.0, target: str = "student", loss: str = "l2",
                 huber_c: float = 0.001, sample_steps: list[int] | None = None,
                 num_train_timesteps: int = 1000, student_steps: int = 1,
                 total_steps: int | None = None, target_decay: float = 0.95):
        super().__init__(solver_steps, w_min, w_max, target, loss, huber_c,
                         sample_steps or list(range(1, 9)), num_train_timesteps, student_steps,
                         total_steps, target_decay=target_decay)
        TCDSampler([1.0], self.grid, gamma)  # checks gamma
        self.gamma = float(gamma)

    def setup(self, nets):
        super().setup(nets)
        # refused before training, not at the export: no stock flow scheduler re-noises part way
        if nets.schedule.kind == "flow" and self.gamma not in (0.0, 1.0):
            raise ValueError(
                f"recipe key 'method.gamma' is {self.gamma!r}, but must be 0 (deterministic) or "
                "1 (stochastic) on this flow teacher: FlowMatchEulerDiscreteScheduler, which "
                "samples its export, re-noises fully or not at all; fix it in the recipe file "
                "or override it (method.gamma=...)")

    def sampler(self, num_steps=None):
        self._check_steps(num_steps)
        return TCDSampler(self.grid.inference(num_steps or self.trained_steps), self.grid,
                          self.gamma)

    def _end(self, index, ctx):
        # m uniform in {0, ..., n} per sample
        m = (ctx.rng.rand(index.shape[0]) * (index + 1).float()).floor().long().clamp_max(index)
        k = torch.as_tensor(self.grid.k, device=index.device)[m] - self.grid.skip
        return k.clamp_min(0)

    def _carry(self, nets, x0, x, t, k, k_end, ctx):
        return safe_ddim(nets.schedule, x0, x, t, self.grid.t(k_end.float()))


class PCM(_ConsistencyDistillation):
    """Phased consistency model: K phases; within each, consistency to the phase's lower edge.

    Edges: the timesteps LCMScheduler / TCDScheduler visit with K steps, plus 0 (K = 2:
    999, 499 | 0). One export serves every multiple of K up to ``max(8, K)``: their schedules
    contain the K edges, and between edges the student's DDIM step stays on its own phase's
    trajectory. Sampled with stock TCDScheduler(eta=0) (deterministic DDIM between timesteps)
    or FlowMatchEulerDiscreteScheduler for flow teachers. PCM's optional adversarial term and
    its ``not_apply_cfg_solver`` variant are not implemented.

    Args (beyond LCM's): phases: K (default: the recipe's student.num_steps).
    """

    name = "pcm"
    # no sample_steps: PCM serves the multiples of its phase count
    options = table({k: v for k, v in _ConsistencyDistillation.options.items()
                     if k != "sample_steps"}, phases=integer(1, none=True))

    @classmethod
    def plan(cls, o, recipe):
        k, n = o["phases"], recipe_student_steps(recipe)
        if k is not None and k > o["solver_steps"]:
            yield ("phases", k, (f"at most method.solver_steps ({o['solver_steps']}): each "
                   "phase edge is a timestep of the solver's grid"))
        elif k is not None and k != n:
            yield ("phases", k,
                   (f"equal to student.num_steps ({n}): the export samples with one step per "
                   "phase (and serves its multiples); set both to the same count, or drop "
                   "method.phases (it defaults to student.num_steps)"))
        yield from super().plan(o, recipe)

    def __init__(self, phases: int | None = None, solver_steps: int = 50, w_min: float = 3.0,
                 w_max: float = 15.0, target: str = "student", loss: str = "huber",
                 huber_c: float = 0.001, num_train_timesteps: int = 1000,
                 student_steps: int = 1, total_steps: int | None = None,
                 target_decay: float = 0.95):
        k = int(phases or student_steps)
        if k < 1:
            raise ValueError(f"phases must be >= 1, got {phases}")
        super().__init__(solver_steps, w_min, w_max, target, loss, huber_c,
                         list(range(k, max(8, k) + 1, k)), num_train_timesteps,
                         student_steps, total_steps, target_decay=target_decay,
                         trained_steps=k)
        self.phases = k
        self._servable = [n for n in self._servable if n % k == 0]
        upper = self.grid.inference_timesteps(k)
        self.edges = sorted([0] + upper[1:])  # lower edges, ascending

    def sampler(self, num_steps=None):
        self._check_steps(num_steps)
        return StudentSampler(self.grid.inference(num_steps or self.phases), stochastic=False)

    def _end(self, index, ctx):
        k = torch.as_tensor(self.grid.k, device=index.device)[index]
        edges = torch.as_tensor(self.edges, device=index.device)
        # the largest edge strictly below k
        below = (edges[None, :] < k[:, None]).sum(1) - 1
        return edges[below]

    def _carry(self, nets, x0, x, t, k, k_end, ctx):
        return safe_ddim(nets.schedule, x0, x, t, self.grid.t(k_end.float()))


# -- consistency training from data ----------------------------------------------------------

ECT_WEIGHTINGS = ("snr", "inverse_gap", "uniform", "native")

class ECT(AnyStepCount, Objective):
    """Easy consistency tuning (teacher-free, from data; the student starts as the teacher).

    Args:
        P_mean, P_std: lognormal of EDM's sigma (ECT / iCT: -1.1, 2.0).
        sigma_data: EDM's sigma_data, in the weighting ``(s^2 + sd^2) / (s sd)^2``.
        q, k, b: ``r = s (1 - q^-(stage+1) (1 + k sigmoid(-b s)))`` (ECT: 4, 8, 1); stage 0
            is close to denoising, each stage shrinks ``s - r`` by q.
        stage_every: training steps per stage (default: a quarter of train.steps).
        huber_c: pseudo-Huber c on the per-sample squared L2 sum ``sqrt(L + c^2) - c``
            (default iCT's ``0.00054 sqrt(d)``, d the sample's dimension).
        weighting: ``snr`` (ECT's ImageNet ``(s^2 + sd^2) / (s sd)^2``, for EDM-preconditioned
            networks, whose error shrinks with the noise: a diffusers backbone's x0), or
            ``inverse_gap`` (ECT's CIFAR ``1 / (s - r)``) or ``uniform`` (for a network whose
            error does not shrink with the noise, e.g. ``x_t + mlp``: there ``snr`` gives
            Adam's whole step to the smallest noise and the 1-step sample does not train),
            or ``native`` (no weight: each pair's difference in the online backbone's own
            output units, divided by ``common.native_gain``: ``sigma / alpha`` for eps. ECT's
            ``snr`` assumes an EDM-preconditioned net whose x0 gain tends to sd; an eps
            UNet's is 14.6 at the top of SD's schedule, where the 1-step sample is made).
        target: ``student`` (iCT / ECT: the student under no_grad) or ``momentum`` (an EMA of
            the student with ``target_decay``, the CM paper's target network; on the 2-D toy
            the self-target diverges, docs/consistency.md).
        sample_steps: step counts the export serves (evenly spaced times, re-noised between).
    """

    name = "ect"
    needs_data = True
    options = table(
        P_mean=number(), P_std=number(0, lo_open=True),
        # 0 makes the weighting (s^2 + sd^2) / (s sd)^2 infinite
        sigma_data=number(0, lo_open=True),
        q=number(1, lo_open=True), k=number(0), b=number(0),
        stage_every=integer(1, none=True), huber_c=number(0, lo_open=True, none=True),
        sample_steps=counts(), weighting=choice(*ECT_WEIGHTINGS),
        target=choice("student", "momentum"), target_decay=number(0, 1, hi_open=True),
    )

    def __init__(self, P_mean: float = -1.1, P_std: float = 2.0, sigma_data: float = 0.5,
                 q: float = 4.0, k: float = 8.0, b: float = 1.0, stage_every: int | None = None,
                 huber_c: float | None = None, sample_steps: list[int] | None = None,
                 student_times: list[float] | None = None, total_steps: int | None = None,
                 weighting: str = "snr", target: str = "student", target_decay: float = 0.95,
                 student_steps: int = 1):
        if q <= 1:
            raise ValueError(f"q must be > 1 (each stage divides s - r by q), got {q}")
        if weighting not in ECT_WEIGHTINGS or target not in ("student", "momentum"):
            raise ValueError(f"weighting must be one of {ECT_WEIGHTINGS} and target 'student' or "
                             f"'momentum', got {weighting!r}, {target!r}")
        self.weighting, self.target, self.target_decay = weighting, target, float(target_decay)
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.q, self.k, self.b = q, k, b
        self.stage_every = stage_every or max(1, (total_steps or 1000) // 4)
        self.huber_c = huber_c
        self._serve(student_times, student_steps, sample_steps)

    def setup(self, nets):
        if self.target == "momentum":
            self.momentum = MomentumTarget(nets.params("student"), self.target_decay)
            nets.add_extra("student", "consistency_target", self.momentum)

    def noise_levels(self, sched, n: int, stage: int, ctx, device):
        """``(s, r, boundary)``: the pair's EDM sigmas, both noise levels the schedule has.

        VP's EDM sigma has a floor (~0.01 at t = 0): a smaller drawn s is not a noise level
        of the schedule (both points would sit at t = 0 while the weight assumed s), so s is
        held to it; an r at or below the floor takes ECT's r = 0 rule (``boundary``: the
        target is the data itself)."""
        s_max = float(edm_sigma(sched, torch.ones(1)))
        s_max = s_max if math.isfinite(s_max) else 1e3  # flow: sigma/alpha is infinite at t=1
        s_min = float(edm_sigma(sched, torch.zeros(1)))
        s = (self.P_mean + self.P_std * ctx.rng.randn(n)).exp().clamp(s_min, s_max).to(device)
        r = self.r_of(s, stage)
        boundary = r <= s_min
        return s, torch.where(boundary, torch.zeros_like(r), r), boundary

    def r_of(self, s, stage: int):
        decay = self.q ** -(stage + 1)
        return (s * (1 - decay * (1 + self.k * torch.sigmoid(-self.b * s)))).clamp_min(0)

    def __call__(self, nets, batch, ctx):
        cond, x0 = batch["cond"], batch["x0"]
        n, sched = x0.shape[0], nets.schedule
        stage = ctx.step // self.stage_every
        s, r, boundary = self.noise_levels(sched, n, stage, ctx, x0.device)
        t, t_r = time_of_edm_sigma(sched, s), time_of_edm_sigma(sched, r)
        eps = ctx.rng.randn(*x0.shape)  # one noise direction for both points
        alpha_t, sigma_t = sched.alpha_sigma(t)
        alpha_r, sigma_r = sched.alpha_sigma(t_r)
        x_t, x_r = add_noise(x0, eps, alpha_t, sigma_t), add_noise(x0, eps, alpha_r, sigma_r)
        seed = ctx.rng.seed()  # the same dropout mask in both passes
        momentum = self.target == "momentum"
        if momentum and ctx.micro == 0:
            self.momentum.update()  # the student as the last optimizer step left it
        # the target first: swapping weights in place after the online pass would change
        # tensors its graph saved
        with torch.no_grad(), seeded(seed), \
                self.momentum.swapped() if momentum else contextlib.nullcontext():
            f_r = torch.nan_to_num(nets.student(x_r, t_r, cond))
        with seeded(seed):
            f_t = nets.student(x_t, t, cond)
        f_r = torch.where(bcast(~boundary, x0), f_r, x0)
        sq = ((f_t.float() - f_r.float()) ** 2).flatten(1).sum(1)
        if self.weighting == "native":  # the online backbone's own output units
            sq = sq / native_gain(nets, t).to(sq) ** 2
        c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(x0[0].numel())
        per_sample = torch.sqrt(sq + c * c) - c
        if self.weighting == "snr":
            weight = (s ** 2 + self.sigma_data ** 2) / (s * self.sigma_data) ** 2
        elif self.weighting == "inverse_gap":
            weight = 1.0 / (s - r)
        else:
            weight = torch.ones_like(s)
        loss = (per_sample * weight).mean()
        ctx.log(ect=loss, stage=stage)
        yield "student", loss
