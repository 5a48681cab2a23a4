"""Flat, complete recipes: a YAML file plus ``key.path=value`` overrides.

Every key a run reads is listed in :data:`DEFAULTS` with its default, so a recipe file says
everything about a run and a typo is an error rather than a silently ignored setting. The
``method`` section is the exception: its keys are the objective's constructor arguments, and
the objective's signature checks them.
"""
from __future__ import annotations

import copy
import os

import yaml

DEFAULTS: dict = {
    "name": "run",
    "teacher": {
        # a pipeline folder, a hub id, "embedded:sd" / "embedded:sd3", or (with build) None
        "path": "embedded:sd",
        # dotted "module:function" returning a fresh pipeline, to train a teacher from scratch
        "build": None,
        "guidance": None,          # CFG scale of the teacher inside objectives (None: its default)
        "prediction_type": None,   # override what the scheduler config says
    },
    "student": {
        "mode": "lora",            # lora: adapters on the frozen base; full: full fine-tune
        "rank": 16,
        "alpha": None,
        "target_modules": None,
        "num_steps": 1,            # sampling steps of the student (1, 2 or 4 in the papers)
        "timesteps": None,         # explicit student times in [0, 1], highest first
    },
    "method": {"name": "dmd2"},
    "data": {
        "source": "world",         # world: procedural shapes; folder: a user's images;
                                   # prompts: prompts only (enough for DMD without a GAN term)
        "path": None,              # folder of images, or a .txt file of prompts
        "prompts": None,           # an inline list of prompts (source: prompts)
        "resolution": 32,
        "on_error": "skip",        # for folders: skip or raise on a bad file
    },
    "train": {
        "steps": 1000,
        "batch_size": 16,          # global batch, split over processes
        "grad_accum": 1,
        "lr": 1e-4,
        "lr_critic": None,         # None: same as lr
        "lr_final": None,          # None: constant lr; f: cosine decay to f x lr at the end
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "clip_grad": 1.0,
        "ema_decay": 0.99,
        "seed": 0,
        "mixed_precision": "no",   # no | fp16 | bf16 (accelerate)
        "checkpoint_every": 200,
        "keep_checkpoints": 2,
        "log_every": 10,
        "eval_every": 0,           # a cheap evaluation into the run log every N steps (0: off)
        "eval_num": 64,
        "device": "auto",          # auto | cpu | cuda
        "stop_after": None,        # stop early at this step (tests; the schedule still says steps)
    },
    "output": {
        "dir": None,               # default runs/<name>
        "export": True,            # write the diffusers LoRA at the end
        "export_role": "ema",      # ema or student
    },
}


class RecipeError(ValueError):
    pass


def _merge(base: dict, override: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        where = f"{path}{key}"
        if key not in base:
            raise RecipeError(
                f"unknown recipe key {where!r}; known keys here: {', '.join(sorted(base))}. "
                "Check the spelling against recipes/ or diffusion_distill/recipe.py."
            )
        default = base[key]
        if isinstance(default, dict) and path + key != "method":
            if not isinstance(value, dict):
                raise RecipeError(f"recipe key {where!r} must be a section (mapping), got "
                                  f"{type(value).__name__} {value!r}")
            out[key] = _merge(default, value, where + ".")
        elif key == "method" and not path:
            if not isinstance(value, dict):
                raise RecipeError("recipe key 'method' must be a mapping with a 'name' "
                                  f"(e.g. method: {{name: dmd2}}), got {value!r}")
            # options without a name refine the method already chosen
            out[key] = dict(value) if "name" in value else {**out[key], **value}
        else:
            out[key] = _check_type(where, default, value)
    return out


def _check_type(where, default, value):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise RecipeError(f"recipe key {where!r} expects {type(default).__name__} (default "
                          f"{default!r}), got {type(value).__name__} {value!r}")
    return value


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not key=value (e.g. train.steps=200)")
    key, raw = item.split("=", 1)
    return key.split("."), yaml.safe_load(raw)


PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def packaged_recipes() -> list[str]:
    """The shipped recipes' names (``dmd2_sd``, ``teachers/sd_unet``, ``hub/dmd2_sdxl``, ...)."""
    names = []
    for root, _, files in os.walk(PACKAGED):
        for f in files:
            if f.endswith(".yaml"):
                rel = os.path.relpath(os.path.join(root, f), PACKAGED)
                names.append(rel[: -len(".yaml")].replace(os.sep, "/"))
    return sorted(names)


def find_recipe(path: str) -> str:
    """A recipe file: ``path`` itself, or a shipped recipe named ``dmd2_sd``,
    ``dmd2_sd.yaml`` or ``recipes/dmd2_sd.yaml`` (so an installed toolkit finds its recipes
    from any folder)."""
    if os.path.isfile(path):
        return path
    name = path[len("recipes/"):] if path.startswith("recipes/") else path
    candidate = os.path.join(PACKAGED, name if name.endswith(".yaml") else name + ".yaml")
    if os.path.isfile(candidate):
        return candidate
    shipped = packaged_recipes()
    raise FileNotFoundError(
        f"recipe {path!r} not found: not a file, and not a shipped recipe. Shipped recipes "
        f"(give the name or recipes/NAME.yaml): {', '.join(shipped[:30])}"
        + (" ..." if len(shipped) > 30 else ""))


def load_recipe(path_or_dict, overrides: list[str] = ()) -> dict:
    """The resolved recipe: defaults, then the file, then ``key=value`` overrides."""
    if isinstance(path_or_dict, dict):
        data = copy.deepcopy(path_or_dict)
    else:
        path_or_dict = find_recipe(path_or_dict)
        with open(path_or_dict) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path_or_dict!r} must be a YAML mapping")
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    recipe = _merge(DEFAULTS, data)
    if recipe["output"]["dir"] is None:
        recipe["output"]["dir"] = os.path.join("runs", recipe["name"])
    return recipe
