"""Resumable training state, written atomically.

A checkpoint is a folder ``checkpoints/step_0000200`` holding every role's weights
(safetensors), the optimizers' states (``torch.save`` of plain tensors, read back with
``weights_only=True``) and ``state.json``. It is first written under a temporary name and then
renamed, so a run killed mid-write keeps its last good checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

PATTERN = re.compile(r"^step_(\d+)$")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name))
             for name in os.listdir(root) if (m := PATTERN.match(name))]
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


@contextlib.contextmanager
def atomic_dir(final: str):
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` by rename.

    A crash or kill mid-write leaves ``final`` as it was (and no half-written folder).
    """
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_", dir=parent)
    try:
        yield tmp
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run_dir: str, step: int, weights: dict[str, dict[str, torch.Tensor]],
                    optimizers: dict, state: dict, keep: int = 2) -> str:
    final = os.path.join(run_dir, "checkpoints", f"step_{step:07d}")
    with atomic_dir(final) as tmp:
        flat = {f"{role}/{k}": v.detach().cpu().contiguous()
                for role, sd in weights.items() for k, v in sd.items()}
        save_file(flat, os.path.join(tmp, "weights.safetensors"))
        torch.save({r: o.state_dict() for r, o in optimizers.items()},
                   os.path.join(tmp, "optimizers.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**state, "step": step}, f, indent=1)
    for _, old in list_checkpoints(run_dir)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str) -> tuple[dict, dict, dict]:
    """(weights per role, optimizer states per role, state)."""
    flat = load_file(os.path.join(path, "weights.safetensors"))
    weights: dict[str, dict] = {}
    for key, value in flat.items():
        role, name = key.split("/", 1)
        weights.setdefault(role, {})[name] = value
    optim = torch.load(os.path.join(path, "optimizers.pt"), weights_only=True)
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    return weights, optim, state
