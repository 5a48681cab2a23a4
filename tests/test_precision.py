"""A bfloat16 frozen base with float32 LoRA roles (``train.base_dtype: bfloat16``).

Whether a bf16 base still learns is shown on the embedded teacher by the LCM learning test
(test_consistency, ``lcm-1-bf16``); here: the dtypes of every piece, the base's x0 against the
float32 base's, and a run that trains, checkpoints and exports in float32.
"""
from __future__ import annotations

import glob
import os

import pytest
import torch
from conftest import PROMPTS, tiny_recipe
from safetensors.torch import load_file

from diffusion_distill.build import setup_run
from diffusion_distill.checkpoint import latest_checkpoint
from diffusion_distill.recipe import load_recipe
from diffusion_distill.train import train


def _base(backbone):
    return [p for n, p in backbone.named_parameters() if "lora_" not in n]


def test_a_bfloat16_base_keeps_float32_roles_and_gives_the_float32_x0(tiny_sd_path, tmp_path):
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", base_dtype="bfloat16")
    teacher, objective, nets = setup_run(load_recipe(recipe))
    reference = setup_run(load_recipe(tiny_recipe(tiny_sd_path, tmp_path / "ref")))[0]
    assert {p.dtype for p in _base(teacher.backbone)} == {torch.bfloat16}
    assert {p.dtype for p in _base(reference.backbone)} == {torch.float32}
    assert {p.dtype for p in teacher.vae.parameters()} == {torch.bfloat16}
    for role in [*objective.roles, "ema"]:
        assert nets.params(role) and {p.dtype for p in nets.params(role)} == {torch.float32}

    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, *teacher.latent_shape, generator=g)
    t = torch.tensor([0.9, 0.6, 0.3, 0.1])
    with torch.no_grad():
        x0 = teacher.denoiser(x_t, t, teacher.prompts(PROMPTS))
        x0_ref = reference.denoiser(x_t, t, reference.prompts(PROMPTS))
    assert x0.dtype == torch.float32
    rel = float((x0 - x0_ref).norm() / x0_ref.norm())
    assert 0 < rel < 0.05, rel  # bf16 rounding (~3 significant digits), not another model


def test_a_bfloat16_run_trains_checkpoints_and_exports_float32_adapters(tiny_sd_path, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_sd_path, run, steps=4, base_dtype="bfloat16",
                         mixed_precision="bf16")
    train(recipe, progress=False)
    ckpt = latest_checkpoint(str(run))
    weights = load_file(os.path.join(ckpt, "weights.safetensors"))
    optim = load_file(os.path.join(ckpt, "optimizers.safetensors"))
    assert weights and {v.dtype for v in weights.values()} == {torch.float32}
    moments = {k: v for k, v in optim.items() if "exp_avg" in k}
    assert moments and {v.dtype for v in moments.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in weights.values())
    exported = glob.glob(str(run / "export" / "*.safetensors"))  # diffusers' and kohya's keys
    assert exported and all({v.dtype for v in load_file(f).values() if v.is_floating_point()}
                            == {torch.float32} for f in exported)  # (kohya's alphas: int64)
    # accelerate keeps one precision per process; the next run in it may choose another
    train(tiny_recipe(tiny_sd_path, tmp_path / "fp32", steps=1), progress=False)
    assert latest_checkpoint(str(tmp_path / "fp32"))


def test_a_custom_teacher_is_not_cast():
    from diffusion_distill.world.toy2d import MLPDenoiser, toy_teacher

    recipe = {"name": "toy", "teacher": {"path": None, "guidance": 1.0},
              "method": {"name": "dmd2"},
              "student": {"num_steps": 1}, "data": {"source": "prompts", "prompts": ["x"]},
              "train": {"steps": 1, "device": "cpu", "base_dtype": "bfloat16"},
              "output": {"dir": "/nonexistent/never-made"}}
    with pytest.raises(ValueError, match="custom one"):
        setup_run(load_recipe(recipe), "cpu", teacher=toy_teacher(schedule="flow"),
                  networks={"student": MLPDenoiser(), "critic": MLPDenoiser()})
