"""What the benchmark scripts that train runs with the in-training evaluation share: their run
arguments and the provenance every results JSON carries."""
from __future__ import annotations

import datetime
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


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


def provenance(script: str, argv=None) -> dict:
    """The command (as typed), the date and the machine, for a results JSON."""
    import torch

    return {"command": f"python benchmarks/{script} " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch "
                       f"{torch.__version__} ({torch.get_num_threads()} threads), CUDA "
                       f"{'yes' if torch.cuda.is_available() else 'no'}"}
