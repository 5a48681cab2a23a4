"""The training data: prompts (and real images, when the objective wants them) per step.

From Python a run may also take the user's own samples (``train(..., data=...)``): x0 already
in the teacher's space (a custom teacher's ``shape``, a pipeline's latents), with optional
prompts (or class labels, written as the text the custom teacher's ``encode`` reads).

A batch is a function of (seed, step, micro-batch) through :class:`~.step.Randomness`: every
process draws the whole global batch and keeps its own slice, so a resumed run equals an
uninterrupted one and a 2-process run equals a 1-process run with the same global batch.
"""
from __future__ import annotations

import torch

from .step import Randomness

DATA_FORMS = ("a tensor x0 of shape (N, *shape)", "(x0, prompts)", "{'x0': x0, 'prompts': prompts}",
              "a torch Dataset of x0 or (x0, prompt) items")


def check_data_path(recipe: dict):
    """``data.path`` exists as the kind its source reads, checked before any model is built
    (a missing folder was found only after the teacher had loaded)."""
    import os

    data = recipe["data"]
    path = data.get("path")
    if not path:
        return
    if data["source"] == "folder" and not os.path.isdir(path):
        raise ValueError(f"recipe key 'data.path' is {path!r}, but must be an existing folder "
                         "of images (data.source: folder), with same-named .txt captions or a "
                         "metadata.jsonl; fix it in the recipe file or override it "
                         "(data.path=...)")
    if data["source"] == "prompts" and not os.path.isfile(path):
        raise ValueError(f"recipe key 'data.path' is {path!r}, but must be an existing text "
                         "file of prompts, one a line (data.source: prompts); fix it in the "
                         "recipe file or override it (data.path=...)")


class UserSamples:
    """The user's own samples: ``x0`` in the teacher's space, with optional prompts (one per
    sample: strings, or integer class labels, passed on as their text)."""

    def __init__(self, data, shape: tuple[int, ...]):
        prompts = None
        if isinstance(data, dict):
            unknown = set(data) - {"x0", "prompts", "labels"}
            if "x0" not in data or unknown:
                raise ValueError(f"data= as a dict takes the keys 'x0' and 'prompts' (or "
                                 f"'labels'), got {sorted(data)}")
            prompts = data.get("prompts", data.get("labels"))
            data = data["x0"]
        elif isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
            data, prompts = data
        self.dataset = None
        if torch.is_tensor(data):
            self.x0 = data.detach().float()
            first = self.x0[0] if len(self.x0) else None
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self.dataset, self.x0 = data, None
            item = data[0] if len(data) else None
            first = item[0] if isinstance(item, (tuple, list)) else item
            first = torch.as_tensor(first) if first is not None else None
        else:
            raise ValueError(f"data= got a {type(data).__name__}; expected one of: "
                             f"{'; '.join(DATA_FORMS)}")
        if first is None:
            raise ValueError("data= holds no samples; pass at least one x0")
        if tuple(first.shape) != tuple(shape):
            raise ValueError(f"data= samples have shape {tuple(first.shape)}, the teacher's "
                             f"samples {tuple(shape)}; pass x0 in the teacher's own space, "
                             f"shaped (N, {', '.join(map(str, shape))})")
        if prompts is not None:
            if torch.is_tensor(prompts):
                prompts = prompts.tolist()
            prompts = [p if isinstance(p, str) else str(int(p)) for p in prompts]
            if len(prompts) != len(self):
                raise ValueError(f"data= has {len(self)} samples but {len(prompts)} prompts; "
                                 "give one prompt (or label) per sample")
        self.prompts = prompts

    def __len__(self):
        return len(self.x0) if self.x0 is not None else len(self.dataset)

    def get_many(self, index: list[int]):
        """(x0 stacked, prompts or None) of the samples at ``index``."""
        if self.x0 is not None:
            x0 = self.x0[index]
            prompts = None
        else:
            items = [self.dataset[i] for i in index]
            pairs = [it if isinstance(it, (tuple, list)) else (it, None) for it in items]
            x0 = torch.stack([torch.as_tensor(x).float() for x, _ in pairs])
            found = [p for _, p in pairs]
            prompts = None if all(p is None for p in found) else [
                p if isinstance(p, str) else str(int(p)) for p in found]
        if self.prompts is not None:
            prompts = [self.prompts[i] for i in index]
        return x0, prompts


