"""The embedded offline world: procedural data, its VAE and teachers, its classifier.

Everything under ``assets/`` was trained by code in this package (see each module's
docstring for the command), so the toolkit can be tried and tested with no download.
"""
from __future__ import annotations

import os

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
EMBEDDED_TEACHERS = {"sd": "sd", "sd3": "sd3"}


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


__all__ = ["ASSETS", "embedded_teacher_path"]
