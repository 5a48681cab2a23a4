"""Every method in the toolkit (DMD, consistency and SiD families) against its teacher, on
the embedded world.

For each embedded teacher: train each method's recipe (a finished run is reused, an
interrupted one resumes), then score the teacher at 50/4/2/1 steps and every student with
``ddistill bench`` under one protocol (same prompts, seeds, reference and feature space).
Writes ``benchmarks/results/leaderboard/<teacher>/`` (the bench output) and
``benchmarks/results/leaderboard.md`` / ``.json`` (the table the README shows). Invocations
accumulate: rerunning some methods replaces their cells, rows and training curves
(``leaderboard/curves/<teacher>/<method>.json``) and keeps every other method's.

    python benchmarks/leaderboard.py                      # everything, hours on 2 CPU cores
    python benchmarks/leaderboard.py --teachers sd --methods dmd2 --num 500

Distances are in EfficientNet-Lite0 ImageNet feature space (128 px): NOT Inception FIDs.
"""
from __future__ import annotations

import argparse
import json
import os

from harness import ROOT, eval_rows, provenance, write_json

# method -> recipe stem (the student's default step count is in each recipe)
METHODS = {
    "dmd2": "dmd2_{t}",
    "dmd2_4step": "dmd2_{t}_4step",
    "dmd2_gan": "dmd2_gan_{t}",
    "decoupled_dmd": "decoupled_dmd_{t}",
    "phased_dmd": "phased_dmd_{t}",
    "lcm": "lcm_{t}",
    "tcd": "tcd_{t}",
    "pcm": "pcm_{t}",
    "ect": "ect_{t}",
    "scm": "scm_{t}",
    "sid": "sid_{t}",
    "sid_4step": "sid_{t}_4step",
    "sida": "sida_{t}",
}
# One export serves several step counts: each is a row. PCM's 2 phases serve multiples of 2.
STEPS = {"lcm": [1, 2, 4, 8], "tcd": [1, 2, 4, 8], "pcm": [2, 4, 8], "ect": [1, 2, 4, 8],
         "scm": [1, 2, 4, 8], "sid_4step": [1, 2, 4]}
TEACHER_GUIDANCE = 5.0


def main(argv=None):
    from diffusion_distill.bench import run_bench
    from diffusion_distill.bench.run import write_report
    from diffusion_distill.checkpoint import atomic_file
    from diffusion_distill.recipe import load_recipe
    from diffusion_distill.train import train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teachers", nargs="+", default=["sd", "sd3"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--num", type=int, default=1000, help="samples per cell")
    p.add_argument("--overrides", nargs="*", default=[], help="recipe overrides for every run")
    p.add_argument("--eval-every", type=int, default=150,
                   help="cheap evaluation every N training steps into each run's eval.jsonl "
                        "(the FD-vs-step plot); 0: off")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "leaderboard"),
                   help="where the training runs go (a finished run there is reused)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--plots-only", action="store_true",
                   help="only redraw the convergence plots from the stored training curves")
    args = p.parse_args(argv)
    if args.plots_only:
        for t in args.teachers:
            convergence_plot(t, args.methods, args.out)
        return

    rows = []
    for t in args.teachers:
        exports = []
        for method in args.methods:
            stem = METHODS[method]
            recipe_path = os.path.join(ROOT, "recipes", stem.format(t=t) + ".yaml")
            run_dir = os.path.join(args.runs, stem.format(t=t))
            recipe = load_recipe(recipe_path, [f"train.eval_every={args.eval_every}"]
                                 + args.overrides + [f"output.dir={run_dir}"])
            train(recipe)
            save_curve(t, method, run_dir, args.out)
            exports.append({"name": method, "path": os.path.join(run_dir, "export"),
                            **({"steps": STEPS[method]} if method in STEPS else {})})
        spec = {"name": f"leaderboard_{t}", "teacher": f"embedded:{t}",
                "teacher_steps": [50, 4, 2, 1], "teacher_guidance": TEACHER_GUIDANCE,
                "exports": exports, "prompts": "single", "num_samples": args.num,
                "latency": {"batch_sizes": [1, 16], "repeats": 3},
                "out": os.path.join(args.out, "leaderboard", t)}
        earlier = os.path.join(spec["out"], "results.json")
        earlier = _read(earlier) if os.path.isfile(earlier) else None
        summary = run_bench(spec, spec["out"])
        # run_bench wrote this invocation's cells only: the teacher's folder keeps the others
        write_report(with_earlier_cells(summary, earlier), spec["out"],
                     stored_curves(t, list(METHODS), args.out))
        for r in summary["cells"]:
            rows.append({"teacher": t, **{k: r.get(k) for k in (
                "model", "steps", "guidance", "nfe", "fd", "fd_teacher", "kid", "precision",
                "recall", "alignment", "seconds_per_image", "feature_space", "nfe_ratio")},
                         "latency": r.get("latency") or {}})
    # Runs accumulate into one table: a row is replaced only by a row of the same teacher,
    # model and step count, so rerunning one method keeps every other row. Each row carries
    # the command, machine and date that made it.
    run = provenance("leaderboard.py", argv)
    path = os.path.join(args.out, "leaderboard.json")
    info = {"rows": []}
    if os.path.isfile(path):
        with open(path) as f:
            info = json.load(f)
        for r in info["rows"]:  # files written before rows carried their run
            r.setdefault("run", info.get("runs", {}).get(r["teacher"]))
    info.pop("runs", None)
    fresh = {_row_key(r) for r in rows}
    info["rows"] = [r for r in info["rows"] if _row_key(r) not in fresh]
    info["rows"] += [{**r, "run": run} for r in rows]
    info["rows"].sort(key=lambda r: (r["teacher"], _MODEL_ORDER.get(r["model"], 1)))
    write_json(path, info)  # atomic: an interrupted write keeps the other teacher's rows
    with atomic_file(os.path.join(args.out, "leaderboard.md")) as f:
        f.write(markdown(info))
    for t in args.teachers:
        convergence_plot(t, list(METHODS), args.out)
    print(markdown(info))


