"""The one sampling loop of every evaluation (the world's protocol, the standard protocol, the
real-data baseline), and its one failure policy.

Policy: a batch whose sampling or scoring raises is recorded (its prompts, seeds, error and a
short traceback), reported on the progress bar, and skipped; the other batches go on. Hours of
a 30k-sample FID are not thrown away for one bad prompt, and nothing is hidden either: the
result says ``complete: False``, lists every failure, and counts ``num_samples`` against
``num_requested``, so a benchmark table marks the cell incomplete and never reuses it.
"""
from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

SampleFn = Callable[[list[str], list[int]], torch.Tensor]
"""``sample_fn(prompts, seeds) -> images`` (N, 3, H, W) in [-1, 1], one image per prompt."""
# consume(start, prompts, seeds, images): score or store one batch (images (N, 3, H, W) in
# [-1, 1], float32 on the CPU). Raising counts as the batch failing.
Consume = Callable[[int, list[str], list[int], torch.Tensor], None]


@dataclass
class SamplingReport:
    ok_index: list[int] = field(default_factory=list)  # prompt indices whose batch succeeded
    failures: list[dict] = field(default_factory=list)
    sample_seconds: float = 0.0  # inside sample_fn only
    evaluations: int | None = None  # backbone forward calls, when a backbone was given

    @property
    def num_ok(self) -> int:
        return len(self.ok_index)

    def per_image(self, seconds: float) -> float | None:
        return seconds / self.num_ok if self.num_ok else None

    @property
    def nfe(self) -> float | None:
        """Network evaluations per successful image (None without a backbone)."""
        return self.evaluations / self.num_ok if self.evaluations is not None and self.num_ok \
            else None


class NFECounter:
    """Counts network evaluations per image by hooking the backbone's forward.

    Measured rather than computed from (steps, guidance): with classifier-free guidance
    diffusers runs the conditional and unconditional halves as one batch of 2N, which counts
    as 2 evaluations per image; guidance-distilled models (Flux) run one. The count is the sum
    over forward calls of the call's batch size, divided by the number of images sampled.
    """

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.evaluations = 0
        self._handle = None

    def _hook(self, module, args, kwargs):
        x = args[0] if args else next(
            (kwargs[k] for k in ("sample", "hidden_states", "x") if k in kwargs), None)
        self.evaluations += int(x.shape[0]) if torch.is_tensor(x) else 1

    def __enter__(self):
        self._handle = self.backbone.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def check_images(images, n: int) -> torch.Tensor:
    """``sample_fn``'s output as (n, 3, H, W) finite float32 on the CPU, or a ValueError that
    says what came back."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[0] != n \
            or images.shape[1] not in (1, 3):
        got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"sample_fn must return a (N, 3, H, W) tensor with N = {n} images in "
                         f"[-1, 1], got {got}")
    if not torch.isfinite(images).all():
        raise ValueError("sample_fn returned NaN or infinite pixel values")
    return images.detach().float().cpu()


def progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img", leave=False)


def check_prompts(prompts: list[str], seeds: list[int]):
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per "
                         "prompt (the same lists for every model you compare)")
    if not prompts:
        raise ValueError("no prompts to evaluate; give at least one prompt")


def sample_all(sample_fn: SampleFn, prompts: list[str], seeds: list[int], consume: Consume, *,
               batch_size: int = 32, backbone: nn.Module | None = None, progress: bool = True,
               desc: str = "sampling") -> SamplingReport:
    """Call ``sample_fn`` on ``batch_size`` prompts at a time (each with its own seed) and hand
    each batch to ``consume``, under the module's failure policy. No gradients are kept."""
    check_prompts(prompts, seeds)
    report = SamplingReport()
    counter = NFECounter(backbone) if backbone is not None else None
    bar = progress_bar(len(prompts), progress, desc)
    with counter or contextlib.nullcontext(), torch.no_grad():
        try:
            for start in range(0, len(prompts), batch_size):
                bp, bs = prompts[start:start + batch_size], seeds[start:start + batch_size]
                try:
                    t0 = time.perf_counter()
                    images = sample_fn(bp, bs)
                    report.sample_seconds += time.perf_counter() - t0
                    consume(start, bp, bs, check_images(images, len(bp)))
                # The policy above: one bad batch must not sink the whole evaluation.
                except Exception as e:  # noqa: BLE001
                    report.failures.append({
                        "batch": start // batch_size, "prompts": bp, "seeds": bs,
                        "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc(limit=4)})
                    bar.write(f"batch {start // batch_size} failed ({type(e).__name__}: {e}); "
                              f"prompts: {bp}")
                else:
                    report.ok_index.extend(range(start, start + len(bp)))
                bar.update(len(bp))
        finally:
            bar.close()
    if counter is not None:
        report.evaluations = counter.evaluations
    return report
