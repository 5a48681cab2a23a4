"""Objectives: one file per method family, each objective a small class.

Contract (see ``Objective``): hyperparameters in ``__init__``; ``__call__(nets, batch, ctx)``
is a generator yielding ``(role, loss)`` pairs. The loop back-propagates each loss into that
role's parameters as soon as it is yielded (so only one graph is alive at a time), and steps
each role's optimizer after the accumulation steps. Adding a method is one file here, one
recipe and one test: no registry or loop edits. A class declares its recipe name
(``name = "dmd2"``) and ``method.name`` is looked up among the modules of this package, or
given as a dotted ``package.module:Class`` naming an :class:`Objective` subclass.
"""
from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ..samplers import StudentSampler, on_teacher_grid
from ..schedules import student_timesteps


@dataclass(frozen=True)
class RoleSettings:
    """How the loop trains one role: which recipe learning rate, and whether it keeps an EMA.

    ``lr`` names the recipe key (``"lr"`` or ``"lr_critic"``; ``lr_critic`` falls back to
    ``lr`` when unset). At most one role per run keeps an EMA (the adapter ``ema``).
    """

    lr: str = "lr"
    ema: bool = False


# -- method options: each objective declares its own, checked when the recipe loads ----------

@dataclass(frozen=True)
class Option:
    """The values one method option takes: ``test(value)`` and the same in words (the recipe's
    message form: "recipe key 'method.X' is V, but must be <allowed>")."""

    test: Callable[[object], bool]
    allowed: str


def table(*bases: Mapping, **options: Option) -> Mapping[str, Option]:
    """An objective's option table (read-only): ``bases`` (e.g. a parent's table) updated
    with ``options``."""
    merged: dict = {}
    for base in bases:
        merged.update(base)
    merged.update(options)
    return MappingProxyType(merged)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _maybe(test, words, none):
    if none:
        return Option(lambda v: v is None or test(v), words + ", or null")
    return Option(test, words)


def integer(lo: int = 1, hi: int | None = None, none: bool = False) -> Option:
    words = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
    return _maybe(lambda v: _int(v) and v >= lo and (hi is None or v <= hi), words, none)


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False, none: bool = False) -> Option:
    """A finite number in the range (``*_open``: the bound itself excluded)."""
    def test(v):
        return _num(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
            (hi is None or (v < hi if hi_open else v <= hi))
    if lo is not None and hi is not None:
        words = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        words = f"a finite number {'>' if lo_open else '>='} {lo}"
    elif hi is not None:
        words = f"a finite number {'<' if hi_open else '<='} {hi}"
    else:
        words = "a finite number"
    return _maybe(test, words, none)


def choice(*values, none: bool = False) -> Option:
    return _maybe(lambda v: isinstance(v, str) and v in values,
                  "one of " + ", ".join(map(str, values)), none)


def flag() -> Option:
    return Option(lambda v: isinstance(v, bool), "true or false")


def text(none: bool = True) -> Option:
    return _maybe(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty name", none)


def counts(none: bool = True) -> Option:
    """A list of step counts (each an integer >= 1)."""
    return _maybe(lambda v: isinstance(v, list) and len(v) > 0 and all(
        _int(n) and n >= 1 for n in v), "a non-empty list of integers >= 1, e.g. [1, 2, 4]",
        none)


# Constructor arguments the loop supplies from the recipe (student.num_steps or the count of
# student.timesteps, the explicit student.timesteps or None, train.steps): never options a
# recipe sets in its method section.
CONTEXT = ("student_steps", "student_times", "total_steps")


def recipe_student_steps(recipe: dict) -> int:
    """The student's step count a recipe asks for (its explicit times, else num_steps)."""
    student = recipe["student"]
    return len(student["timesteps"]) if student.get("timesteps") else student["num_steps"]


def student_context(recipe: dict) -> dict:
    """The ``CONTEXT`` a resolved recipe gives :func:`build_objective`."""
    return {"student_steps": recipe_student_steps(recipe),
            "student_times": recipe["student"].get("timesteps") or None,
            "total_steps": recipe["train"]["steps"]}


def time_range_problems(o: dict):
    """``t_min < t_max``, the relation every family with a re-noising range has."""
    if o["t_max"] <= o["t_min"]:
        yield "t_max", o["t_max"], f"above method.t_min ({o['t_min']})"


@dataclass(frozen=True)
class RunFiles:
    """What :meth:`Objective.prepare` gets from the loop: the run folder, the run's prompt
    source ``prompts(n, seed) -> list[str]``, the run's seed and the fingerprint of the
    teacher's base weights (to recognise a cache made by another teacher)."""

    run_dir: str
    prompts: object
    seed: int = 0
    teacher_fingerprint: str = ""


class Objective:
    """Base class. ``roles``: adapters the method trains; ``needs_data``: wants real x0.

    An objective also owns how its student is sampled (``sampler``) and how the loop trains
    each of its roles (``role_settings``), so the loop, the export and the evaluation never
    need to know a method's name or how it names its roles.
    """

    name: str | None = None  # the recipe's method.name for the shipped methods
    roles: tuple[str, ...] = ("student",)
    needs_data: bool = False
    # the student's times, highest first: the recipe's student.timesteps where the objective
    # accepts them, else its own default_times(student.num_steps); build_objective puts them
    # on the teacher's grid
    student_times: list[float] | None = None
    # {option: Option}: every constructor argument a recipe may set, with its values. The
    # recipe loader checks them (and :meth:`plan`) before any work; a dotted user objective
    # without a table gets its signature checked only.
    options: Mapping[str, Option] = table()

    @classmethod
    def plan(cls, o: dict, recipe: dict):
        """Relations between options (and recipe keys) the table cannot say: yields
        ``(option, value, allowed)`` for each one broken. ``o``: every option, defaults
        filled in."""
        return ()

    def setup(self, nets) -> None:
        """Called once before the optimizers are built: add extra trained modules here."""

    # The loop's messages end with the objective's advice: only the objective knows which of
    # its options matter (the loop never names a method's option).
    def data_advice(self) -> str:
        """Why this objective wants real images (``needs_data``), and how it could do
        without them, for the refusal of a data source that has none."""
        return f"{type(self).__name__} trains on real images"

    def nonfinite_advice(self, role: str) -> str:
        """What to try when ``role``'s loss is NaN or infinite."""
        return "lower train.lr or check the data"

    def prepare(self, nets, run: RunFiles) -> None:
        """Called once by the training loop before its first step (on a resume too): make or
        read what the method caches per run in the run folder (e.g. DMD's teacher pairs)."""

    def __call__(self, nets, batch, ctx):
        raise NotImplementedError

    def role_settings(self, role: str) -> RoleSettings:
        """Default: the student gets ``train.lr`` and the EMA; every other role (critics,
        discriminators) gets ``train.lr_critic`` and no EMA."""
        if role == "student":
            return RoleSettings(lr="lr", ema=True)
        return RoleSettings(lr="lr_critic", ema=False)

    def default_times(self, num_steps: int) -> list[float]:
        """The student's times for ``num_steps`` when the recipe names none, highest first.

        Default: evenly spaced from pure noise (DMD2's choice). A family whose paper samples
        on another grid overrides it (the consistency solver grid, SiD's ``t_init``)."""
        return student_timesteps(num_steps)

    def own_times(self, student_times, student_steps) -> list[float]:
        """The times a constructor keeps: the recipe's explicit ones, else its defaults."""
        return list(student_times) if student_times else self.default_times(student_steps or 1)

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


def short_names() -> dict[str, type]:
    """{recipe name: class} of every objective declared in this package's modules."""
    import pkgutil

    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "common":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, Objective)
                    and obj.__module__ == module.__name__ and obj.name):
                found[obj.name] = obj
    return found


