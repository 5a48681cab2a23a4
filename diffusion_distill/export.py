"""Export a trained student so that plain diffusers loads and samples it.

An export folder holds

* ``pytorch_lora_weights.safetensors``: the student's LoRA in diffusers' format
  (``pipe.load_lora_weights(folder)`` reads it); for UNet families also
  ``pytorch_lora_weights_kohya.safetensors`` with kohya / ComfyUI key names.
  Phased DMD writes one such file per expert under ``expert_K/``.
* ``distill_config.json``: the teacher it belongs to (path and a fingerprint of its base
  weights), the scheduler class and config, the student's timesteps, guidance and prediction
  type, the objective.

``load_student(folder)`` does the diffusers steps: load the teacher pipeline, check the
fingerprint, load the LoRA, swap in the scheduler, and call with the student's timesteps.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

CONFIG_NAME = "distill_config.json"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def base_fingerprint(backbone) -> str:
    """A hash of a few of the base weights, to refuse loading onto a different base.

    Adapter weights are skipped and peft's ``base_layer`` infix removed, so the same base
    gives the same value with or without adapters loaded.
    """
    params = sorted((n.replace(".base_layer", ""), p) for n, p in backbone.named_parameters()
                    if "lora_" not in n)
    picked = params[:3] + params[-3:]
    h = hashlib.sha256()
    for name, p in picked:
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _component(pipe) -> str:
    return "unet" if hasattr(pipe, "unet") and pipe.unet is not None else "transformer"


def student_scheduler(teacher, student_times: list[float], stochastic: bool = True):
    """(scheduler class name, config, call kwargs) reproducing the student's sampler.

    The few-step student predicts x0 and re-noises it with fresh noise between steps (DMD2's
    multi-step sampler, also the consistency-model one): diffusers' LCMScheduler for VP
    families, FlowMatchEulerDiscreteScheduler with stochastic_sampling for flow families.
    """
    sched = teacher.pipe.scheduler
    if teacher.schedule.kind == "flow":
        config = dict(sched.config)
        # Our times are already the sigmas to visit; no further shifting.
        config.update(shift=1.0, use_dynamic_shifting=False, stochastic_sampling=stochastic)
        return ("FlowMatchEulerDiscreteScheduler", config,
                {"sigmas": [float(t) for t in student_times]})
    from diffusers import LCMScheduler

    config = dict(LCMScheduler.from_config(sched.config).config)
    # A huge timestep_scaling puts LCM's boundary condition at c_skip=0, c_out=1 for every
    # t > 0: the scheduler then returns the network's x0 exactly, as the student was trained.
    config.update(timestep_scaling=1e6, prediction_type=teacher.denoiser.prediction_type)
    steps = [round(float(teacher.schedule.model_time(torch.tensor(t)))) for t in student_times]
    return "LCMScheduler", config, {"timesteps": steps}


def _kohya(state: dict) -> dict | None:
    try:
        from diffusers.utils import convert_state_dict_to_kohya
    except ImportError:  # older diffusers
        return None
    return convert_state_dict_to_kohya(state)


def export_nets(nets, teacher, recipe: dict, out_dir: str, role: str | None = None) -> str:
    """Write the export folder (atomically: a temp folder renamed into place)."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_dir
    from .student import SharedBaseRoles
    from .train import student_times as recipe_times

    if not isinstance(nets.roles, SharedBaseRoles):
        return _export_full(nets, teacher, recipe, out_dir)
    if teacher.pipe is None:
        raise ValueError("a custom teacher has no diffusers pipeline to export a LoRA for; "
                         "save the student network's state_dict instead")
    times = recipe_times(recipe, teacher)
    experts = [r for r in nets.roles.trainable if r.startswith("student_")]
    if role is None:
        wanted = recipe["output"]["export_role"]
        role = wanted if wanted in nets.roles._params else "student"
    component = _component(teacher.pipe)
    pipe_cls = type(teacher.pipe)

    def write(role_name, folder):
        os.makedirs(folder, exist_ok=True)
        peft_state = {k: v.detach().cpu().contiguous()
                      for k, v in nets.roles.state_dict(role_name).items()}
        # peft key names (lora_A / lora_B), which current diffusers loads as they are. The
        # older "lora.down / lora.up" names (convert_state_dict_to_diffusers) lose the
        # attention projections on load with diffusers 0.42 (tested in test_export.py).
        pipe_cls.save_lora_weights(folder, **{f"{component}_lora_layers": peft_state},
                                   safe_serialization=True)
        kohya = _kohya(peft_state) if component == "unet" else None
        if kohya:
            save_file({k: v.contiguous() for k, v in kohya.items()},
                      os.path.join(folder, "pytorch_lora_weights_kohya.safetensors"))

    with atomic_dir(out_dir) as tmp:
        if experts:
            for i, expert in enumerate(experts):
                write(expert, os.path.join(tmp, f"expert_{i}"))
        else:
            write(role, tmp)
        name, sched_config, call_kwargs = student_scheduler(teacher, times)
        lora = nets.roles.lora_config
        config = {
            "format": 1,
            "teacher": {"path": recipe["teacher"]["path"], "family": teacher.family,
                        "pipeline_class": pipe_cls.__name__,
                        "base_fingerprint": base_fingerprint(teacher.backbone)},
            "scheduler": {"class": name, "config": sched_config},
            "call": {**call_kwargs, "num_inference_steps": len(times), "guidance_scale": 1.0},
            "student_times": times,
            "prediction_type": teacher.denoiser.prediction_type,
            "objective": recipe["method"]["name"],
            "role": "experts" if experts else role,
            "experts": len(experts),
            "lora": {"rank": lora.r, "alpha": lora.lora_alpha,
                     "target_modules": sorted(lora.target_modules)},
            "teacher_guidance": nets.guidance,
        }
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=1, default=str)
    return out_dir


