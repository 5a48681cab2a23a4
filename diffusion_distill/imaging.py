"""Images in the toolkit's convention ([-1, 1], (B, 3, H, W)) to and from 8-bit pixels."""
from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 pixels, rounded to the nearest level (as PIL would save them)."""
    return ((images.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> [-1, 1] floats."""
    return pixels.float() / 127.5 - 1
