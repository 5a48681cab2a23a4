"""Every DMD-family method in the toolkit against its teacher, on the embedded world.

For each embedded teacher: train each method's recipe (a finished run is reused, an
interrupted one resumes), then score the teacher at 50/4/2/1 steps and every student with
``ddistill bench`` under one protocol (same prompts, seeds, reference and feature space).
Writes ``benchmarks/results/leaderboard/<teacher>/`` (the bench output) and
``benchmarks/results/leaderboard.md`` / ``.json`` (the table the README shows).

    python benchmarks/leaderboard.py                      # everything, hours on 2 CPU cores
    python benchmarks/leaderboard.py --teachers sd --methods dmd2 --num 500

Distances are in EfficientNet-Lite0 ImageNet feature space (128 px): NOT Inception FIDs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# method -> recipe stem (the student's step count is in each recipe)
METHODS = {
    "dmd2": "dmd2_{t}",
    "dmd2_4step": "dmd2_{t}_4step",
    "dmd2_gan": "dmd2_gan_{t}",
    "decoupled_dmd": "decoupled_dmd_{t}",
    "phased_dmd": "phased_dmd_{t}",
}
TEACHER_GUIDANCE = 5.0


def main(argv=None):
    from diffusion_distill.bench import run_bench
    from diffusion_distill.recipe import load_recipe
    from diffusion_distill.train import train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", nargs="+", default=["sd", "sd3"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--num", type=int, default=1000, help="samples per cell")
    p.add_argument("--overrides", nargs="*", default=[], help="recipe overrides for every run")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)

    rows = []
    for t in args.teachers:
        exports = []
        for method in args.methods:
            stem = METHODS[method]
            recipe_path = os.path.join(ROOT, "recipes", stem.format(t=t) + ".yaml")
            run_dir = os.path.join(ROOT, "runs", "leaderboard", stem.format(t=t))
            recipe = load_recipe(recipe_path, args.overrides + [f"output.dir={run_dir}"])
            train(recipe)
            exports.append({"name": method, "path": os.path.join(run_dir, "export")})
        spec = {"name": f"leaderboard_{t}", "teacher": f"embedded:{t}",
                "teacher_steps": [50, 4, 2, 1], "teacher_guidance": TEACHER_GUIDANCE,
                "exports": exports, "prompts": "single", "num_samples": args.num,
                "out": os.path.join(args.out, "leaderboard", t)}
        summary = run_bench(spec, spec["out"])
        for r in summary["cells"]:
            rows.append({"teacher": t, **{k: r.get(k) for k in (
                "model", "steps", "guidance", "nfe", "fd", "kid", "precision", "recall",
                "alignment", "seconds_per_image", "feature_space")}})
    info = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "command": "python benchmarks/leaderboard.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "rows": rows}
    with open(os.path.join(args.out, "leaderboard.json"), "w") as f:
        json.dump(info, f, indent=2, default=str)
    with open(os.path.join(args.out, "leaderboard.md"), "w") as f:
        f.write(markdown(info))
    print(markdown(info))


def markdown(info) -> str:
    head = ("| teacher | model | steps | NFE | FD | KID | precision | recall | alignment | s/image |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")

    def f(v, fmt):
        if isinstance(v, dict):
            v = v.get("mean", v.get("whole_prompt"))
        return "" if v is None else format(v, fmt)

    body = "".join(
        f"| {r['teacher']} | {r['model']} | {r['steps']} | {f(r['nfe'], '.0f')} | "
        f"{f(r['fd'], '.2f')} | {f(r['kid'], '.4f')} | {f(r['precision'], '.2f')} | "
        f"{f(r['recall'], '.2f')} | {f(r['alignment'], '.3f')} | "
        f"{f(r['seconds_per_image'], '.4f')} |\n" for r in info["rows"])
    return (head + body + f"\n{info['command']} — {info['cpus']} CPU cores, torch "
            f"{info['torch']}, {info['date']}. Feature space: EfficientNet-Lite0 ImageNet @128 px "
            "(not Inception).\n")


if __name__ == "__main__":
    main()
