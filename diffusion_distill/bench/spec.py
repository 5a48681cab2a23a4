"""The benchmark spec: its keys, their checks and defaults, and the cells it asks for."""
from __future__ import annotations

import math
import os
import re

SPEC_KEYS = {
    "name": "benchmark name (default: the spec file's name)",
    "teacher": "pipeline folder or embedded:sd / embedded:sd3",
    "teacher_steps": "list of step counts to run the teacher at, e.g. [50, 4, 2, 1]",
    "teacher_guidance": "teacher CFG scale (default: the pipeline's own)",
    "exports": "list of student exports: a path, or {name, path, steps, guidance}",
    "prompts": "world evaluation prompt set: single, pair or count",
    "seed": "first seed; sample i uses seed + i (default 0)",
    "num_samples": "samples per cell (default 1000)",
    "feature_size": "feature network input size in px (default 128)",
    "batch_size": "prompts per pipeline call (default 50)",
    "metrics": ("table columns, from fd, fd_teacher (FD to the teacher's default cell), kid, "
                "precision, recall, alignment (default all)"),
    "real_baseline": "also score fresh real renders, the metrics' floor (default true)",
    "latency": "{batch_sizes: [1, 16], repeats: 3} timed sampling per model; false: none",
    "standard": ("the standard protocol instead of the world's: {prompts, num_samples, "
                 "inception, clip, reference, fid_backend, metrics} (Inception FID, CLIP score)"),
    "out": "output folder (default benchmarks/results/<name>)",
}
METRICS = ("fd", "fd_teacher", "kid", "precision", "recall", "alignment")
def load_spec(path: str) -> dict:
    from ..recipe import yaml_load

    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark spec {path!r} does not exist; expected a YAML file "
                                "such as benchmarks/specs/embedded_sd.yaml")
    with open(path) as f:  # a syntax error names the file, line and column
        spec = yaml_load(f.read(), path) or {}
    if not isinstance(spec, dict):
        # ValueError, not TypeError: the CLI shows ValueErrors to people without a traceback.
        raise ValueError(f"benchmark spec {path!r} must be a YAML mapping, got "  # noqa: TRY004
                         f"{type(spec).__name__}")
    spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return normalize_spec(spec, path)


def _int(v, lo):
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