def _read(path):
    with open(path) as f:
        return json.load(f)


def _curve_path(out, teacher, method):
    # beside the teacher's bench folder, not in it: the bench refuses a new folder that
    # already holds files it did not write
    return os.path.join(out, "leaderboard", "curves", teacher, f"{method}.json")


def save_curve(teacher, method, run_dir, out):
    """The run's in-training evaluation rows (``eval.jsonl``), kept beside the teacher's
    results: runs live outside the repository, and a plot drawn only from the runs on disk
    loses every method that was not rerun."""
    rows = eval_rows(run_dir)
    if rows:
        write_json(_curve_path(out, teacher, method), {"run": run_dir, "rows": rows})


def stored_curves(teacher, methods, out) -> dict:
    return {m: _read(p)["rows"] for m in methods
            if os.path.isfile(p := _curve_path(out, teacher, m))}


def with_earlier_cells(summary, earlier):
    """The teacher's summary with the student cells an earlier invocation scored and this one
    did not, where both used one protocol (prompts, seeds, samples, feature space): the
    real-data and teacher cells first (this invocation's), then the methods in table order."""
    if not earlier or earlier.get("protocol") != summary["protocol"]:
        return summary
    fresh = {c["cell"] for c in summary["cells"]}
    cells = [c for c in earlier["cells"] if c["cell"] not in fresh] + summary["cells"]
    order = list(METHODS)
    head = [c for c in summary["cells"] if c["model"] not in order]  # real data, teacher
    students = sorted((c for c in cells if c["model"] in order),
                      key=lambda c: order.index(c["model"]))  # stable: steps keep their order
    exports = {e["name"]: e for e in earlier["spec"]["exports"] + summary["spec"]["exports"]}
    return {**summary, "spec": {**summary["spec"], "exports": list(exports.values())},
            "cells": head + students, "complete": all(c.get("complete") for c in head + students)}


def convergence_plot(teacher, methods, out):
    """FD, FD to teacher, alignment, recall and the worst class share against training step
    for each method's stored curve: ``leaderboard/convergence_<teacher>.png`` when every
    method has one, else ``convergence_<teacher>_<methods>.png`` (a figure of fewer methods
    never replaces the full one)."""
    import shutil
    import tempfile

    from diffusion_distill.bench.plots import plots

    logs = stored_curves(teacher, methods, out)
    if not logs:
        return None
    name = "" if set(logs) == set(METHODS) else "_" + "_".join(logs)
    with tempfile.TemporaryDirectory() as tmp:
        written = plots([], tmp, logs, log=lambda *_: None)
        if not written:
            return None
        target = os.path.join(out, "leaderboard", f"convergence_{teacher}{name}.png")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(written[0], target)
    print(f"[leaderboard] {target}: training curves of {', '.join(logs)}")
    return target


_MODEL_ORDER = {"real-data": -1, "teacher": 0}  # then the students, in the order they were run


def _row_key(r):
    return (r["teacher"], r["model"], r["steps"])


def markdown(info) -> str:
    head = ("| teacher | model | steps | NFE | FD | FD to teacher | KID | precision | recall | "
            "alignment | s/image @1 | s/image @16 | speedup @16 (NFE ratio) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")

    def latency(r, bs, key, fmt):
        v = (r.get("latency") or {}).get(bs, {}).get(key)
        return "" if v is None else format(v, fmt)

    def speedup(r):
        s = latency(r, "16", "speedup", ".1f")
        return f"{s}x ({r['nfe_ratio']:.0f}x)" if s and r.get("nfe_ratio") else s

    def f(v, fmt):
        if isinstance(v, dict):
            v = v.get("mean", v.get("whole_prompt"))
        return "" if v is None else format(v, fmt)

    body = "".join(
        f"| {r['teacher']} | {r['model']} | {r['steps']} | {f(r['nfe'], '.0f')} | "
        f"{f(r['fd'], '.2f')} | {f(r.get('fd_teacher'), '.2f')} | {f(r['kid'], '.4f')} | "
        f"{f(r['precision'], '.2f')} | "
        f"{f(r['recall'], '.2f')} | {f(r['alignment'], '.3f')} | "
        f"{latency(r, '1', 'seconds_per_image', '.4f')} | "
        f"{latency(r, '16', 'seconds_per_image', '.4f')} | "
        f"{speedup(r)} |\n" for r in info["rows"])
    runs = []  # each distinct run once, with the rows it made
    for r in info["rows"]:
        if r.get("run") and r["run"] not in [u for u, _ in runs]:
            runs.append((r["run"], []))
        if r.get("run"):
            next(m for u, m in runs if u == r["run"]).append(f"{r['teacher']} {r['model']}")
    made = "".join(f"- `{u['command']}` ({u['machine']}, {u['date']}): "
                   f"{', '.join(dict.fromkeys(m))}\n" for u, m in runs)
    return (head + body + "\n" + made + "\nFeature space: EfficientNet-Lite0 ImageNet @128 px "
            "(not Inception); FD to teacher: to the teacher's 50-step samples, same prompts and "
            "seeds (blank: a row made before it was measured). Latency: the plain diffusers call (text encoding, sampling, "
            "decoding), median of 3 after a warm-up, at batch sizes 1 and 16; speedup over the "
            "teacher at 50 steps with CFG, beside the NFE ratio.\n")


if __name__ == "__main__":
    main()
