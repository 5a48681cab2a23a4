"""The embedded offline world: procedural data, its VAE and teachers, its classifier.

Everything under ``assets/`` was trained by code in this package (see each module's
docstring for the command), so the toolkit can be tried and tested with no download.
"""
from __future__ import annotations

# the paths are resolved in the leaf module ``assets`` (teachers and export need them too)
from ..assets import ASSETS, EMBEDDED_TEACHERS, embedded_teacher_path

__all__ = ["ASSETS", "EMBEDDED_TEACHERS", "embedded_teacher_path"]
