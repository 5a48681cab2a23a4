"""``ddistill bench SPEC``: the teacher and every student, same prompts, seeds and metrics.

A spec (YAML, see ``benchmarks/specs/``) names a teacher, the step counts to run it at, and
the student exports to compare with it. Each (model, steps, guidance) is a *cell*; every cell
is scored by :func:`diffusion_distill.eval.evaluate.evaluate` under one shared protocol (the
world's evaluation prompts, seeds ``seed .. seed+num-1``, the same cached reference features,
the same feature space). Each finished cell is written to ``OUT/cells/<cell>.json`` at once,
so an interrupted benchmark resumes where it stopped: a cell whose file is complete and was
made under the same protocol is not run again. At the end ``OUT/results.json`` gathers every
cell and ``OUT/results.md`` tables them; ``OUT/grids/`` holds sample grids.

Each cell is also timed at batch sizes 1 and 16 (``latency``; the speedup over the teacher's
default sampler sits beside the NFE ratio), and PNG plots are drawn: metrics against NFE, FD
against training step (from each export's run log), alignment against recall, speedup.

Reported distances are in the EfficientNet-Lite0 feature space named in every row: they are
NOT Inception FIDs. A spec's ``standard:`` section switches to the standard protocol instead
(Inception FID with clean resizing and CLIP score from local weights, COCO-style prompt
files: :mod:`diffusion_distill.eval.standard`).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import time

import torch

SPEC_KEYS = {
    "name": "benchmark name (default: the spec file's name)",
    "teacher": "pipeline folder or embedded:sd / embedded:sd3",
    "teacher_steps": "list of step counts to run the teacher at, e.g. [50, 4, 2, 1]",
    "teacher_guidance": "teacher CFG scale (default: the pipeline's own)",
    "exports": "list of student exports: a path, or {name, path, steps, guidance}",
    "prompts": "world evaluation prompt set: single, pair or count",
    "seed": "first seed; sample i uses seed + i (default 0)",
    "num_samples": "samples per cell (default 1000)",
    "feature_size": "feature network input size in px (default 128)",
    "batch_size": "prompts per pipeline call (default 50)",
    "metrics": "table columns, from fd, kid, precision, recall, alignment (default all)",
    "real_baseline": "also score fresh real renders, the metrics' floor (default true)",
    "latency": "{batch_sizes: [1, 16], repeats: 3} timed sampling per model; false: none",
    "standard": ("the standard protocol instead of the world's: {prompts, num_samples, "
                 "inception, clip, reference, fid_backend, metrics} (Inception FID, CLIP score)"),
    "out": "output folder (default benchmarks/results/<name>)",
}
METRICS = ("fd", "kid", "precision", "recall", "alignment")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmark a teacher and its students on one protocol",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("spec", help="a benchmark spec YAML (see benchmarks/specs/)")
    p.add_argument("--out", default=None, help="output folder (overrides the spec's out)")
    p.add_argument("--cache-dir", default=None, help="where reference features are cached")
    p.add_argument("--rerun", action="store_true", help="run every cell again, ignoring "
                                                        "finished cell files")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli)


# -- the spec ------------------------------------------------------------------------------
def load_spec(path: str) -> dict:
    from .recipe import yaml_load

    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark spec {path!r} does not exist; expected a YAML file "
                                "such as benchmarks/specs/embedded_sd.yaml")
    with open(path) as f:  # a syntax error names the file, line and column
        spec = yaml_load(f.read(), path) or {}
    if not isinstance(spec, dict):
        # ValueError, not TypeError: the CLI shows ValueErrors to people without a traceback.
        raise ValueError(f"benchmark spec {path!r} must be a YAML mapping, got "  # noqa: TRY004
                         f"{type(spec).__name__}")
    spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return normalize_spec(spec, path)


def normalize_spec(spec: dict, where: str = "the spec") -> dict:
    """Check a spec dict and fill in its defaults (also for specs built in code).

    Relative model paths stay relative to where the command runs, like every CLI path.
    """
    spec = dict(spec)
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        allowed = "\n".join(f"  {k}: {v}" for k, v in SPEC_KEYS.items())
        raise ValueError(f"unknown key(s) {unknown} in {where}; a spec may hold:\n{allowed}")
    if not spec.get("teacher") and not spec.get("exports"):
        raise ValueError(f"{where} names neither a teacher nor exports; give at least one")
    spec.setdefault("name", "bench")
    spec.setdefault("teacher_steps", [50])
    spec.setdefault("exports", [])
    spec.setdefault("prompts", "single")
    spec.setdefault("seed", 0)
    spec.setdefault("num_samples", 1000)
    spec.setdefault("feature_size", 128)
    spec.setdefault("batch_size", 50)
    spec.setdefault("metrics", list(METRICS))
    spec.setdefault("real_baseline", True)
    latency = spec.setdefault("latency", {})
    if latency not in (False, None):
        if not isinstance(latency, dict) or set(latency) - {"batch_sizes", "repeats"}:
            raise ValueError(f"latency in {where} must be false or a mapping with batch_sizes "
                             f"and repeats, got {latency!r}")
        latency = {"batch_sizes": [int(b) for b in latency.get("batch_sizes", [1, 16])],
                   "repeats": int(latency.get("repeats", 3))}
        if min(latency["batch_sizes"], default=0) < 1 or latency["repeats"] < 1:
            raise ValueError(f"latency in {where}: batch sizes and repeats must be >= 1, got "
                             f"{latency}")
        spec["latency"] = latency
    bad = [m for m in spec["metrics"] if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad} in {where}; available: {list(METRICS)}")
    if isinstance(spec["teacher_steps"], int):
        spec["teacher_steps"] = [spec["teacher_steps"]]
    if spec.get("standard") is not None and not isinstance(spec["standard"], dict):
        raise ValueError(f"standard in {where} must be a mapping (prompts, inception, clip, "
                         f"reference, ...), got {spec['standard']!r}")
    return spec


def cells_of(spec: dict) -> list[dict]:
    """Every (model, steps, guidance) to evaluate, teacher first, in spec order."""
    cells = []
    if spec.get("real_baseline") and not spec.get("standard"):
        # Real images from another seed, scored like a model: the best any model can reach at
        # this sample count (FD is biased upward at finite n, recall below 1).
        cells.append({"model": "real-data", "path": None, "steps": 0, "guidance": None})
    if spec.get("teacher"):
        for steps in spec["teacher_steps"]:
            cells.append({"model": "teacher", "path": spec["teacher"], "steps": int(steps),
                          "guidance": spec.get("teacher_guidance")})
    for i, e in enumerate(spec["exports"]):
        e = {"path": e} if isinstance(e, str) else dict(e)
        if "path" not in e:
            raise ValueError(f"export #{i} in the spec has no path: {e}")
        name = e.get("name") or os.path.basename(os.path.normpath(e["path"]))
        steps = e.get("steps")
        for s in (steps if isinstance(steps, list) else [steps]):
            cells.append({"model": name, "path": e["path"], "steps": s,
                          "guidance": e.get("guidance"), "teacher": spec.get("teacher")})
    for c in cells:
        g = "default" if c["guidance"] is None else f"{c['guidance']:g}"
        s = "own" if c["steps"] is None else c["steps"]
        c["id"] = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{c['model']}-steps{s}-cfg{g}")
    ids = [c["id"] for c in cells]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"cells {dupes} appear twice; give each export a distinct name")
    return cells


# -- running -------------------------------------------------------------------------------
def model_fingerprint(path: str | None) -> str | None:
    """What identifies a model's weights for reusing a finished cell: the name, size and
    modification time of every weight and config file in its folder (cheap even for a
    multi-GB pipeline; a retrained or replaced model changes it)."""
    if path is None:
        return None
    from .eval.protocol import resolve_path as _resolve

    folder = _resolve(path)
    if not os.path.isdir(folder):
        return None
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.endswith((".safetensors", ".bin", ".json", ".txt", ".model")):
                st = os.stat(os.path.join(root, name))
                rel = os.path.relpath(os.path.join(root, name), folder)
                h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _finished(path: str, protocol: dict) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            r = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    # Only a complete cell made under the very same protocol may be reused.
    same = all(r.get(k) == v for k, v in protocol.items())
    return r if r.get("complete") and same else None


def run_bench(spec: dict, out: str, cache_dir=None, rerun=False, progress=True,
              log=print) -> dict:
    from .checkpoint import check_output_dir
    from .eval.protocol import Protocol, evaluate_loaded, write_json
    from .world.data import save_grid

    spec = normalize_spec(spec)  # specs built in code get the same checks and defaults
    cells = cells_of(spec)
    # An earlier benchmark's folder (resumed), a new or an empty one: never someone else's.
    if not os.path.isdir(os.path.join(out, "cells")):
        check_output_dir(out, ("results.json",), "benchmark output folder")
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    os.makedirs(os.path.join(out, "grids"), exist_ok=True)
    if spec.get("standard"):
        protocol = StandardProtocol(spec, out)
    else:
        protocol = Protocol(spec["num_samples"], spec["prompts"], spec["seed"],
                            spec["feature_size"], cache_dir)
    described = protocol.describe()
    results, loaded = {}, {}
    ran, t_start = 0, time.perf_counter()
    for k, c in enumerate(cells):
        cell_file = os.path.join(out, "cells", f"{c['id']}.json")
        # A cell is reused only for the very same weights: a model retrained at the same path
        # (or another export under the same name) is evaluated again.
        weights = model_fingerprint(c["path"])
        done = None if rerun else _finished(cell_file, {**described, "weights": weights})
        if done:
            log(f"[bench] {c['id']}: finished earlier, kept ({cell_file})")
            results[c["id"]] = done
            continue
        eta = ""
        if ran:  # cells differ in cost (50 steps vs 1); the mean so far is a rough guide
            left = (time.perf_counter() - t_start) / ran * (len(cells) - k)
            eta = f", about {left / 60:.0f} min left for the rest"
        n = len(protocol.prompts)
        log(f"[bench] cell {k + 1}/{len(cells)} {c['id']}: evaluating {n} samples{eta} ...")
        ran += 1
        t0 = time.perf_counter()
        try:
            if c["path"] is None:
                result, images = evaluate_real(protocol, spec["batch_size"], progress)
            else:
                model = _loaded_model(c, loaded)
                evaluate_fn = (protocol.evaluate_loaded if isinstance(protocol, StandardProtocol)
                               else evaluate_loaded)
                result, images = evaluate_fn(model, protocol, c["steps"], c["guidance"],
                                             spec["batch_size"], progress, name=c["model"])
        except Exception as e:  # noqa: BLE001
            # A broken export must not stop the other cells; the cell records why it failed.
            result, images = {"model": c["model"], "complete": False, **described,
                              "error": f"{type(e).__name__}: {e}"}, None
            log(f"[bench] {c['id']}: FAILED: {result['error']}")
        result.update({"cell": c["id"], "path": c["path"], "weights": weights,
                       "cell_seconds": time.perf_counter() - t0})
        if images is not None:
            grid = os.path.join(out, "grids", f"{c['id']}.png")
            save_grid(images, grid)
            result["grid"] = os.path.relpath(grid, out)
        write_json(cell_file, result)
        results[c["id"]] = result
    if spec["latency"]:
        for c in cells:
            if c["path"] is None or not results[c["id"]].get("complete"):
                continue
            results[c["id"]]["latency"] = _cell_latency(c, spec, out, protocol, loaded, rerun,
                                                        log)
    rows = [results[c["id"]] for c in cells]
    add_speedups(rows)
    summary = {"spec": spec, "protocol": described, "complete": all(r.get("complete")
                                                                    for r in rows),
               "machine": machine(), "cells": rows}
    write_json(os.path.join(out, "results.json"), summary)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown_table(summary, spec["metrics"]))
    overview(rows, out)
    plots(rows, out, run_logs(spec), log)
    return summary


class StandardProtocol:
    """The spec's ``standard:`` section as a bench protocol: the prompt file's prompts and
    seeds, samples written as PNG folders (``OUT/samples/<cell>/``, which clean-fid reads
    directly), Inception FID and CLIP score (:mod:`diffusion_distill.eval.standard`)."""

    def __init__(self, spec: dict, out: str):
        from .eval.standard import StandardConfig, load_prompts

        self.config = StandardConfig.from_dict(spec["standard"])
        self.seed, self.out = spec["seed"], out
        self.prompts = load_prompts(self.config.prompts, self.config.num_samples)

    def describe(self) -> dict:
        return self.config.describe(self.seed)

    def evaluate_loaded(self, loaded, protocol, steps=None, guidance=None, batch_size=16,
                        progress=True, name=None):
        import contextlib

        import numpy as np
        from PIL import Image

        from .eval.evaluate import NFECounter
        from .eval.protocol import backbone_of, make_sample_fn, model_head
        from .eval.standard import evaluate_standard, image_files

        call, pipe = loaded.call, loaded.pipe
        head, steps = model_head(loaded, steps, guidance, name)
        cell = f"{name}-steps{head['steps']}-cfg{head['guidance']}"
        folder = os.path.join(self.out, "samples", re.sub(r"[^A-Za-z0-9_.-]+", "_", cell))
        backbone = backbone_of(pipe)
        with NFECounter(backbone) if backbone is not None else contextlib.nullcontext() as n:
            result = evaluate_standard(make_sample_fn(call, steps, guidance), self.config,
                                       folder, seed=self.seed, batch_size=batch_size,
                                       progress=progress)
        if n is not None:
            result["nfe"] = n.evaluations / result["num_samples"]
        # The protocol's keys go in flat (describe()), as a finished cell is recognised by
        # them; the reference's details keep their own key.
        result.pop("protocol", None)
        result["reference_info"] = result.pop("reference", None)
        first = [np.asarray(Image.open(f).convert("RGB")) for f in image_files(folder)[:16]]
        images = torch.from_numpy(np.stack(first)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return {**head, **self.describe(), **result, "complete": True}, images

REAL_SEED_OFFSET = 1_000_000  # real-baseline renders never reuse the reference's seed


def evaluate_real(protocol, batch_size=50, progress=True):
    """Score fresh real renders of the protocol's prompts, exactly as a model is scored."""
    from .eval.evaluate import evaluate
    from .world.data import render_prompts

    first = protocol.seeds[0]

    def sample_fn(prompts, seeds):
        i = seeds[0] - first  # seeds are first, first+1, ...: their offset indexes the labels
        return render_prompts(protocol.labels[i:i + len(seeds)],
                              seed=REAL_SEED_OFFSET + seeds[0])

    result = evaluate(sample_fn, protocol.prompts, protocol.seeds,
                      reference_features=protocol.reference, labels=protocol.labels,
                      alignment_fn=protocol.alignment_fn, batch_size=batch_size,
                      extractor=protocol.extractor, nfe=0, progress=progress)
    images = result.pop("images")
    head = {"model": "real-data", "model_kind": "real", "pipeline": None, "steps": 0,
            "guidance": None, **protocol.describe()}
    return {**head, **result}, images


