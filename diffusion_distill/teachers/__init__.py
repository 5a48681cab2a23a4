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


class TeacherFolderError(ValueError):
    """A teacher pipeline folder that cannot be used as it is: the teacher's fault, not the
    toolkit's; the message names the file."""


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT = ("convert it once, in a trusted environment: DiffusionPipeline.from_pretrained(PATH, "
           "use_safetensors=False).save_pretrained(NEW_PATH, safe_serialization=True), then "
           "give NEW_PATH")


def check_pipeline_folder(path: str) -> dict:
    """A local pipeline folder read as untrusted input, before diffusers opens it: its
    model_index.json, and every model component's safetensors files present and whole
    (headers read, not the weights). Returns the index."""
    from safetensors import safe_open

    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        found = sorted(os.listdir(path))[:10] if os.path.isdir(path) else "a file"
        raise FileNotFoundError(
            f"teacher path {path!r} is not a diffusers pipeline folder: no model_index.json "
            f"(found {found}). Expected a folder written by Pipeline.save_pretrained, one "
            f"of {', '.join(sorted(FAMILIES))}."
        )
    try:
        with open(index, encoding="utf-8") as f:
            components = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TeacherFolderError(f"the teacher's {index} is not valid JSON ({e}); the folder "
                                 "is damaged: copy or save the pipeline again") from None
    if not isinstance(components, dict) or not isinstance(components.get("_class_name"), str):
        raise TeacherFolderError(f"the teacher's {index} has no '_class_name' (the pipeline "
                                 "class); the folder is damaged: save the pipeline again")
    cls = components["_class_name"]
    if cls not in FAMILIES:
        raise ValueError(
            f"teacher at {path!r} is a {cls}; supported pipelines: "
            f"{', '.join(sorted(FAMILIES))}."
        )
    for name, entry in components.items():
        if name.startswith("_") or entry == [None, None] or not isinstance(entry, list):
            continue
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            raise TeacherFolderError(f"the teacher's model_index.json names a component "
                                     f"{name!r}, but {folder} is missing; the folder is "
                                     "incomplete: copy the whole pipeline folder")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            continue  # a tokenizer or scheduler: no weights
        files = sorted(os.listdir(folder))
        weights = [f for f in files if f.endswith(".safetensors")]
        if not weights:
            pickled = [f for f in files if f.endswith(PICKLED)]
            if pickled:
                raise TeacherFolderError(
                    f"the teacher's {os.path.join(folder, pickled[0])} is a pickled weight "
                    "file, and only safetensors are read (unpickling runs whatever code the "
                    f"file holds); {CONVERT}")
            raise TeacherFolderError(f"the teacher's component {name!r} has no weights: no "
                                     f".safetensors file in {folder}; the folder is incomplete")
        for w in weights:
            file = os.path.join(folder, w)
            try:
                with safe_open(file, framework="pt") as f:
                    f.keys()
            except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
                raise TeacherFolderError(
                    f"the teacher's weight file {file} is truncated or corrupt "
                    f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); copy or save "
                    "the pipeline again") from None
    return components


def check_finite_weights(pipe, path: str | None = None):
    """Every weight of the pipeline's models is finite; a NaN or inf is named by component,
    file and parameter (a teacher that outputs NaN is not a learning-rate problem)."""
    import torch

    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        for pname, p in component.named_parameters():
            if not torch.isfinite(p).all():
                where = os.path.join(path, name) if path and os.path.isdir(path) else name
                raise TeacherFolderError(
                    f"the teacher's {where} weights hold non-finite values (NaN or inf) in "
                    f"{pname!r}; the teacher is broken, not the training: use an intact copy")


def is_hub_id(path: str) -> bool:
    """``org/name``: what a teacher path that is not a local folder must look like."""
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith(".")


def load_pipeline(path: str, torch_dtype=None):
    from diffusers import DiffusionPipeline

    if os.path.exists(path):
        components = check_pipeline_folder(path)
        # A component saved as None (SD3 without its T5, [null, null] in the index) must be
        # passed as None again, or from_pretrained refuses the folder it wrote itself.
        absent = {k: None for k, v in components.items()
                  if not k.startswith("_") and isinstance(v, list) and v == [None, None]}
        try:
            pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True,
                                                     use_safetensors=True,
                                                     torch_dtype=torch_dtype, **absent)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            # a config diffusers cannot read, weights that do not fit their config, ...
            raise TeacherFolderError(
                f"the teacher folder {path!r} could not be loaded by diffusers "
                f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); the folder is "
                "damaged or not a pipeline diffusers wrote") from None
        check_finite_weights(pipe, path)
        return pipe
    if not is_hub_id(path):
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
    "TeacherFolderError",
    "backbone_name",
    "custom_teacher",
    "load_pipeline",
    "load_teacher",
    "pipeline_backbone",
    "teacher_from_pipeline",
]
