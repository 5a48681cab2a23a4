"""The world's attribute classifier: reads a 32x32 image, predicts what a caption would say.

One small CNN trunk with a head per attribute. Which heads are read depends on the kind of
prompt being scored:

* ``single``: shape, color, size, position;
* ``pair``:   the canonical pair (see ``data.canonical_pair``): axis (horizontal/vertical),
              shape and colour of the first (left/top) and of the second object. "A left of B"
              and "B right of A" are the same picture, so predicting the canonical form keeps
              every head well defined;
* ``count``:  count, shape, color.

``score_alignment(images, labels)`` compares these predictions with a prompt's labels; a
prompt is right as a whole only when every attribute it states is right.

    python -m diffusion_distill.world.classifier --out diffusion_distill/world/assets/classifier
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from .data import COLORS, POSITIONS, SHAPES, SIZES, ShapesWorld, canonical_pair

HEADS = {
    "count": (1, 2, 3),
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "axis": ("horizontal", "vertical"),
    "shape_a": SHAPES,
    "color_a": tuple(COLORS),
    "shape_b": SHAPES,
    "color_b": tuple(COLORS),
}
# Which heads a scene kind's labels supervise (and which a prompt of that kind is scored on).
KIND_HEADS = {
    "single": ("count", "shape", "color", "size", "position"),
    "pair": ("count", "axis", "shape_a", "color_a", "shape_b", "color_b"),
    "count": ("count", "shape", "color"),
}


def _assets() -> str:
    return os.path.join(os.path.dirname(__file__), "assets", "classifier")


class AttributeClassifier(nn.Module):
    """A small VGG-style CNN (about 0.3M parameters) with one linear head per attribute."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.trunk = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2),                       # 16x16
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8x8
            *block(2 * w, 4 * w), nn.MaxPool2d(2),               # 4x4: keeps where things are
            nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (32, 32):
            # Samples at another resolution are judged at the one the classifier knows.
            images = F.interpolate(images, size=(32, 32), mode="area")
        h = self.trunk(images)
        return {k: head(h) for k, head in self.heads.items()}


def targets_for(labels: list[dict]) -> dict[str, torch.Tensor]:
    """Class indices per head (-1 where a sample's labels do not define that head)."""
    out = {k: torch.full((len(labels),), -1, dtype=torch.long) for k in HEADS}
    for i, lab in enumerate(labels):
        values = dict(lab)
        if lab["kind"] == "pair":
            values.update(canonical_pair(lab))
        for k in KIND_HEADS[lab["kind"]]:
            # Training labels come from the renderer, so even unsaid attributes are known.
            v = values.get(k)
            if v is not None:
                out[k][i] = HEADS[k].index(v)
    return out


