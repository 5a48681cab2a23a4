"""The run's logs: ``metrics.jsonl`` (a row per logged interval), ``eval.jsonl`` (a row per
in-training evaluation) and, when tensorboard is installed, the same scalars under ``tb/``."""
from __future__ import annotations

import json
import os


class RunLog:
    """Appends the run's log rows; only the main process makes one."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.writer = _tensorboard(run_dir)

    def metrics(self, row: dict, step: int) -> None:
        _append(os.path.join(self.run_dir, "metrics.jsonl"), row)
        if self.writer:
            for k, v in row.items():
                self.writer.add_scalar(k, v, step)

    def eval(self, row: dict) -> None:
        _append(os.path.join(self.run_dir, "eval.jsonl"), row)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _tensorboard(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001  tensorboard is optional (and its import can fail oddly)
        return None
    return SummaryWriter(os.path.join(run_dir, "tb"))
