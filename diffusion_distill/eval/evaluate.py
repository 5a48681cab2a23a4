"""``evaluate(sample_fn, prompts, seeds, reference_images)``: one protocol for every model.

Teacher and students are scored on the same prompts, the same seeds, the same reference set
and the same feature space, so their numbers can be compared cell by cell. Sampling and
feature extraction run batch by batch (features are taken as soon as a batch is sampled, so
no large float image buffer builds up), in the one sampling loop (:mod:`.sampling`): a batch
that fails is recorded with its prompts and seeds and the evaluation goes on; the result then
says ``complete: false`` and lists the failures, so a partial evaluation is never mistaken
for a whole one.

Every distribution number carries ``feature_space``. In this project that is EfficientNet-
Lite0 (ImageNet) features: a Fréchet distance here is NOT an Inception FID.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from ..checkpoint import atomic_path
from ..imaging import from_uint8, to_uint8
from .features import DEFAULT_SIZE, get_feature_extractor
from .metrics import frechet_distance, kernel_inception_distance, precision_recall
from .sampling import NFECounter, SampleFn, check_prompts, sample_all  # noqa: F401 (public here)

NOT_INCEPTION = ("Distances are computed on {space} features; they are NOT Inception FID/KID "
                 "values and are comparable only with numbers in the same feature space.")


def cache_dir(path: str | None = None) -> str:
    """Where reference features are cached: ``path``, $DDISTILL_CACHE, or ~/.cache/..."""
    path = path or os.environ.get("DDISTILL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "diffusion_distill")
    return os.path.join(path, "eval")


def _cache_file(key: dict, extractor, cache: str | None) -> tuple[str, dict]:
    full_key = {**key, "feature_space": extractor.name}
    digest = hashlib.sha256(json.dumps(full_key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir(cache), f"reference-{digest}.safetensors"), full_key


def read_cached_features(key: dict, extractor, cache: str | None = None
                         ) -> torch.Tensor | None:
    """The features :func:`cached_features` stored under ``key``; None when there are none
    (or only a truncated file from an interrupted run)."""
    from safetensors.torch import load_file

    path, _ = _cache_file(key, extractor, cache)
    if os.path.isfile(path):
        try:
            return load_file(path)["features"]
        # A truncated file from an interrupted run: recompute it.
        except Exception:  # noqa: BLE001, S110
            pass
    return None


def cached_features(key: dict, make_images: Callable[[], torch.Tensor], extractor,
                    cache: str | None = None) -> torch.Tensor:
    """Features of a reference set, computed once and then read from disk.

    ``key`` describes the set completely (what images, how many, which seed); the feature
    space name is added to it, so features at another size or from another network never
    collide. Files are safetensors: loading them cannot run code.
    """
    from safetensors.torch import save_file

    found = read_cached_features(key, extractor, cache)
    if found is not None:
        return found
    path, full_key = _cache_file(key, extractor, cache)
    feats = extractor.extract(make_images())
    with atomic_path(path) as tmp:  # readers never see half a file
        save_file({"features": feats.contiguous()}, tmp,
                  metadata={"key": json.dumps(full_key, sort_keys=True)})
    return feats


def evaluate(
    sample_fn: SampleFn,
    prompts: list[str],
    seeds: list[int],
    reference_images: torch.Tensor | None = None,
    *,
    reference_features: torch.Tensor | None = None,
    labels: list[dict] | None = None,
    alignment_fn: Callable[[torch.Tensor, list[dict]], dict] | None = None,
    batch_size: int = 32,
    feature_size: int = DEFAULT_SIZE,
    extractor=None,
    backbone: nn.Module | None = None,
    nfe: float | None = None,
    k: int = 3,
    kid_subsets: int = 100,
    progress: bool = True,
    keep_images: int = 64,
    return_features: bool = False,
) -> dict:
    """Sample ``prompts`` with ``seeds`` and score the samples against a reference set.

    Args:
        sample_fn: ``sample_fn(prompts, seeds) -> images`` in [-1, 1], one per prompt.
        prompts, seeds: one seed per prompt; the same lists for every model compared.
        reference_images: real images, (M, 3, H, W) in [-1, 1]; or give ``reference_features``
            (e.g. from :func:`cached_features`) to skip extracting them again.
        labels: attribute labels per prompt, for ``alignment_fn``.
        alignment_fn: ``alignment_fn(images, labels) -> {"whole_prompt": float,
            "per_attribute": {...}}`` (the world's classifier); alignment is None without it.
        batch_size: prompts per ``sample_fn`` call and per feature batch.
        feature_size: side in pixels the feature network sees (part of the feature space name).
        backbone: the denoising network; when given, NFE is measured by hooking its forward.
        nfe: network evaluations per image, when the caller knows it (used if no backbone).
        keep_images: how many samples (in prompt order) to return under ``"images"`` for grids.
        return_features: also return the samples' features under ``"features"`` (N, D), e.g.
            to score other models against these samples (:func:`fd_to`).

    Returns:
        A dict with ``fd``, ``kid`` (``mean``, ``std``), ``precision``, ``recall``,
        ``alignment``, ``nfe``, ``seconds_per_image``, ``feature_space``, ``num_samples``,
        ``num_requested``, ``complete`` and ``failures`` (each with the batch's prompts, seeds
        and error). Metrics are None when too few samples succeeded to compute them.
    """
    check_prompts(prompts, seeds)
    if labels is not None and len(labels) != len(prompts):
        raise ValueError(f"got {len(labels)} label dicts for {len(prompts)} prompts")
    if reference_images is None and reference_features is None:
        raise ValueError("give reference_images (real images in [-1, 1]) or reference_features "
                         "to compare the samples against")
    extractor = extractor or get_feature_extractor(feature_size)
    space = extractor.name
    t_start = time.perf_counter()

    if reference_features is None:
        reference_features = extractor.extract(reference_images)

    feats, images_u8 = [], []
    feature_seconds = 0.0

    def consume(start, bp, bs, images):
        nonlocal feature_seconds
        t0 = time.perf_counter()
        feats.append(extractor.extract(images))
        feature_seconds += time.perf_counter() - t0
        # uint8 keeps every sample for the alignment classifier at 1/4 the memory.
        images_u8.append(to_uint8(images))

    report = sample_all(sample_fn, prompts, seeds, consume, batch_size=batch_size,
                        backbone=backbone, progress=progress,
                        desc=f"sampling+features ({space})")
    ok_index, failures = report.ok_index, report.failures
    n_ok = len(ok_index)
    result = {
        "feature_space": space,
        "note": NOT_INCEPTION.format(space=space),
        "num_samples": n_ok,
        "num_requested": len(prompts),
        "num_reference": len(reference_features),
        "complete": not failures,
        "failures": failures,
        "nfe": report.nfe if backbone is not None else nfe,
        "seconds_per_image": report.per_image(report.sample_seconds),
        "feature_seconds_per_image": report.per_image(feature_seconds),
        "fd": None, "kid": None, "precision": None, "recall": None, "alignment": None,
    }
    fake = torch.cat(feats) if feats else torch.zeros(0, reference_features.shape[1])
    if n_ok >= max(k + 1, 4):
        t0 = time.perf_counter()
        result["fd"] = frechet_distance(reference_features, fake)
        mean, std = kernel_inception_distance(reference_features, fake, subsets=kid_subsets)
        result["kid"] = {"mean": mean, "std": std}
        result["precision"], result["recall"] = precision_recall(reference_features, fake, k)
        result["metric_seconds"] = time.perf_counter() - t0
    elif n_ok:
        result["metrics_skipped"] = f"only {n_ok} samples succeeded; need at least {max(k + 1, 4)}"

    images = from_uint8(torch.cat(images_u8)) if images_u8 else None
    if alignment_fn is not None and labels is not None and images is not None:
        try:
            result["alignment"] = _plain(alignment_fn(images, [labels[i] for i in ok_index]))
        # Alignment is one metric of several: report it.
        except Exception as e:  # noqa: BLE001
            result["alignment_error"] = f"{type(e).__name__}: {e}"
            result["complete"] = False
    result["total_seconds"] = time.perf_counter() - t_start
    result["images"] = images[:keep_images] if images is not None else None
    if return_features:
        result["features"] = fake
    return result


def fd_to(target_features: torch.Tensor, features: torch.Tensor) -> float | None:
    """Fréchet distance of ``features`` to another model's samples, e.g. the teacher's own
    (FD-to-teacher, the FID-T of the few-step literature: how close a student lands to what it
    was distilled from, apart from how close the teacher is to the data). None when either set
    has too few samples for a covariance."""
    if min(len(target_features), len(features)) < 4:
        return None
    return frechet_distance(target_features, features)


def _plain(x):
    """Tensors and numpy scalars -> floats, so the result is JSON-serialisable."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if torch.is_tensor(x):
        return x.item() if x.numel() == 1 else x.tolist()
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return x.item()
    return x


def summary_table(rows: list[tuple[str, dict]]) -> str:
    """A short fixed-width table of results, one row per (name, result)."""
    head = f"{'model':<28} {'NFE':>5} {'FD':>8} {'KID':>9} {'prec':>5} {'rec':>5} " \
           f"{'align':>6} {'s/img':>7} {'n':>6}"
    lines = [head, "-" * len(head)]
    for name, r in rows:
        def f(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        kid = r.get("kid") or {}
        align = (r.get("alignment") or {}).get("whole_prompt")
        n = f"{r.get('num_samples', 0)}" + ("" if r.get("complete", True) else "!")
        lines.append(f"{name[-28:]:<28} {f(r.get('nfe'), '5.0f')} {f(r.get('fd'), '8.2f')} "
                     f"{f(kid.get('mean'), '9.4f')} {f(r.get('precision'), '5.2f')} "
                     f"{f(r.get('recall'), '5.2f')} {f(align, '6.3f')} "
                     f"{f(r.get('seconds_per_image'), '7.4f')} {n:>6}")
    spaces = sorted({r.get("feature_space", "?") for _, r in rows})
    lines.append(f"feature space: {', '.join(spaces)} (not Inception FID/KID)")
    if any(not r.get("complete", True) for _, r in rows):
        lines.append("! = incomplete: some batches failed; see 'failures' in the JSON")
    return "\n".join(lines)