def resolve(name: str):
    """The objective class of a recipe's ``method.name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"method.name must be a method's name, got {name!r}")
    if ":" not in name:
        names = short_names()
        if name not in names:
            raise ValueError(f"unknown method {name!r}; the methods: {', '.join(sorted(names))}, "
                             "or a dotted 'package.module:Class' naming an Objective subclass.")
        return names[name]
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"method.name {name!r}: cannot import module {module_name!r} ({e}); "
                         "check the spelling and that it is on the Python path.") from None
    cls = getattr(module, attr, None)
    # a recipe may only name an objective, never an arbitrary callable
    if not (inspect.isclass(cls) and issubclass(cls, Objective)):
        raise ValueError(f"method.name {name!r} does not name an Objective subclass (found "
                         f"{type(cls).__name__ if cls is not None else 'nothing'}); a dotted "
                         "method must be a class deriving from diffusion_distill.objectives."
                         "Objective.")
    return cls


def option_problems(method: dict, recipe: dict):
    """Each ``(key, value, allowed)`` of ``method`` (a recipe's method section) that its
    objective's option table or :meth:`Objective.plan` refuses; ``key`` is the recipe key."""
    cls = resolve(method["name"])
    params = inspect.signature(cls.__init__).parameters
    settable = [p for p in params if p not in ("self", *CONTEXT)
                and params[p].kind not in (params[p].VAR_POSITIONAL, params[p].VAR_KEYWORD)]
    given = {k: v for k, v in method.items() if k != "name"}
    for key, value in given.items():
        if key not in settable:
            yield (f"method.{key}", value,
                   (f"an option of method {method['name']!r} (its options: "
                   f"{', '.join(settable) or 'none'}); remove it or fix its spelling"))
    if any(k not in settable for k in given):
        return
    bad = False
    for key, value in given.items():
        option = cls.options.get(key)
        if option is None:
            continue
        try:
            ok = bool(option.test(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            bad = True
            yield f"method.{key}", value, option.allowed
    if bad:  # the relations assume each value is of its kind
        return
    o = {p: params[p].default for p in settable if params[p].default is not params[p].empty}
    o.update(given)
    for key, value, allowed in cls.plan(o, recipe):
        yield key if "." in key else f"method.{key}", value, allowed


def build_objective(method: dict, teacher=None, **context) -> Objective:
    """Instantiate ``method.name`` with the section's other keys as arguments.

    ``context`` (``CONTEXT``: ``student_steps``, ``student_times``, ``total_steps``) is passed
    where the constructor asks for it. The objective makes its own times
    (:meth:`Objective.own_times`); with ``teacher`` they are put on its grid
    (``samplers.on_teacher_grid``, the one snapping place).
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
    given = context.get("student_times")
    if objective.student_times is None:  # e.g. a user objective that takes no times
        objective.student_times = objective.own_times(given, context.get("student_steps"))
    elif given and "student_times" not in params:  # refused, never dropped
        raise ValueError(f"method {method['name']!r} samples at times of its own "
                         f"({objective.student_times}), so student.timesteps={list(given)} "
                         f"cannot be honoured; set student.timesteps to null and "
                         f"student.num_steps to {len(given)}")
    if teacher is not None:
        objective.student_times = on_teacher_grid(objective.student_times, teacher)
    return objective
