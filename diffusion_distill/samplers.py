"""How a few-step student is sampled, and how plain diffusers renders the same sampler.

An objective owns its student's sampler (``Objective.sampler()``): a small value that says

* ``times``: the continuous times the student is evaluated at, highest first;
* ``adapters``: which trained role serves each step (one LoRA, or an expert per phase);
* ``denoise``: the student's x0 from the network's x0 (identity, or a consistency model's
  boundary condition ``c_skip x_t + c_out x0``);
* ``step``: the rule from one time to the next (fresh-noise re-noising as in DMD2 / LCM, or
  deterministic DDIM);
* ``render``: the diffusers scheduler class, its config and the pipeline call arguments that
  reproduce exactly that sampler, so an export needs no code of ours.

``student.generate``, the in-training evaluation, the benchmark and the export all consult
this one value; nothing outside ``objectives/`` knows a method's name or how it names roles.
A method with a rule of its own subclasses :class:`StudentSampler` (``step``, ``denoise`` and
``render``) in its own file.
"""
from __future__ import annotations

import contextlib
import itertools

import torch

from .denoiser import ddim_step


class StudentSampler:
    """The few-step sampler of a student (see the module docstring).

    Args:
        times: the student's times in (0, 1], strictly descending.
        adapters: the trained role serving each step (default ``"student"`` for every step).
        stochastic: re-noise the step's x0 with fresh noise (DMD2's and the consistency
            models' multi-step sampler); False: deterministic DDIM (the implied noise reused).
        export_names: {role: adapter name in the export} when several adapters serve the
            steps (e.g. Phased DMD's experts); each gets its own sub-folder in the export.
    """

    def __init__(self, times: list[float], adapters: list[str] | None = None,
                 stochastic: bool = True, export_names: dict[str, str] | None = None):
        times = [float(t) for t in times]
        if not times:
            raise ValueError("a student sampler needs at least one time")
        if any(not 0.0 < t <= 1.0 for t in times) or any(a <= b for a, b in itertools.pairwise(times)):
            raise ValueError(f"student times must lie in (0, 1] and strictly decrease, got "
                             f"{times}; e.g. student.timesteps=[1.0, 0.5]")
        adapters = list(adapters) if adapters else ["student"] * len(times)
        if len(adapters) != len(times):
            raise ValueError(f"{len(adapters)} adapters for {len(times)} steps: give one per step")
        self.times = times
        self.adapters = adapters
        self.stochastic = stochastic
        names = dict(export_names or {})
        if len(set(adapters)) > 1:
            for role in adapters:
                names.setdefault(role, role)
        self.export_names = names

    @property
    def num_steps(self) -> int:
        return len(self.times)

    @property
    def roles(self) -> list[str]:
        """The distinct trained roles this sampler uses, in step order."""
        return list(dict.fromkeys(self.adapters))

    # -- the sampler itself ---------------------------------------------------------------
    def denoise(self, schedule, x0, x_t, t):
        """The student's output at ``t`` from its network's x0 (a boundary condition hook)."""
        return x0

    def step(self, schedule, x0, x_t, t, s, noise):
        """From ``x_t`` at ``t`` to time ``s`` given the student's ``x0``."""
        return ddim_step(schedule, x0, x_t, t, s, noise=noise if self.stochastic else None)

    def needs_noise(self, i: int) -> bool:
        """Whether the move after step ``i`` draws fresh noise (the export draws it too)."""
        return self.stochastic

    def finish(self, schedule, x0, x_t, t):
        """The sample after the last step. A deterministic VP student ends where diffusers'
        TCDScheduler (eta 0) ends: DDIM to timestep 0, i.e. ``alpha_0 x0 + sigma_0 eps``."""
        if self.stochastic or schedule.kind != "vp":
            return x0
        return ddim_step(schedule, x0, x_t, t, 0.0)

    # -- what diffusers needs -------------------------------------------------------------
    def render(self, teacher) -> dict:
        """``{"scheduler": {"class", "config"}, "call": {...}}`` reproducing this sampler.

        VP teachers: diffusers' LCMScheduler with its boundary condition switched off (a huge
        ``timestep_scaling`` gives c_skip = 0, c_out = 1 for every t > 0), which returns the
        network's x0 and re-noises it with fresh noise: DMD2's multi-step sampler. Flow
        teachers: FlowMatchEulerDiscreteScheduler on exactly our times (no further shift),
        stochastic or not. Deterministic VP students use TCDScheduler with eta (its gamma) 0,
        which is DDIM between any custom timesteps (DDIMScheduler only steps by a fixed
        stride).
        """
        sched = teacher.pipe.scheduler
        if teacher.schedule.kind == "flow":
            config = dict(sched.config)
            config.update(shift=1.0, use_dynamic_shifting=False,
                          stochastic_sampling=self.stochastic)
            return {"scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "config": config},
                    "call": {"sigmas": list(self.times)}}
        steps = vp_timesteps(teacher.schedule, self.times)
        if self.stochastic:
            from diffusers import LCMScheduler

            config = dict(LCMScheduler.from_config(sched.config).config)
            config.update(timestep_scaling=1e6, prediction_type=teacher.denoiser.prediction_type)
            return {"scheduler": {"class": "LCMScheduler", "config": config},
                    "call": {"timesteps": steps}}
        from diffusers import TCDScheduler

        config = dict(TCDScheduler.from_config(sched.config).config)
        config.update(prediction_type=teacher.denoiser.prediction_type)
        return {"scheduler": {"class": "TCDScheduler", "config": config},
                "call": {"timesteps": steps, "eta": 0.0}}

    def describe(self) -> dict:
        """What the export's config records of the sampler (for people and for checks)."""
        return {"kind": type(self).__name__, "times": list(self.times),
                "adapters": list(self.adapters), "stochastic": self.stochastic}


