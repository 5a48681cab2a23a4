"""Images in the toolkit's convention ([-1, 1], (B, 3, H, W)) to and from 8-bit pixels."""
from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 pixels, rounded to the nearest level (as PIL would save them)."""
    return ((images.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> [-1, 1] floats."""
    return pixels.float() / 127.5 - 1


def image_format(path: str, what: str = "image path") -> str:
    """The PIL format that writes ``path`` (from its extension), or a ValueError saying which
    extensions work: checked before sampling, not by the save after it."""
    import os

    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    savable = {e: f for e, f in Image.registered_extensions().items() if f in Image.SAVE}
    if ext not in savable:
        common = [e for e in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff") if e in savable]
        raise ValueError(f"{what} {path!r} has {'the extension ' + repr(ext) if ext else 'no extension'}"
                         f", which names no image format; end it with one of {', '.join(common)}"
                         " (e.g. samples.png)")
    return savable[ext]
