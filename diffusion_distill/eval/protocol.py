"""Evaluation protocols as a library: load a model (teacher pipeline, embedded teacher or
student export) and score it on the embedded world's prompts, seeds, reference and alignment.

``ddistill eval`` (``eval/cli.py``), ``ddistill bench``, the demo and the training loop's
in-run evaluation all use this module; it imports nothing above the export layer.

Sampling goes through plain diffusers, ``pipe(prompts, num_inference_steps=N,
guidance_scale=G, generator=[one per seed], output_type="pt")``, so what is measured is what a
user gets. The prompts are the world's fixed held-out evaluation prompts, the seeds ``seed``,
``seed``+1, ...; the reference set is real procedural images rendered for the same prompts,
whose features are cached on disk ($DDISTILL_CACHE or ~/.cache/diffusion_distill) so that
repeated evaluations only pay for the samples.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass

import torch

from .evaluate import cached_features, evaluate
from .features import DEFAULT_SIZE, get_feature_extractor

PROMPT_KINDS = ("single", "pair", "count")
REFERENCE_SEED = 0  # the real reference images' own seed, fixed so the cache is reused


# -- loading -------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready to evaluate: ``call(prompts, **kwargs)`` samples through diffusers; ``pipe``
    is the plain pipeline; ``kind`` is "teacher" or "student"; ``defaults`` the sampler settings
    (``steps``, ``guidance``) used when none are given."""

    call: object
    pipe: object
    kind: str
    defaults: dict


def resolve_path(path: str) -> str:
    from ..assets import resolve_teacher_path

    return resolve_teacher_path(path)


def model_fingerprint(path: str | None) -> str | None:
    """What identifies a model's weights for reusing a finished cell: the name, size and
    modification time of every weight and config file in its folder (cheap even for a
    multi-GB pipeline; a retrained or replaced model changes it)."""
    if path is None:
        return None
    folder = resolve_path(path)
    if not os.path.isdir(folder):
        return None
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.endswith((".safetensors", ".bin", ".json", ".txt", ".model")):
                st = os.stat(os.path.join(root, name))
                rel = os.path.relpath(os.path.join(root, name), folder)
                h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def load_model(path: str, teacher: str | None = None) -> LoadedModel:
    """A :class:`LoadedModel` for a pipeline folder, embedded teacher or export.

    ``call(prompts, **kwargs)`` samples; ``pipe`` is the plain diffusers pipeline (its
    backbone is hooked to count NFE); ``defaults`` are the sampler settings used when the
    command line leaves them out.
    """
    from ..export import CONFIG_NAME
    from ..teachers import load_pipeline

    local = resolve_path(path)
    if not os.path.exists(local):
        raise FileNotFoundError(
            f"{path!r} does not exist. Expected a diffusers pipeline folder (with "
            f"model_index.json), a student export folder (with {CONFIG_NAME}), or "
            "embedded:sd / embedded:sd3.")
    if not os.path.isdir(local):
        raise ValueError(f"{path!r} is a file; expected a folder: a diffusers pipeline (with "
                         f"model_index.json) or a student export (with {CONFIG_NAME}).")
    if os.path.isfile(os.path.join(local, CONFIG_NAME)):
        from ..student_pipeline import load_student

        student = load_student(local, teacher=teacher)
        call = student.call_kwargs
        defaults = {"steps": call.get("num_inference_steps") or len(call.get("timesteps") or []),
                    "guidance": call.get("guidance_scale")}
        return LoadedModel(student, student.pipe, "student", defaults)
    if os.path.isfile(os.path.join(local, "model_index.json")):
        pipe = load_pipeline(local)
        pipe.set_progress_bar_config(disable=True)  # our own bar counts images, not steps
        return LoadedModel(pipe, pipe, "teacher", {"steps": 50, "guidance": None})
    found = sorted(os.listdir(local))[:10]
    raise ValueError(
        f"{path!r} is neither a diffusers pipeline folder (no model_index.json) nor a student "
        f"export (no {CONFIG_NAME}); it holds {found or 'nothing'}. Give a folder written by "
        "Pipeline.save_pretrained, or one written by `ddistill export`.")


def backbone_of(pipe):
    """The pipeline's denoising network (for counting NFE), or None."""
    from ..teachers import pipeline_backbone

    try:
        return pipeline_backbone(pipe)
    except ValueError:
        return None


def make_sample_fn(call, steps: int | None, guidance: float | None):
    """``sample_fn(prompts, seeds)`` through the plain diffusers call, images in [-1, 1]."""
    kwargs = {}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if guidance is not None:
        kwargs["guidance_scale"] = guidance

    @torch.no_grad()
    def sample_fn(prompts, seeds):
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        out = call(list(prompts), generator=generators, output_type="pt", **kwargs)
        return out.images.float() * 2 - 1  # diffusers' "pt" output is in [0, 1]

    return sample_fn


# -- the world: prompts, reference, alignment ----------------------------------------------
def world_prompts(kind: str, n: int):
    from ..world.data import eval_prompts

    return eval_prompts(kind, n)


