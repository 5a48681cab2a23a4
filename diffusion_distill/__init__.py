"""Distill diffusion and flow-matching teachers into 1-4 step LoRA students.

The public API: ``load_teacher`` (any supported diffusers pipeline, or ``embedded:sd`` /
``embedded:sd3``), ``custom_teacher`` (any callable denoiser), ``train`` (a recipe), and
``load_student`` (an export, through plain diffusers).
"""
__version__ = "0.1.0"

# ``train`` is bound eagerly: a lazy attribute would lose to the submodule of the same name
# (importing ``diffusion_distill.train`` from anywhere sets the package attribute to the
# module), and ``from diffusion_distill import train`` would then bind a module, not the
# function. The module stays importable as ``from diffusion_distill.train import ...``.
from .train import train as train  # re-exported as the public API


def __getattr__(name):
    # Lazy: the rest loads when first used.
    if name in ("load_teacher", "custom_teacher"):
        from . import teachers

        return getattr(teachers, name)
    if name == "resolve_teacher_path":  # an export's teacher reference -> from_pretrained's
        from .assets import resolve_teacher_path

        return resolve_teacher_path
    if name == "load_student":
        from . import student_pipeline

        return student_pipeline.load_student
    if name == "export_nets":
        from . import export

        return export.export_nets
    raise AttributeError(f"module 'diffusion_distill' has no attribute {name!r}")
