"""A spec's ``standard:`` section as a bench protocol (Inception FID and CLIP score over PNG
sample folders): :mod:`diffusion_distill.eval.standard` behind the interface the cell
runner uses."""
from __future__ import annotations

import os
import re

import torch


class StandardProtocol:
    """The spec's ``standard:`` section as a bench protocol: the prompt file's prompts and
    seeds, samples written as PNG folders (``OUT/samples/<cell>/``, which clean-fid reads
    directly), Inception FID and CLIP score (:mod:`diffusion_distill.eval.standard`)."""

    def __init__(self, spec: dict, out: str):
        from ..eval.standard import StandardConfig, load_prompts

        self.config = StandardConfig.from_dict(spec["standard"])
        self.seed, self.out = spec["seed"], out
        self.prompts = load_prompts(self.config.prompts, self.config.num_samples)

    def describe(self) -> dict:
        return self.config.describe(self.seed)

    def evaluate_loaded(self, loaded, protocol, steps=None, guidance=None, batch_size=16,
                        progress=True, name=None):
        import numpy as np
        from PIL import Image

        from ..eval.protocol import backbone_of, make_sample_fn, model_head
        from ..eval.standard import evaluate_standard, image_files

        head, steps = model_head(loaded, steps, guidance, name)
        cell = f"{name}-steps{head['steps']}-cfg{head['guidance']}"
        folder = os.path.join(self.out, "samples", re.sub(r"[^A-Za-z0-9_.-]+", "_", cell))
        result = evaluate_standard(make_sample_fn(loaded.call, steps, guidance), self.config,
                                   folder, seed=self.seed, batch_size=batch_size,
                                   progress=progress, backbone=backbone_of(loaded.pipe))
        # The protocol's keys go in flat (describe()), as a finished cell is recognised by
        # them; the reference's details keep their own key.
        result.pop("protocol", None)
        result["reference_info"] = result.pop("reference", None)
        first = [np.asarray(Image.open(f).convert("RGB")) for f in image_files(folder)[:16]]
        images = (torch.from_numpy(np.stack(first)).permute(0, 3, 1, 2).float() / 127.5 - 1
                  if first else None)
        return {**head, **self.describe(), **result}, images
