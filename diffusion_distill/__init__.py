"""Distill diffusion and flow-matching teachers into 1-4 step LoRA students.

The public API: ``load_teacher`` (any supported diffusers pipeline, or ``embedded:sd`` /
``embedded:sd3``), ``custom_teacher`` (any callable denoiser), ``train`` (a recipe), and
``load_student`` (an export, through plain diffusers).
"""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: importing the package stays cheap (no torch/diffusers until used).
    if name in ("load_teacher", "custom_teacher"):
        from . import teachers

        return getattr(teachers, name)
    if name == "train":
        from .train import train

        return train
    if name in ("load_student", "export_nets"):
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module 'diffusion_distill' has no attribute {name!r}")