def vp_timesteps(schedule, times: list[float]) -> list[int]:
    """The integer DDPM timesteps of continuous times (999, 749, ...)."""
    return [round(float(schedule.model_time(torch.tensor(t)))) for t in times]


def on_teacher_grid(times: list[float], teacher) -> list[float]:
    """The times a student of ``teacher`` is trained and sampled at: on a VP diffusers
    pipeline rounded to the scheduler's integer steps, so that the exported scheduler visits
    exactly the times the student was trained at; a flow or custom teacher takes continuous
    times as they are. The one place where student times are snapped."""
    schedule = teacher.schedule
    if schedule.kind != "vp" or teacher.pipe is None:
        return [float(t) for t in times]
    n = schedule.num_train_timesteps - 1
    return [round(t * n) / n for t in times]


# The re-noising stream of a flow student is seeded with the caller's seed plus this offset:
# seeding it with the seed itself would make the re-noising repeat the initial latents' noise
# (both are torch.randn of the same shape). Not a multiple of 2**32: torch's CPU generator keeps
# only a seed's low 32 bits, so seed + 2**32 would be the very same stream.
RENOISE_SEED_OFFSET = 0x9E3779B9


def noise_seed(generator) -> int | None:
    """The re-noising seed of a sampling call: its (first) generator's seed + the offset."""
    if generator is None:
        return None
    g = generator[0] if isinstance(generator, (list, tuple)) else generator
    return (int(g.initial_seed()) + RENOISE_SEED_OFFSET) % 2**32


@contextlib.contextmanager
def seeded_global_rng(generator):
    """Torch's global RNG seeded from ``generator`` for the duration, then restored.

    SD3/Flux pipelines do not hand their generator to the scheduler, so a stochastic flow
    step draws its re-noising from the global RNG. Seeding it from the caller's generator
    (``noise_seed``; and restoring it afterwards) makes a seed fix the samples whatever the global state was;
    the toolkit's own sampler does the same, so both draw the same noise.
    """
    seed = noise_seed(generator)
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
