"""Building a run's pieces from a resolved recipe: teacher, objective, roles, and restoring a
run folder's latest weights. Training, export and evaluation all start here, so none of them
needs the training loop.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .objectives import Objective, build_objective, student_context
from .recipe import load_recipe
from .student import MixedRoles, Nets, SeparateRoles, SharedBaseRoles

# train.base_dtype -> the frozen base's weights (teacher backbone, VAE, text encoders)
BASE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_teacher(recipe, device="cpu"):
    from .teachers import load_teacher, teacher_from_pipeline

    spec = recipe["teacher"]
    dtype = BASE_DTYPES[recipe["train"]["base_dtype"]]
    kwargs = {}
    if spec["guidance"] is not None:
        kwargs["guidance_scale"] = spec["guidance"]
    if spec["prediction_type"] is not None:
        kwargs["prediction_type"] = spec["prediction_type"]
    if spec["build"]:
        module, fn = spec["build"].split(":")
        import importlib

        pipe = getattr(importlib.import_module(module), fn)()
        teacher = teacher_from_pipeline(pipe.to(dtype=dtype), **kwargs)
    else:
        if not spec["path"]:
            raise ValueError(
                f"recipe key 'teacher.path' is {spec['path']!r}, but must name the teacher: a "
                "diffusers pipeline folder, a hub id such as 'org/name', or embedded:sd / "
                "embedded:sd3 (from Python, train(recipe, teacher=...) passes your own; "
                "teacher.build trains one from scratch); set teacher.path=...")
        # loaded in its dtype: a bfloat16 base never exists as a float32 copy in memory
        teacher = load_teacher(spec["path"], torch_dtype=dtype, **kwargs)
    return teacher.to(device)


def cast_base(teacher, base_dtype: str):
    """A given teacher (``train(teacher=...)``) in the recipe's ``train.base_dtype``."""
    dtype = BASE_DTYPES[base_dtype]
    if dtype == torch.float32:
        return teacher
    if teacher.pipe is None:
        raise ValueError(
            f"train.base_dtype={base_dtype} casts a diffusers pipeline's weights, but this "
            "teacher is a custom one (no pipeline): cast your own network before wrapping it, "
            "and leave train.base_dtype at float32.")
    teacher.pipe.to(dtype=dtype)
    return teacher


def ema_role(recipe, objective: Objective) -> str | None:
    """The one role whose EMA the run keeps (the objective says which), or None."""
    if recipe["train"]["ema_decay"] is None:
        return None
    wanted = [r for r in objective.roles if objective.role_settings(r).ema]
    if len(wanted) > 1:
        raise ValueError(f"{type(objective).__name__} asks for an EMA of {wanted}; a run keeps "
                         "one EMA adapter. Declare ema=True for one role in role_settings.")
    return wanted[0] if wanted else None


def build_nets(recipe, teacher, objective: Objective, networks=None) -> Nets:
    s = recipe["student"]
    ema_of = ema_role(recipe, objective)
    ema = ema_of is not None
    if networks is None and teacher.pipe is None:
        networks = {}  # a custom teacher has no base to put adapters on: user networks only
    if networks is not None:  # a custom teacher's own student / critic networks
        missing = [r for r in objective.roles if r not in networks]
        if missing:
            raise ValueError(
                f"method {recipe['method']['name']!r} trains the roles {list(objective.roles)}; "
                f"networks= gives {sorted(networks)}. Pass one module for each of {missing} "
                "(each called like the teacher: x0 = net(x_t, t, cond)).")
        roles = SeparateRoles(teacher.backbone, networks=networks, roles=objective.roles,
                              ema=ema, ema_of=ema_of or "student")
    else:
        modes = role_modes(recipe, objective)
        kinds = set(modes.values())
        if kinds == {"lora"}:
            roles = SharedBaseRoles(teacher.backbone, roles=objective.roles, rank=s["rank"],
                                    alpha=s["alpha"], target_modules=s["target_modules"],
                                    lora_bias=s["lora_bias"], ema=ema, ema_of=ema_of or "student")
        elif kinds == {"full"}:
            roles = SeparateRoles(teacher.backbone, roles=objective.roles, ema=ema,
                                  ema_of=ema_of or "student")
        else:
            roles = MixedRoles(teacher.backbone, modes, rank=s["rank"], alpha=s["alpha"],
                               target_modules=s["target_modules"],
                               lora_bias=s["lora_bias"], ema=ema,
                               ema_of=ema_of or "student")
    return Nets(teacher, roles, guidance=recipe["teacher"]["guidance"])