# -- latency -------------------------------------------------------------------------------
def _loaded_model(c: dict, loaded: dict):
    """The cell's model, from ``loaded`` when the previous cell used it. One model is held at
    a time, so a big teacher and a student never share RAM."""
    from .eval.protocol import load_model

    key = (c["path"], c.get("teacher"))
    if key not in loaded:
        loaded.clear()
        loaded[key] = load_model(c["path"], c.get("teacher") if c["model"] != "teacher"
                                 else None)
    return loaded[key]


def _cell_latency(c, spec, out, protocol, loaded, rerun, log) -> dict:
    """The cell's timings at each batch size, from its own file when made with the same
    settings (so a resumed benchmark does not time a finished cell again)."""
    from .eval.protocol import write_json

    path = os.path.join(out, "cells", f"{c['id']}.latency.json")
    settings = {**spec["latency"], "device": _device_name(),
                "weights": model_fingerprint(c["path"])}
    if not rerun and os.path.isfile(path):
        with open(path) as f:
            done = json.load(f)
        if done.get("settings") == settings:
            return done["by_batch_size"]
    model = _loaded_model(c, loaded)
    log(f"[bench] {c['id']}: timing batch sizes {spec['latency']['batch_sizes']} ...")
    by_bs = measure_latency(model, c["steps"], c["guidance"], protocol.prompts,
                            spec["latency"]["batch_sizes"], spec["latency"]["repeats"])
    write_json(path, {"settings": settings, "by_batch_size": by_bs})
    return by_bs


