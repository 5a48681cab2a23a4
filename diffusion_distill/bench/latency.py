"""Timing the plain diffusers call per batch size, and speedups over the teacher."""
from __future__ import annotations

import os
import platform
import time

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu x{torch.get_num_threads()} threads"


def measure_latency(loaded, steps, guidance, prompts, batch_sizes=(1, 16), repeats=3) -> dict:
    """Wall time of the plain diffusers call, per batch size: one untimed warm-up call (lazy
    initialisation, allocator growth, cudnn autotuning), then the median of ``repeats`` timed
    calls, synchronised on CUDA. Decoding is included: it is what a user waits for.

    Returns ``{str(batch_size): {seconds_per_batch, seconds_per_image, images_per_second,
    peak_memory_gb (CUDA only)}}``.
    """
    from ..eval.protocol import backbone_of, make_sample_fn

    call, pipe, kind, defaults = loaded.call, loaded.pipe, loaded.kind, loaded.defaults
    if kind == "teacher" and steps is None:
        steps = defaults["steps"]
    sample_fn = make_sample_fn(call, steps, guidance)
    backbone = backbone_of(pipe)
    cuda = backbone is not None and next(backbone.parameters()).is_cuda
    results = {}
    for bs in batch_sizes:
        batch = [prompts[i % len(prompts)] for i in range(bs)]
        seeds = list(range(bs))
        sample_fn(batch, seeds)  # warm-up
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sample_fn(batch, seeds)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        per_batch = sorted(times)[len(times) // 2]
        row = {"seconds_per_batch": per_batch, "seconds_per_image": per_batch / bs,
               "images_per_second": bs / per_batch, "repeats": repeats}
        if cuda:
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        results[str(bs)] = row
    return results


def add_speedups(rows: list[dict]):
    """Beside each model's latency, its speedup over the teacher's default sampler (the first
    teacher cell) and the NFE ratio that would predict it; the gap between the two is the
    fixed cost (text encoding, VAE decoding, Python) that fewer steps do not remove."""
    ref = next((r for r in rows if r.get("model_kind") == "teacher" and r.get("latency")), None)
    if ref is None:
        return
    for r in rows:
        if not r.get("latency"):
            continue
        r["nfe_ratio"] = (ref["nfe"] / r["nfe"]) if r.get("nfe") and ref.get("nfe") else None
        for bs, row in r["latency"].items():
            base = ref["latency"].get(bs)
            row["speedup"] = (base["seconds_per_image"] / row["seconds_per_image"]
                              if base else None)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}
