"""Export a trained student so that plain diffusers loads and samples it.

An export folder holds

* ``pytorch_lora_weights.safetensors``: the student's LoRA in diffusers' format
  (``pipe.load_lora_weights(folder)`` reads it); for UNet families also
  ``pytorch_lora_weights_kohya.safetensors`` with kohya / ComfyUI key names.
  A student served by several adapters (an expert per phase) has one such file per adapter
  in a sub-folder named after it, loaded as named adapters and switched per step.
* ``distill_config.json``: the teacher it belongs to (as given, as a reference that works from
  any folder: ``embedded:NAME``, an absolute folder or a hub id, and a fingerprint of its base
  weights), the scheduler class and config, the call
  arguments for every step count the student serves, the adapter of each step, and
  ``usage``: the plain-diffusers lines that sample it.

Reading an export back is :mod:`diffusion_distill.student_pipeline` (``load_student``).
"""
from __future__ import annotations

import hashlib
import json
import os

from .assets import EMBEDDED_PREFIX
from .export_config import CONFIG_NAME, WEIGHT_NAME  # noqa: F401  (the names every reader uses)

# What an export folder may replace: an earlier LoRA export, or a full fine-tune's pipeline.
EXPORT_MARKERS = (CONFIG_NAME, "model_index.json")


def backbone_name(pipe) -> str:
    # imported when used: this module stays light to import (the CLI lists it)
    from .teachers import backbone_name as name

    return name(pipe)


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


def _kohya(state: dict) -> dict | None:
    try:
        from diffusers.utils import convert_state_dict_to_kohya
    except ImportError:  # older diffusers
        return None
    return convert_state_dict_to_kohya(state)


def teacher_reference(recipe: dict, teacher) -> dict:
    """How the export names its teacher: as the recipe gave it, and as a reference that works
    from any folder: ``embedded:NAME`` as it is (every install ships that teacher, so an export
    copied to another machine or checkout still finds it; ``resolve_teacher_path`` turns it
    into the folder ``from_pretrained`` takes), a local folder as its absolute path, a hub id
    as given."""
    given = recipe["teacher"]["path"]
    pretrained = given
    if given and not given.startswith(EMBEDDED_PREFIX) and os.path.isdir(given):
        pretrained = os.path.abspath(given)
    return {"path": given, "pretrained": pretrained, "family": teacher.family,
            "pipeline_class": type(teacher.pipe).__name__,
            "base_fingerprint": base_fingerprint(teacher.backbone)}