def world_reference_features(labels: list[dict], kind: str, extractor, cache: str | None):
    """Features of real renders of the same prompts, cached; the key covers the renderer."""
    from ..world import data

    # Hash the renderer's source: if the world changes, an old cache must not be reused.
    renderer = hashlib.sha256(inspect.getsource(data).encode()).hexdigest()[:12]
    key = {"reference": "shapes-world", "kind": kind, "n": len(labels), "seed": REFERENCE_SEED,
           "renderer": renderer}
    return cached_features(key, lambda: data.render_prompts(labels, seed=REFERENCE_SEED),
                           extractor, cache)


def world_alignment():
    """``alignment_fn(images, labels)`` from the world's classifier, or (None, why not)."""
    try:
        from ..world import classifier as wc
    except ImportError as e:
        return None, f"world attribute classifier unavailable ({e})"
    try:
        model = wc.load_classifier()
    # E.g. its weights are not trained or shipped yet.
    except Exception as e:  # noqa: BLE001
        return None, f"world attribute classifier could not be loaded ({type(e).__name__}: {e})"
    params = inspect.signature(wc.score_alignment).parameters

    def alignment_fn(images, labels):
        from ..world.data import RESOLUTION

        # The classifier is trained at the world's resolution; a pipeline that samples at
        # another size is scored on its images resized to it, as a viewer would downscale.
        if images.shape[-2:] != (RESOLUTION, RESOLUTION):
            images = torch.nn.functional.interpolate(
                images, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False,
                antialias=True)
        # Pass the loaded classifier when the function takes one, so it is read once per eval.
        out = (wc.score_alignment(images, labels, model=model) if "model" in params
               else wc.score_alignment(images, labels))
        # Per-sample booleans would bloat every results file; the aggregates are what we report.
        return {k: v for k, v in out.items() if k != "per_sample"}

    return alignment_fn, None


# -- the command ---------------------------------------------------------------------------
class Protocol:
    """What every model in a comparison shares: prompts, seeds, reference, features, alignment."""

    def __init__(self, num=1000, prompts_kind="single", seed=0, feature_size=DEFAULT_SIZE,
                 cache_dir=None):
        if num < 4:
            raise ValueError(f"--num {num} is too few samples; the metrics need at least 4 "
                             "(1000 is the default and what reported numbers use)")
        if prompts_kind not in PROMPT_KINDS:
            raise ValueError(f"prompts kind must be one of {PROMPT_KINDS}, got {prompts_kind!r}")
        self.num, self.prompts_kind, self.seed = num, prompts_kind, seed
        self.prompts, self.labels = world_prompts(prompts_kind, num)
        self.seeds = [seed + i for i in range(num)]
        self.extractor = get_feature_extractor(feature_size)
        self.reference = world_reference_features(self.labels, prompts_kind, self.extractor,
                                                  cache_dir)
        self.alignment_fn, self.alignment_note = world_alignment()

    def describe(self) -> dict:
        return {"prompts": self.prompts_kind, "seeds": {"first": self.seed, "count": self.num},
                "reference_seed": REFERENCE_SEED, "feature_space": self.extractor.name}


def evaluate_loaded(loaded, protocol: Protocol, steps=None, guidance=None, batch_size=32,
                    progress=True, name=None, return_features=False
                    ) -> tuple[dict, torch.Tensor | None]:
    """Evaluate a model from :func:`load_model` under ``protocol``; (result, first samples).
    ``return_features``: the result keeps the samples' features under ``"features"``."""
    head, steps = model_head(loaded, steps, guidance, name)
    result = evaluate(make_sample_fn(loaded.call, steps, guidance), protocol.prompts, protocol.seeds,
                      reference_features=protocol.reference, labels=protocol.labels,
                      alignment_fn=protocol.alignment_fn, batch_size=batch_size,
                      extractor=protocol.extractor, backbone=backbone_of(loaded.pipe),
                      progress=progress, return_features=return_features)
    images = result.pop("images")
    if protocol.alignment_note:
        result["alignment_note"] = protocol.alignment_note
    return {**head, **protocol.describe(), **result}, images


def model_head(loaded, steps=None, guidance=None, name=None) -> tuple[dict, int | None]:
    """What a result row says about the model and its sampler (the step count and CFG scale
    actually used, defaults resolved), and the step count to call it with."""
    pipe, model_kind, defaults = loaded.pipe, loaded.kind, loaded.defaults
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    served = getattr(loaded.call, "servable_steps", None) if model_kind == "student" else None
    if steps is not None and served and steps not in served:
        # refused before sampling: every batch would fail the same way
        raise ValueError(f"--steps {steps}: this export samples with {served} step(s); pass "
                         f"--steps one of those, or leave it out for its own "
                         f"({defaults['steps']})")
    steps_used = steps if steps is not None else defaults["steps"]
    if model_kind == "teacher" and steps is None:
        steps = steps_used  # a teacher always gets an explicit, recorded step count
    params = inspect.signature(pipe.__call__).parameters
    guidance_used = guidance if guidance is not None else (
        defaults["guidance"] if defaults["guidance"] is not None
        else params["guidance_scale"].default if "guidance_scale" in params else None)
    return {"model": name, "model_kind": model_kind, "pipeline": type(pipe).__name__,
            "steps": steps_used, "guidance": guidance_used}, steps


def write_json(path: str, obj: dict):
    from ..checkpoint import atomic_file

    with atomic_file(path) as f:  # a crash mid-write never leaves a truncated results file
        json.dump(obj, f, indent=2)
