"""Several processes: a real 2-process launch (torchrun, gloo on CPU) equals one process with
the same global batch, in its weights and in its logged values; a launch that asks for two
processes and starts one is refused with the command that works."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_recipe
from safetensors.torch import load_file

from diffusion_distill.checkpoint import latest_checkpoint
from diffusion_distill.parallel import _launcher_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(launcher, recipe, tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = launcher + ["-m", "diffusion_distill.cli", "train", str(path), "--no-progress"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600,
                          check=False)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k != "seconds_per_step"} for r in rows]


def test_two_processes_match_one(tiny_sd_path, tmp_path):
    """torchrun --nproc_per_node 2 gives the 1-process result (same global batch): weights,
    and every logged value (each the mean over both processes, not rank 0's half)."""
    runs, logs = {}, {}
    for n in (1, 2):
        recipe = tiny_recipe(tiny_sd_path, tmp_path / f"p{n}", steps=2, checkpoint_every=2,
                             batch_size=4)
        launcher = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                    "--master_port", str(29511 + n)]
        out = _launch(launcher, recipe, tmp_path, f"p{n}")
        assert out.returncode == 0, out.stderr[-3000:]
        # two processes really ran (a launcher can silently start one)
        assert ("2 processes, train.parallel=ddp" in out.stdout) == (n == 2), out.stdout[-2000:]
        runs[n] = load_file(os.path.join(latest_checkpoint(recipe["output"]["dir"]),
                                         "weights.safetensors"))
        logs[n] = _metrics(recipe["output"]["dir"])
    assert set(runs[1]) == set(runs[2])
    for k in runs[1]:
        torch.testing.assert_close(runs[1][k], runs[2][k], rtol=1e-4, atol=1e-5)
    # both runs trained: LoRA B starts at zero, so equal untrained runs would show zeros here
    for role in ("student", "critic", "ema"):
        assert any(k.startswith(role + "/") and "lora_B" in k and v.abs().max() > 0
                   for k, v in runs[1].items()), f"the {role} weights never moved"
    assert [sorted(r) for r in logs[1]] == [sorted(r) for r in logs[2]]
    for one, two in zip(logs[1], logs[2]):
        for k in one:
            assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-7), k


def test_a_launch_that_starts_one_of_two_processes_is_refused(tiny_sd_path, tmp_path):
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", steps=2)
    launcher = [PY, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = _launch(launcher, recipe, tmp_path, "one")
    assert out.returncode != 0
    assert "asked for 2 processes but started only this one" in out.stderr, out.stderr[-2000:]
    assert "torchrun --nproc_per_node 2 -m diffusion_distill.cli train RECIPE" in out.stderr
    assert not os.path.exists(os.path.join(recipe["output"]["dir"], "checkpoints"))


def test_the_launchers_process_count_is_read_from_its_command_line(tmp_path):
    config = tmp_path / "8gpu.yaml"
    config.write_text("num_processes: 8\n")
    assert _launcher_processes(["python", "-m", "accelerate.commands.launch",
                                "--num_processes", "2", "-m", "x"]) == 2
    assert _launcher_processes(["python", "/venv/bin/accelerate", "launch",
                                "--num_processes=3", "x.py"]) == 3
    assert _launcher_processes(["python", "/venv/bin/accelerate", "launch", "--config_file",
                                str(config), "-m", "x"]) == 8
    assert _launcher_processes(["torchrun", "--nproc_per_node", "2", "-m", "x"]) is None
    assert _launcher_processes(["bash"]) is None
