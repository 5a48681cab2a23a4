"""A LoRA taken from a full student (``ddistill export --lora-rank R``)."""
import json
import os

import pytest
import torch
from conftest import tiny_recipe
from torch import nn

from diffusion_distill.build import setup_run
from diffusion_distill.export import export_nets
from diffusion_distill.recipe import RecipeError, load_recipe
from diffusion_distill.student import generate
from diffusion_distill.student_pipeline import load_student

PROMPTS = ["a red circle", "two green triangles"]


def _full_student(path, tmp_path, norms=False):
    """A full 'student': the teacher with every linear / convolution weight and bias moved
    (and, with ``norms``, its normalisation scales too)."""
    recipe = load_recipe(tiny_recipe(path, tmp_path / "run"))
    recipe["student"]["mode"] = "full"
    recipe = load_recipe(recipe)
    teacher, objective, nets = setup_run(recipe)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in nets.network("student").modules():
            kinds = (nn.Linear, nn.Conv2d) + ((nn.GroupNorm, nn.LayerNorm) if norms else ())
            if isinstance(module, kinds):
                for p in module.parameters(recurse=False):
                    p.add_(0.05 * p.std().clamp_min(0.1) * torch.randn(p.shape, generator=g))
        for e, s in zip(nets.network("ema").parameters(), nets.network("student").parameters()):
            e.copy_(s)
    return recipe, teacher, objective, nets


def _samples(nets, objective):
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    return generate(nets, PROMPTS, objective.sampler(), gens)


def _plain(export):
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    return load_student(export)(PROMPTS, generator=gens, output_type="latent").images


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_a_full_rank_lora_reproduces_the_full_student_in_plain_diffusers(
        family, tiny_sd_path, tiny_sd3_path, tmp_path):
    """Catches: factors transposed or in the wrong order, a convolution kernel reshaped
    wrongly, a scale other than 1 (alpha != rank), dropped biases, keys that diffusers
    silently skips (the loaded pipeline would sample the teacher's images)."""
    path = tiny_sd_path if family == "sd" else tiny_sd3_path
    recipe, teacher, objective, nets = _full_student(path, tmp_path)
    ours = _samples(nets, objective)
    teacher_only = generate(nets, PROMPTS, objective.sampler(),
                            [torch.Generator().manual_seed(s) for s in (11, 12)], role="teacher")
    assert (ours - teacher_only).abs().max() > 1e-2  # the student really differs
    full = export_nets(nets, teacher, recipe, str(tmp_path / "full"), lora_rank=4096,
                       objective=objective)
    with open(os.path.join(full, "distill_config.json")) as f:
        lora = json.load(f)["lora"]
    assert lora["from_full"]["energy_kept"] == pytest.approx(1.0)
    assert lora["from_full"]["not_represented"] == {}
    torch.testing.assert_close(_plain(full), ours, rtol=1e-3, atol=1e-3)
    # a low rank keeps part of the change: between the teacher and the student
    low = export_nets(nets, teacher, recipe, str(tmp_path / "low"), lora_rank=2,
                      objective=objective)
    with open(os.path.join(low, "distill_config.json")) as f:
        assert json.load(f)["lora"]["from_full"]["energy_kept"] < 0.9
    error = (_plain(low) - ours).abs().mean()
    assert 1e-3 < error < (teacher_only - ours).abs().mean()


def test_what_a_lora_cannot_hold_is_reported(tiny_sd_path, tmp_path):
    from diffusion_distill.lowrank import lora_from_full

    _, teacher, _, nets = _full_student(tiny_sd_path, tmp_path, norms=True)
    state, report = lora_from_full(nets.network("student"), teacher.backbone, 8)
    assert report["not_represented"] and all(
        "norm" in n for n in report["not_represented"])
    assert all(v.shape[0] <= 8 for k, v in state.items() if k.endswith("lora_A.weight"))


def test_lora_rank_needs_a_full_student(tiny_sd_path, tmp_path):
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run")
    recipe["output"]["lora_rank"] = 16
    with pytest.raises(RecipeError, match="output.lora_rank.*student.mode=full"):
        load_recipe(recipe)
