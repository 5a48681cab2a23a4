"""The benchmark's markdown table and its overview image of samples."""
from __future__ import annotations

import os

from .spec import METRICS


def failure_reason(r: dict) -> str | None:
    """Why a cell is incomplete, in one line: its error, else its first failed batch's."""
    why = r.get("error") or next((f.get("error") for f in r.get("failures") or []), None) \
        or r.get("alignment_error")
    return " ".join(str(why).replace("|", "/").split())[:300] if why else None


def markdown_table(summary: dict, metrics=METRICS) -> str:
    proto = summary["protocol"]
    standard = proto.get("protocol") == "standard"
    if standard:
        metrics = proto["metrics"]
    cols = ["model", "steps", "guidance", "NFE"]
    for m in metrics:
        cols += {"fd": ["FD"], "fd_teacher": ["FD to teacher"], "kid": ["KID x1e3"], "precision": ["precision"],
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
        ref = next((r["fd_teacher_reference"] for r in summary["cells"]
                    if r.get("fd_teacher_reference")), None)
        if ref:
            about += (f" FD to teacher: to the samples of cell `{ref}` (same prompts and "
                      "seeds, same feature space).")
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
            if m in ("fd", "fd_teacher"):
                row.append(num(r.get(m), ".2f"))
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
            samples += " (incomplete" + (f": {why}" if (why := failure_reason(r)) else "") + ")"
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