_VALUE_RULES = [
    ("teacher_steps", lambda v: isinstance(v, list) and v and all(_int(n, 1) for n in v),
     "a step count >= 1 or a list of them"),
    ("num_samples", lambda v: _int(v, 4), "an integer >= 4"),
    ("batch_size", lambda v: _int(v, 1), "an integer >= 1"),
    ("feature_size", lambda v: _int(v, 1), "an integer >= 1"),
    ("seed", lambda v: _int(v, 0), "an integer >= 0"),
    ("teacher", lambda v: isinstance(v, str) and bool(v), "a pipeline folder or embedded:sd"),
    ("teacher_guidance", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
     and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("exports", lambda v: isinstance(v, list), "a list of export entries"),
    ("metrics", lambda v: isinstance(v, list), "a list of metric names"),
    ("name", lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty name"),
]


def normalize_spec(spec: dict, where: str = "the spec") -> dict:
    """Check a spec dict and fill in its defaults (also for specs built in code).

    Relative model paths stay relative to where the command runs, like every CLI path.
    """
    spec = dict(spec)
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        allowed = "\n".join(f"  {k}: {v}" for k, v in SPEC_KEYS.items())
        raise ValueError(f"unknown key(s) {unknown} in {where}; a spec may hold:\n{allowed}")
    if not spec.get("teacher") and not spec.get("exports"):
        raise ValueError(f"{where} names neither a teacher nor exports; give at least one")
    spec.setdefault("name", "bench")
    spec.setdefault("teacher_steps", [50])
    spec.setdefault("exports", [])
    spec.setdefault("prompts", "single")
    spec.setdefault("seed", 0)
    spec.setdefault("num_samples", 1000)
    spec.setdefault("feature_size", 128)
    spec.setdefault("batch_size", 50)
    spec.setdefault("metrics", list(METRICS))
    spec.setdefault("real_baseline", True)
    latency = spec.setdefault("latency", {})
    if latency not in (False, None):
        if not isinstance(latency, dict) or set(latency) - {"batch_sizes", "repeats"}:
            raise ValueError(f"latency in {where} must be false or a mapping with batch_sizes "
                             f"and repeats, got {latency!r}")
        latency = {"batch_sizes": [int(b) for b in latency.get("batch_sizes", [1, 16])],
                   "repeats": int(latency.get("repeats", 3))}
        if min(latency["batch_sizes"], default=0) < 1 or latency["repeats"] < 1:
            raise ValueError(f"latency in {where}: batch sizes and repeats must be >= 1, got "
                             f"{latency}")
        spec["latency"] = latency
    bad = [m for m in spec["metrics"] if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad} in {where}; available: {list(METRICS)}")
    if isinstance(spec["teacher_steps"], int):
        spec["teacher_steps"] = [spec["teacher_steps"]]
    for key, test, allowed in _VALUE_RULES:
        value = spec.get(key)
        if value is not None and not test(value):
            raise ValueError(f"{key} in {where} is {value!r}, but must be {allowed}")
    if spec.get("standard") is not None and not isinstance(spec["standard"], dict):
        raise ValueError(f"standard in {where} must be a mapping (prompts, inception, clip, "
                         f"reference, ...), got {spec['standard']!r}")
    return spec


EXPORT_KEYS = {
    "path": "the export folder (with distill_config.json)",
    "name": "its name in the table (default: the folder's name)",
    "steps": "a step count it serves, or a list of them (default: its own)",
    "guidance": "CFG scale (default: its own)",
}


def _export_entry(i: int, e) -> dict:
    """One ``exports`` entry as a mapping, each of its keys checked."""
    where = f"exports[{i}] in the spec"
    e = {"path": e} if isinstance(e, str) else e
    if not isinstance(e, dict):
        raise ValueError(f"{where} is {e!r}, but must be a path or a mapping with "  # noqa: TRY004
                         f"{', '.join(EXPORT_KEYS)}")
    unknown = sorted(set(e) - set(EXPORT_KEYS))
    if unknown:
        allowed = "; ".join(f"{k}: {v}" for k, v in EXPORT_KEYS.items())
        raise ValueError(f"unknown key(s) {unknown} in {where}; an entry may hold {allowed}")
    if not isinstance(e.get("path"), str) or not e["path"]:
        raise ValueError(f"{where} has no path (got {e.get('path')!r}); give path: "
                         "EXPORT_FOLDER")
    steps = e.get("steps")
    counts = steps if isinstance(steps, list) else [steps]
    if steps is not None and not (counts and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts)):
        raise ValueError(f"{where}: steps is {steps!r}, but must be a step count >= 1 or a "
                         "list of them")
    g = e.get("guidance")
    if g is not None and not (isinstance(g, (int, float)) and not isinstance(g, bool)
                              and math.isfinite(g) and g >= 0):
        raise ValueError(f"{where}: guidance is {g!r}, but must be a finite number >= 0")
    if e.get("name") is not None and not isinstance(e["name"], str):
        raise ValueError(f"{where}: name is {e['name']!r}, but must be a string")
    return dict(e)


def check_models(spec: dict, cells: list[dict]):
    """Every model the cells name, before the first cell runs: the teacher folder exists,
    each export's distill_config.json is sound and serves each step count asked of it."""
    from ..assets import resolve_teacher_path
    from ..export_config import read_export_config, served_steps

    if spec.get("teacher"):
        from ..teachers import is_hub_id

        folder = resolve_teacher_path(spec["teacher"])
        if not os.path.exists(folder) and not is_hub_id(folder):
            raise FileNotFoundError(f"teacher {spec['teacher']!r} in the spec does not exist; "
                                    "give a pipeline folder, a hub id (org/name) or "
                                    "embedded:sd / embedded:sd3")
        if not os.path.isdir(folder) and os.path.exists(folder):
            raise ValueError(f"teacher {spec['teacher']!r} in the spec is a file; give a "
                             "pipeline folder (with model_index.json) or embedded:sd")
        if os.path.isdir(folder) and not os.path.isfile(os.path.join(folder,
                                                                      "model_index.json")):
            raise ValueError(f"teacher {spec['teacher']!r} in the spec has no "
                             "model_index.json; give a diffusers pipeline folder")
    configs: dict = {}
    for c in cells:
        if c["model"] in ("teacher", "real-data"):
            continue
        if c["path"] not in configs:
            folder = resolve_teacher_path(c["path"])
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"export {c['path']!r} ({c['model']}) in the spec does "
                                        "not exist or is not a folder")
            configs[c["path"]] = read_export_config(folder)
        served = served_steps(configs[c["path"]])
        if c["steps"] is not None and c["steps"] not in served:
            raise ValueError(f"export {c['model']!r} in the spec: steps {c['steps']} is not a "
                             f"count it serves; it samples with {served} step(s)")


def cells_of(spec: dict) -> list[dict]:
    """Every (model, steps, guidance) to evaluate, teacher first, in spec order."""
    cells = []
    if spec.get("real_baseline") and not spec.get("standard"):
        # Real images from another seed, scored like a model: the best any model can reach at
        # this sample count (FD is biased upward at finite n, recall below 1).
        cells.append({"model": "real-data", "path": None, "steps": 0, "guidance": None})
    if spec.get("teacher"):
        for steps in spec["teacher_steps"]:
            cells.append({"model": "teacher", "path": spec["teacher"], "steps": int(steps),
                          "guidance": spec.get("teacher_guidance")})
    for i, e in enumerate(spec["exports"]):
        e = _export_entry(i, e)
        name = e.get("name") or os.path.basename(os.path.normpath(e["path"]))
        steps = e.get("steps")
        for s in (steps if isinstance(steps, list) else [steps]):
            cells.append({"model": name, "path": e["path"], "steps": s,
                          "guidance": e.get("guidance"), "teacher": spec.get("teacher")})
    for c in cells:
        g = "default" if c["guidance"] is None else f"{c['guidance']:g}"
        s = "own" if c["steps"] is None else c["steps"]
        c["id"] = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{c['model']}-steps{s}-cfg{g}")
    ids = [c["id"] for c in cells]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"cells {dupes} appear twice; give each export a distinct name")
    return cells
