"""Few-step SiD with labels on a conditional 2-D toy (issue 28): where the first non-finite
value appears, if any.

The teacher is exact and class-conditional: label k in 0..7 is the ring's k-th Gaussian
(its closed-form posterior mean), the empty prompt (label 8) the whole mixture, so CFG is
defined. Student and critic: the toy MLP with a label embedding. Through the public
``train()`` (SiD is data-free: the prompts are the labels), logged every 10 steps; the row
records the largest critic loss, the SiD term's range, the score gap, non-finite counts and
the step a run stopped at and the first logged step with a non-finite value, and (for a run
that finished) the student's quality with each of its first k steps (``by_steps``; ``energy``,
``accuracy``, ``radius`` at its own K; see :func:`label_quality`) next to the teacher's own
50-step samples at the run's CFG scale (``teacher``), in ``results/sid_toy_labels.json``
under its label. ``--method '{"name": "dmd2"}'`` runs another distribution-matching method on
the same toy (the control for what is SiD's own).

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


def label_quality(x: torch.Tensor) -> dict:
    """For 8 x 125 samples, label k's in rows k*125..: ``energy``, the mean over the labels of
    the energy distance to 125 of that label's Gaussian; ``accuracy``, the share nearest their
    own label's mode (a label-blind sampler: 0.125); ``radius``, their mean distance from the
    ring's centre (the modes sit at 2). Energy alone cannot tell a sampler that ignores its
    label from one that follows it but lands off the ring (issue 28: VP at CFG 2)."""
    from diffusion_distill.world.toy2d import energy_distance, ring_means

    x = x.float()
    g = torch.Generator().manual_seed(1)
    data = ring_means(8).repeat_interleave(125, 0) + 0.02 ** 0.5 * torch.randn(1000, 2,
                                                                               generator=g)
    label = torch.arange(8).repeat_interleave(125)
    energy = sum(float(energy_distance(x[k * 125:(k + 1) * 125], data[k * 125:(k + 1) * 125]))
                 for k in range(8)) / 8
    accuracy = float((torch.cdist(x, ring_means(8)).argmin(1) == label).float().mean())
    return {"energy": energy, "accuracy": accuracy, "radius": float(x.norm(dim=1).mean())}


PROMPTS = [str(k) for k in range(8) for _ in range(125)]


def run_objective(recipe, teacher):
    """The run's objective, set up on fresh networks (its sampler, its resolved options)."""
    from diffusion_distill.build import setup_run
    from diffusion_distill.recipe import load_recipe

    return setup_run(load_recipe(recipe), "cpu", teacher,
                     {"student": LabelMLP(), "critic": LabelMLP()})[1]


def student_quality(nets, objective) -> dict:
    """:func:`label_quality` of the student's samples with each step count it serves (SiD:
    its first k steps, k = 1..K)."""
    from diffusion_distill.student import generate

    return {k: label_quality(generate(nets, PROMPTS, objective.sampler(k),
                                      torch.Generator().manual_seed(2), ema=False))
            for k in objective.servable_steps()}


def teacher_quality(teacher, guidance: float) -> dict:
    """The reference: the teacher's own 50-step DDIM samples at the run's CFG scale (CFG 2
    sharpens each label and pushes it outward: flow 0.044 / radius 2.15, VP 0.040 / 2.12)."""
    return label_quality(teacher.sample(PROMPTS, steps=50, guidance=guidance,
                                        generator=torch.Generator().manual_seed(2)))


def main():
    from diffusion_distill.step import NonFiniteLossError
    from diffusion_distill.train import train

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", default="flow", choices=("flow", "vp"))
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--num-steps", type=int, default=4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="{}", help="method options (JSON; \"name\" picks another method)")
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
        stopped, quality = None, {}
        try:
            _, nets = train(recipe, progress=False, teacher=teacher, return_nets=True,
                            networks={"student": LabelMLP(), "critic": LabelMLP()})
            quality = student_quality(nets, run_objective(recipe, teacher))
        except NonFiniteLossError as e:  # the stop is the measurement
            stopped = f"{type(e).__name__}: {str(e)[:200]}"
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]

    def values(key, pick=max):  # None: a method that does not log it
        found = [r[key] for r in rows if key in r]
        return pick(found) if found else None

    own = quality.get(args.num_steps, {})
    row = {"stopped": stopped, "last_step": rows[-1]["step"], "energy": own.get("energy"),
           "accuracy": own.get("accuracy"), "radius": own.get("radius"),
           "by_steps": {str(k): {key: round(v, 4) for key, v in q.items()}
                        for k, q in quality.items()},
           "teacher": {key: round(v, 4) for key, v in
                       teacher_quality(teacher, args.guidance).items()},
           "max_critic_loss": values("loss/critic"),
           "sid_min": values("sid", min), "sid_max": values("sid"),
           "max_score_gap": values("score_gap"),
           "nonfinite": (values("nonfinite", sum) or 0) + (values("nonfinite_critic", sum) or 0),
           "first_nonfinite_step": next((r["step"] for r in rows if r.get("nonfinite")
                                         or r.get("nonfinite_critic") or not all(
                                             math.isfinite(v) for v in r.values()
                                             if isinstance(v, float))), None)}
    # SiD's re-noising range as resolved on the schedule (rows before it was resolved from
    # SiD-LSG's noise levels, issue 28, ran 0.02..0.98 on every schedule and have no "t")
    t_range = getattr(run_objective(recipe, teacher), "t_range", None)
    label = (f"{args.schedule} cfg {args.guidance:g} {args.num_steps} steps seed {args.seed} "
             f"{args.method}" + (f" train {args.train}" if args.train != "{}" else "")
             + (" t {:.3f}..{:.3f}".format(*t_range) if t_range else ""))
    write_row(args.out, label, row)
    print(label, json.dumps(row))


if __name__ == "__main__":
    main()