def _export_full(nets, teacher, recipe, out_dir):
    """Full fine-tune (also how the embedded teachers are trained): save the whole pipeline."""
    role = "ema" if "ema" in nets.roles.networks else "student"
    backbone = nets.roles.networks[role]
    pipe = teacher.pipe
    component = _component(pipe)
    original = getattr(pipe, component)
    try:
        setattr(pipe, component, backbone)
        pipe.save_pretrained(out_dir, safe_serialization=True)
    finally:
        setattr(pipe, component, original)
    return out_dir


class StudentPipeline:
    """A diffusers pipeline with the student's LoRA, scheduler and call arguments set.

    ``student(prompts, generator=...)`` is ``pipe(prompts, **call, generator=...)``; every other
    pipeline argument can be passed too. ``.pipe`` is the plain diffusers pipeline.
    """

    def __init__(self, pipe, config: dict):
        self.pipe = pipe
        self.config = config
        self.call_kwargs = dict(config["call"])

    def __call__(self, prompt, **kwargs):
        call = {**self.call_kwargs, **kwargs}
        if self.config.get("experts"):
            call["callback_on_step_end"] = self._switch_expert
            self.pipe.set_adapters("expert_0")
        return self.pipe(prompt, **call)

    def _switch_expert(self, pipe, i, t, callback_kwargs):
        # Phased DMD: the expert for the next step's phase.
        nxt = min(i + 1, self.config["experts"] - 1)
        pipe.set_adapters(f"expert_{nxt}")
        return callback_kwargs


def load_student(folder: str, teacher: str | None = None, torch_dtype=None) -> StudentPipeline:
    """Plain diffusers + the export: the student ready to sample.

    Args:
        folder: an export folder (with distill_config.json).
        teacher: the teacher pipeline (folder, hub id or ``embedded:NAME``) if not the one
            recorded in the export.
    """
    import diffusers

    from .teachers import load_pipeline

    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder!r} is not a student export: no {CONFIG_NAME}. "
                                "Create one with `ddistill export RUN --out DIR`.")
    with open(cfg_path) as f:
        config = json.load(f)
    path = teacher or config["teacher"]["path"]
    if path.startswith("embedded:"):
        from .world import embedded_teacher_path

        path = embedded_teacher_path(path.split(":", 1)[1])
    pipe = load_pipeline(path, torch_dtype=torch_dtype)
    component = getattr(pipe, _component(pipe))
    found = base_fingerprint(component)
    expected = config["teacher"]["base_fingerprint"]
    if found != expected or type(pipe).__name__ != config["teacher"]["pipeline_class"]:
        raise ValueError(
            f"the export in {folder!r} was trained on a different base: it expects a "
            f"{config['teacher']['pipeline_class']} with base fingerprint {expected} "
            f"({config['teacher']['path']}), but {path!r} is a {type(pipe).__name__} with "
            f"fingerprint {found}. Load it onto the teacher it was distilled from.")
    if config.get("experts"):
        for i in range(config["experts"]):
            pipe.load_lora_weights(os.path.join(folder, f"expert_{i}"), adapter_name=f"expert_{i}")
    else:
        pipe.load_lora_weights(folder)
    cls = getattr(diffusers, config["scheduler"]["class"])
    pipe.scheduler = cls.from_config(config["scheduler"]["config"])
    return StudentPipeline(pipe, config)


def add_parser(sub):
    p = sub.add_parser("export", help="export a run's student as a diffusers LoRA")
    p.add_argument("run", help="a run folder (with recipe.yaml and checkpoints/)")
    p.add_argument("--out", required=True, help="the export folder to write")
    p.add_argument("--role", default=None, help="ema (default when present) or student")
    p.set_defaults(func=_cli)


def _cli(args):
    from .train import restore_run

    nets, teacher, recipe = restore_run(args.run)
    print(export_nets(nets, teacher, recipe, args.out, role=args.role))
