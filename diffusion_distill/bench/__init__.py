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

from .cli import add_parser
from .latency import add_speedups, machine, measure_latency
from .plots import plots, run_logs
from .report import markdown_table, overview
from .run import evaluate_real, model_fingerprint, run_bench
from .spec import METRICS, SPEC_KEYS, cells_of, load_spec, normalize_spec
from .standard_protocol import StandardProtocol

__all__ = ["METRICS", "SPEC_KEYS", "StandardProtocol", "add_parser", "add_speedups",
           "cells_of", "evaluate_real", "load_spec", "machine", "markdown_table",
           "measure_latency", "model_fingerprint", "normalize_spec", "overview", "plots",
           "run_bench", "run_logs"]
