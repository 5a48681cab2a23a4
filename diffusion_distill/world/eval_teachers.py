"""Prompt alignment of the embedded teachers, sampled by plain diffusers.

    python -m diffusion_distill.world.eval_teachers --teachers sd sd3 --n 120 \
        --out benchmarks/results/teachers_alignment.json

For each teacher and each sampler setting (default: 50, 4 and 1 steps), the held-out eval
prompts (``data.eval_prompts``) are sampled with fixed seeds through the pipeline's own
``__call__`` and scored by the attribute classifier (``classifier.score_alignment``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from .classifier import score_alignment
from .data import eval_prompts, save_grid


@torch.no_grad()
def sample_pipeline(pipe, prompts: list[str], steps: int, guidance: float, seed: int = 0,
                    batch_size: int = 60) -> torch.Tensor:
    """Images in [-1, 1] for ``prompts``; each chunk of ``batch_size`` prompts gets a generator
    seeded by ``seed`` + its offset, so a run is reproducible at a fixed batch size."""
    out = []
    for i in range(0, len(prompts), batch_size):
        g = torch.Generator().manual_seed(seed + i)
        images = pipe(prompts[i:i + batch_size], num_inference_steps=steps,
                      guidance_scale=guidance, generator=g, output_type="pt").images
        out.append(images.float() * 2 - 1)
    return torch.cat(out)


def evaluate_pipeline(pipe, kind: str = "single", n: int = 120, steps: int = 50,
                      guidance: float = 5.0, seed: int = 0, save_png: str | None = None) -> dict:
    prompts, labels = eval_prompts(kind, n)
    t0 = time.time()
    images = sample_pipeline(pipe, prompts, steps, guidance, seed)
    seconds = time.time() - t0
    if save_png:
        save_grid(images[:32], save_png, nrow=8)
    result = score_alignment(images, labels)
    return {"kind": kind, "n": n, "steps": steps, "guidance": guidance,
            "whole_prompt": round(result["whole_prompt"], 4),
            "per_attribute": {k: round(v, 4) for k, v in result["per_attribute"].items()},
            "sampling_seconds": round(seconds, 1)}


def load_teacher_pipeline(name_or_path: str):
    from diffusers import DiffusionPipeline

    from . import embedded_teacher_path

    path = embedded_teacher_path(name_or_path) if name_or_path in ("sd", "sd3") else name_or_path
    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    except ValueError as e:  # an SD3 folder saved with text_encoder_3=None (see null_t5)
        if "text_encoder_3" not in str(e):
            raise
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True,
                                                 text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None):
    p = argparse.ArgumentParser(description="prompt alignment of the embedded teachers")
    p.add_argument("--teachers", nargs="+", default=["sd", "sd3"],
                   help="sd, sd3, or pipeline folders")
    p.add_argument("--kinds", nargs="+", default=["single", "pair"])
    p.add_argument("--steps", nargs="+", type=int, default=[50, 4, 1])
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--out", default="benchmarks/results/teachers_alignment.json")
    p.add_argument("--png-dir", default=None)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    results = []
    for name in a.teachers:
        pipe = load_teacher_pipeline(name)
        for kind in a.kinds:
            for steps in a.steps:
                png = (os.path.join(a.png_dir, f"{os.path.basename(name)}_{kind}_{steps}.png")
                       if a.png_dir else None)
                r = dict(teacher=name, **evaluate_pipeline(pipe, kind, a.n, steps, a.guidance,
                                                           save_png=png))
                print(json.dumps(r), flush=True)
                results.append(r)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    report = {"command": "python -m diffusion_distill.world.eval_teachers " +
                         " ".join(argv if argv is not None else __import__("sys").argv[1:]),
              "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared)",
              "classifier": "diffusion_distill/world/assets/classifier", "results": results}
    from ..checkpoint import atomic_file

    with atomic_file(a.out) as f:
        json.dump(report, f, indent=2)
    print(a.out)


if __name__ == "__main__":
    main()
