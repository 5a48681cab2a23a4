"""Flat, complete recipes: a YAML file plus ``key.path=value`` overrides.

Every key a run reads is listed in :data:`DEFAULTS` with its default, so a recipe file says
everything about a run and a typo is an error rather than a silently ignored setting. The
``method`` section is the exception: its keys are the objective's constructor arguments, and
the objective's own option table (``Objective.options`` and ``plan``, in its file) checks them
here, when the recipe loads.
"""
from __future__ import annotations

import copy
import itertools
import math
import os
import re

import yaml


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first, again):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.again = key, first, again


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4`` / ``5E3`` as numbers (YAML 1.2), not strings,
    and refusing a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *base" may be overridden key by key: that is its purpose
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], key_node.start_mark)
                    seen[key] = key_node.start_mark
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    break
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."))


def yaml_load(text, where: str = "<text>"):
    """YAML with numbers read as numbers; a syntax error names the file, line and column."""
    try:
        return yaml.load(text, Loader=_Loader)
    except _DuplicateKey as e:
        raise RecipeError(f"{where}:{e.again.line + 1}: key {e.key!r} is given twice in the "
                          f"same section (first on line {e.first.line + 1}); YAML would keep "
                          "only the last one without a word. Remove one of them") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise RecipeError(f"{at}: YAML syntax error: {problem}; fix the line (indentation, "
                          "a missing ':' or an unclosed quote or bracket)") from None

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
        "target_modules": None,    # null: attention/feed-forward; "all": every linear and
                                   # convolution layer; or a list of module-name suffixes
        "lora_bias": False,        # LoRA roles also train a bias per targeted layer (like
                                   # rank and target_modules, inert for full roles)
        "num_steps": 1,            # sampling steps of the student (1, 2 or 4 in the papers)
        "timesteps": None,         # explicit student times in [0, 1], highest first
        "init": None,              # an export folder of this teacher to start from (warm
                                   # start; see warm_start.py), or None: the teacher
    },
    "critic": {
        # lora | full | null (null: as student.mode); a method's non-student roles (DMD's
        # fake score, SiD's critic) take it. LoRA critics share the student's rank/targets.
        "mode": None,
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
        "base_dtype": "float32",   # float32 | bfloat16: the frozen base's weights (the LoRA
                                   # roles and their optimizer state stay float32)
        "optimizer": "adamw",      # adamw | adamw8bit (bitsandbytes, CUDA only)
        "checkpoint_every": 200,
        "keep_checkpoints": 2,
        "log_every": 10,
        "eval_every": 0,           # a cheap evaluation into the run log every N steps (0: off)
        "eval_num": 64,
        "eval_batch_size": 32,     # prompts per sampling call of that evaluation; several
                                   # processes share these batches out (eval/in_training.py)
        "device": "auto",          # auto | cpu | cuda
        "stop_after": None,        # stop early at this step (tests; the schedule still says steps)
        "attention": "native",     # acceleration.BACKENDS (native: torch's choice); what
                                   # runs here is checked when the run is built
        "gradient_checkpointing": False,  # recompute the backbone's activations in backward
        "compile": False,          # torch.compile the repeated blocks (regional)
        "parallel": "auto",        # auto | none | ddp | fsdp: how several processes share the
                                   # work (auto: ddp when several processes run; see train.py)
        "fsdp_offload": False,     # parallel fsdp: keep shards and AdamW state in CPU memory
        "dist_timeout": 1800,      # several processes: seconds a collective waits for the
                                   # others before the run stops (one lost, or stuck)
    },
    "output": {
        "dir": None,               # default runs/<name>
        "export": True,            # write the diffusers LoRA at the end
        "export_role": "ema",      # ema or student
        "lora_rank": None,         # a full student exported as a rank-R LoRA (truncated SVD
                                   # per layer) instead of a whole pipeline; None: the pipeline
    },
}


class RecipeError(ValueError):
    """A recipe value people must fix; the message names the key, the value and what is
    allowed."""


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
                          f"{default!r}), got {type(value).__name__} {value!r}; fix it in the "
                          f"recipe file or override it ({where}=...)")
    return value


def parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not key=value (e.g. train.steps=200)")
    key, raw = item.split("=", 1)
    return key.split("."), yaml_load(raw, f"override {item!r}")


PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def packaged_recipes() -> list[str]:
    """The shipped recipes' names (``dmd2_sd``, ``teachers/sd_unet``, ``hub/dmd2_sdxl``, ...)."""
    names = []
    for root, dirs, files in os.walk(PACKAGED):
        dirs[:] = [d for d in dirs if d != "accelerate"]  # accelerate's launch configs
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
    name = path.removeprefix("recipes/")
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
            data = yaml_load(f.read(), path_or_dict) or {}
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path_or_dict!r} must be a YAML mapping")
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {'.'.join(keys[:i + 1])!r} is not a "
                                  "section, so it has no sub-key")
        node[keys[-1]] = value
    recipe = _merge(DEFAULTS, data)
    validate(recipe)
    if recipe["output"]["dir"] is None:
        recipe["output"]["dir"] = os.path.join("runs", recipe["name"])
    return recipe


# -- value checks -------------------------------------------------------------------------
# Each: (key path, test, the allowed values in words). A value None is allowed wherever the
# default is None (it means "not set").
_POSITIVE_INT = (lambda v: v > 0, "an integer > 0")
def _attention_backends():
    from .acceleration import BACKENDS

    return BACKENDS


class _AttentionBackends:
    """The allowed values in words, read from the one list when a message is written."""

    def __str__(self):
        return "one of " + ", ".join(_attention_backends())


_RULES = [
    # 10^8 steps at a fast 10 ms each already take 12 days: more is a typo (1e12)
    ("train.steps", lambda v: 0 < v <= 10 ** 8, "an integer in [1, 100000000]"),
    ("train.batch_size", *_POSITIVE_INT),
    ("train.grad_accum", *_POSITIVE_INT),
    ("train.log_every", *_POSITIVE_INT),
    ("train.checkpoint_every", *_POSITIVE_INT),
    ("train.keep_checkpoints", lambda v: v >= 0, "an integer >= 0 (0: keep all)"),
    ("train.eval_every", lambda v: v >= 0, "an integer >= 0 (0: off)"),
    ("train.eval_num", lambda v: v >= 4, "an integer >= 4"),
    ("train.eval_batch_size", *_POSITIVE_INT),
    ("train.stop_after", *_POSITIVE_INT),
    ("train.seed", lambda v: v >= 0, "an integer >= 0"),
    ("train.lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0, e.g. 1e-4"),
    ("train.lr_critic", lambda v: math.isfinite(v) and v > 0, "a finite number > 0, or null"),
    ("train.lr_final", lambda v: math.isfinite(v) and 0 <= v <= 1,
     "a fraction of train.lr in [0, 1], or null (constant rate)"),
    ("train.weight_decay", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("train.clip_grad", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: off)"),
    ("train.ema_decay", lambda v: math.isfinite(v) and 0 <= v < 1,
     "a number in [0, 1), or null (no EMA)"),
    ("train.betas", lambda v: len(v) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v),
     "two numbers in [0, 1), e.g. [0.9, 0.999]"),
    ("train.mixed_precision", lambda v: v in ("no", "fp16", "bf16"), "one of no, fp16, bf16"),
    ("train.base_dtype", lambda v: v in ("float32", "bfloat16"), "float32 or bfloat16"),
    ("train.device", lambda v: v in ("auto", "cpu", "cuda"), "one of auto, cpu, cuda"),
    ("train.parallel", lambda v: v in ("auto", "none", "ddp", "fsdp"),
     "one of auto, none, ddp, fsdp"),
    ("train.fsdp_offload", lambda v: isinstance(v, bool), "true or false"),
    ("train.dist_timeout", lambda v: math.isfinite(v) and v > 0, "a number of seconds > 0"),
    ("train.optimizer", lambda v: v in ("adamw", "adamw8bit"), "adamw or adamw8bit"),
    ("train.attention", lambda v: v in _attention_backends(), _AttentionBackends()),
    ("student.mode", lambda v: v in ("lora", "full"), "lora or full"),
    ("critic.mode", lambda v: v in ("lora", "full"), "lora or full, or null (= student.mode)"),
    ("student.rank", lambda v: v >= 1, "an integer >= 1"),
    ("student.target_modules", lambda v: v == "all" or (isinstance(v, list) and len(v) >= 1
                                                         and all(isinstance(m, str) and m.strip()
                                                                 for m in v)),
     ("a list of module-name suffixes (e.g. [to_q, to_v]), all (every linear and convolution "
      "layer), or null (the attention and feed-forward projections)")),
    ("student.alpha", lambda v: math.isfinite(v) and v > 0, "a number > 0, or null (= rank)"),
    ("student.num_steps", lambda v: v >= 1, "an integer >= 1"),
    ("student.init", lambda v: isinstance(v, str) and bool(v.strip()),
     "an export folder of this teacher (a path), or null (start from the teacher)"),
    ("student.timesteps", lambda v: len(v) >= 1 and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1 for t in v)
     and all(a > b for a, b in itertools.pairwise(v)),
     "a list of times in (0, 1], strictly descending (highest first), e.g. [1.0, 0.5], or null"),
    ("teacher.guidance", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0, or null"),
    ("data.source", lambda v: v in ("world", "folder", "prompts"), "world, folder or prompts"),
    ("data.resolution", lambda v: v >= 8, "an integer >= 8 (pixels)"),
    ("data.on_error", lambda v: v in ("skip", "raise"), "skip or raise"),
    ("output.lora_rank", lambda v: v >= 1, "an integer >= 1, or null (a whole pipeline)"),
    ("output.export_role", lambda v: bool(v.strip()),
     "a role name: ema (default), student, or a role the method trains"),
    ("name", lambda v: bool(v.strip()) and "/" not in v and "\\" not in v,
     "a non-empty name without slashes"),
]


