"""Objectives: one file per method family, each objective a small class.

Contract (see ``Objective``): hyperparameters in ``__init__``; ``__call__(nets, batch, ctx)``
is a generator yielding ``(role, loss)`` pairs. The loop back-propagates each loss into that
role's parameters as soon as it is yielded (so only one graph is alive at a time), and steps
each role's optimizer after the accumulation steps. Adding a method is one file here, one
recipe and one test: no registry or loop edits, because ``method.name`` is resolved below.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from ..samplers import StudentSampler

# short names used in recipes -> "module:Class" inside this package
SHORT_NAMES = {
    "denoising": "denoising:Denoising",
    "dmd": "dmd:DMD",
    "dmd2": "dmd:DMD2",
    "decoupled_dmd": "dmd:DecoupledDMD",
    "phased_dmd": "dmd:PhasedDMD",
}


@dataclass(frozen=True)
class RoleSettings:
    """How the loop trains one role: which recipe learning rate, and whether it keeps an EMA.

    ``lr`` names the recipe key (``"lr"`` or ``"lr_critic"``; ``lr_critic`` falls back to
    ``lr`` when unset). At most one role per run keeps an EMA (the adapter ``ema``).
    """

    lr: str = "lr"
    ema: bool = False


class Objective:
    """Base class. ``roles``: adapters the method trains; ``needs_data``: wants real x0.

    An objective also owns how its student is sampled (``sampler``) and how the loop trains
    each of its roles (``role_settings``), so the loop, the export and the evaluation never
    need to know a method's name or how it names its roles.
    """

    roles: tuple[str, ...] = ("student",)
    needs_data: bool = False
    # set by build_objective from the recipe (student.num_steps / student.timesteps)
    student_times: list[float] | None = None

    def setup(self, nets) -> None:
        """Called once before the optimizers are built: add extra trained modules here."""

    def __call__(self, nets, batch, ctx):
        raise NotImplementedError

    def role_settings(self, role: str) -> RoleSettings:
        """Default: the student gets ``train.lr`` and the EMA; every other role (critics,
        discriminators) gets ``train.lr_critic`` and no EMA."""
        if role == "student":
            return RoleSettings(lr="lr", ema=True)
        return RoleSettings(lr="lr_critic", ema=False)

    def servable_steps(self) -> list[int]:
        """The step counts one trained student can be sampled with (default: its own)."""
        return [len(self.student_times or [1.0])]

    def sampler(self, num_steps: int | None = None) -> StudentSampler:
        """The student's sampler for ``num_steps`` (default: the trained count).

        The default: the student's times, one adapter ``student``, x0 re-noised with fresh
        noise between steps (DMD2's multi-step sampler)."""
        self._check_steps(num_steps)
        return StudentSampler(self.student_times or [1.0])

    def _check_steps(self, num_steps):
        if num_steps is not None and num_steps not in self.servable_steps():
            raise ValueError(f"this {type(self).__name__} student samples with "
                             f"{self.servable_steps()} step(s), not {num_steps}; pick one of "
                             "those (or train with student.num_steps set to it).")


def resolve(name: str):
    target = SHORT_NAMES.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown method {name!r}; short names: {', '.join(SHORT_NAMES)}, "
                         "or a dotted 'package.module:Class'.")
    module, cls = target.split(":")
    if name in SHORT_NAMES:
        module = f"{__name__}.{module}"
    return getattr(importlib.import_module(module), cls)


def build_objective(method: dict, **context) -> Objective:
    """Instantiate ``method.name`` with the section's other keys as arguments.

    ``context`` (e.g. ``num_student_steps``) is passed where the constructor asks for it.
    """
    kwargs = {k: v for k, v in method.items() if k != "name"}
    cls = resolve(method["name"])
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        allowed = [p for p in params if p not in ("self", *context)]
        raise ValueError(f"method {method['name']!r} has no option(s) {unknown}; its options: "
                         f"{allowed}")
    for key, value in context.items():
        if key in params and key not in kwargs:
            kwargs[key] = value
    objective = cls(**kwargs)
    if objective.student_times is None and context.get("student_times") is not None:
        objective.student_times = list(context["student_times"])
    return objective
