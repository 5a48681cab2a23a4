import os

import pytest
import torch

# Tiny models run fastest single-threaded (thread overhead dominates), and CI has 2 cores.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny SD pipeline saved with save_pretrained, as a user's teacher folder would be."""
    from diffusion_distill.tiny import tiny_sd

    path = tmp_path_factory.mktemp("tiny_sd")
    tiny_sd().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    from diffusion_distill.tiny import tiny_sd3

    path = tmp_path_factory.mktemp("tiny_sd3")
    tiny_sd3().save_pretrained(path)
    return str(path)


PROMPTS = ["a red circle", "a blue square", "two green triangles", "a small yellow circle"]


def tiny_recipe(teacher_path, out_dir, method=None, **train):
    return {
        "name": "tiny",
        "teacher": {"path": teacher_path, "guidance": 3.0},
        "student": {"rank": 4, "num_steps": 1},
        "method": method or {"name": "dmd2", "critic_steps": 2},
        "data": {"source": "prompts", "prompts": PROMPTS},
        "train": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 1,
                  "device": "cpu", **train},
        "output": {"dir": str(out_dir)},
    }
