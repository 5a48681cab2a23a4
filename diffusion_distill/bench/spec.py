"""The benchmark spec: its keys, their checks and defaults, and the cells it asks for."""
from __future__ import annotations

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
    if spec.get("standard") is not None and not isinstance(spec["standard"], dict):
        raise ValueError(f"standard in {where} must be a mapping (prompts, inception, clip, "
                         f"reference, ...), got {spec['standard']!r}")
    return spec


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
        e = {"path": e} if isinstance(e, str) else dict(e)
        if "path" not in e:
            raise ValueError(f"export #{i} in the spec has no path: {e}")
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