def role_modes(recipe, objective: Objective) -> dict[str, str]:
    """``{role: "lora" | "full"}``: a role trained at the student's rate (``train.lr``: the
    student, Phased DMD's experts) takes ``student.mode``; every other role (critics) takes
    ``critic.mode``, which defaults to ``student.mode``."""
    student = recipe["student"]["mode"]
    critic = recipe["critic"]["mode"] or student
    modes = {r: student if objective.role_settings(r).lr == "lr" else critic
             for r in objective.roles}
    if recipe["critic"]["mode"] and all(objective.role_settings(r).lr == "lr"
                                        for r in objective.roles):
        raise ValueError(f"recipe key 'critic.mode' is {recipe['critic']['mode']!r}, but "
                         f"method {recipe['method']['name']!r} trains no critic (its roles: "
                         f"{list(objective.roles)}); remove critic.mode (or set it to null)")
    return modes


def setup_run(recipe: dict, device="cpu", teacher=None, networks=None):
    """(teacher, objective, nets) for a resolved recipe: what training and export share.

    ``teacher`` (e.g. a custom teacher) and ``networks`` ({role: module}) replace what the
    recipe's teacher section would build.
    """
    teacher = build_teacher(recipe, device) if teacher is None else \
        cast_base(teacher, recipe["train"]["base_dtype"]).to(device)
    # the objective makes its student's times (the recipe's explicit ones, or its defaults)
    objective = build_objective(recipe["method"], teacher, **student_context(recipe))
    nets = build_nets(recipe, teacher, objective, networks)
    from .acceleration import apply_to_run

    # attention kernel, checkpointing, compile; the run's attention is handed to its users
    nets.attention = apply_to_run(recipe["train"], nets, device)
    objective.setup(nets)  # e.g. DMD2's GAN head, trained with the critic
    return teacher, objective, nets


@dataclass
class Run:
    """A run's pieces: what ``setup_run`` builds, and the recipe it was built from."""

    teacher: object
    objective: Objective
    nets: Nets
    recipe: dict


def restore_run(run_dir: str, device="cpu") -> Run:
    """A run folder's pieces with its latest checkpoint's weights loaded."""
    from .checkpoint import CheckpointError, load_latest_good

    path = os.path.join(run_dir, "recipe.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} is not a run folder: no recipe.yaml. Give the "
                                "folder `ddistill train` printed (runs/<name> by default).")
    recipe = load_recipe(path)
    torch.manual_seed(recipe["train"]["seed"])
    teacher, objective, nets = setup_run(recipe, device)

    def apply(weights, _optim, state):
        for role, sd in weights.items():
            try:
                nets.load_state_dict(role, sd)
            except KeyError as e:
                raise CheckpointError(f"checkpoint of step {state['step']} holds a role "
                                      f"{role!r} this run does not have") from e

    # A corrupt latest checkpoint falls back to the one before it (with a warning); the run
    # folder itself is left as it is.
    if load_latest_good(run_dir, apply) is None:
        raise FileNotFoundError(f"run {run_dir!r} has no checkpoint yet (nothing in "
                                f"{os.path.join(run_dir, 'checkpoints')}); train it first")
    return Run(teacher, objective, nets, recipe)
