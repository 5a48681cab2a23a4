"""SiD's guidance strategies side by side: prompt alignment against recall (diversity).

SiD-LSG claims that where the guidance sits (the teacher, the critic's own training, the critic
inside the generator loss) trades prompt following against diversity. For one embedded teacher
this trains ``recipes/sid_<teacher>.yaml`` once per strategy (``method.guidance``: lsg,
zero_cfg, anti_cfg, teacher_cfg, none) with the same budget and seed, then scores the teacher
(50 steps, CFG 5) and every student with ``ddistill bench`` under one protocol. The bench's
``alignment_vs_recall.png`` is the trade-off plot; ``benchmarks/results/sid_guidance.json``
the rows.

    python benchmarks/sid_guidance.py --teacher sd --steps 300 --num 250

Distances are in EfficientNet-Lite0 ImageNet feature space (128 px): NOT Inception FIDs.
"""
from __future__ import annotations

import argparse
import os

from harness import ROOT, provenance, write_json

STRATEGIES = ("lsg", "zero_cfg", "anti_cfg", "teacher_cfg", "none")


def main(argv=None):
    from diffusion_distill.bench import run_bench
    from diffusion_distill.objectives.sid import GUIDANCE_PRESETS
    from diffusion_distill.recipe import load_recipe
    from diffusion_distill.train import train

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="sd", choices=["sd", "sd3"])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                   choices=list(GUIDANCE_PRESETS))
    p.add_argument("--steps", type=int, default=300, help="training steps per strategy")
    p.add_argument("--num", type=int, default=250, help="samples per cell")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "sid_guidance"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)

    exports = []
    for strategy in args.strategies:
        run_dir = os.path.join(args.runs, args.teacher, strategy)
        recipe = load_recipe(os.path.join(ROOT, "recipes", f"sid_{args.teacher}.yaml"),
                             [f"method.guidance={strategy}", f"train.steps={args.steps}",
                              f"output.dir={run_dir}"])
        train(recipe)  # a finished run is reused, an interrupted one resumes
        exports.append({"name": f"sid_{strategy}", "path": os.path.join(run_dir, "export")})
    out = os.path.join(args.out, "sid_guidance", args.teacher)
    spec = {"name": f"sid_guidance_{args.teacher}", "teacher": f"embedded:{args.teacher}",
            "teacher_steps": [50], "teacher_guidance": 5.0, "exports": exports,
            "prompts": "single", "num_samples": args.num, "latency": False, "out": out}
    summary = run_bench(spec, out)
    rows = [{k: r.get(k) for k in ("model", "steps", "nfe", "fd", "fd_teacher", "precision",
                                    "recall", "alignment", "feature_space", "complete")}
            for r in summary["cells"]]
    write_json(os.path.join(args.out, f"sid_guidance_{args.teacher}.json"), {
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        **provenance("sid_guidance.py", argv),
        "plot": os.path.relpath(os.path.join(out, "alignment_vs_recall.png"), ROOT),
        "rows": rows})
    for r in rows:
        align = (r["alignment"] or {}).get("whole_prompt")
        print(f"{r['model']:>16}  FD {r['fd'] or float('nan'):7.1f}  FD-T "
              f"{r['fd_teacher'] or float('nan'):7.1f}  recall {r['recall'] or float('nan'):.2f}"
              f"  alignment {align if align is not None else float('nan'):.3f}")


if __name__ == "__main__":
    main()
