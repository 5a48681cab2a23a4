"""Load any supported teacher behind the one denoiser interface.

``load_teacher(path)`` reads a diffusers pipeline (a local folder, or a hub id the user names)
and picks the family adapter from the pipeline's class. Nothing is downloaded unless the user
passes a hub id; weights are read with safetensors and never with remote code.
"""
from __future__ import annotations

import importlib
import json
import os

from ..assets import resolve_teacher_path
from .base import PromptCache, Teacher
from .custom import custom_teacher

# pipeline class -> family module. One line per family; the family file does the rest.
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusionXLPipeline": "sdxl",
    "FluxPipeline": "flux",
    "PixArtSigmaPipeline": "pixart",
    "PixArtAlphaPipeline": "pixart",
    "SanaPipeline": "sana",
}


def _family_module(name: str):
    return importlib.import_module(f".{name}", __name__)


def teacher_from_pipeline(pipe, path=None, **kwargs) -> Teacher:
    cls = type(pipe).__name__
    if cls not in FAMILIES:
        raise ValueError(
            f"pipeline class {cls} is not supported as a teacher; supported: "
            f"{', '.join(sorted(FAMILIES))}. For anything else wrap your model as "
            "diffusion_distill.teachers.custom_teacher(fn, shape, schedule=...)."
        )
    family = _family_module(FAMILIES[cls])
    teacher = family.from_pipeline(pipe, path=path, **kwargs)
    teacher.family = FAMILIES[cls] if FAMILIES[cls] != "pixart" else teacher.family
    # the module whose features a discriminator head reads (DMD2's GAN term, SiDA)
    teacher.feature_module = family.feature_module(teacher.backbone)
    return teacher


def load_pipeline(path: str, torch_dtype=None):
    from diffusers import DiffusionPipeline

    if os.path.exists(path):
        index = os.path.join(path, "model_index.json")
        if not os.path.isfile(index):
            found = sorted(os.listdir(path))[:10] if os.path.isdir(path) else "a file"
            raise FileNotFoundError(
                f"teacher path {path!r} is not a diffusers pipeline folder: no model_index.json "
                f"(found {found}). Expected a folder written by Pipeline.save_pretrained, one "
                f"of {', '.join(sorted(FAMILIES))}."
            )
        with open(index) as f:
            components = json.load(f)
        cls = components.get("_class_name")
        if cls not in FAMILIES:
            raise ValueError(
                f"teacher at {path!r} is a {cls}; supported pipelines: "
                f"{', '.join(sorted(FAMILIES))}."
            )
        # A component saved as None (SD3 without its T5, [null, null] in the index) must be
        # passed as None again, or from_pretrained refuses the folder it wrote itself.
        absent = {k: None for k, v in components.items()
                  if not k.startswith("_") and isinstance(v, list) and v == [None, None]}
        return DiffusionPipeline.from_pretrained(path, local_files_only=True,
                                                 use_safetensors=True, torch_dtype=torch_dtype,
                                                 **absent)
    parts = path.split("/")
    if len(parts) != 2 or not all(parts) or path.startswith("."):
        raise FileNotFoundError(
            f"teacher path {path!r} does not exist. Give a folder written by "
            "Pipeline.save_pretrained, a hub model id such as 'org/name', or 'embedded:sd' / "
            "'embedded:sd3' for the shipped teachers."
        )
    # A hub id, named by the user: the only case in which anything is downloaded.
    return DiffusionPipeline.from_pretrained(path, use_safetensors=True, torch_dtype=torch_dtype)


def backbone_name(pipe) -> str:
    """The pipeline component that is the denoising network: ``"unet"`` or ``"transformer"``."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer; the "
                     "supported pipelines are listed in diffusion_distill.teachers.FAMILIES.")


def pipeline_backbone(pipe):
    """The denoising network of a diffusers pipeline (its UNet or transformer)."""
    return getattr(pipe, backbone_name(pipe))


def load_teacher(path_or_pipe, **kwargs) -> Teacher:
    """A Teacher from a pipeline object, a local pipeline folder, a hub id, or ``embedded:NAME``."""
    if not isinstance(path_or_pipe, str):
        return teacher_from_pipeline(path_or_pipe, **kwargs)
    path = resolve_teacher_path(path_or_pipe)
    pipe = load_pipeline(path, torch_dtype=kwargs.pop("torch_dtype", None))
    return teacher_from_pipeline(pipe, path=path, **kwargs)


__all__ = [
    "FAMILIES",
    "PromptCache",
    "Teacher",
    "backbone_name",
    "custom_teacher",
    "load_pipeline",
    "load_teacher",
    "pipeline_backbone",
    "teacher_from_pipeline",
]