def recipe_value(recipe: dict, path: str):
    """The value at a dotted key path of a resolved recipe, e.g. ``train.lr``."""
    node = recipe
    for k in path.split("."):
        node = node[k]
    return node


def refused(path: str, value, allowed: str) -> RecipeError:
    """The one message form of a bad recipe value: the key, the value, what it must be."""
    return RecipeError(f"recipe key {path!r} is {value!r}, but must be {allowed}; "
                       f"fix it in the recipe file or override it ({path}=...)")


def validate(recipe: dict):
    """Check every value against its allowed range; :class:`RecipeError` names the key path,
    the value, what is allowed and what to do."""
    for path, test, allowed in _RULES:
        value = recipe_value(recipe, path)
        if value is None:
            continue
        try:
            ok = bool(test(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise refused(path, value, allowed)
    method = recipe["method"]
    if not isinstance(method.get("name"), str) or not method["name"].strip():
        raise RecipeError(f"recipe key 'method.name' is {method.get('name')!r}, but must be a "
                          "method name such as dmd2; set method: {name: dmd2}")
    from .objectives import option_problems

    try:
        # the objective's own option table and relations (objectives/<family>.py)
        for path, value, allowed in option_problems(method, recipe):
            raise refused(path, value, allowed)
    except RecipeError:
        raise
    except ValueError as e:  # an unknown method name, or a dotted one that does not import
        raise RecipeError(f"recipe key 'method.name': {e}") from None
    if recipe["output"]["lora_rank"] is not None and recipe["student"]["mode"] != "full":
        raise RecipeError(f"recipe key 'output.lora_rank' is {recipe['output']['lora_rank']!r}, "
                          "but it turns a full student into a LoRA and student.mode is "
                          f"{recipe['student']['mode']!r}; remove output.lora_rank, or set "
                          "student.mode=full")
    if recipe["data"]["source"] == "folder" and not recipe["data"]["path"]:
        raise RecipeError("recipe key 'data.path' is empty but data.source is 'folder'; set "
                          "data.path=/path/to/images")
