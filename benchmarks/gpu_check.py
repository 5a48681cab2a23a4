"""The GPU check (run it through ``benchmarks/gpu_check.sh``): CUDA-only tests, then one DMD2
LoRA step at SDXL-1024 and Flux-1024 with random weights, per attention backend.

Each step is the toolkit's own: ``memory_plan.build_setup`` builds the planner's
``dmd2_lora`` cell (bf16 base, float32 student / critic / EMA adapters, r=16, gradient
checkpointing, batch 1) on the GPU with random weights, and ``step.train_step`` runs it (a
student step, which trains the critic too). Per backend: one warm-up step and two timed ones
(synchronised), ``torch.cuda.max_memory_allocated`` over the three (steady state: AdamW state
exists after the first), against the planner's ``<arch>/dmd2_lora/w1/b1/ckpt`` figure from
``results/memory_plan.json``. The JSON is rewritten after each piece, so a run cut short
keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from harness import HERE, ROOT, provenance, write_json

ARCHS = ("sdxl", "flux_dev")
SKIP_BACKENDS = ("flex", "flash_hub", "sage_hub")  # compile a kernel / fetch one: not in 8 min


def refuse_without_cuda():
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: refused: torch sees no CUDA device (torch.cuda.is_available() is "
                 "False). It measures GPU memory and kernels; run benchmarks/gpu_check.sh on a "
                 "machine with an NVIDIA GPU.")


def cuda_tests(seconds: int) -> dict:
    """tests/test_cuda.py in a subprocess, with its outcome per test."""
    import xml.etree.ElementTree as ET

    junit = os.path.join(ROOT, ".gpu_check_junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/test_cuda.py", f"--junitxml={junit}"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=seconds)
        rc, tail = proc.returncode, proc.stdout[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", (e.stdout or b"")[-3000:].decode(errors="replace")
    tests = {}
    if os.path.exists(junit):
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = f"{tag}: {(node.get('message') or '')[:300]}"
            tests[case.get("name")] = outcome
        os.remove(junit)
    return {"returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "tests": tests,
            "output_tail": tail}


def planned(arch: str) -> dict | None:
    path = os.path.join(HERE, "results", "memory_plan.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("cells", {}).get(f"{arch}/dmd2_lora/w1/b1/ckpt")


def dmd2_step(arch: str, deadline: float) -> dict:
    import torch
    from memory_plan import TRAIN_CFG, build_setup, make_batch

    from diffusion_distill.acceleration import available_backends, set_attention_backend
    from diffusion_distill.step import build_optimizers, train_step

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run = build_setup(arch, "dmd2_lora", True, torch.bfloat16, "cuda")
    data = make_batch(run, 1, "cuda")
    run.objective.setup(run.nets)
    optimizers = build_optimizers(run.objective, run.nets, TRAIN_CFG)
    result = {"what": run.arch["what"], "base_params": run.base_params,
              "build_seconds": round(time.perf_counter() - t0, 1),
              "weights_gb": round(torch.cuda.memory_allocated() / 1e9, 3), "backends": {}}
    plan = planned(arch)
    result["planned_peak_gb"] = plan.get("planned_peak_gb") if plan else None
    backends = [b for b in available_backends("cuda", run.base) if b not in SKIP_BACKENDS]
    for backend in backends:
        if time.perf_counter() > deadline:
            result["backends"][backend] = {"skipped": "time budget spent"}
            continue
        entry = {}
        try:
            set_attention_backend(run.base, backend, "cuda")
            torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                logs = train_step(run.objective, run.nets, optimizers, lambda rng, n: data,
                                  0, TRAIN_CFG, local_batch=1, device="cuda")
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            peak = torch.cuda.max_memory_allocated() / 1e9
            entry = {"step_seconds": [round(x, 3) for x in times],
                     "median_timed_step_seconds": round(statistics.median(times[1:]), 3),
                     "max_memory_allocated_gb": round(peak, 3),
                     "losses": {k: v for k, v in logs.items() if k.startswith("loss/")}}
            if result["planned_peak_gb"]:
                entry["measured_over_planned"] = round(peak / result["planned_peak_gb"], 3)
        except Exception as e:  # noqa: BLE001  (record it; the other backends go on)
            entry = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        result["backends"][backend] = entry
        print(f"[{arch}] {backend}: {entry}", flush=True)
    return result  # the run's tensors go with this frame


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "gpu_check.json"))
    p.add_argument("--budget-seconds", type=float, default=470,
                   help="stop starting new measurements after this many seconds")
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args(argv)
    refuse_without_cuda()
    import torch

    start = time.perf_counter()
    deadline = start + args.budget_seconds
    out = {"what": "CUDA-only tests; one DMD2-LoRA step (bf16 base, fp32 adapters, r=16, "
                   "gradient checkpointing, batch 1, random weights) at SDXL-1024 and "
                   "Flux-1024 per attention backend",
           **provenance("gpu_check.py", argv),
           "machine_details": {"gpu": torch.cuda.get_device_name(0),
                       "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory
                                              / 1e9, 1),
                       "torch": torch.__version__, "cuda": torch.version.cuda,
                       "python": platform.python_version()}}
    if not args.skip_tests:
        out["cuda_tests"] = cuda_tests(seconds=150)
        write_json(args.out, out)
    out["dmd2_lora_step"] = {}
    for arch in ARCHS:
        if time.perf_counter() > deadline:
            out["dmd2_lora_step"][arch] = {"skipped": "time budget spent"}
            continue
        try:
            out["dmd2_lora_step"][arch] = dmd2_step(arch, deadline)
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            out["dmd2_lora_step"][arch] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        write_json(args.out, out)
    out["seconds"] = round(time.perf_counter() - start, 1)
    write_json(args.out, out)
    print(f"wrote {args.out} in {out['seconds']} s")


if __name__ == "__main__":
    main()
