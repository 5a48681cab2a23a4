"""``ddistill bench SPEC``."""
from __future__ import annotations

import os
import sys

from .run import run_bench
from .spec import load_spec


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmark a teacher and its students on one protocol",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("spec", help="a benchmark spec YAML (see benchmarks/specs/)")
    p.add_argument("--out", default=None, help="output folder (overrides the spec's out)")
    p.add_argument("--cache-dir", default=None, help="where reference features are cached")
    p.add_argument("--rerun", action="store_true", help="run every cell again, ignoring "
                                                        "finished cell files")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    spec = load_spec(args.spec)
    out = args.out or spec.get("out") or os.path.join("benchmarks", "results", spec["name"])
    summary = run_bench(spec, out, cache_dir=args.cache_dir, rerun=args.rerun,
                        progress=not args.no_progress)
    with open(os.path.join(out, "results.md")) as f:
        print(f.read())
    print(f"wrote {out}/results.json, results.md, cells/, grids/")
    if not summary["complete"]:
        bad = [r["cell"] for r in summary["cells"] if not r.get("complete")]
        print(f"ddistill bench: INCOMPLETE cells: {bad}; rerun the same command to retry them "
              "(finished cells are kept)", file=sys.stderr)
        return 1
    return 0
