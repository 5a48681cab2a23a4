"""Every method on the exact 2-D toy, through the public ``train(..., data=...)``.

Issue 28's protocol: the ring of 8 Gaussians (closed-form posterior mean, a custom teacher,
unconditional), the user's own 20,000 samples as ``data=``, the toy's plain MLP for every
role, batch 256, lr 1e-3, 2,000 steps, two seeds, flow and VP schedules. Each method runs at
its defaults, except what an unconditional teacher needs (no guidance: LCM/TCD/PCM's
``w_min = w_max = 0``, SiD's ``guidance: none``), plus the settings the docs name for the
toy (``--configs toy``: ECT's sigma_data 1.4 / uniform / momentum; sCM on a network with a
low time frequency). Reported per run: the energy distance of 1,000 student samples to 1,000
held-out data samples beside the 50-step teacher's own, the worst mode's share (the
smallest fraction of samples nearest one mode, times 8: 1 is an even split, 0 a lost mode),
and whether training stayed finite.

    python benchmarks/toy_every_method.py                      # results/toy_every_method.json
    python benchmarks/toy_every_method.py --methods sid sida --schedules flow --seeds 0
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import torch
from harness import HERE, provenance, write_json

UNCONDITIONAL = {"w_min": 0.0, "w_max": 0.0}
# each method at its defaults, as far as an unconditional teacher allows
DEFAULTS = {
    "dmd": {"name": "dmd"},
    "dmd2": {"name": "dmd2"},
    "decoupled_dmd": {"name": "decoupled_dmd"},
    "phased_dmd": {"name": "phased_dmd"},
    "lcm": {"name": "lcm", **UNCONDITIONAL},
    "tcd": {"name": "tcd", "gamma": 0.0, **UNCONDITIONAL},  # a flow teacher: 0 or 1
    "pcm": {"name": "pcm", **UNCONDITIONAL},
    "ect": {"name": "ect"},
    "scm": {"name": "scm"},
    "sid": {"name": "sid", "guidance": "none"},
    "sida": {"name": "sida", "guidance": "none", "gan_feature_module": "net.3"},  # MLP's
}
# the settings docs/consistency.md gives for a network like the toy's MLP
TOY = {
    "ect": {"name": "ect", "sigma_data": 1.4, "weighting": "uniform", "target": "momentum",
            "stage_every": 1000},
    "lcm": {"name": "lcm", "target": "momentum", **UNCONDITIONAL},
    "pcm": {"name": "pcm", "target": "momentum", **UNCONDITIONAL},
    # sCM on the network its paper asks for (the TrigFlow boundary condition and low time
    # frequencies: tests/consistency_helpers.EDMMLP), as tests/test_user_data.py trains it
    "scm": {"name": "scm", "sigma_data": 1.4, "network": "edm"},
}
STUDENT_STEPS = {"phased_dmd": 2, "pcm": 4, "tcd": 4}  # step counts of their recipes' kind


def run(config: dict, schedule: str, seed: int, steps: int, batch: int, lr: float) -> dict:
    from diffusion_distill.objectives import build_objective
    from diffusion_distill.student import generate
    from diffusion_distill.train import train
    from diffusion_distill.world.toy2d import MLPDenoiser, energy_distance, mode_shares, toy_teacher

    method = dict(config)
    network = method.pop("network", "mlp")
    num_steps = STUDENT_STEPS.get(method["name"], 1)
    teacher = toy_teacher(k=8, var=0.02, schedule=schedule)
    mixture = teacher.denoiser.backbone.fn
    x0 = mixture.sample(20000, torch.Generator().manual_seed(0))
    held_out = mixture.sample(1000, torch.Generator().manual_seed(1))
    objective = build_objective(method, student_steps=num_steps, total_steps=steps)
    torch.manual_seed(seed)
    if network == "edm":
        from consistency_helpers import EDMMLP

        networks = {role: EDMMLP(teacher.schedule, sigma_data=1.4, max_frequency=3.0)
                    for role in objective.roles}
    else:
        networks = {role: MLPDenoiser() for role in objective.roles}

    def score(x):
        finite = bool(torch.isfinite(x).all())
        if not finite:
            return math.nan, 0.0, False
        return energy_distance(x, held_out), float(mode_shares(x).min()), True

    reference = teacher.sample([""] * 1000, steps=50, generator=torch.Generator().manual_seed(2))
    teacher_ed = score(reference)[0]
    t0 = time.perf_counter()
    error = None
    with tempfile.TemporaryDirectory() as out:
        recipe = {"name": "toy", "teacher": {"path": None, "guidance": 1.0},
                  "student": {"num_steps": num_steps}, "method": method,
                  "data": {"source": "prompts", "prompts": [""]},
                  "train": {"steps": steps, "batch_size": batch, "lr": lr, "ema_decay": None,
                            "device": "cpu", "seed": seed, "checkpoint_every": steps,
                            "log_every": steps},
                  "output": {"dir": out, "export": False}}
        try:
            _, nets = train(recipe, progress=False, teacher=teacher, networks=networks,
                            data=x0, return_nets=True)
        except Exception as e:  # noqa: BLE001  (a run that stops is a result, with its reason)
            nets, error = None, f"{type(e).__name__}: {str(e)[:300]}"
    row = {"method": method, "schedule": schedule, "seed": seed, "student_steps": num_steps,
           "train_steps": steps, "teacher_energy": round(teacher_ed, 4),
           "seconds": round(time.perf_counter() - t0, 1)}
    row["network"] = network
    if nets is None:
        return {**row, "error": error, "finite": False}
    x = generate(nets, [""] * 1000, objective.sampler(num_steps),
                 torch.Generator().manual_seed(2), ema=False)
    ed, worst, finite = score(x)
    return {**row, "energy": None if math.isnan(ed) else round(ed, 4),
            "ratio_to_teacher": None if math.isnan(ed) else round(ed / teacher_ed, 1),
            "worst_mode_share": round(worst, 2), "finite": finite}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(DEFAULTS), choices=list(DEFAULTS))
    p.add_argument("--configs", nargs="+", default=["defaults", "toy"],
                   choices=["defaults", "toy"])
    p.add_argument("--schedules", nargs="+", default=["flow", "vp"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default=os.path.join(HERE, "results", "toy_every_method.json"))
    args = p.parse_args(argv)
    # rows accumulate across invocations (e.g. one per seed), each keyed by what it ran
    info = {"rows": []}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            info = json.load(f)
    run_info = provenance("toy_every_method.py", argv)
    for name in args.methods:
        for kind in args.configs:
            config = (DEFAULTS if kind == "defaults" else TOY).get(name)
            if config is None:
                continue
            for schedule in args.schedules:
                for seed in args.seeds:
                    row = {"config": kind, **run(config, schedule, seed, args.steps,
                                                   args.batch, args.lr), "run": run_info}
                    print({k: v for k, v in row.items() if k not in ("method", "run")}, name,
                          flush=True)
                    info["rows"] = [r for r in info["rows"] if _key(r) != _key(row)] + [row]
                    write_json(args.out, info)  # as it goes: a stopped run keeps its rows


def _key(row):
    return (row["config"], row["method"]["name"], row["schedule"], row["seed"],
            row["train_steps"])


if __name__ == "__main__":
    main()