def _augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur and noise, so the classifier judges content rather than the exact pixels: the
    samples it will score come out of a VAE decoder, softer and noisier than the renders."""
    n = images.shape[0]
    blur = torch.rand(n, generator=g) < 0.5
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        soft = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
        images = torch.where(blur[:, None, None, None], soft, images)
    noise = torch.rand(n, 1, 1, 1, generator=g) * 0.15
    return (images + noise * torch.randn(images.shape, generator=g)).clamp(-1, 1)


def train_classifier(out: str | None = None, steps: int = 1500, batch_size: int = 64,
                     lr: float = 2e-3, seed: int = 0, minutes: float | None = None,
                     log=print) -> tuple[AttributeClassifier, dict]:
    torch.manual_seed(seed)
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.1)
    world = ShapesWorld(seed + 100)  # its own stream, not the teachers' training images
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    model.train()
    step = 0
    for step in range(1, steps + 1):
        images, _, labels = world.batch(batch_size, step)
        images = _augment(images, g)
        logits = model(images)
        targets = targets_for(labels)
        loss = sum(F.cross_entropy(logits[k], targets[k], ignore_index=-1)
                   for k in HEADS if (targets[k] >= 0).any())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            log(f"classifier step {step} loss {loss.item():.4f} {time.time() - start:.0f}s")
        if minutes is not None and time.time() - start > minutes * 60:
            break
    model.eval()
    info = {"steps": step, "seconds": round(time.time() - start, 1),
            "accuracy_on_fresh_renders": evaluate_classifier(model)}
    log(f"classifier done: {info}")
    if out:
        from safetensors.torch import save_file

        os.makedirs(out, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "info.json"), "w") as f:
            json.dump(info, f, indent=2)
    return model, info


@torch.no_grad()
def evaluate_classifier(model, n: int = 512, seed: int = 4242) -> dict:
    """Whole-prompt accuracy on fresh real renders of the eval prompts (and of the stream)."""
    from .data import eval_prompts, render_prompts

    result = {}
    for kind in ("single", "pair", "count"):
        _, labels = eval_prompts(kind, n)
        images = render_prompts(labels, seed=seed)
        result[kind] = score_alignment(images, labels, model=model)["whole_prompt"]
    return result


_CACHE: dict[str, AttributeClassifier] = {}


def load_classifier(path: str | None = None) -> AttributeClassifier:
    """The shipped classifier (or one saved by ``train_classifier`` at ``path``), in eval mode."""
    from safetensors.torch import load_file

    path = path or _assets()
    file = os.path.join(path, "model.safetensors")
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"no attribute classifier at {file}. The package ships one under "
            "diffusion_distill/world/assets/classifier; retrain it with `python -m "
            "diffusion_distill.world.classifier --out <folder>`."
        )
    if file not in _CACHE:
        model = AttributeClassifier()
        model.load_state_dict(load_file(file))
        _CACHE[file] = model.eval()
    return _CACHE[file]


@torch.no_grad()
def predict(images: torch.Tensor, model: AttributeClassifier | None = None,
            batch_size: int = 256) -> dict[str, list]:
    """Predicted attribute values per head, e.g. ``{"shape": ["circle", ...], ...}``."""
    model = model or load_classifier()
    images = images.float().cpu()
    preds = {k: [] for k in HEADS}
    for i in range(0, len(images), batch_size):
        logits = model(images[i:i + batch_size])
        for k, v in logits.items():
            preds[k] += [HEADS[k][j] for j in v.argmax(-1).tolist()]
    return preds


def score_alignment(images: torch.Tensor, labels: list[dict],
                    model: AttributeClassifier | None = None) -> dict:
    """How well images match their prompts' labels.

    Args:
        images: (N, 3, H, W) in [-1, 1].
        labels: the prompts' labels, e.g. from ``data.eval_prompts``; attributes a prompt does
            not state (``None``, or ``said_size=False``) are not scored.

    Returns ``{"per_attribute": {name: accuracy}, "whole_prompt": accuracy, "per_sample":
    [bool, ...], "n": N, "shares": ..., "worst_share": ...}``; pair attributes are reported as
    ``pair.axis``, ``pair.shape_a``...

    ``shares[name][value]`` = ``{"asked": fraction of the scored prompts asking for value,
    "got": fraction of their images classified as value}``: mode coverage per class (a
    collapsed student over-produces some classes and starves others whatever its prompts say).
    ``worst_share`` is the smallest ``got / asked`` over every class asked for (1: each class as
    often as asked; 0: a class never produced).
    """
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels; pass one labels "
                         "dict per image (e.g. from world.data.eval_prompts).")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    preds = predict(images, model)
    hits: dict[str, list[bool]] = {}
    asked: dict[str, Counter] = {}
    got: dict[str, Counter] = {}
    per_sample = []
    for i, lab in enumerate(labels):
        values = dict(lab)
        if lab["kind"] == "pair":
            values.update(canonical_pair(lab))
        ok = True
        for k in KIND_HEADS[lab["kind"]]:
            v = values.get(k)
            if v is None or lab.get(f"said_{k}") is False:
                continue
            right = preds[k][i] == v
            name = f"pair.{k}" if lab["kind"] == "pair" and k != "count" else k
            hits.setdefault(name, []).append(right)
            asked.setdefault(name, Counter())[v] += 1
            got.setdefault(name, Counter())[preds[k][i]] += 1
            ok = ok and right
        per_sample.append(ok)
    shares = {name: {str(value): {"asked": asked[name][value] / len(hits[name]),
                                  "got": got[name][value] / len(hits[name])}
                     for value in sorted(set(asked[name]) | set(got[name]), key=str)}
              for name in sorted(hits)}
    ratios = [c["got"] / c["asked"] for per in shares.values() for c in per.values()
              if c["asked"] > 0]
    return {"per_attribute": {k: sum(v) / len(v) for k, v in sorted(hits.items())},
            "whole_prompt": sum(per_sample) / max(1, len(per_sample)),
            "per_sample": per_sample, "n": len(per_sample), "shares": shares,
            "worst_share": min(ratios) if ratios else None}


def main(argv=None):
    p = argparse.ArgumentParser(description="train the world's attribute classifier")
    p.add_argument("--out", default="runs/classifier")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    train_classifier(a.out, steps=a.steps, minutes=a.minutes,
                     log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
