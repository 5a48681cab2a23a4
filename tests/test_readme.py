"""The README's Python code runs as written: its blocks are extracted and executed, the
plain-diffusers one against real exports of the embedded teachers (one LoRA, a multi-step
flow student re-noised from the global RNG, and per-phase experts), so the documentation
cannot drift from the code."""
import os
import re

import numpy as np
import pytest
import torch

from diffusion_distill.train import train

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def python_blocks() -> list[str]:
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.DOTALL)


def _block(marker: str) -> str:
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"expected one README python block with {marker!r}"
    return found[0]


def test_every_python_block_is_covered():
    blocks = python_blocks()
    assert len(blocks) == 3, "a new README python block needs a test here"
    assert sum("distill_config.json" in b for b in blocks) == 1
    assert sum("custom_teacher" in b for b in blocks) == 1
    assert sum("data=samples" in b for b in blocks) == 1


def _export(tmp_path, teacher, method, num_steps):
    recipe = {
        "name": "readme", "teacher": {"path": teacher, "guidance": 3.0},
        "student": {"rank": 4, "num_steps": num_steps}, "method": method,
        "data": {"source": "prompts", "prompts": ["a red circle", "a blue square"]},
        "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1,
                  "device": "cpu"},
        "output": {"dir": str(tmp_path / "run")},
    }
    run_dir = train(recipe, progress=False)
    os.rename(os.path.join(run_dir, "export"), tmp_path / "my_student")


@pytest.mark.parametrize("teacher,method,num_steps", [
    ("embedded:sd", {"name": "dmd2", "critic_steps": 1}, 1),
    ("embedded:sd3", {"name": "dmd2", "critic_steps": 1}, 2),
    ("embedded:sd", {"name": "phased_dmd", "critic_steps": 1}, 2),
], ids=["sd-1step", "sd3-2step-flow", "sd-phased-experts"])
def test_plain_diffusers_block_runs_and_matches_load_student(teacher, method, num_steps,
                                                              tmp_path, monkeypatch):
    _export(tmp_path, teacher, method, num_steps)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1234)  # whatever the global RNG state, the seed fixes the images
    scope = {}
    exec(compile(_block("distill_config.json"), "README.md", "exec"), scope)  # noqa: S102  (the README is ours)
    plain, again = np.asarray(scope["image"]), np.asarray(scope["again"])
    assert plain.shape == again.shape and plain.ndim == 3
    # the same uint8 image, up to rounding of float noise at a level boundary
    assert np.abs(plain.astype(int) - again.astype(int)).max() <= 1
    # ``ddistill sample``'s function: the same seed, the same images, whatever the global RNG
    from diffusion_distill.sample import sample

    torch.manual_seed(1)
    first = sample("my_student", ["a red circle", "a blue square"], seed=0)
    torch.manual_seed(2)
    second = sample("my_student", ["a red circle", "a blue square"], seed=0)
    torch.testing.assert_close(first, second)


def test_custom_teacher_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(_block("custom_teacher"), "README.md", "exec"), scope)  # noqa: S102  (the README is ours)
    assert os.path.isdir(scope["run_dir"])
    # the next block goes on from the first one's teacher and recipe: a data method on the
    # user's own samples (fails if train() had no data= or the custom teacher refused it)
    scope["recipe"]["train"]["steps"] = 20
    exec(compile(_block("data=samples"), "README.md", "exec"), scope)  # noqa: S102  (the README is ours)
    assert os.path.isfile(os.path.join(scope["run_dir"], "metrics.jsonl"))
