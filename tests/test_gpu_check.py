"""The GPU check refuses clearly, before any work, on a machine without a GPU (this one)."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
@pytest.mark.parametrize("entry", ["sh", "py"])
def test_gpu_check_refuses_without_cuda_and_writes_nothing(entry, tmp_path):
    out = tmp_path / "gpu.json"
    cmd = (["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out)] if entry == "sh"
           else [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"),
                 "--out", str(out)])
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode != 0
    assert "refused" in proc.stderr and "no CUDA device" in proc.stderr, proc.stderr
    assert "NVIDIA GPU" in proc.stderr  # says what to do
    assert not out.exists()
