"""`ddistill bench` on a tiny random pipeline: cells, tables, and resuming without rework."""
import json

import pytest
import yaml


def test_bench_runs_cells_writes_tables_and_resumes(tiny_sd_path, tmp_path, capsys):
    from diffusion_distill.cli import main

    spec = {"name": "tiny", "teacher": tiny_sd_path, "teacher_steps": [1],
            "exports": [{"name": "missing", "path": str(tmp_path / "no_export")}],
            "num_samples": 8, "feature_size": 32, "batch_size": 8}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    argv = ["bench", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    # The missing export fails its own cell only; the command reports it and exits 1.
    assert main(argv) == 1
    out = tmp_path / "out"
    summary = json.loads((out / "results.json").read_text())
    cells = {c["cell"]: c for c in summary["cells"]}
    assert set(cells) == {"real-data-steps0-cfgdefault", "teacher-steps1-cfgdefault",
                          "missing-stepsown-cfgdefault"}
    real = cells["real-data-steps0-cfgdefault"]
    # fresh real renders: the floor no model can beat; far below a random pipeline's FD
    assert real["complete"] and real["nfe"] == 0
    assert real["alignment"]["whole_prompt"] == 1.0  # the classifier reads real renders right
    assert real["fd"] < cells["teacher-steps1-cfgdefault"]["fd"]
    assert cells["teacher-steps1-cfgdefault"]["nfe"] == 2  # 1 step x 2 (CFG)
    assert cells["teacher-steps1-cfgdefault"]["complete"]
    assert "does not exist" in cells["missing-stepsown-cfgdefault"]["error"]
    md = (out / "results.md").read_text()
    assert "NOT Inception" in md and md.count("| teacher |") == 1 and "incomplete" in md
    assert (out / "grids" / "teacher-steps1-cfgdefault.png").is_file()
    assert (out / "overview.png").is_file()

    # Second run: finished cells are read back, not recomputed.
    first = (out / "cells" / "teacher-steps1-cfgdefault.json").read_text()
    capsys.readouterr()
    assert main(argv) == 1
    log = capsys.readouterr().out
    assert log.count("finished earlier, kept") == 2
    assert (out / "cells" / "teacher-steps1-cfgdefault.json").read_text() == first


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
