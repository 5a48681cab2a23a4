"""Running a benchmark: each cell evaluated once under one protocol, written as it finishes
(resumable), then the latency, the table, the overview and the plots."""
from __future__ import annotations

import json
import os
import time

from safetensors.torch import save_file

from ..checkpoint import atomic_file, atomic_path
from ..eval.protocol import model_fingerprint
from .latency import add_speedups, device_name, machine, measure_latency
from .plots import plots, run_logs
from .report import markdown_table, overview
from .spec import cells_of, check_models, normalize_spec
from .standard_protocol import StandardProtocol


def features_path(out: str, cell_id: str) -> str:
    """Where a cell's sample features are kept (world protocol): every other cell's
    FD-to-teacher is computed from them without sampling again."""
    return os.path.join(out, "features", f"{cell_id}.safetensors")


def _finished(path: str, protocol: dict, features: str | None = None) -> dict | None:
    if not os.path.isfile(path) or (features and not os.path.isfile(features)):
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
    from ..checkpoint import check_output_dir
    from ..eval.protocol import Protocol, evaluate_loaded, write_json
    from ..world.data import save_grid

    spec = normalize_spec(spec)  # specs built in code get the same checks and defaults
    cells = cells_of(spec)
    check_models(spec, cells)  # a broken export is refused now, not after hours of cells
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
    standard = isinstance(protocol, StandardProtocol)
    results, loaded = {}, {}
    ran, t_start = 0, time.perf_counter()
    for k, c in enumerate(cells):
        cell_file = os.path.join(out, "cells", f"{c['id']}.json")
        # A cell is reused only for the very same weights: a model retrained at the same path
        # (or another export under the same name) is evaluated again.
        weights = model_fingerprint(c["path"])
        feats_file = None if standard else features_path(out, c["id"])
        done = None if rerun else _finished(cell_file, {**described, "weights": weights},
                                            feats_file)
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
                result, images = evaluate_real(protocol, spec["batch_size"], progress,
                                               return_features=True)
            elif standard:
                result, images = protocol.evaluate_loaded(
                    _loaded_model(c, loaded), protocol, c["steps"], c["guidance"],
                    spec["batch_size"], progress, name=c["model"])
            else:
                result, images = evaluate_loaded(
                    _loaded_model(c, loaded), protocol, c["steps"], c["guidance"],
                    spec["batch_size"], progress, name=c["model"], return_features=True)
        except Exception as e:  # noqa: BLE001
            # A broken export must not stop the other cells; the cell records why it failed.
            result, images = {"model": c["model"], "complete": False, **described,
                              "error": f"{type(e).__name__}: {e}"}, None
            log(f"[bench] {c['id']}: FAILED: {result['error']}")
        result.update({"cell": c["id"], "path": c["path"], "weights": weights,
                       "cell_seconds": time.perf_counter() - t0})
        feats = result.pop("features", None)
        if feats is not None and len(feats):
            with atomic_path(feats_file) as tmp:
                save_file({"features": feats.contiguous()}, tmp)
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
    if not standard:
        add_fd_to_teacher(rows, out)
    add_speedups(rows)
    summary = {"spec": spec, "protocol": described, "complete": all(r.get("complete")
                                                                    for r in rows),
               "machine": machine(), "cells": rows}
    write_report(summary, out, run_logs(spec), log)
    return summary


def write_report(summary: dict, out: str, logs: dict | None = None, log=print):
    """A benchmark's folder-level files from its summary: ``results.json``, ``results.md``,
    ``overview.png`` and the plots (training curves from ``logs``)."""
    from ..eval.protocol import write_json

    write_json(os.path.join(out, "results.json"), summary)
    with atomic_file(os.path.join(out, "results.md")) as f:
        f.write(markdown_table(summary, summary["spec"]["metrics"]))
    overview(summary["cells"], out)
    plots(summary["cells"], out, logs, log)


REAL_SEED_OFFSET = 1_000_000  # real-baseline renders never reuse the reference's seed


def add_fd_to_teacher(rows: list[dict], out: str):
    """FD-to-teacher beside FD-to-data: each cell's Fréchet distance to the samples of the
    teacher's first (default) cell, same prompts and seeds, from the features every cell
    keeps. A student can sit far from the data and near its teacher (the teacher's own gap)
    or the other way round; only both numbers tell which."""
    from safetensors.torch import load_file

    from ..eval.evaluate import fd_to

    ref = next((r for r in rows if r.get("model_kind") == "teacher" and r.get("complete")), None)
    ref_file = ref and features_path(out, ref["cell"])
    if not ref_file or not os.path.isfile(ref_file):
        return
    target = load_file(ref_file)["features"]
    for r in rows:
        path = features_path(out, r.get("cell", ""))
        if r is ref or not r.get("complete") or not os.path.isfile(path):
            continue
        r["fd_teacher"] = fd_to(target, load_file(path)["features"])
        r["fd_teacher_reference"] = ref["cell"]


def evaluate_real(protocol, batch_size=50, progress=True, return_features=False):
    """Score fresh real renders of the protocol's prompts, exactly as a model is scored."""
    from ..eval.evaluate import evaluate
    from ..world.data import render_prompts

    first = protocol.seeds[0]

    def sample_fn(prompts, seeds):
        i = seeds[0] - first  # seeds are first, first+1, ...: their offset indexes the labels
        return render_prompts(protocol.labels[i:i + len(seeds)],
                              seed=REAL_SEED_OFFSET + seeds[0])

    result = evaluate(sample_fn, protocol.prompts, protocol.seeds,
                      reference_features=protocol.reference, labels=protocol.labels,
                      alignment_fn=protocol.alignment_fn, batch_size=batch_size,
                      extractor=protocol.extractor, nfe=0, progress=progress,
                      return_features=return_features)
    images = result.pop("images")
    head = {"model": "real-data", "model_kind": "real", "pipeline": None, "steps": 0,
            "guidance": None, **protocol.describe()}
    return {**head, **result}, images


def _loaded_model(c: dict, loaded: dict):
    """The cell's model, from ``loaded`` when the previous cell used it. One model is held at
    a time, so a big teacher and a student never share RAM."""
    from ..eval.protocol import load_model

    key = (c["path"], c.get("teacher"))
    if key not in loaded:
        loaded.clear()
        loaded[key] = load_model(c["path"], c.get("teacher") if c["model"] != "teacher"
                                 else None)
    return loaded[key]


def _cell_latency(c, spec, out, protocol, loaded, rerun, log) -> dict:
    """The cell's timings at each batch size, from its own file when made with the same
    settings (so a resumed benchmark does not time a finished cell again)."""
    from ..eval.protocol import write_json

    path = os.path.join(out, "cells", f"{c['id']}.latency.json")
    settings = {**spec["latency"], "device": device_name(),
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
