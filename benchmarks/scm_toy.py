"""sCM on the exact 2-D toy (issue 28): one controlled run per hypothesis.

``tangent``: on one loss batch, the JVP tangent against the central finite difference of the
same directional derivative and against an independent finite difference along the exact
teacher's PF-ODE written in TrigFlow coordinates (``x_trig = x_u cos s / alpha_u``, s -> u
by bisection). ``train``: sCM from random init through the public ``train(data=)`` on the
toy's samples, the student the plain ``x_t + MLP`` or the TrigFlow/EDM-preconditioned one,
with the MLP's highest time frequency; energy distance and worst mode share at 1 and 2 steps,
and ``|f(x_u, u) - ODE endpoint|`` along exact teacher trajectories. Rows are added to
``results/scm_toy.json`` under their label (docs/consistency.md, the sCM diagnosis).

    python benchmarks/scm_toy.py tangent
    python benchmarks/scm_toy.py train --network edm --max-frequency 3 --schedule vp
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from harness import HERE, write_row


def tangent_check(schedule):
    from diffusion_distill.build import setup_run
    from diffusion_distill.objectives.common import bcast, time_of_edm_sigma
    from diffusion_distill.recipe import load_recipe
    from diffusion_distill.step import Randomness, StepContext
    from diffusion_distill.world.toy2d import MLPDenoiser, toy_teacher

    torch.manual_seed(0)
    teacher = toy_teacher(schedule=schedule)
    recipe = load_recipe(_recipe({"name": "scm", "sigma_data": 1.4}, "/nonexistent", 1, 1e-3))
    net = MLPDenoiser().double()
    with torch.no_grad():  # a student that is not the identity
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    _, obj, nets = setup_run(recipe, "cpu", teacher, {"student": net})
    n, sd = 256, obj.sigma_data
    ctx = StepContext(0, 0, Randomness(0, 0, 0), 1, 1)
    x0 = teacher.denoiser.backbone.fn.sample(n, torch.Generator().manual_seed(0)).double()
    u = obj.sample_time(nets.schedule, n, ctx, "cpu")[0].double()
    cond = teacher.prompts([""] * n)
    (alpha, sigma, s), (d_alpha, d_sigma, d_s) = obj.trig(nets.schedule, u)
    x_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * torch.randn(n, 2, dtype=torch.float64)
    with torch.no_grad():
        x0_T = nets.teacher(x_t, u, cond).double()
        v = bcast(d_alpha, x0) * x0_T + bcast(d_sigma, x0) * (x_t - bcast(alpha, x0) * x0_T) \
            / bcast(sigma, x0)
        df_ds = {}
        for kind in ("jvp", "finite_difference"):
            obj.tangent = kind
            df_ds[kind] = obj.tangent_du(nets, x_t, u, v, cond, 7).double() / bcast(d_s, x0)

        def f_trig(x_trig, s_):  # the student at a TrigFlow point, mapped to the toolkit's u
            uu = time_of_edm_sigma(nets.schedule, sd * s_.tan(), iters=60)
            a, _ = nets.schedule.alpha_sigma(uu)
            return nets.student(x_trig * bcast(a / s_.cos(), x_trig), uu, cond).double()

        x_trig = x_t * bcast(s.cos() / alpha, x0)
        cos, sin = bcast(s.cos(), x0), bcast(s.sin(), x0)
        dx_ds = -sin * x0_T + cos * (x_trig - cos * x0_T) / sin  # the teacher's PF-ODE
        h = 1e-5
        trig_fd = (f_trig(x_trig + h * dx_ds, s + h) - f_trig(x_trig - h * dx_ds, s - h)) / (2 * h)
    keep = u > 1e-3  # VP draws below the schedule's floor sit at u = 0: no step down there

    def rel(a, b):
        return float((a[keep] - b[keep]).norm() / b[keep].norm())

    worst = ((df_ds["jvp"] - trig_fd).norm(dim=1) / trig_fd.norm(dim=1))[keep].max()
    return {"jvp_vs_fd": rel(df_ds["jvp"], df_ds["finite_difference"]),
            "jvp_vs_trigflow_fd": rel(df_ds["jvp"], trig_fd), "worst_sample": float(worst),
            "at_floor": int((~keep).sum())}


def _recipe(method, out, steps, lr, lr_final=None):
    return {"name": "toy", "teacher": {"path": None, "guidance": 1.0},
            "student": {"num_steps": 1}, "method": method,
            "data": {"source": "prompts", "prompts": [""]},
            "train": {"steps": steps, "batch_size": 256, "lr": lr, "lr_final": lr_final,
                      "ema_decay": None, "device": "cpu", "checkpoint_every": steps,
                      "log_every": steps},
            "output": {"dir": out, "export": False}}


def train_run(args):
    from consistency_helpers import EDMMLP

    from diffusion_distill.objectives import build_objective
    from diffusion_distill.student import generate
    from diffusion_distill.train import train
    from diffusion_distill.world.toy2d import MLPDenoiser, energy_distance, mode_shares, toy_teacher

    method = {"name": "scm", "sigma_data": 1.4, **json.loads(args.method)}
    torch.manual_seed(0)
    teacher = toy_teacher(schedule=args.schedule)
    mixture = teacher.denoiser.backbone.fn
    x0 = mixture.sample(20000, torch.Generator().manual_seed(0))
    data = mixture.sample(1000, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    student = (EDMMLP(teacher.schedule, 1.4, args.max_frequency) if args.network == "edm"
               else MLPDenoiser(max_frequency=args.max_frequency))
    with tempfile.TemporaryDirectory() as out:
        _, nets = train(_recipe(method, out, args.steps, args.lr, args.lr_final),
                        progress=False, teacher=teacher, networks={"student": student},
                        data=x0, return_nets=True)
    objective = build_objective(method, student_times=[1.0])
    row = {}
    for n in (1, 2):
        x = generate(nets, [""] * 1000, objective.sampler(n), torch.Generator().manual_seed(2),
                     ema=False)
        row[f"energy_{n}"] = energy_distance(x, data)
        row[f"worst_share_{n}"] = float(mode_shares(x).min())
    # consistency along exact teacher trajectories (DDIM on the exact x0, 400 steps)
    cond, us = teacher.prompts([""] * 500), torch.linspace(1, 0, 401)
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(3))
    x = x * teacher.schedule.alpha_sigma(us[:1])[1]
    points = []
    with torch.no_grad():
        for i in range(400):
            u = us[i].expand(500)
            x0_T = nets.teacher(x, u, cond)
            alpha, sigma = teacher.schedule.alpha_sigma(u)
            eps = (x - alpha[:, None] * x0_T) / sigma[:, None]
            points.append((float(us[i]), x))
            a2, s2 = teacher.schedule.alpha_sigma(us[i + 1].expand(500))
            x = a2[:, None] * x0_T + s2[:, None] * eps
        row["f_error_by_u"] = {f"{u:.3f}": float((nets.student(p, torch.full((500,), u), cond)
                                                  - x).norm(dim=1).mean())
                               for u, p in points[::80] + [points[-1]]}
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("tangent", "train"))
    p.add_argument("--schedule", default="flow", choices=("flow", "vp"))
    p.add_argument("--network", default="plain", choices=("plain", "edm"))
    p.add_argument("--max-frequency", type=float, default=100.0)
    p.add_argument("--method", default="{}", help="sCM options over sigma_data 1.4 (JSON)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-final", type=float, default=None)
    p.add_argument("--out", default=os.path.join(HERE, "results", "scm_toy.json"))
    args = p.parse_args()
    if args.what == "tangent":
        label, row = f"tangent {args.schedule}", tangent_check(args.schedule)
    else:
        label = (f"{args.network} f<={args.max_frequency:g} {args.schedule} {args.method} "
                 f"lr {args.lr:g}" + (f" -> x{args.lr_final:g}" if args.lr_final else ""))
        row = train_run(args)
    write_row(args.out, label, row)
    print(label, json.dumps(row))


if __name__ == "__main__":
    main()
