"""The training data: prompts (and real images, when the objective wants them) per step.

A batch is a function of (seed, step, micro-batch) through :class:`~.step.Randomness`: every
process draws the whole global batch and keeps its own slice, so a resumed run equals an
uninterrupted one and a 2-process run equals a 1-process run with the same global batch.
"""
from __future__ import annotations

import torch

from .step import Randomness


class Batches:
    """Prompts (and real images, when the objective wants them) for each (step, micro)."""

    def __init__(self, recipe, teacher, objective):
        d = recipe["data"]
        needs_data = objective.needs_data
        self.teacher, self.needs_data = teacher, needs_data
        self.source = d["source"]
        if self.source == "world":
            from .world.data import ShapesWorld

            self.world = ShapesWorld(resolution=d["resolution"])
        elif self.source == "folder":
            from .world.data import ImageFolderDataset

            if not d["path"]:
                raise ValueError("data.source is 'folder' but data.path is empty; set "
                                 "data.path=/path/to/images")
            self.folder = ImageFolderDataset(d["path"], resolution=d["resolution"],
                                             on_error=d["on_error"])
        elif self.source == "prompts":
            prompts = d["prompts"]
            if prompts is None and d["path"]:
                with open(d["path"]) as f:
                    prompts = [line.strip() for line in f if line.strip()]
            if not prompts:
                raise ValueError("data.source is 'prompts' but no prompts were given; set "
                                 "data.prompts (a list) or data.path (a .txt, one per line)")
            if needs_data:
                raise ValueError(f"data.source is 'prompts' (no images), but "
                                 f"{objective.data_advice()}; or use data.source=world or "
                                 "folder")
            self.prompt_list = list(prompts)
        else:
            raise ValueError(f"data.source must be 'world', 'folder' or 'prompts', got "
                             f"{self.source!r}")

    def __call__(self, rng: Randomness, local_batch: int) -> dict:
        n = local_batch * rng.world
        images = None
        if self.source == "world" and not self.needs_data:
            captions, _ = self.world.captions(n, seed=rng.seed())  # no rendering needed
        elif self.source == "world":
            images, captions, _ = self.world.batch(n, seed=rng.seed())
        elif self.source == "prompts":
            index = torch.randint(len(self.prompt_list), (n,), generator=rng.gen).tolist()
            captions = [self.prompt_list[i] for i in index]
        else:
            index = torch.randint(len(self.folder), (n,), generator=rng.gen).tolist()
            images, captions = self.folder.get_many(index)
        lo, hi = rng.rank * local_batch, (rng.rank + 1) * local_batch
        captions = list(captions)[lo:hi]
        batch = {"prompts": captions, "cond": self.teacher.prompts(captions)}
        if self.needs_data:
            batch["x0"] = self.teacher.encode_images(images[lo:hi].to(rng.device))
        return batch
