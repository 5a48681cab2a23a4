"""`ddistill bench` on a tiny random pipeline: cells, tables, and resuming without rework."""
import json
import os
from pathlib import Path

import pytest
import yaml


def _export_for_another_base(tmp_path, teacher) -> str:
    """An export folder whose config and LoRA file are sound, for a base that is not
    ``teacher`` (its fingerprint differs): refused only when loaded."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "other_base"
    folder.mkdir()
    (folder / "distill_config.json").write_text(json.dumps({
        "format": 2, "scheduler": {"class": "LCMScheduler", "config": {}},
        "teacher": {"path": teacher, "pretrained": teacher, "base_fingerprint": "0" * 16,
                    "pipeline_class": "StableDiffusionPipeline"},
        "call": {"num_inference_steps": 1, "guidance_scale": 1.0}}))
    save_file({"unet.conv_in.lora_A.weight": torch.zeros(1, 4)},
              str(folder / "pytorch_lora_weights.safetensors"))
    return str(folder)


def test_bench_runs_cells_writes_tables_and_resumes(tiny_sd_path, tmp_path, capsys):
    from diffusion_distill.cli import main

    spec = {"name": "tiny", "teacher": tiny_sd_path, "teacher_steps": [2, 1],
            "exports": [{"name": "missing", "path": str(tmp_path / "no_export")}],
            "num_samples": 8, "feature_size": 32, "batch_size": 8,
            "latency": {"batch_sizes": [1, 4], "repeats": 1}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    argv = ["bench", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    # A missing export is refused before the first cell: nothing is written.
    assert main(argv) == 2 and not (tmp_path / "out").exists()
    # A sound export for another base passes the checks but fails its own cell only; the
    # command reports it and exits 1.
    spec["exports"] = [{"name": "missing", "path": _export_for_another_base(tmp_path,
                                                                             tiny_sd_path)}]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(argv) == 1
    out = tmp_path / "out"
    summary = json.loads((out / "results.json").read_text())
    cells = {c["cell"]: c for c in summary["cells"]}
    assert set(cells) == {"real-data-steps0-cfgdefault", "teacher-steps2-cfgdefault",
                          "teacher-steps1-cfgdefault", "missing-stepsown-cfgdefault"}
    real = cells["real-data-steps0-cfgdefault"]
    # fresh real renders: the floor no model can beat; far below a random pipeline's FD
    assert real["complete"] and real["nfe"] == 0
    assert real["alignment"]["whole_prompt"] == 1.0  # the classifier reads real renders right
    assert real["fd"] < cells["teacher-steps1-cfgdefault"]["fd"]
    assert cells["teacher-steps1-cfgdefault"]["nfe"] == 2  # 1 step x 2 (CFG)
    assert cells["teacher-steps1-cfgdefault"]["complete"]
    assert "different base" in cells["missing-stepsown-cfgdefault"]["error"]
    # FD to the teacher's default (first) cell, from the features each cell keeps: the
    # random pipeline at 1 step lands far nearer its own 2-step samples than real renders do.
    one_step = cells["teacher-steps1-cfgdefault"]
    assert one_step["fd_teacher_reference"] == "teacher-steps2-cfgdefault"
    assert 0 < one_step["fd_teacher"] < real["fd_teacher"]
    assert "fd_teacher" not in cells["teacher-steps2-cfgdefault"]
    assert (out / "features" / "teacher-steps1-cfgdefault.safetensors").is_file()
    md = (out / "results.md").read_text()
    assert "FD to teacher" in md and "cell `teacher-steps2-cfgdefault`" in md
    assert "NOT Inception" in md and md.count("| teacher |") == 4 and "incomplete" in md  # 2 cells x 2 tables
    assert (out / "grids" / "teacher-steps1-cfgdefault.png").is_file()
    assert (out / "overview.png").is_file()
    for plot in ("metrics_vs_nfe.png", "alignment_vs_recall.png", "speedup_vs_nfe.png"):
        assert (out / plot).stat().st_size > 1000, plot

    # Latency at each batch size; speedups are against the first (default) teacher cell.
    two, one = cells["teacher-steps2-cfgdefault"], cells["teacher-steps1-cfgdefault"]
    assert set(one["latency"]) == {"1", "4"} and "latency" not in real
    assert two["latency"]["4"]["speedup"] == pytest.approx(1.0)
    assert one["nfe_ratio"] == pytest.approx(2.0)
    for bs in ("1", "4"):
        t = one["latency"][bs]
        assert t["images_per_second"] == pytest.approx(1 / t["seconds_per_image"])
        assert t["speedup"] == pytest.approx(two["latency"][bs]["seconds_per_image"]
                                             / t["seconds_per_image"])
    assert "## Latency" in md and "speedup @4" in md

    # Second run: finished cells are read back, not recomputed.
    first = (out / "cells" / "teacher-steps1-cfgdefault.json").read_text()
    capsys.readouterr()
    assert main(argv) == 1
    log = capsys.readouterr().out
    assert log.count("finished earlier, kept") == 3
    assert "timing" not in log  # latency files are reused too
    assert (out / "cells" / "teacher-steps1-cfgdefault.json").read_text() == first

    # New weights at the same path (a retrained model): its cells are evaluated again.
    unet = next((Path(tiny_sd_path) / "unet").glob("*.safetensors"))
    os.utime(unet, ns=(unet.stat().st_atime_ns, unet.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert main(argv) == 1
    log = capsys.readouterr().out
    assert log.count("finished earlier, kept") == 1  # only the real-data row
    assert log.count("timing") == 2


def test_bench_spec_errors(tmp_path):
    from diffusion_distill.bench import load_spec

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_spec(str(tmp_path / "none.yaml"))
    (tmp_path / "bad.yaml").write_text("teacher: x\nnfe_list: [1]\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_spec(str(tmp_path / "bad.yaml"))
    (tmp_path / "empty.yaml").write_text("num_samples: 8\n")
    with pytest.raises(ValueError, match="neither a teacher nor exports"):
        load_spec(str(tmp_path / "empty.yaml"))


def test_specs_built_in_code_get_defaults():
    """benchmarks/leaderboard.py passes a dict straight to run_bench: same checks, defaults."""
    from diffusion_distill.bench import cells_of, normalize_spec

    spec = normalize_spec({"teacher": "embedded:sd", "teacher_steps": 4})
    assert spec["seed"] == 0 and spec["feature_size"] == 128 and spec["num_samples"] == 1000
    assert [c["id"] for c in cells_of(spec)] == ["real-data-steps0-cfgdefault",
                                                 "teacher-steps4-cfgdefault"]
    with pytest.raises(ValueError, match="unknown key"):
        normalize_spec({"teacher": "x", "nfe": [1]})
    with pytest.raises(ValueError, match="batch sizes and repeats must be >= 1"):
        normalize_spec({"teacher": "x", "latency": {"batch_sizes": [0]}})
    assert normalize_spec({"teacher": "x", "latency": False})["latency"] is False


def test_training_curves_come_from_run_logs(tmp_path):
    """FD against training step is drawn from each export's eval.jsonl, with no sampling."""
    from diffusion_distill.bench import plots, run_logs

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    rows = [{"step": s, "fd": 100.0 / s, "fd_teacher": 50.0 / s, "recall": s / 600,
             "alignment": {"whole_prompt": s / 400, "worst_share": s / 500}}
            for s in (100, 200, 300)]
    (run / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    logs = run_logs({"exports": [{"name": "dmd2", "path": str(run / "export")},
                                 str(tmp_path / "elsewhere" / "export")]})
    assert list(logs) == ["dmd2"] and [r["step"] for r in logs["dmd2"]] == [100, 200, 300]
    written = plots([], str(tmp_path), logs, log=lambda *_: None)
    assert [p.rsplit("/", 1)[-1] for p in written] == ["fd_vs_step.png"]


def test_a_leaderboard_rerun_of_some_methods_keeps_the_others(tmp_path):
    """benchmarks/leaderboard.py reruns one method at a time: the teacher's aggregate keeps
    the cells and training curves of every method it did not rerun, replaces the rerun ones,
    and mixes nothing scored under another protocol. Catches the folder-level results and
    plots being rewritten with only the last invocation's methods, and curves stored where
    the bench then refuses its own output folder."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import leaderboard

    protocol = {"prompts": "single", "seeds": {"first": 0, "count": 8}}

    def cell(model, steps, fd):
        return {"cell": f"{model}-steps{steps}", "model": model, "steps": steps, "fd": fd,
                "complete": True}

    def summary(cells, names, proto=protocol):
        return {"protocol": proto, "spec": {"exports": [{"name": n, "path": f"/r/{n}"}
                                                        for n in names]}, "cells": cells}

    earlier = summary([cell("real-data", 0, 0.0), cell("teacher", 50, 1.0), cell("dmd2", 1, 5.0),
                       cell("ect", 1, 9.0), cell("ect", 2, 8.0), cell("sid", 1, 4.0)],
                      ["dmd2", "ect", "sid"])
    now = summary([cell("real-data", 0, 0.1), cell("teacher", 50, 1.1), cell("ect", 1, 3.0),
                   cell("ect", 2, 2.0)], ["ect"])
    merged = leaderboard.with_earlier_cells(now, earlier)
    assert [(c["model"], c["steps"], c["fd"]) for c in merged["cells"]] == [
        ("real-data", 0, 0.1), ("teacher", 50, 1.1), ("dmd2", 1, 5.0), ("ect", 1, 3.0),
        ("ect", 2, 2.0), ("sid", 1, 4.0)]
    assert [e["name"] for e in merged["spec"]["exports"]] == ["dmd2", "ect", "sid"]
    other = summary(earlier["cells"], ["dmd2"], {**protocol, "seeds": {"first": 0, "count": 4}})
    assert leaderboard.with_earlier_cells(now, other) is now

    run = tmp_path / "runs" / "ect_sd"
    run.mkdir(parents=True)
    (run / "eval.jsonl").write_text(json.dumps({"step": 150, "fd": 3.0}) + "\n")
    out = str(tmp_path / "results")
    leaderboard.save_curve("sd", "ect", str(run), out)
    leaderboard.save_curve("sd", "sid", str(tmp_path / "runs" / "gone"), out)  # no log: none
    assert leaderboard.stored_curves("sd", list(leaderboard.METHODS), out) == {
        "ect": [{"step": 150, "fd": 3.0}]}
    written = leaderboard.convergence_plot("sd", list(leaderboard.METHODS), out)
    assert written.endswith("convergence_sd_ect.png")  # never the full figure's name
    # the stored curves leave the teacher's bench folder to the bench, which refuses a new
    # folder holding files it did not write (a first leaderboard run into a fresh --out)
    from diffusion_distill.checkpoint import check_output_dir

    check_output_dir(os.path.join(out, "leaderboard", "sd"), ("results.json",), "bench")
