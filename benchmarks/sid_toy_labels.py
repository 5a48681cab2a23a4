"""Few-step SiD with labels on a conditional 2-D toy (issue 28): where the first non-finite
value appears, if any.

The teacher is exact and class-conditional: label k in 0..7 is the ring's k-th Gaussian
(its closed-form posterior mean), the empty prompt (label 8) the whole mixture, so CFG is
defined. Student and critic: the toy MLP with a label embedding. Through the public
``train()`` (SiD is data-free: the prompts are the labels), logged every 10 steps; the row
records the largest critic loss, the SiD term's range, the score gap, non-finite counts and
the step a run stopped at, and (for a run that finished) the mean over labels of the energy
distance of 125 student samples to that label's Gaussian (``energy``), in
``results/sid_toy_labels.json`` under its label.

    python benchmarks/sid_toy_labels.py --schedule flow --guidance 2 --num-steps 4 --seed 0
    python benchmarks/sid_toy_labels.py --method '{"alpha": 1.2}' --train '{"betas": [0, 0.999]}'
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile

import torch
from harness import HERE, write_row
from torch import nn


class LabelMLP(nn.Module):
    """The toy MLP (x_t + MLP, time features to 100) with a 9-way label embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 16)
        self.net = nn.Sequential(nn.Linear(34, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                 nn.Linear(128, 2))
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100), 8)))

    def forward(self, x_t, t, cond=None):
        angles = t[:, None] * self.freqs[None]
        features = [x_t, angles.sin(), angles.cos(), self.emb(cond.long().view(-1))]
        return x_t + self.net(torch.cat(features, 1))


def labelled_teacher(schedule):
    from diffusion_distill.teachers.custom import custom_teacher, make_schedule
    from diffusion_distill.world.toy2d import GaussianMixtureDenoiser, ring_means

    means, sched = ring_means(8), make_schedule(schedule)
    whole = GaussianMixtureDenoiser(means, 0.02, sched)
    modes = [GaussianMixtureDenoiser(means[k:k + 1], 0.02, sched) for k in range(8)]

    def fn(x_t, t, cond):
        label, out = cond.long().view(-1), whole(x_t, t)
        for k, mode in enumerate(modes):
            out = torch.where((label == k)[:, None], mode(x_t, t), out)
        return out

    return custom_teacher(fn, shape=(2,), schedule=schedule, prediction_type="sample",
                          encode=lambda prompts: torch.tensor([int(p) if p else 8
                                                               for p in prompts]), uncond="")


def label_energy(nets, recipe, teacher) -> float:
    """Mean over the 8 labels of the energy distance of 125 student samples to 125 of that
    label's Gaussian (a student that ignored its label would be far from each)."""
    from diffusion_distill.build import setup_run
    from diffusion_distill.recipe import load_recipe
    from diffusion_distill.student import generate
    from diffusion_distill.world.toy2d import energy_distance, ring_means

    objective = setup_run(load_recipe(recipe), "cpu", teacher,
                          {"student": LabelMLP(), "critic": LabelMLP()})[1]
    prompts = [str(k) for k in range(8) for _ in range(125)]
    x = generate(nets, prompts, objective.sampler(), torch.Generator().manual_seed(2), ema=False)
    g = torch.Generator().manual_seed(1)
    data = ring_means(8).repeat_interleave(125, 0) + 0.02 ** 0.5 * torch.randn(1000, 2,
                                                                               generator=g)
    return sum(float(energy_distance(x[k * 125:(k + 1) * 125].float(),
                                     data[k * 125:(k + 1) * 125])) for k in range(8)) / 8


def main():
    from diffusion_distill.step import NonFiniteLossError
    from diffusion_distill.train import train

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", default="flow", choices=("flow", "vp"))
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--num-steps", type=int, default=4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="{}", help="SiD options (JSON)")
    p.add_argument("--train", default="{}", help="train options (JSON), e.g. Adam's betas")
    p.add_argument("--out", default=os.path.join(HERE, "results", "sid_toy_labels.json"))
    args = p.parse_args()
    torch.manual_seed(args.seed)
    teacher = labelled_teacher(args.schedule)
    with tempfile.TemporaryDirectory() as out:
        recipe = {"name": "toy", "teacher": {"path": None, "guidance": args.guidance},
                  "student": {"num_steps": args.num_steps},
                  "method": {"name": "sid", **json.loads(args.method)},
                  "data": {"source": "prompts", "prompts": [str(k) for k in range(8)]},
                  "train": {"steps": args.steps, "batch_size": 256, "lr": 1e-3,
                            "ema_decay": None, "device": "cpu", "checkpoint_every": args.steps,
                            "log_every": 10, "seed": args.seed, **json.loads(args.train)},
                  "output": {"dir": out, "export": False}}
        stopped, energy = None, None
        try:
            _, nets = train(recipe, progress=False, teacher=teacher, return_nets=True,
                            networks={"student": LabelMLP(), "critic": LabelMLP()})
            energy = label_energy(nets, recipe, teacher)
        except NonFiniteLossError as e:  # the stop is the measurement
            stopped = f"{type(e).__name__}: {str(e)[:200]}"
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]

    def values(key):
        return [r[key] for r in rows if key in r]

    row = {"stopped": stopped, "last_step": rows[-1]["step"], "energy": energy,
           "max_critic_loss": max(values("loss/critic")),
           "sid_min": min(values("sid")), "sid_max": max(values("sid")),
           "max_score_gap": max(values("score_gap")),
           "nonfinite": sum(values("nonfinite")) + sum(values("nonfinite_critic"))}
    label = (f"{args.schedule} cfg {args.guidance:g} {args.num_steps} steps seed {args.seed} "
             f"{args.method}" + (f" train {args.train}" if args.train != "{}" else ""))
    write_row(args.out, label, row)
    print(label, json.dumps(row))


if __name__ == "__main__":
    main()
