"""Training wall time until a student comes within a factor of its teacher's Fréchet distance.

For one embedded teacher and a few methods (by default 4-step consistency against 4-step DMD2):
train each method's recipe with the in-training evaluation on (``train.eval_every``,
``train.eval_num`` samples, the toolkit's own few-step sampler), score the teacher (50 steps,
CFG 5) on exactly that protocol (same prompts, seeds, reference, feature space and sample
count, so that the finite-sample bias of FD is shared), and report per method the training
seconds (``train_seconds`` in ``eval.jsonl``: time inside the training step only, no
evaluation or checkpoints) at the first evaluation with FD <= ``--factor`` x the teacher's.
The curve starts at step 0, the student as initialised (the teacher's weights under the
student's own few-step sampler, unguided): a target met there costs no training at all.

    python benchmarks/time_to_quality.py --teacher sd --methods lcm tcd dmd2_4step

Writes ``benchmarks/results/time_to_quality_<teacher>.json`` and a plot of FD / teacher FD
against training seconds beside it. Distances are in EfficientNet-Lite0 ImageNet feature space
(128 px): NOT Inception FIDs.
"""
from __future__ import annotations

import argparse
import os
import sys

from harness import (
    ROOT,
    add_run_arguments,
    check_run_arguments,
    provenance,
    train_and_evaluate,
    write_json,
)

TEACHER_STEPS, TEACHER_GUIDANCE = 50, 5.0  # the leaderboard's teacher row
FEW_STEPS = 4  # the teacher's own few-step sampler: the bar on FD to the teacher


