"""Warm start: a new run's student begins from another export of the same teacher
(``student.init: <export folder>``), e.g. a TCD or LCM student whose few-step samples are
already close to the teacher's.

What can start what (anything else is refused, before the first step, with what to do):

=====================================  ==========================================
export (``student.init``)              student of the new run
=====================================  ==========================================
a LoRA export (``distill_config.json``) ``student.mode: lora`` with the same rank, alpha
                                       and target modules, on the same base weights
a whole pipeline (``model_index.json``) ``student.mode: full`` of the same architecture
=====================================  ==========================================

A whole pipeline cannot start a LoRA student directly: turn it into a LoRA first
(``ddistill export RUN --lora-rank R``). Multi-adapter exports (one expert per phase) are
refused: a run's student is one network. The EMA starts equal to the loaded student. A
resumed run takes its weights from its checkpoint, never from ``student.init``.
"""
from __future__ import annotations

import json
import os

from .student import role_is_full

CONFIG_NAME = "distill_config.json"  # what export.py writes beside a LoRA
LORA_FILE = "pytorch_lora_weights.safetensors"


def init_student(nets, teacher, recipe: dict, fingerprint: str, log=print) -> None:
    """Load the export ``recipe["student"]["init"]`` into the student (and its EMA).

    Args:
        fingerprint: the fingerprint of the teacher's base weights (``export.base_fingerprint``),
            compared with the one the export recorded.
    """
    folder = recipe["student"]["init"]
    full = role_is_full(nets.roles, "student")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"student.init {folder!r} is not a folder; give an export folder "
                                "(written by `ddistill export` or at the end of `ddistill train`)")
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        state = _lora_state(folder, nets, teacher, recipe, fingerprint, full)
    elif os.path.isfile(os.path.join(folder, "model_index.json")):
        state = _pipeline_state(folder, teacher, full)
    else:
        raise ValueError(f"student.init {folder!r} holds neither {CONFIG_NAME} (a LoRA export) "
                         "nor model_index.json (a whole pipeline); give an export folder")
    try:
        nets.roles.load_state_dict("student", state)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"student.init {folder!r} does not fit this run's student "
                         f"({str(e).splitlines()[0][:300]}); it was exported with another role "
                         "layout") from None
    if getattr(nets.roles, "ema_of", None) == "student":
        nets.roles.load_state_dict("ema", {k: v.clone() for k, v in
                                           nets.roles.state_dict("student").items()})
    log(f"student.init: the student starts from {folder}")


def _lora_state(folder, nets, teacher, recipe, fingerprint, full) -> dict:
    from safetensors.torch import load_file

    with open(os.path.join(folder, CONFIG_NAME)) as f:
        config = json.load(f)
    given = config.get("teacher", {})
    if given.get("base_fingerprint") != fingerprint:
        raise ValueError(
            f"student.init {folder!r} was trained on another base: it records "
            f"{given.get('path')!r} with base fingerprint {given.get('base_fingerprint')}, this "
            f"run's teacher {recipe['teacher']['path']!r} has {fingerprint}. Start from an "
            "export of this run's teacher, or set teacher.path to the export's")
    if config.get("adapters"):
        raise ValueError(f"student.init {folder!r} holds {len(config['adapters'])} adapters (one "
                         "per phase); a run's student is one network. Start from a one-LoRA "
                         "export")
    if config.get("lora", {}).get("from_full"):
        raise ValueError(f"student.init {folder!r} is a LoRA taken from a full student (a rank "
                         "per layer, on every changed layer): no recipe's LoRA student has that "
                         "layout. Start a full student (student.mode=full) from the full run's "
                         "whole-pipeline export instead")
    if full:
        raise ValueError(f"student.init {folder!r} is a LoRA export, but student.mode is full; "
                         "start a full student from a whole-pipeline export, or set "
                         "student.mode=lora with the export's rank "
                         f"({config.get('lora', {}).get('rank')})")
    lora, ours = config.get("lora", {}), nets.roles.lora_config
    ours = {"rank": ours.r, "alpha": ours.lora_alpha, "target_modules": sorted(ours.target_modules),
            "lora_bias": ours.lora_bias}
    theirs = {"rank": lora.get("rank"), "alpha": lora.get("alpha"),
              "target_modules": sorted(lora.get("target_modules") or []),
              "lora_bias": lora.get("lora_bias", False)}
    diff = [f"{k}: export {theirs[k]!r}, this run {ours[k]!r}" for k in ours
            if theirs[k] != ours[k]]
    if diff:
        raise ValueError(f"student.init {folder!r} has another LoRA layout than this run's "
                         f"student: {'; '.join(diff)}. Set student.rank / student.alpha / "
                         f"student.target_modules / student.lora_bias to the export's (rank {theirs['rank']})")
    prefix = config.get("component") or _component(teacher)
    state = load_file(os.path.join(folder, LORA_FILE))
    return {k[len(prefix) + 1:] if k.startswith(prefix + ".") else k: v
            for k, v in state.items()}


def _component(teacher) -> str:
    from .teachers import backbone_name

    return backbone_name(teacher.pipe)


def _pipeline_state(folder, teacher, full) -> dict:
    if not full:
        raise ValueError(f"student.init {folder!r} is a whole pipeline (a full fine-tune), but "
                         "student.mode is lora; turn it into a LoRA first (`ddistill export RUN "
                         "--lora-rank R`) and start from that, or set student.mode=full")
    from .teachers import load_pipeline

    pipe = load_pipeline(folder)
    component = _component(teacher)
    if type(pipe).__name__ != type(teacher.pipe).__name__:
        raise ValueError(f"student.init {folder!r} is a {type(pipe).__name__}, this run's "
                         f"teacher a {type(teacher.pipe).__name__}; start from an export of "
                         "this teacher")
    return getattr(pipe, component).state_dict()