class Batches:
    """Prompts (and real images, when the objective wants them) for each (step, micro).

    ``data``: the user's own samples (:class:`UserSamples`), which replace the recipe's
    data source; their prompts, where they have none, are the recipe's ``data.prompts``
    (or the empty prompt)."""

    def __init__(self, recipe, teacher, objective, data=None):
        d = recipe["data"]
        needs_data = objective.needs_data
        self.teacher, self.needs_data = teacher, needs_data
        self.source = d["source"]
        custom = getattr(teacher, "family", None) == "custom"
        self.samples = None
        if data is not None:
            self.samples = UserSamples(data, tuple(teacher.latent_shape))
            prompts = d["prompts"] if self.source == "prompts" else None
            self.prompt_list = list(prompts) if prompts else [""]
            self.source = "samples"
        elif custom and needs_data:
            # a custom teacher has no images to render or encode: its x0 come from the user
            raise ValueError(f"{objective.data_advice()}, and a custom teacher's samples come "
                             "from Python: train(recipe, teacher=..., networks=..., data=x0) "
                             f"with x0 shaped (N, {', '.join(map(str, teacher.latent_shape))})"
                             " in the teacher's space, optionally with one prompt or label per "
                             f"sample (data=(x0, prompts)); data.source={self.source!r} cannot "
                             "supply them")
        elif self.source == "world":
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
                                 "folder, or pass latents from Python: train(..., data=x0)")
            self.prompt_list = list(prompts)
        else:
            raise ValueError(f"data.source must be 'world', 'folder' or 'prompts', got "
                             f"{self.source!r}")

    def prompts(self, n: int, seed: int) -> list[str]:
        """``n`` prompts of this run's data, a function of ``seed`` alone (e.g. for the
        prompts of cached teacher samples)."""
        return self(Randomness(seed, step=-1, micro=0), n, encode=False)["prompts"]

    def __call__(self, rng: Randomness, local_batch: int, encode: bool = True) -> dict:
        n = local_batch * rng.world
        images = None
        if self.source == "world" and not self.needs_data:
            captions, _ = self.world.captions(n, seed=rng.seed())  # no rendering needed
        elif self.source == "world":
            images, captions, _ = self.world.batch(n, seed=rng.seed())
        elif self.source == "prompts":
            index = torch.randint(len(self.prompt_list), (n,), generator=rng.gen).tolist()
            captions = [self.prompt_list[i] for i in index]
        elif self.source == "samples":
            index = torch.randint(len(self.samples), (n,), generator=rng.gen).tolist()
            x0, captions = self.samples.get_many(index)
            if captions is None:
                pick = torch.randint(len(self.prompt_list), (n,), generator=rng.gen).tolist()
                captions = [self.prompt_list[i] for i in pick]
        else:
            index = torch.randint(len(self.folder), (n,), generator=rng.gen).tolist()
            images, captions = self.folder.get_many(index)
        lo, hi = rng.rank * local_batch, (rng.rank + 1) * local_batch
        captions = list(captions)[lo:hi]
        if not encode:
            return {"prompts": captions}
        batch = {"prompts": captions, "cond": self.teacher.prompts(captions)}
        if self.source == "samples":
            if self.needs_data:
                batch["x0"] = x0[lo:hi].to(rng.device)
        elif self.needs_data:
            batch["x0"] = self.teacher.encode_images(images[lo:hi].to(rng.device))
        return batch


class LatentPool:
    """Batches drawn from a fixed pool of x0 with their captions (teacher training: world
    latents encoded once, since the VAE is frozen), like :class:`Batches` a function of the
    step's randomness alone, so a resumed run draws what an uninterrupted one would.

    ``encode``: captions -> the denoiser's condition (the teacher's prompt encoding)."""

    def __init__(self, x0: torch.Tensor, captions: list[str], encode):
        if len(x0) != len(captions):
            raise ValueError(f"a latent pool needs one caption per latent, got {len(x0)} "
                             f"latents and {len(captions)} captions")
        self.x0, self.captions, self.encode = x0, list(captions), encode

    def __call__(self, rng: Randomness, local_batch: int) -> dict:
        index = rng.randint(len(self.captions), local_batch)
        captions = [self.captions[i] for i in index.tolist()]
        return {"x0": self.x0[index], "cond": self.encode(captions), "prompts": captions}
