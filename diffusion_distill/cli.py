"""``ddistill``: train | export | sample | eval | bench | demo.

Each subcommand lives with the code it drives; a module exposes ``add_parser(subparsers)``
which registers its subcommand and sets ``func``. This file only assembles them, checks the
common flags before any work, and turns errors into one line (``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import traceback

# (module, attribute) of each subcommand's add_parser, in the order --help lists them.
SUBCOMMANDS = [
    ("diffusion_distill.train_cli", "add_parser"),
    ("diffusion_distill.export", "add_parser"),
    ("diffusion_distill.sample", "add_parser"),
    ("diffusion_distill.eval.cli", "add_parser"),
    ("diffusion_distill.bench", "add_parser"),
    ("diffusion_distill.eval.inception", "add_parser"),
    ("diffusion_distill.demo", "add_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddistill", description=__doc__.splitlines()[0],
                                     epilog="--debug (anywhere): show the traceback of an error")
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


# What each command's --out (and --grid) names: a folder or a file. Checked before any work.
OUT_KINDS = {"export": "folder", "bench": "folder", "demo": "folder", "eval": "file",
             "sample": "file", "stats": "file"}
# An existing file is overwritten only when it is of the kind the command writes.
FILE_KINDS = {"eval": ".json", "sample": ".png", "stats": ".npz", "grid": ".png"}
# Numeric flags: (attribute, test, allowed); None (not given) is always fine.
FLAG_RULES = [
    ("steps", lambda v: v >= 1, "an integer >= 1"),
    ("num", lambda v: v >= 1, "an integer >= 1"),
    ("batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("feature_size", lambda v: v >= 1, "an integer >= 1"),
    ("seed", lambda v: v >= 0, "an integer >= 0"),
    ("guidance", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
]


class UserError(ValueError):
    """A mistake in what was asked (a flag, a path), shown as one line without a traceback."""


def _user_errors():
    from .parallel import ProcessLostError
    from .step import NonFiniteLossError

    # Errors meant for people: the message says what was given, why not and what to do.
    return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            FileExistsError, PermissionError, NonFiniteLossError, ProcessLostError)


def check_flags(args):
    """The same checks as recipe values, for the flags, before any work starts."""
    for name, test, allowed in FLAG_RULES:
        value = getattr(args, name, None)
        if value is None:
            continue
        if not test(value):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} is {value!r}, but must be {allowed}")
    kind = OUT_KINDS.get(args.command)
    for name in ("out", "grid"):
        path = getattr(args, name, None)
        if not path or not isinstance(path, str):
            continue
        flag = f"--{name}"
        want = "file" if name == "grid" else kind
        if want == "folder" and os.path.lexists(path) and not os.path.isdir(path):
            raise UserError(f"{flag} {path!r} is a file, but `ddistill {args.command}` writes a "
                            "folder there; give a folder path (a new one)")
        if want == "file" and os.path.isdir(path):
            raise UserError(f"{flag} {path!r} is a folder, but `ddistill {args.command}` writes "
                            f"a file there; give a file path, e.g. {os.path.join(path, 'out')}"
                            f"{'.png' if name == 'grid' or args.command == 'sample' else ''}")
        ext = FILE_KINDS.get("grid" if name == "grid" else args.command)
        if (want == "file" and ext and os.path.isfile(path)
                and not path.lower().endswith(ext)):
            raise UserError(f"{flag} {path!r} already exists and is not a {ext} file, so "
                            f"`ddistill {args.command}` will not overwrite it; choose a new "
                            f"file name ending in {ext}, or remove that file yourself")
        if want == "file" and path.endswith(os.sep):
            raise UserError(f"{flag} {path!r} ends with a slash, but `ddistill {args.command}` "
                            "writes a file there; give a file name")
        if want == "file" and (name == "grid" or args.command == "sample"):
            from .imaging import image_format

            image_format(path, flag)
        from .checkpoint import check_writable

        check_writable(path, flag)  # a loop of links, a read-only place: before any work


def main(argv: list[str] | None = None) -> int:
    """Run the CLI. User errors: one line on stderr, exit code 2 (``--debug``: the
    traceback). Anything else is a bug in the toolkit: exit code 1, with how to report it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DDISTILL_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) \
            and not any(x.startswith("-") for x in extra):
        # ``train RECIPE --no-progress key=value``: argparse ends a positional list at the
        # first flag; overrides after a flag belong to it all the same
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        check_flags(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"ddistill {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if debug:
            traceback.print_exc()
        print(f"ddistill {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  a bug: say so, and how to get the details
        from .checkpoint import ENVIRONMENT_ERRNOS

        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            # the machine's fault (a full disk, a read-only filesystem), not the toolkit's
            if debug:
                traceback.print_exc()
            print(f"ddistill {args.command}: error: {_one_line(e)}; free space or choose a "
                  "writable place, then rerun", file=sys.stderr)
            return 2
        if debug:
            traceback.print_exc()
        print(f"ddistill {args.command}: internal error (a bug in ddistill, not in your "
              f"input): {type(e).__name__}: {_one_line(e)}. "
              + ("Please report it with the traceback above." if debug else
                 "Rerun with --debug for the traceback, and please report it."),
              file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    text = " ".join(str(msg).split())
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text += f": {e.filename}"
    return text


if __name__ == "__main__":
    sys.exit(main())
