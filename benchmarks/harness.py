"""What every script in ``benchmarks/`` shares, so that a script holds only what it measures.

* the import path: importing this module (``from harness import ...``; a script's own folder
  is on ``sys.path`` when it runs as ``python benchmarks/NAME.py``) makes the checkout's
  package, the other scripts and the tests' helpers importable, installed or not;
* :func:`provenance`: the command as typed, the date and the machine, in every results JSON;
* :func:`write_json`: results written atomically (an interrupted write keeps the old file);
* :func:`train_and_evaluate`: train a recipe with the in-training evaluation on and return
  its ``eval.jsonl`` rows (the evaluation curve), and the run arguments such scripts share.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# the package, the other scripts (shared tables), the tests' helpers (tiny recipes)
for _path in (ROOT, HERE, os.path.join(ROOT, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def machine() -> str:
    """The machine in one line: CPU architecture and cores, torch, its threads, CUDA."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), CUDA {gpu}")


def provenance(script: str | None = None, argv=None, **recorded) -> dict:
    """The command (as typed), the date and the machine for a results JSON, plus what the
    caller records beside them (e.g. ``feature_space=``)."""
    script = script or os.path.basename(sys.argv[0])
    return {"command": f"python benchmarks/{script} " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "date": datetime.date.today().isoformat(), "machine": machine(), **recorded}


def write_json(path: str, obj) -> str:
    """``obj`` as JSON at ``path`` (its folder made), atomically; returns the path."""
    from diffusion_distill.eval.protocol import write_json as write_atomically

    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, obj)
    return path


def write_row(path: str, label: str, row: dict) -> str:
    """Put ``row`` (with its provenance) under ``label`` in the results JSON at ``path``,
    keeping the rows other commands wrote there; a row of the same label is replaced."""
    rows = {}
    if os.path.isfile(path):
        with open(path) as f:
            rows = json.load(f).get("rows", {})
    rows[label] = {**row, **provenance()}
    return write_json(path, {"rows": rows})


def eval_rows(run_dir: str) -> list[dict]:
    """A run's in-training evaluation rows (``eval.jsonl``), in step order."""
    path = os.path.join(run_dir, "eval.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_and_evaluate(recipe) -> list[dict]:
    """Train (or resume; a finished run is kept) a resolved recipe whose ``train.eval_every``
    is set, and return its evaluation curve (:func:`eval_rows`)."""
    from diffusion_distill.train import train

    return eval_rows(train(recipe))


def add_run_arguments(p, runs: str, steps: int, eval_every: int) -> None:
    """--steps, --eval-every, --eval-num, --runs (under runs/``runs``) and --out."""
    p.add_argument("--steps", type=int, default=steps, help="training steps per run")
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--eval-num", type=int, default=128, help="samples per evaluation")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", runs),
                   help="where the runs go (a finished run is reused)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))


def check_run_arguments(p, a) -> None:
    if a.eval_every < 1 or a.steps < a.eval_every:
        p.error(f"--eval-every {a.eval_every} must be >= 1 and at most --steps {a.steps}")
