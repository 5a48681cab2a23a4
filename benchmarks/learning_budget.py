"""Does a method learn on the embedded SD teacher within a test's budget?

The learning tests on a diffusers teacher (tests/test_consistency.py) train a rank-4 LoRA for a
few hundred steps at batch 2 and ask the student's few-step latents to close half of their
energy distance to a reference. This script runs one such budget for any method and reports the
energy distance before and after, to the VAE-encoded world images (the data: what consistency
training, ECT, moves toward) and to the teacher's own 50-step CFG-3 latents (what distillation
moves toward), on 128 world prompts and fixed seeds, and how far the samples moved at all
(``moved``: the energy distance between the samples before and after). ``teacher_cfg1`` is the
teacher's own unguided 50-step latents (what an unguided student of this teacher, e.g. ECT's,
can reach at best; its distance to the data is ``teacher_50_step_cfg1_to_data``). Several step
counts are scored from one run (the first is the recipe's student.num_steps); each adds a row
to the JSON.

    python benchmarks/learning_budget.py --method '{"name": "ect", "stage_every": 75}' \\
        --steps 300 --lr 3e-4 --num-steps 1 2 --batch 4

Energy distance between flattened latents (world.toy2d.energy_distance); 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from harness import HERE, provenance, write_json


def main(argv=None):
    import torch
    from conftest import tiny_recipe

    from diffusion_distill.build import setup_run
    from diffusion_distill.recipe import load_recipe
    from diffusion_distill.student import generate
    from diffusion_distill.train import train
    from diffusion_distill.world.data import ShapesWorld
    from diffusion_distill.world.toy2d import energy_distance

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, help="the recipe's method section, as JSON")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-steps", type=int, nargs="+", default=[1],
                   help="the student's sampling step counts to score (the first one trains)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--teacher", default="embedded:sd")
    p.add_argument("--ema-decay", type=float, default=0.99,
                   help="train.ema_decay (the samples are the EMA's)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "learning_budget.json"))
    a = p.parse_args(argv)
    method = json.loads(a.method)

    with tempfile.TemporaryDirectory() as tmp:
        recipe = tiny_recipe(a.teacher, os.path.join(tmp, "run"), method=method,
                             steps=a.steps, lr=a.lr, checkpoint_every=a.steps,
                             batch_size=a.batch, ema_decay=a.ema_decay)
        recipe["data"] = {"source": "world", "resolution": 32}
        recipe["student"]["num_steps"] = a.num_steps[0]
        recipe["output"]["export"] = False
        teacher, objective, initial = setup_run(load_recipe(recipe), "cpu")
        images, captions, _ = ShapesWorld(resolution=32).batch(128, seed=12345)
        prompts = list(captions)
        with torch.no_grad():
            data = torch.cat([teacher.encode_images(images[i:i + 32])
                              for i in range(0, 128, 32)]).flatten(1)
            noise = torch.randn(128, *teacher.latent_shape,
                                generator=torch.Generator().manual_seed(7))
            reference, unguided = (
                torch.cat([teacher.sample(prompts[i:i + 32], guidance=g, noise=noise[i:i + 32])
                           for i in range(0, 128, 32)]).flatten(1) for g in (3.0, 1.0))

        def samples(nets, n):
            return generate(nets, prompts, objective.sampler(n),
                            torch.Generator().manual_seed(3)).flatten(1)

        def distances(x):
            return {"data": float(energy_distance(x, data)),
                    "teacher": float(energy_distance(x, reference)),
                    "teacher_cfg1": float(energy_distance(x, unguided))}

        first = {n: samples(initial, n) for n in a.num_steps}
        t0 = time.perf_counter()
        _, nets = train(load_recipe(recipe), progress=False, return_nets=True)
        seconds = time.perf_counter() - t0
        last = {n: samples(nets, n) for n in a.num_steps}
    new = []
    for n in a.num_steps:
        before, after = distances(first[n]), distances(last[n])
        new.append({"method": method, "steps": a.steps, "lr": a.lr, "num_steps": n,
                    "batch": a.batch, "ema_decay": a.ema_decay, "teacher": a.teacher,
                    "before": before, "after": after,
                    "ratio": {k: after[k] / before[k] for k in after},
                    "moved": float(energy_distance(first[n], last[n])),
                    "train_seconds": round(seconds),
                    "teacher_50_step_to_data": float(energy_distance(reference, data)),
                    "teacher_50_step_cfg1_to_data": float(energy_distance(unguided, data)),
                    **provenance("learning_budget.py", argv)})
        print(json.dumps({k: new[-1][k] for k in ("method", "num_steps", "before", "after",
                                                  "ratio", "moved")}))
    rows = []
    if os.path.isfile(a.out):
        with open(a.out) as f:
            rows = json.load(f).get("rows", [])
    write_json(a.out, {"what": __doc__.splitlines()[0], "rows": rows + new})
    return 0


if __name__ == "__main__":
    sys.exit(main())
