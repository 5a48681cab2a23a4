"""``ddistill sample PATH``: images from a teacher or a student export, as a PNG grid."""
from __future__ import annotations

import os

import torch


def sample(path: str, prompts: list[str], seed: int = 0, steps: int | None = None,
           guidance: float | None = None, teacher: str | None = None) -> torch.Tensor:
    """Images in [-1, 1] through plain diffusers, one seed per prompt (seed, seed+1, ...)."""
    from .eval.protocol import load_model, make_sample_fn

    model = load_model(path, teacher)
    defaults = model.defaults
    fn = make_sample_fn(model.call, steps if steps is not None else defaults["steps"],
                        guidance if guidance is not None else defaults["guidance"])
    return fn(prompts, [seed + i for i in range(len(prompts))])


def add_parser(sub):
    p = sub.add_parser("sample", help="sample a teacher or a student export to a PNG grid")
    p.add_argument("path", help="pipeline folder, embedded:sd / embedded:sd3, or an export")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--teacher", default=None, help="the teacher of an export, if moved")
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=_cli)


def _cli(args):
    from .world.data import save_grid

    images = sample(args.path, args.prompt, args.seed, args.steps, args.guidance, args.teacher)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_grid(images, args.out, nrow=min(8, len(images)))
    print(args.out)