def export_nets(nets, teacher, recipe: dict, out_dir: str, *, objective,
                role: str | None = None, lora_rank: int | None = None) -> str:
    """Write the export folder (atomically: a temp folder renamed into place).

    ``objective``: the one the run built (and trained with). Its sampler decides everything
    method-specific: the student's times, which adapters serve which steps (one LoRA at the
    top level, or one sub-folder per adapter), the scheduler and the pipeline call arguments,
    for every step count the student can serve.

    ``lora_rank`` (default: the recipe's ``output.lora_rank``): a full student is written as
    a rank-``lora_rank`` LoRA (truncated SVD of each layer's change, :mod:`.lowrank`) in the
    same format as a LoRA student's export, instead of as a whole pipeline.
    """
    from safetensors.torch import save_file

    from .checkpoint import atomic_dir
    from .student import role_is_full, serving_role

    if lora_rank is None:
        lora_rank = recipe["output"].get("lora_rank")
    from_full = role_is_full(nets.roles, "student")
    if from_full and not lora_rank:  # a whole student network: a whole pipeline
        return _export_full(nets, teacher, recipe, out_dir)
    if lora_rank and not from_full:
        raise ValueError(f"--lora-rank / output.lora_rank {lora_rank} turns a full student into "
                         "a LoRA, but this run's student is already a LoRA (student.mode: lora); "
                         "export it without --lora-rank")
    if teacher.pipe is None:
        raise ValueError("a custom teacher has no diffusers pipeline to export a LoRA for; "
                         "save the student network's state_dict instead")
    sampler = objective.sampler()
    wanted = role or recipe["output"]["export_role"]
    use_ema = wanted == "ema"
    reports = {}
    if wanted not in ("ema", "student") and wanted not in nets.roles.trainable:
        raise ValueError(f"export role {wanted!r} does not exist in this run; roles: "
                         f"{['ema', *nets.roles.trainable]}")
    component = backbone_name(teacher.pipe)
    pipe_cls = type(teacher.pipe)

    def source(trained_role):  # the adapter whose weights serve a trained role
        if wanted not in ("ema", "student"):
            return wanted
        return serving_role(nets, trained_role, ema=use_ema)

    def write(adapter, folder):
        os.makedirs(folder, exist_ok=True)
        if from_full:
            from .lowrank import lora_from_full

            state, reports[adapter] = lora_from_full(nets.roles.networks[adapter],
                                                     teacher.backbone, lora_rank)
            reports[adapter]["target_modules"] = sorted({k.rsplit(".lora_", 1)[0]
                                                         for k in state})
        else:
            state = nets.roles.state_dict(adapter)
        peft_state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        # peft key names (lora_A / lora_B), which current diffusers loads as they are. The
        # older "lora.down / lora.up" names (convert_state_dict_to_diffusers) lose the
        # attention projections on load with diffusers 0.42 (tested in test_export.py).
        pipe_cls.save_lora_weights(folder, **{f"{component}_lora_layers": peft_state},
                                   safe_serialization=True)
        kohya = _kohya(peft_state) if component == "unet" else None
        if kohya:
            save_file({k: v.contiguous() for k, v in kohya.items()},
                      os.path.join(folder, "pytorch_lora_weights_kohya.safetensors"))

    def steps_entry(n):
        s = objective.sampler(n)
        rendered = s.render(teacher)
        return {"call": {**rendered["call"], "num_inference_steps": s.num_steps,
                         "guidance_scale": 1.0},
                "adapters": [s.export_names.get(r, r) for r in s.adapters]
                if s.export_names else None}

    with atomic_dir(out_dir, markers=(CONFIG_NAME,), what="export folder") as tmp:
        named = sampler.export_names
        if named:
            for trained in sampler.roles:
                write(source(trained), os.path.join(tmp, named[trained]))
        else:
            write(source(sampler.roles[0]), tmp)
        rendered = sampler.render(teacher)
        default = steps_entry(sampler.num_steps)
        adapters = list(dict.fromkeys(named[r] for r in sampler.roles)) if named else []
        config = {
            "format": 2,
            "teacher": teacher_reference(recipe, teacher),
            "scheduler": rendered["scheduler"],
            "call": default["call"],
            "steps": {str(n): steps_entry(n) for n in objective.servable_steps()},
            "student_times": sampler.times,
            "sampler": sampler.describe(),
            "prediction_type": teacher.denoiser.prediction_type,
            "objective": recipe["method"]["name"],
            "role": "adapters" if named else ("ema" if use_ema and nets.roles.ema_of
                                               else wanted if wanted != "ema" else "student"),
            # named LoRA adapters (sub-folders) and the one each step uses; [] = one LoRA
            "adapters": adapters,
            "adapter_per_step": default["adapters"] or [],
            "experts": len(adapters),
            "lora": _lora_layout(nets, lora_rank, reports),
            "teacher_guidance": nets.guidance,
        }
        config["usage"] = usage_snippet(config)
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=1, default=str)
    return out_dir


def _lora_layout(nets, lora_rank, reports) -> dict:
    """What the export records of its LoRA's shape; for a LoRA taken from a full student, the
    rank per layer is min(rank, the layer's), alpha = rank (scale 1), every changed linear and
    convolution is a target, and ``from_full`` says how much of the change the rank kept."""
    if not reports:
        lora = nets.roles.lora_config
        return {"rank": lora.r, "alpha": lora.lora_alpha,
                "target_modules": sorted(lora.target_modules), "lora_bias": lora.lora_bias}
    report = dict(next(iter(reports.values())))
    return {"rank": lora_rank, "alpha": lora_rank, "target_modules": report.pop("target_modules"),
            "from_full": report}


