"""An export folder read as untrusted input: ``distill_config.json`` and its LoRA files.

An export may be truncated by a full disk, edited by hand, copied without its sub-folders or
made for another base. Everything ``load_student``, ``eval`` and ``bench`` read from it passes
through here first, and each fault is one :class:`ExportError` line that names the file, the
key and what was expected, before any pipeline is loaded or sampled.
"""
from __future__ import annotations

import json
import math
import os
import re

CONFIG_NAME = "distill_config.json"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
REEXPORT = "re-export it with `ddistill export RUN --out DIR`"


class ExportError(ValueError):
    """An export folder that cannot be used as it is; the message names the file."""


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _numbers(v) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_num(x) for x in v)


def _name(v) -> bool:  # an adapter: a sub-folder name, never a path
    return isinstance(v, str) and bool(re.fullmatch(r"[A-Za-z0-9_.-]+", v)) and v not in (".", "..")


def _scheduler_class(v) -> bool:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
        return False
    import inspect

    import diffusers

    cls = getattr(diffusers, v, None)
    return inspect.isclass(cls) and issubclass(cls, diffusers.SchedulerMixin)


def _dict(v) -> bool:
    return isinstance(v, dict)


# (key, required, test, expected in words); a section's keys are checked only when the
# section itself is a mapping.
_CALL = [
    ("num_inference_steps", True, lambda v: _int(v) and v >= 1, "an integer >= 1"),
    ("guidance_scale", False, lambda v: _num(v) and v >= 0, "a finite number >= 0"),
    ("eta", False, lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    ("timesteps", False, _numbers, "a non-empty list of numbers"),
    ("sigmas", False, _numbers, "a non-empty list of numbers"),
]
_TOP = [
    ("format", False, lambda v: v in (1, 2) and _int(v), "1 or 2"),
    ("teacher", True, _dict, "a mapping (path, pretrained, pipeline_class, base_fingerprint)"),
    ("teacher.path", True, lambda v: v is None or isinstance(v, str), "a path or hub id"),
    ("teacher.pretrained", False, lambda v: v is None or isinstance(v, str),
     "a path, hub id or embedded:NAME"),
    ("teacher.pipeline_class", True, lambda v: isinstance(v, str) and v.isidentifier(),
     "a diffusers pipeline class name"),
    ("teacher.base_fingerprint", True, lambda v: isinstance(v, str) and bool(v),
     "the base weights' fingerprint (a hex string)"),
    ("scheduler", True, _dict, "a mapping with class and config"),
    ("scheduler.class", True, _scheduler_class,
     "the name of a diffusers scheduler class, e.g. LCMScheduler"),
    ("scheduler.config", True, _dict, "a mapping (the scheduler's config)"),
    ("call", True, _dict, "a mapping of pipeline call arguments (num_inference_steps, ...)"),
    *[(f"call.{k}", *rest) for k, *rest in _CALL],
    ("steps", False, _dict, "a mapping {step count: {call, adapters}}"),
    ("adapters", False, lambda v: isinstance(v, list) and all(_name(a) for a in v),
     "a list of adapter sub-folder names"),
    ("adapter_per_step", False, lambda v: isinstance(v, list) and all(_name(a) for a in v),
     "a list of adapter names"),
    ("experts", False, lambda v: _int(v) and v >= 0, "an integer >= 0"),
]


def _lookup(config: dict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _refuse(path, key, value, expected) -> ExportError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ExportError(f"{path}: key {key!r} is {shown}, but must be {expected}; the export is "
                       f"damaged or was edited by hand: {REEXPORT}")


def _check(config: dict, path: str, rules, prefix: str = ""):
    for key, required, test, expected in rules:
        parent = key.rpartition(".")[0]
        if parent and not isinstance(_lookup(config, parent)[1], dict):
            continue  # the section itself was refused (or is optional and absent)
        found, value = _lookup(config, key)
        if not found:
            if required:
                raise ExportError(f"{path}: key {prefix + key!r} is missing; it must be "
                                  f"{expected}. The export is incomplete: {REEXPORT}")
            continue
        try:
            ok = bool(test(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise _refuse(path, prefix + key, value, expected)


def read_export_config(folder: str) -> dict:
    """``folder``'s distill_config.json, checked (see the module docstring)."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} is not a student export: no {CONFIG_NAME}. "
                                "Create one with `ddistill export RUN --out DIR`.")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}); the file is truncated or damaged: "
                          f"{REEXPORT}") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path} holds a JSON {type(config).__name__}, but must hold a "
                          f"mapping (scheduler, teacher, call, ...): {REEXPORT}")
    _check(config, path, _TOP)
    for n, entry in (config.get("steps") or {}).items():
        if not (n.isdigit() and int(n) >= 1) or not isinstance(entry, dict):
            raise _refuse(path, f"steps.{n}", entry,
                          "an entry {call, adapters} under a step count >= 1")
        _check(entry, path, [("call", True, _dict, "a mapping of call arguments"),
                             *[(f"call.{k}", *rest) for k, *rest in _CALL],
                             ("adapters", False, lambda v: v is None or (
                                 isinstance(v, list) and all(_name(a) for a in v)),
                              "a list of adapter names, or null")], prefix=f"steps.{n}.")
    named = config.get("adapters") or []
    for key, names in [("adapter_per_step", config.get("adapter_per_step") or []),
                       *[(f"steps.{n}.adapters", e.get("adapters") or [])
                         for n, e in (config.get("steps") or {}).items()]]:
        unknown = [a for a in names if a not in named and not config.get("experts")]
        if unknown:
            raise _refuse(path, key, names, f"names listed under 'adapters' ({named})")
    return config


def served_steps(config: dict) -> list[int]:
    """The step counts an export serves."""
    if config.get("steps"):
        return sorted(int(n) for n in config["steps"])
    return [config["call"]["num_inference_steps"]]


def lora_files(folder: str, config: dict) -> list[tuple[str | None, str]]:
    """``(adapter name or None, weight file)`` of every LoRA the export's config names."""
    names = config.get("adapters") or (
        [f"expert_{i}" for i in range(config["experts"])] if config.get("experts") else [])
    if names:
        return [(n, os.path.join(folder, n, WEIGHT_NAME)) for n in names]
    return [(None, os.path.join(folder, WEIGHT_NAME))]


def lora_layer_count(path: str) -> int:
    """How many LoRA layers (modules with an A/down matrix) a weight file holds; a missing,
    truncated or corrupt file is an :class:`ExportError` naming it."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ExportError(f"{path} is missing, but the export's {CONFIG_NAME} names it; the "
                          f"export was copied incompletely: copy the whole folder, or {REEXPORT}")
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise ExportError(f"{path} is truncated or corrupt ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]}): {REEXPORT}") from None
    layers = {re.split(r"\.(?:lora_A|lora\.down|lora_down)\b", k)[0] for k in keys
              if re.search(r"\.(?:lora_A|lora\.down|lora_down)\b", k)}
    if not layers:
        raise ExportError(f"{path} holds no LoRA layers ({len(keys)} tensors, none a LoRA "
                          f"down/A matrix): {REEXPORT}")
    return len(layers)


def adapter_layer_counts(module) -> dict[str, int]:
    """{adapter name: how many of ``module``'s layers carry it} (peft LoRA layers)."""
    from torch import nn

    counts: dict[str, int] = {}
    for m in module.modules():
        lora_a = getattr(m, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict):
            for name in lora_a:
                counts[name] = counts.get(name, 0) + 1
    return counts
