"""``ddistill eval PATH``: score a teacher or a student export on the embedded world's prompts.

PATH is a diffusers pipeline folder (a teacher), ``embedded:sd`` / ``embedded:sd3`` (the
shipped teachers), or a student export folder (one with ``distill_config.json``). The
protocol itself (loading, prompts, seeds, reference, metrics) is ``eval/protocol.py``.
"""
from __future__ import annotations

import os
import sys

import torch

from .evaluate import summary_table
from .features import DEFAULT_SIZE
from .protocol import PROMPT_KINDS, Protocol, evaluate_loaded, load_model, write_json


def add_parser(sub):
    p = sub.add_parser(
        "eval", help="score a teacher or student: FD/KID/precision/recall, alignment, NFE, speed",
        description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("path", help="a diffusers pipeline folder, embedded:sd / embedded:sd3, or a "
                                "student export folder (with distill_config.json)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the export's own, or 50 for a teacher)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (default: the export's own, or the pipeline's default)")
    p.add_argument("--num", type=int, default=1000, help="number of samples (default 1000)")
    p.add_argument("--prompts", choices=PROMPT_KINDS, default="single",
                   help="which of the world's evaluation prompt sets (default single)")
    p.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed+i")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per pipeline call")
    p.add_argument("--feature-size", type=int, default=DEFAULT_SIZE,
                   help=f"side in px the feature network sees (default {DEFAULT_SIZE}); part "
                        "of the feature space name, so only compare equal sizes")
    p.add_argument("--teacher", default=None,
                   help="for an export: the teacher to load it onto, if not the recorded one")
    p.add_argument("--cache-dir", default=None, help="where reference features are cached")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--grid", default=None, help="save a PNG grid of the first 64 samples here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_cli)


def run_eval(path: str, *, steps=None, guidance=None, num=1000, prompts_kind="single", seed=0,
             batch_size=32, feature_size=DEFAULT_SIZE, teacher=None, cache_dir=None,
             progress=True) -> tuple[dict, torch.Tensor | None]:
    """Evaluate one model; returns (JSON-ready result, the first samples for a grid)."""
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if num < 4:  # checked before loading anything (Protocol checks it again for other callers)
        raise ValueError(f"--num {num} is too few samples; the metrics need at least 4 "
                         "(1000 is the default and what reported numbers use)")
    loaded = load_model(path, teacher)  # first: a bad path fails before any rendering
    protocol = Protocol(num, prompts_kind, seed, feature_size, cache_dir)
    return evaluate_loaded(loaded, protocol, steps, guidance, batch_size, progress, name=path)


def run_cli(args) -> int:
    result, images = run_eval(
        args.path, steps=args.steps, guidance=args.guidance, num=args.num,
        prompts_kind=args.prompts, seed=args.seed, batch_size=args.batch_size,
        feature_size=args.feature_size, teacher=args.teacher, cache_dir=args.cache_dir,
        progress=not args.no_progress)
    # The arguments as parsed (defaults included), so the JSON says how to reproduce it.
    result["arguments"] = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    if args.out:
        write_json(args.out, result)
    if args.grid and images is not None:
        from ..world.data import save_grid

        os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
        save_grid(images, args.grid)
    print(summary_table([(args.path, result)]))
    if result.get("alignment_note"):
        print(f"alignment: {result['alignment_note']}")
    if args.out:
        print(f"wrote {args.out}")
    if not result["complete"]:
        n_fail = len(result["failures"])
        print(f"ddistill eval: INCOMPLETE: {n_fail} batch(es) failed, "
              f"{result['num_samples']}/{result['num_requested']} samples scored; the metrics "
              "above cover only those. First failure: "
              f"{result['failures'][0]['error'] if n_fail else result.get('alignment_error')}",
              file=sys.stderr)
        return 1
    return 0
