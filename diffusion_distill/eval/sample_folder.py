"""The standard protocol's sample folder: ``000000.png``, ``000001.png``, ... and
``prompts.jsonl`` in one flat folder, which clean-fid reads directly
(``cleanfid.fid.compute_fid(sample_dir, ...)``). Each file is written atomically."""
from __future__ import annotations

import glob
import json
import os
import re

import torch
from PIL import Image

from ..checkpoint import atomic_file, atomic_path
from .sampling import check_images

PROMPTS_FILE = "prompts.jsonl"
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
_OWN_FILE = re.compile(r"(\d{6,}\.png|" + re.escape(PROMPTS_FILE) + r")(\.\d+\.tmp)?")


def image_files(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, sorted), as clean-fid's folder reader finds."""
    return sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                  if os.path.splitext(p)[1].lower()[1:] in IMAGE_EXTENSIONS)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8, as a saved PNG holds them, from [-1, 1] floats (or uint8 as given)."""
    if torch.is_tensor(images) and images.dtype == torch.uint8:
        u8 = images.cpu()
        if u8.dim() != 4 or u8.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(u8.shape)}")
    else:
        from ..imaging import to_uint8

        u8 = to_uint8(check_images(images, len(images)))
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


def write_samples(images: torch.Tensor, prompts: list[str], seeds: list[int], folder: str,
                  start: int = 0) -> list[str]:
    """Write ``folder/{start:06d}.png``, ... (uint8 RGB) and their lines in ``prompts.jsonl``.

    A flat folder that clean-fid's folder reader globs directly. Each PNG is written under a
    temporary name (ending ``.tmp``, which no image reader picks up) and renamed, so a crash
    never leaves a truncated image under a final name. ``prompts.jsonl`` (index, file, seed,
    prompt; one line per image, sorted by index) is merged by index and replaced the same way,
    so writing a batch again, e.g. after a restart, replaces its lines instead of adding more.
    """
    u8 = to_uint8(images)
    if not len(u8) == len(prompts) == len(seeds):
        raise ValueError(f"got {len(u8)} images, {len(prompts)} prompts and {len(seeds)} seeds; "
                         "give one prompt and one seed per image")
    os.makedirs(folder, exist_ok=True)
    paths, lines = [], {}
    for k, image in enumerate(u8):
        name = f"{start + k:06d}.png"
        paths.append(os.path.join(folder, name))
        with atomic_path(paths[-1]) as tmp:
            Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGB").save(tmp, format="PNG")
        lines[start + k] = {"index": start + k, "file": name, "seed": int(seeds[k]),
                            "prompt": prompts[k]}
    manifest = os.path.join(folder, PROMPTS_FILE)
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            old = (json.loads(line) for line in f if line.strip())
            lines = {**{e["index"]: e for e in old}, **lines}
    with atomic_file(manifest, encoding="utf-8") as f:
        f.writelines(json.dumps(lines[i], ensure_ascii=False) + "\n" for i in sorted(lines))
    return paths


def prepare_sample_dir(folder: str):
    """Empty ``folder`` of an earlier run's samples; refuse one holding other images.

    clean-fid scores every image it finds in the folder, so stale or foreign images would
    silently change the FID.
    """
    os.makedirs(folder, exist_ok=True)
    # Checked before anything is removed: foreign images are never deleted, only refused.
    own = [n for n in os.listdir(folder) if _OWN_FILE.fullmatch(n)]
    others = [p for p in image_files(folder)
              if not (os.path.dirname(p) == folder.rstrip(os.sep)
                      and _OWN_FILE.fullmatch(os.path.basename(p)))]
    if own and not os.path.isfile(os.path.join(folder, PROMPTS_FILE)):
        others = sorted(os.path.join(folder, n) for n in own) + others  # no manifest: not ours
    if others:
        raise ValueError(f"sample folder {folder!r} holds other images ({others[:3]}, "
                         f"{len(others)} in all) that clean-fid would score with the samples; "
                         "give an empty folder or one written by write_samples (with its "
                         f"{PROMPTS_FILE}); nothing was removed")
    for name in own:
        os.remove(os.path.join(folder, name))