def usage_snippet(config: dict) -> list[str]:
    """Plain-diffusers code that samples this export (also in the README), one line each."""
    lines = [
        "import json, torch, diffusers",
        "cfg = json.load(open('EXPORT/distill_config.json'))",
        "from diffusion_distill import resolve_teacher_path  # embedded:NAME -> its folder",
        ("pipe = diffusers.DiffusionPipeline.from_pretrained("
         "resolve_teacher_path(cfg['teacher']['pretrained']))"),
        ("pipe.scheduler = getattr(diffusers, cfg['scheduler']['class']).from_config("
         "cfg['scheduler']['config'])"),
    ]
    if config["adapters"]:
        lines += [
            "for name in cfg['adapters']:",
            "    pipe.load_lora_weights(f'EXPORT/{name}', adapter_name=name)",
            "per_step = cfg['adapter_per_step']",
            "pipe.set_adapters(per_step[0])",
            "def switch(pipe, i, t, kwargs):  # the next step's adapter",
            "    pipe.set_adapters(per_step[min(i + 1, len(per_step) - 1)])",
            "    return kwargs",
            "torch.manual_seed(0x9E3779B9 + 0)  # flow pipelines re-noise from the global RNG",
            ("image = pipe('a red circle', generator=torch.Generator().manual_seed(0), "
             "callback_on_step_end=switch, **cfg['call']).images[0]"),
        ]
    else:
        lines += [
            "pipe.load_lora_weights('EXPORT')",
            "torch.manual_seed(0x9E3779B9 + 0)  # flow pipelines re-noise from the global RNG",
            ("image = pipe('a red circle', generator=torch.Generator().manual_seed(0), "
             "**cfg['call']).images[0]"),
        ]
    return lines


def _export_full(nets, teacher, recipe, out_dir):
    """Full fine-tune (also how the embedded teachers are trained): save the whole pipeline
    (atomically; it replaces only an earlier saved pipeline, a folder with model_index.json)."""
    from .checkpoint import atomic_dir

    role = "ema" if "ema" in nets.roles.networks else "student"
    backbone = nets.roles.networks[role]
    pipe = teacher.pipe
    component = backbone_name(pipe)
    original = getattr(pipe, component)
    try:
        setattr(pipe, component, backbone)
        with atomic_dir(out_dir, markers=("model_index.json",), what="pipeline folder") as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
    finally:
        setattr(pipe, component, original)
    return out_dir


def add_parser(sub):
    p = sub.add_parser("export", help="export a run's student as a diffusers LoRA")
    p.add_argument("run", help="a run folder (with recipe.yaml and checkpoints/)")
    p.add_argument("--out", required=True, help="the export folder to write")
    p.add_argument("--role", default=None, help="ema (default when present) or student")
    p.add_argument("--lora-rank", type=int, default=None,
                   help="a full student's export as a rank-R LoRA (truncated SVD of each "
                        "layer's change) instead of a whole pipeline")
    p.set_defaults(func=_cli)


def _cli(args):
    from .build import restore_run
    from .checkpoint import OutputFolderError, check_output_dir, is_inside

    if is_inside(args.run, args.out):
        raise OutputFolderError(
            f"--out {args.out!r} is the run folder {args.run!r} or a folder above it; an export "
            "there would replace the run. Choose a new folder, e.g. --out exports/NAME (or "
            "RUN/export)")
    check_output_dir(args.out, EXPORT_MARKERS, "--out export folder")  # before loading
    run = restore_run(args.run)
    print(export_nets(run.nets, run.teacher, run.recipe, args.out, role=args.role,
                      objective=run.objective, lora_rank=args.lora_rank))
