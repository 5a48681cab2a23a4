"""Mode coverage of few-step students on the exact 2-D toy (8 Gaussians on a ring).

For each (method, steps, schedule, training length, seed): train on the toy's exact teacher
(``world/toy2d.py``), sample 2000 points with the student's own sampler, and report the
energy distance to the data and the *worst mode's share* (the smallest fraction of samples
nearest one mode, times 8: 1.0 is an even split, 0 a lost mode). The question it answers
(issue 15): does multi-step DMD2 with backward simulation collapse onto a few modes, and
what stops it?

    python benchmarks/toy_mode_coverage.py            # writes results/toy_mode_coverage.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch
from harness import HERE, provenance, write_json

from diffusion_distill.objectives import common
from diffusion_distill.objectives.dmd import DMD2


class DMD2BelowStepTime(DMD2):
    """Hypothesis: the DM term and the critic should re-noise a step's output only below the
    time it was generated from (Phased DMD's subinterval idea, without its experts)."""

    def generate(self, nets, cond, ctx, grad):
        x0, t = super().generate(nets, cond, ctx, grad)
        self._hi = min(float(t[0]), self.t_max)
        return x0, t

    def sample_t(self, ctx, n, lo=None, hi=None):
        return common.uniform_t(ctx, n, self.t_min, max(self._hi, self.t_min + 1e-3))


CONFIGS = [  # (label, method, student steps, schedule, training steps)
    ("dmd2 1-step", {"name": "dmd2", "critic_steps": 5}, 1, "flow", 2400),
    ("dmd2 4-step", {"name": "dmd2", "critic_steps": 5}, 4, "flow", 600),
    ("dmd2 4-step", {"name": "dmd2", "critic_steps": 5}, 4, "flow", 2400),
    ("dmd2 4-step vp", {"name": "dmd2", "critic_steps": 5}, 4, "vp", 2400),
    ("dmd2 4-step, 10 critic steps", {"name": "dmd2", "critic_steps": 10}, 4, "flow", 4800),
    ("dmd2 4-step, re-noise below step time",
     {"name": f"{__name__}:DMD2BelowStepTime", "critic_steps": 5}, 4, "flow", 2400),
    ("phased_dmd 4 experts", {"name": "phased_dmd", "critic_steps": 5}, 4, "flow", 2400),
]


def run(method, num_steps, schedule, steps, seed, out):
    from diffusion_distill.build import setup_run
    from diffusion_distill.recipe import load_recipe
    from diffusion_distill.student import generate
    from diffusion_distill.train import train
    from diffusion_distill.world.toy2d import MLPDenoiser, energy_distance, mode_shares, toy_teacher

    torch.manual_seed(seed)
    teacher = toy_teacher(k=8, var=0.02, schedule=schedule)
    recipe = load_recipe({
        "name": "toy", "teacher": {"path": None, "guidance": 1.0},
        "student": {"num_steps": num_steps}, "method": method,
        "data": {"source": "prompts", "prompts": [""]},
        "train": {"steps": steps, "batch_size": 128, "lr": 1e-3, "ema_decay": None,
                  "seed": seed, "checkpoint_every": steps, "log_every": 50, "device": "cpu"},
        "output": {"dir": out}})
    data = teacher.denoiser.backbone.fn.sample(2000, torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    roles = ([f"student_{k}" for k in range(num_steps)] if method["name"] == "phased_dmd"
             else ["student"]) + ["critic"]
    networks = {r: MLPDenoiser() for r in roles}
    _, objective, _ = setup_run(recipe, "cpu", teacher, copy.deepcopy(networks))
    _, nets = train(recipe, progress=False, teacher=teacher, networks=networks, return_nets=True)
    x = generate(nets, [""] * 2000, objective.sampler(), torch.Generator().manual_seed(2),
                 ema=False)
    shares = mode_shares(x)
    return {"energy_distance": round(energy_distance(x, data), 4),
            "worst_mode_share": round(float(shares.min()), 2),
            "mode_shares": [round(float(s), 2) for s in shares]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--json", default=os.path.join(HERE, "results", "toy_mode_coverage.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, method, num_steps, schedule, steps) in enumerate(CONFIGS):
            for seed in args.seeds:
                t0 = time.perf_counter()
                result = run(method, num_steps, schedule, steps, seed,
                             os.path.join(tmp, f"run{i}_{seed}"))
                row = {"config": label, "student_steps": num_steps, "schedule": schedule,
                       "train_steps": steps, "seed": seed, **result,
                       "seconds": round(time.perf_counter() - t0, 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = {"what": __doc__.split("\n\n")[1].replace("\n", " "),
           **provenance("toy_mode_coverage.py", argv), "rows": rows}
    write_json(args.json, out)
    print(f"wrote {os.path.relpath(args.json)}")


if __name__ == "__main__":
    main()
