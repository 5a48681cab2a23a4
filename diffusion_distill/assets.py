"""Where the shipped files live, and the one reading of ``embedded:NAME``.

A leaf module (no imports from the package), so that teachers, export and evaluation can
resolve an embedded teacher without depending on the world package that trained it.
"""
from __future__ import annotations

import os

ASSETS = os.path.join(os.path.dirname(__file__), "world", "assets")
EMBEDDED_TEACHERS = {"sd": "sd", "sd3": "sd3"}
EMBEDDED_PREFIX = "embedded:"


def embedded_teacher_path(name: str) -> str:
    """The folder of a shipped teacher pipeline: ``"sd"`` (UNet, epsilon, DDIM) or ``"sd3"``
    (SD3 transformer, rectified flow)."""
    if name not in EMBEDDED_TEACHERS:
        raise ValueError(f"unknown embedded teacher {name!r}; available: "
                         f"{', '.join(sorted(EMBEDDED_TEACHERS))} (e.g. teacher.path: embedded:sd)")
    path = os.path.join(ASSETS, EMBEDDED_TEACHERS[name])
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"the embedded teacher {name!r} is missing: no pipeline at {path}. The package ships "
            "it; reinstall, or rebuild it with `python -m diffusion_distill.teacher_training "
            f"{name} --out {path}`."
        )
    return path


def resolve_teacher_path(path: str) -> str:
    """``embedded:NAME`` -> the shipped folder; anything else (a folder, a hub id) as given."""
    if isinstance(path, str) and path.startswith(EMBEDDED_PREFIX):
        return embedded_teacher_path(path[len(EMBEDDED_PREFIX):])
    return path