def main(argv=None):
    from leaderboard import METHODS

    from diffusion_distill.eval.evaluate import fd_to
    from diffusion_distill.eval.in_training import InTrainingEval
    from diffusion_distill.eval.protocol import Protocol, evaluate_loaded, load_model
    from diffusion_distill.recipe import load_recipe

    def load_teacher_for(recipe):
        from diffusion_distill.build import setup_run

        return setup_run(recipe, "cpu")[0]

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="sd", choices=["sd", "sd3"])
    p.add_argument("--methods", nargs="+", default=["lcm", "tcd", "dmd2_4step"],
                   choices=list(METHODS))
    p.add_argument("--factor", type=float, default=1.5, help="the target: FD <= factor x teacher")
    add_run_arguments(p, "time_to_quality", steps=300, eval_every=50)
    a = p.parse_args(argv)
    check_run_arguments(p, a)

    protocol = Protocol(num=a.eval_num, prompts_kind="single")
    loaded = load_model(f"embedded:{a.teacher}")
    teacher_row, _ = evaluate_loaded(loaded, protocol, steps=TEACHER_STEPS,
                                     guidance=TEACHER_GUIDANCE, progress=False)
    teacher_fd = teacher_row["fd"]
    print(f"[time_to_quality] teacher {a.teacher}, {TEACHER_STEPS} steps CFG "
          f"{TEACHER_GUIDANCE}: FD {teacher_fd:.2f} on {a.eval_num} samples", flush=True)
    # The second bar, on FD to the teacher (what a distilled student is trained toward): as
    # close to the 50-step teacher's samples as the teacher's own 4-step sampler gets, against
    # the very reference the in-training fd_teacher uses.
    first = load_recipe(os.path.join(ROOT, "recipes", METHODS[a.methods[0]].format(t=a.teacher)
                                     + ".yaml"), [f"train.eval_num={a.eval_num}"])
    few_row, _ = evaluate_loaded(loaded, protocol, steps=FEW_STEPS, guidance=TEACHER_GUIDANCE,
                                 progress=False, return_features=True)
    few_fd_teacher = fd_to(InTrainingEval(load_teacher_for(first), first, protocol)
                           .teacher_features(), few_row.pop("features"))
    print(f"[time_to_quality] teacher at {FEW_STEPS} steps: FD to its 50-step samples "
          f"{few_fd_teacher:.2f}", flush=True)

    methods = {}
    for method in a.methods:
        stem = METHODS[method].format(t=a.teacher)
        run_dir = os.path.join(a.runs, stem)
        recipe = load_recipe(os.path.join(ROOT, "recipes", stem + ".yaml"), [
            f"train.steps={a.steps}", f"train.eval_every={a.eval_every}",
            f"train.eval_num={a.eval_num}", "output.export=false", f"output.dir={run_dir}"])
        rows = train_and_evaluate(recipe)
        if rows and rows[0]["step"] != 0:
            # a run made before the loop evaluated its initialisation: score it here (LoRA
            # B = 0, so the initial student is the teacher under the student's sampler)
            from diffusion_distill.build import setup_run

            teacher, objective, nets = setup_run(recipe, "cpu")
            rows.insert(0, {**InTrainingEval(teacher, recipe, protocol)(nets, objective),
                            "step": 0, "train_seconds": 0.0})
        if not rows or "train_seconds" not in rows[-1]:
            raise SystemExit(f"{run_dir}/eval.jsonl has no train_seconds: a run made before the "
                             "toolkit logged them; give another --runs folder")
        curve = [{"step": r["step"], "train_seconds": r["train_seconds"], "fd": r["fd"],
                  "fd_ratio": r["fd"] / teacher_fd, "fd_teacher": r.get("fd_teacher"),
                  "alignment": r["alignment"]["whole_prompt"], "recall": r["recall"],
                  "worst_share": r["alignment"].get("worst_share")}
                 for r in rows]
        reached = next((c for c in curve if c["fd_ratio"] <= a.factor), None)
        near = next((c for c in curve if c["fd_teacher"] is not None
                     and c["fd_teacher"] <= few_fd_teacher), None)
        best = min(curve, key=lambda c: c["fd_ratio"])
        methods[method] = {
            "recipe": f"recipes/{stem}.yaml", "student_steps": recipe["student"]["num_steps"],
            "reached": reached is not None,
            "train_seconds_to_target": reached["train_seconds"] if reached else None,
            "step_to_target": reached["step"] if reached else None,
            "train_seconds_to_teacher_4step_fd_teacher": near["train_seconds"] if near else None,
            "step_to_teacher_4step_fd_teacher": near["step"] if near else None,
            "best_fd_ratio": best["fd_ratio"], "best_step": best["step"], "curve": curve}
        print(f"[time_to_quality] {method}: " + (
            f"FD <= {a.factor}x teacher at step {reached['step']}, "
            f"{reached['train_seconds']:.0f} s of training" if reached else
            f"not within {a.factor}x in {a.steps} steps") +
            f" (best {best['fd_ratio']:.2f}x at step {best['step']}); FD to teacher <= the "
            f"teacher's {FEW_STEPS}-step: " + (f"step {near['step']}, {near['train_seconds']:.0f} s"
                                                if near else "not reached"), flush=True)

    result = {
        "what": f"training seconds until FD <= {a.factor}x the teacher's",
        **provenance("time_to_quality.py", argv),
        "feature_space": teacher_row.get("feature_space"), "num_samples": a.eval_num,
        "teacher": {"name": a.teacher, "steps": TEACHER_STEPS, "guidance": TEACHER_GUIDANCE,
                    "fd": teacher_fd, "alignment": teacher_row["alignment"]["whole_prompt"],
                    "recall": teacher_row["recall"]},
        "teacher_few_steps": {"steps": FEW_STEPS, "guidance": TEACHER_GUIDANCE,
                              "fd": few_row["fd"], "fd_teacher": few_fd_teacher,
                              "alignment": few_row["alignment"]["whole_prompt"]},
        "factor": a.factor, "methods": methods}
    out = os.path.join(a.out, f"time_to_quality_{a.teacher}.json")
    write_json(out, result)
    _plot(result, out[:-len(".json")] + ".png")
    print(f"[time_to_quality] -> {out}")
    return 0


def _plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in result["methods"].items():
        label = f"{name} ({m['student_steps']} steps)"
        secs = [c["train_seconds"] for c in m["curve"]]
        ax.plot(secs, [c["fd_ratio"] for c in m["curve"]], marker="o", label=label)
        bx.plot(secs, [c["fd_teacher"] for c in m["curve"]], marker="o", label=label)
    ax.axhline(result["factor"], color="gray", ls="--", lw=1, label=f"{result['factor']}x teacher")
    ax.axhline(1.0, color="black", lw=1, label="teacher (50 steps, CFG 5)")
    few = result["teacher_few_steps"]
    bx.axhline(few["fd_teacher"], color="gray", ls="--", lw=1,
               label=f"teacher's own {few['steps']}-step samples")
    xlabel = ("training seconds (2 CPU cores)" if "CUDA no" in result["machine"]
              else "training seconds")
    for axis in (ax, bx):
        axis.set_xlabel(xlabel)
        axis.legend(fontsize=8)
    ax.set_ylabel(f"FD / teacher FD ({result['num_samples']} samples)")
    bx.set_ylabel("FD to the teacher's 50-step samples")
    ax.set_title(f"embedded {result['teacher']['name']}: FD to the data", fontsize=10)
    bx.set_title(f"embedded {result['teacher']['name']}: FD to the teacher", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
