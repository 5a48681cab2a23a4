"""The benchmark's figures (matplotlib, optional): metrics against NFE, FD during training,
alignment against recall, speedup against the NFE ratio."""
from __future__ import annotations

import json
import os

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


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
    * ``fd_vs_step.png``: FD, FD to the teacher, alignment, recall and the worst class share
      (mode coverage) of each student during training, from run logs;
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
    space = next((r.get("feature_space") for r in [*rows, *(x for v in (logs or {}).values()
                                                             for x in v)]
                  if r.get("feature_space")), "?")
    real = next((r for r in rows if r.get("model_kind") == "real" and r.get("complete")), None)
    scored = [r for r in rows if r.get("nfe") and r.get("complete")]
    models = list(dict.fromkeys(r["model"] for r in scored))

    def value(r, m):
        if m in ("alignment", "worst_share"):  # both come from the attribute classifier
            return (r.get("alignment") or {}).get("whole_prompt" if m == "alignment" else m)
        return r.get(m)

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
        n = next((r.get("num_samples") for v in curves.values() for r in v
                  if r.get("num_samples")), "?")
        panels = [("fd", f"FD ({space}, n={n}) during training")]
        if any(r.get("fd_teacher") is not None for v in curves.values() for r in v):
            panels.append(("fd_teacher", "FD to the teacher's samples during training"))
        panels += [("alignment", "alignment during training"), ("recall", "recall")]
        if any(value(r, "worst_share") is not None for v in curves.values() for r in v):
            # mode coverage: the class produced least often, as a fraction of how often asked
            panels.append(("worst_share", "worst class share (got / asked)"))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6))
        for name, log_rows in curves.items():
            for ax, (m, _) in zip(axes, panels):
                pts = [(r["step"], value(r, m)) for r in log_rows if value(r, m) is not None]
                if pts:
                    ax.plot(*zip(*pts), "o-", label=name)
        for ax, (_, label) in zip(axes, panels):
            ax.set_xlabel("training step")
            ax.set_title(label, fontsize=9)
        axes[-1].legend(fontsize=7)
        save(fig, "fd_vs_step.png")
    return written
