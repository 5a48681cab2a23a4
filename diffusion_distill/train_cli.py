"""``ddistill train``: the command line of :func:`diffusion_distill.train.train`."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("train", help="train (or resume) a recipe")
    p.add_argument("recipe", help="a YAML file in recipes/")
    p.add_argument("overrides", nargs="*", help="key.path=value, e.g. train.steps=200")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--new-run", action="store_true",
                   help="start over in an output.dir that holds another run (its checkpoints "
                        "and recipe.yaml are moved aside, never deleted)")
    p.add_argument("--teacher-changed", action="store_true",
                   help="resume although the teacher's weights differ from those the run's "
                        "checkpoints were trained on")
    p.set_defaults(func=_run)


def _run(args):
    from .train import train

    print(train(args.recipe, args.overrides, progress=not args.no_progress,
                new_run=args.new_run, teacher_changed=args.teacher_changed))
