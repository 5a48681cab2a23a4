"""``ddistill demo``: the main job on the embedded world, end to end, on a laptop CPU.

1. DMD2 distils the embedded SD3-style teacher into a 1-step LoRA student (recipes/dmd2_sd3.yaml).
2. The student is exported as a diffusers LoRA and reloaded through plain diffusers.
3. Teacher (its default sampler, with CFG) and student (1 step) are sampled on the same prompts
   and seeds: a PNG grid (teacher row above student row) and the offline metrics side by side.
"""
from __future__ import annotations

import json
import os
import time

import torch

from .checkpoint import atomic_file

DEFAULT_RECIPE = "recipes/dmd2_sd3.yaml"  # the embedded teacher that meets the quality bar
# The demo's own bars (README, Numbers): the student's FD at most 1.2x the teacher's, its
# alignment at least 0.9x, the whole run (training and both evaluations) within 15 minutes.
BARS = {"fd_ratio": 1.2, "alignment_ratio": 0.9, "minutes": 15.0}


def bar_verdicts(fd_ratio, alignment_ratio, seconds) -> dict:
    """``{bar: {"value", "bar", "met"}}`` for the demo's three bars (None: not measurable)."""
    values = {"fd_ratio": (fd_ratio, lambda v, b: v <= b),
              "alignment_ratio": (alignment_ratio, lambda v, b: v >= b),
              "minutes": (seconds / 60.0, lambda v, b: v <= b)}
    return {name: {"value": v, "bar": BARS[name], "met": None if v is None else ok(v, BARS[name])}
            for name, (v, ok) in values.items()}


def run_demo(recipe: str = DEFAULT_RECIPE, overrides=(), num: int = 250, out: str = "runs/demo",
             teacher_steps: int = 50, progress: bool = True) -> dict:
    from .checkpoint import check_output_dir
    from .eval.evaluate import summary_table
    from .eval.protocol import Protocol, evaluate_loaded, load_model
    from .recipe import load_recipe
    from .train import train
    from .world.data import save_grid

    # An earlier demo's folder (its run resumes), a new or an empty one: never someone else's.
    if not os.path.isfile(os.path.join(out, "run", "recipe.yaml")):
        check_output_dir(out, ("demo.json",), "demo output folder")
    if num < 4:
        raise ValueError(f"--num {num} is too few samples; the metrics need at least 4")
    started = time.time()
    resolved = load_recipe(recipe, list(overrides) + [f"output.dir={out}/run"])
    run_dir = train(resolved, progress=progress)
    export = os.path.join(run_dir, "export")
    trained = time.time()

    protocol = Protocol(num=num, prompts_kind="single")
    guidance = resolved["teacher"]["guidance"]
    teacher, teacher_images = _teacher_row(resolved["teacher"]["path"], protocol, teacher_steps,
                                           guidance, progress)
    student, student_images = evaluate_loaded(load_model(export), protocol, progress=progress,
                                              name="student (1 step)")
    # The grid: same prompts and seeds, teacher row over student row, 8 columns.
    grid = os.path.join(out, "teacher_vs_student.png")
    save_grid(torch.cat([teacher_images[:8], student_images[:8]]), grid, nrow=8)
    rows = [(f"teacher, {teacher['steps']} steps, CFG {guidance}", teacher),
            (f"DMD2 student, {student['steps']} step", student)]
    table = summary_table(rows)
    def whole(r):  # alignment: whole-prompt accuracy
        a = r.get("alignment")
        return a.get("whole_prompt") if isinstance(a, dict) else a

    ratios = {
        "fd_ratio": student["fd"] / teacher["fd"] if teacher["fd"] else None,
        "alignment_ratio": whole(student) / whole(teacher) if whole(teacher) else None,
        "speedup": teacher["seconds_per_image"] / student["seconds_per_image"],
        "nfe_ratio": teacher["nfe"] / student["nfe"],
    }
    seconds = {"train": trained - started, "total": time.time() - started}
    bars = bar_verdicts(ratios["fd_ratio"], ratios["alignment_ratio"], seconds["total"])
    summary = {"recipe": recipe, "overrides": list(overrides), "run": run_dir, "export": export,
               "grid": grid, "prompts": protocol.prompts[:8], "teacher": teacher,
               "student": student, **ratios, "seconds": seconds, "bars": bars}
    with atomic_file(os.path.join(out, "demo.json")) as f:
        json.dump(summary, f, indent=2, default=str)
    print(table)
    print(f"student / teacher: Fréchet distance x{ratios['fd_ratio']:.2f}, alignment "
          f"x{ratios['alignment_ratio']:.2f}, {ratios['speedup']:.1f}x faster per image "
          f"({ratios['nfe_ratio']:.0f}x fewer network evaluations); features: "
          f"{teacher['feature_space']} (not Inception: not comparable to published FIDs)")
    def verdict(name, text, fmt):
        b = bars[name]
        state = "n/a" if b["met"] is None else "met" if b["met"] else "NOT met"
        return f"{text} {b['bar']:g}{fmt}: {state}" + (
            "" if b["value"] is None else f" ({b['value']:.2f}{fmt})")

    print("bars: " + "; ".join([
        verdict("fd_ratio", "FD <=", "x"), verdict("alignment_ratio", "alignment >=", "x"),
        verdict("minutes", "whole run (install not counted) <=", " min")]))
    print(f"grid: {grid}\nexport: {export} (load with diffusion_distill.load_student)\n"
          f"summary: {os.path.join(out, 'demo.json')}")
    return summary


def _teacher_row(path, protocol, steps, guidance, progress):
    """The teacher's row, cached: it depends only on the teacher's weights and the protocol,
    and its many-step sampling is most of the demo's evaluation time."""
    import hashlib

    from .eval.evaluate import cache_dir
    from .eval.protocol import evaluate_loaded, load_model
    from .export import base_fingerprint

    loaded = load_model(path)
    pipe = loaded.pipe
    from .teachers import pipeline_backbone

    backbone = pipeline_backbone(pipe)
    key = json.dumps({"teacher": base_fingerprint(backbone), "steps": steps,
                      "guidance": guidance, **protocol.describe()}, sort_keys=True)
    file = os.path.join(cache_dir(), f"teacher_{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    if os.path.isfile(file + ".json") and os.path.isfile(file + ".pt"):
        print(f"teacher row: cached ({file}.json)")
        with open(file + ".json") as f:
            return json.load(f), torch.load(file + ".pt", weights_only=True)
    row, images = evaluate_loaded(loaded, protocol, steps=steps, guidance=guidance,
                                  progress=progress, name="teacher")
    os.makedirs(os.path.dirname(file), exist_ok=True)
    torch.save(images[:8].clone(), file + ".pt")
    with atomic_file(file + ".json") as f:
        json.dump(row, f, default=str)
    return row, images


def add_parser(sub):
    p = sub.add_parser("demo", help="distil the embedded teacher with DMD2 and compare (CPU)")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.steps=300")
    p.add_argument("--recipe", default=DEFAULT_RECIPE)
    # 250 keeps the demo within minutes; FD is biased upward at small n, so compare the two
    # rows (same prompts, seeds, n) and use `ddistill bench` with 1000 for reported numbers.
    p.add_argument("--num", type=int, default=250, help="samples per model for the metrics")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=lambda a: run_demo(a.recipe, a.overrides, a.num, a.out) and 0)
