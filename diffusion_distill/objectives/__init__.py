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

# short names used in recipes -> "module:Class" inside this package
SHORT_NAMES = {
    "denoising": "denoising:Denoising",
    "dmd": "dmd:DMD",
    "dmd2": "dmd:DMD2",
    "decoupled_dmd": "dmd:DecoupledDMD",
    "phased_dmd": "dmd:PhasedDMD",
}


class Objective:
    """Base class. ``roles``: adapters the method trains; ``needs_data``: wants real x0."""

    roles: tuple[str, ...] = ("student",)
    needs_data: bool = False

    def setup(self, nets) -> None:
        """Called once before the optimizers are built: add extra trained modules here."""

    def __call__(self, nets, batch, ctx):
        raise NotImplementedError

    def sampler_times(self, num_steps):  # the student's own sampling times (None: default)
        return None


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
    return cls(**kwargs)