def _device_name() -> str:
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
    from .eval.protocol import backbone_of, make_sample_fn

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


def markdown_table(summary: dict, metrics=METRICS) -> str:
    proto = summary["protocol"]
    standard = proto.get("protocol") == "standard"
    if standard:
        metrics = proto["metrics"]
    cols = ["model", "steps", "guidance", "NFE"]
    for m in metrics:
        cols += {"fd": ["FD"], "kid": ["KID x1e3"], "precision": ["precision"],
                 "recall": ["recall"], "alignment": ["alignment"], "fid": ["FID"],
                 "clip_score": ["CLIP score"]}[m]
    cols += ["s/image", "samples"]
    if standard:
        space = next((r.get("feature_space") for r in summary["cells"]
                      if r.get("feature_space")), "Inception-v3")
        about = (f"Standard protocol: FID in **{space}** against `{proto['reference']}`, "
                 f"CLIP score with `{proto['clip']}`; prompts: the first "
                 f"{proto['num_samples'] or 'all'} of `{proto['prompts']}`, sample i with seed "
                 f"{proto['seed']} + i; samples in `samples/<cell>/` (a folder clean-fid reads).")
        requested = proto["num_samples"]
    else:
        about = (f"Feature space: **{proto['feature_space']}** (EfficientNet-Lite0 ImageNet "
                 "features; these are NOT Inception FID/KID values). Prompts: world "
                 f"`{proto['prompts']}` evaluation set; seeds {proto['seeds']['first']}.."
                 f"{proto['seeds']['first'] + proto['seeds']['count'] - 1}; reference: real "
                 f"renders of the same prompts (seed {proto['reference_seed']}).")
        requested = proto["seeds"]["count"]
    lines = [f"# {summary['spec']['name']}", "", about, "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    for r in summary["cells"]:
        kid = r.get("kid") or {}
        row = [r.get("model", "?"), str(r.get("steps", "-")), num(r.get("guidance"), "g"),
               num(r.get("nfe"), "g")]
        for m in metrics:
            if m == "fd":
                row.append(num(r.get("fd"), ".2f"))
            elif m == "kid":
                row.append(f"{num(1e3 * kid['mean'], '.2f')} ± {num(1e3 * kid['std'], '.2f')}"
                           if kid else "-")
            elif m == "alignment":
                row.append(num((r.get("alignment") or {}).get("whole_prompt"), ".3f"))
            elif m in ("fid", "clip_score"):
                row.append(num(r.get(m), ".2f"))
            else:
                row.append(num(r.get(m), ".3f"))
        samples = f"{r.get('num_samples', 0)}/{r.get('num_requested', requested) or '-'}"
        if not r.get("complete"):
            samples += " (incomplete" + (f": {r['error']}" if r.get("error") else "") + ")"
        row += [num(r.get("seconds_per_image"), ".4f"), samples]
        lines.append("| " + " | ".join(row) + " |")
    timed = [r for r in summary["cells"] if r.get("latency")]
    if timed:
        sizes = sorted({bs for r in timed for bs in r["latency"]}, key=int)
        head = ["model", "steps", "NFE", "NFE ratio"]
        for bs in sizes:
            head += [f"s/image @{bs}", f"images/s @{bs}", f"speedup @{bs}"]
        gpu = any("peak_memory_gb" in row for r in timed for row in r["latency"].values())
        if gpu:
            head += [f"peak GB @{bs}" for bs in sizes]
        lines += ["", "## Latency", "",
                  ("Wall time of the plain diffusers call (text encoding, sampling, VAE "
                   "decoding), median of repeated calls after a warm-up. Speedup is against the "
                   "teacher's first (default) sampler; the NFE ratio is what fewer steps alone "
                   "would predict."), "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in timed:
            row = [r.get("model", "?"), str(r.get("steps", "-")), num(r.get("nfe"), "g"),
                   num(r.get("nfe_ratio"), ".1f")]
            for bs in sizes:
                t = r["latency"].get(bs, {})
                row += [num(t.get("seconds_per_image"), ".4f"),
                        num(t.get("images_per_second"), ".1f"), num(t.get("speedup"), ".1f")]
            if gpu:
                row += [num(r["latency"].get(bs, {}).get("peak_memory_gb"), ".2f")
                        for bs in sizes]
            lines.append("| " + " | ".join(row) + " |")
    m = summary["machine"]
    lines += ["", (f"Machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} "
              f"({m['torch_threads']} threads), CUDA {'yes' if m['cuda'] else 'no'}. "
              "s/image is sampling wall time only.")]
    return "\n".join(lines) + "\n"


def overview(rows: list[dict], out: str, per_row: int = 8, scale: int = 3):
    """One PNG: a row of samples per cell, labelled (PIL only; matplotlib is not needed)."""
    from PIL import Image, ImageDraw

    strips = []
    for r in rows:
        if not r.get("grid"):
            continue
        grid = Image.open(os.path.join(out, r["grid"])).convert("RGB")
        # The first row of the saved grid is the first 8 samples (save_grid uses 8 per row).
        tile_h = grid.height // max(1, round(grid.height / (grid.width / per_row)))
        strips.append(((f"{r['model']}  steps={r.get('steps')}  NFE={r.get('nfe')}  "
                       f"FD={r.get('fd') if r.get('fd') is None else round(r['fd'], 2)}"),
                       grid.crop((0, 0, grid.width, tile_h))))
    if not strips:
        return None
    width = max(s.width for _, s in strips)
    label_h = 14
    canvas = Image.new("RGB", (width, sum(s.height + label_h for _, s in strips)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for label, strip in strips:
        draw.text((2, y + 1), label, fill="black")
        canvas.paste(strip, (0, y + label_h))
        y += strip.height + label_h
    path = os.path.join(out, "overview.png")
    canvas.save(path)
    return path


def run_logs(spec: dict) -> dict[str, list[dict]]:
    """Each export's training-time evaluations (``eval.jsonl``, written every
    ``train.eval_every`` steps): from the export's ``log`` entry, or beside the export in its
    run folder (``<run>/export`` -> ``<run>/eval.jsonl``)."""
    logs = {}
    for e in spec.get("exports", []):
        e = {"path": e} if isinstance(e, str) else e
        name = e.get("name") or os.path.basename(os.path.normpath(e["path"]))
        path = e.get("log") or os.path.join(os.path.dirname(os.path.normpath(e["path"])),
                                            "eval.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            logs[name] = [r for r in rows if "step" in r]
    return logs


def plots(rows: list[dict], out: str, logs: dict | None = None, log=print) -> list[str]:
    """The report's figures (PNG, matplotlib):

    * ``metrics_vs_nfe.png``: FD, alignment and recall against NFE, a line per model;
    * ``fd_vs_step.png``: FD (and alignment) of each student during training, from run logs;
    * ``alignment_vs_recall.png``: prompt following against diversity, a point per cell;
    * ``speedup_vs_nfe.png``: measured speedup over the teacher beside the NFE ratio.
    The real-data row is drawn as the floor (dashed) where it applies.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("[bench] matplotlib not installed (pip install 'diffusion_distill[plots]'): no "
            "plots; see results.md and overview.png")
        return []
    written = []
    space = next((r.get("feature_space") for r in rows if r.get("feature_space")), "?")
    real = next((r for r in rows if r.get("model_kind") == "real" and r.get("complete")), None)
    scored = [r for r in rows if r.get("nfe") and r.get("complete")]
    models = list(dict.fromkeys(r["model"] for r in scored))

    def value(r, m):
        return (r.get("alignment") or {}).get("whole_prompt") if m == "alignment" else r.get(m)

    def save(fig, name):
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    if scored:
        if any(r.get("fid") is not None or r.get("clip_score") is not None for r in scored):
            panels = (("fid", f"FID ({space})"), ("clip_score", "CLIP score"))
        else:
            panels = (("fd", f"Fréchet distance ({space}, not FID)"),
                      ("alignment", "whole-prompt alignment"), ("recall", "recall"))
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
        for ax, (m, label) in zip(axes, panels):
            for i, model in enumerate(models):
                pts = sorted((r["nfe"], value(r, m)) for r in scored
                             if r["model"] == model and value(r, m) is not None)
                if pts:  # a marker per model: 1-step students often sit on the same spot
                    ax.plot(*zip(*pts), MARKERS[i % len(MARKERS)] + "-", label=model,
                            alpha=0.8)
            if real and value(real, m) is not None:
                ax.axhline(value(real, m), ls="--", c="gray", lw=1, label="real data")
            ax.set_xscale("log")
            ax.set_xlabel("NFE per image")
            ax.set_title(label, fontsize=9)
        axes[-1].legend(fontsize=7)
        save(fig, "metrics_vs_nfe.png")

        fig, ax = plt.subplots(figsize=(5, 4))
        for r in scored:
            if r.get("recall") is not None and value(r, "alignment") is not None:
                ax.scatter(r["recall"], value(r, "alignment"))
                ax.annotate(f"{r['model']} ({r['nfe']:.0f})", (r["recall"], value(r, "alignment")),
                            fontsize=7)
        ax.set_xlabel("recall (diversity)")
        ax.set_ylabel("whole-prompt alignment")
        ax.set_title("alignment vs recall (NFE in brackets)", fontsize=9)
        save(fig, "alignment_vs_recall.png")

    timed = [r for r in rows if r.get("latency") and r.get("nfe_ratio")]
    if timed:
        fig, ax = plt.subplots(figsize=(5, 4))
        for bs in sorted({bs for r in timed for bs in r["latency"]}, key=int):
            pts = sorted((r["nfe_ratio"], r["latency"][bs]["speedup"]) for r in timed
                         if bs in r["latency"] and r["latency"][bs].get("speedup"))
            if pts:
                ax.plot(*zip(*pts), "o", label=f"batch {bs}")
        top = max(r["nfe_ratio"] for r in timed)
        ax.plot([1, top], [1, top], ls="--", c="gray", lw=1, label="speedup = NFE ratio")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE ratio (teacher / model)")
        ax.set_ylabel("measured speedup per image")
        ax.legend(fontsize=7)
        save(fig, "speedup_vs_nfe.png")

    curves = {k: v for k, v in (logs or {}).items() if any(r.get("fd") is not None for r in v)}
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for name, log_rows in curves.items():
            pts = [(r["step"], r.get("fd"), value(r, "alignment")) for r in log_rows]
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=name)
        n = next((r.get("num_samples") for v in curves.values() for r in v
                  if r.get("num_samples")), "?")
        for ax, label in zip(axes, (f"FD ({space}, n={n}) during training",
                                    "alignment during training")):
            ax.set_xlabel("training step")
            ax.set_title(label, fontsize=9)
        axes[1].legend(fontsize=7)
        save(fig, "fd_vs_step.png")
    return written


def _cli(args) -> int:
    spec = load_spec(args.spec)
    out = args.out or spec.get("out") or os.path.join("benchmarks", "results", spec["name"])
    summary = run_bench(spec, out, cache_dir=args.cache_dir, rerun=args.rerun,
                        progress=not args.no_progress)
    with open(os.path.join(out, "results.md")) as f:
        print(f.read())
    print(f"wrote {out}/results.json, results.md, cells/, grids/")
    if not summary["complete"]:
        bad = [r["cell"] for r in summary["cells"] if not r.get("complete")]
        print(f"ddistill bench: INCOMPLETE cells: {bad}; rerun the same command to retry them "
              "(finished cells are kept)", file=sys.stderr)
        return 1
    return 0
