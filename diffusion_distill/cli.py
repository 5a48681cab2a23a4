"""``ddistill``: train | export | sample | eval | bench | demo.

Each subcommand lives with the code it drives; a module exposes ``add_parser(subparsers)``
which registers its subcommand and sets ``func``. This file only assembles them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, attribute) of each subcommand's add_parser, in the order --help lists them.
SUBCOMMANDS = [
    ("diffusion_distill.train", "add_parser"),
    ("diffusion_distill.export", "add_parser"),
    ("diffusion_distill.sample", "add_parser"),
    ("diffusion_distill.eval.cli", "add_parser"),
    ("diffusion_distill.bench", "add_parser"),
    ("diffusion_distill.eval.standard", "add_parser"),
    ("diffusion_distill.demo", "add_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddistill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module, attr in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # that subcommand is not written yet
                continue
            raise
        getattr(mod, attr)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        # Errors meant for people: say it plainly, no traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"ddistill {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
