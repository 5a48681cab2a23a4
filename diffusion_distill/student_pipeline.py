"""Load an export (see :mod:`diffusion_distill.export`) into plain diffusers.

``load_student(folder)`` does the diffusers steps: load the teacher pipeline, check the
fingerprint, load the LoRA, swap in the scheduler, and call with the student's timesteps.
"""
from __future__ import annotations

import os

from .assets import EMBEDDED_PREFIX, resolve_teacher_path
from .export import backbone_name, base_fingerprint
from .export_config import (
    REEXPORT,
    ExportError,
    adapter_layer_counts,
    lora_files,
    lora_layer_count,
    read_export_config,
)


class StudentPipeline:
    """A diffusers pipeline with the student's LoRA, scheduler and call arguments set.

    ``student(prompts, generator=...)`` is ``pipe(prompts, **call, generator=...)``; every other
    pipeline argument can be passed too. ``num_inference_steps`` picks any step count the
    export serves (``student.servable_steps``). ``.pipe`` is the plain diffusers pipeline.
    """

    def __init__(self, pipe, config: dict):
        self.pipe = pipe
        self.config = config
        self.call_kwargs = dict(config["call"])
        self.steps = config.get("steps") or {
            str(config["call"]["num_inference_steps"]): {"call": config["call"], "adapters":
                                                          config.get("adapter_per_step")}}

    @property
    def servable_steps(self) -> list[int]:
        return sorted(int(n) for n in self.steps)

    def __call__(self, prompt, num_inference_steps: int | None = None, **kwargs):
        from .samplers import seeded_global_rng

        n = str(num_inference_steps or self.config["call"]["num_inference_steps"])
        if n not in self.steps:
            raise ValueError(f"this export samples with {self.servable_steps} step(s), not "
                             f"{num_inference_steps}; pass num_inference_steps= one of those.")
        entry = self.steps[n]
        call = {**entry["call"], **kwargs}
        per_step = entry.get("adapters") or []
        if len(set(per_step)) > 1:
            self.pipe.set_adapters(per_step[0])

            def switch(pipe, i, t, callback_kwargs):  # the adapter of the next step
                pipe.set_adapters(per_step[min(i + 1, len(per_step) - 1)])
                return callback_kwargs

            call["callback_on_step_end"] = switch
        elif per_step:
            self.pipe.set_adapters(per_step[0])
        # Flow pipelines re-noise from torch's global RNG: seed it from the caller's
        # generator so a seed fixes the samples (the toolkit's own sampler does the same).
        flow = "FlowMatch" in self.config["scheduler"]["class"]
        with seeded_global_rng(call.get("generator") if flow else None):
            return self.pipe(prompt, **call)


def load_student(folder: str, teacher: str | None = None, torch_dtype=None) -> StudentPipeline:
    """Plain diffusers + the export: the student ready to sample.

    Args:
        folder: an export folder (with distill_config.json).
        teacher: the teacher pipeline (folder, hub id or ``embedded:NAME``) if not the one
            recorded in the export.
    """
    import diffusers

    from .teachers import load_pipeline

    config = read_export_config(folder)  # one line naming file and key, before any loading
    # every LoRA file the config names, present and whole, with its layer count
    files = [(name, file, lora_layer_count(file)) for name, file in lora_files(folder, config)]
    path = resolve_teacher_path(
        teacher or config["teacher"].get("pretrained") or config["teacher"]["path"])
    if (teacher is None and not os.path.isdir(path)
            and str(config["teacher"]["path"]).startswith(EMBEDDED_PREFIX)):
        # an export written before the reference was portable names another checkout's
        # folder for its embedded teacher: that teacher ships here too
        path = resolve_teacher_path(config["teacher"]["path"])
    pipe = load_pipeline(path, torch_dtype=torch_dtype)
    component = getattr(pipe, backbone_name(pipe))
    found = base_fingerprint(component)
    expected = config["teacher"]["base_fingerprint"]
    if found != expected or type(pipe).__name__ != config["teacher"]["pipeline_class"]:
        raise ValueError(
            f"the export in {folder!r} was trained on a different base: it expects a "
            f"{config['teacher']['pipeline_class']} with base fingerprint {expected} "
            f"({config['teacher']['path']}), but {path!r} is a {type(pipe).__name__} with "
            f"fingerprint {found}. Load it onto the teacher it was distilled from.")
    for name, file, want in files:
        before = adapter_layer_counts(component)
        try:
            if name is None:
                pipe.load_lora_weights(os.path.dirname(file))
            else:
                pipe.load_lora_weights(os.path.dirname(file), adapter_name=name)
        except ValueError as e:  # peft: no target module of the file exists in this base
            raise ExportError(
                f"{file}: none of its {want} LoRA layers fit the {type(component).__name__} of "
                f"{path!r} ({' '.join(str(e).split())[:200]}); the file does not fit this base "
                f"(edited, or written for another model): {REEXPORT}") from None
        landed = sum(n for a, n in adapter_layer_counts(component).items() if a not in before)
        if landed != want:
            # diffusers skips keys that match no module with a warning: the student would
            # sample as (part of) the bare teacher
            raise ExportError(
                f"{file}: only {landed} of its {want} LoRA layers landed in the "
                f"{type(component).__name__} of {path!r}; the file does not fit this base "
                f"(edited, or written for another model): {REEXPORT}")
    if config.get("experts") and not config.get("adapters"):  # format 1 (Phased DMD)
        config.setdefault("adapter_per_step", [n for n, _, _ in files])
    cls = getattr(diffusers, config["scheduler"]["class"])
    pipe.scheduler = cls.from_config(config["scheduler"]["config"])
    return StudentPipeline(pipe, config)
