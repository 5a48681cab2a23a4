"""Sizes checked against the machine before any model is built.

A batch of a billion images or a trillion steps is a typo; found by the operating system it
is minutes of swapping or a run that never ends. This is a lower bound (the batch's own images
and the few copies every objective makes of them), so it refuses only what cannot fit, and
says what it counted.
"""
from __future__ import annotations

import os

# float32 copies of one sample's image-sized tensor that any step holds at once: the data,
# its latent, the noise, the noised input, each role's prediction and its gradient. The
# backbone's activations come on top, so the real need is larger.
COPIES_PER_SAMPLE = 8


def available_memory_bytes(device: str = "cpu") -> int | None:
    """Free memory on the device the batch lives on (None where it cannot be read)."""
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info()
            return int(free)
        return None
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_fits(recipe: dict, device: str = "cpu", processes: int = 1):
    """Refuse a batch whose lower-bound memory exceeds what the device has free."""
    cfg = recipe["train"]
    per_process = cfg["batch_size"] // max(1, processes * cfg["grad_accum"])
    res = recipe["data"]["resolution"]
    need = per_process * 3 * res * res * 4 * COPIES_PER_SAMPLE
    have = available_memory_bytes(device)
    if have is not None and need > have:
        gib = 2 ** 30
        raise ValueError(
            f"recipe key 'train.batch_size' is {cfg['batch_size']}, but one step's batch needs "
            f"at least {need / gib:,.1f} GiB ({per_process} samples x {COPIES_PER_SAMPLE} "
            f"float32 copies of 3x{res}x{res}, before the network's activations) and this "
            f"{device} has {have / gib:,.1f} GiB free; lower train.batch_size, or raise "
            "train.grad_accum to split it into micro-batches")
