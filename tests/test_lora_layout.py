"""The LoRA roles' layout options: ``student.target_modules: all`` and ``student.lora_bias``."""
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


def _samples(make):
    return make([torch.Generator().manual_seed(s) for s in (11, 12)])


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_an_all_layer_lora_with_biases_is_what_plain_diffusers_loads(
        family, tiny_sd_path, tiny_sd3_path, tmp_path):
    """Catches: ``all`` falling back to the attention/feed-forward defaults (a layer left
    out), lora_bias not reaching peft (no bias in the student's parameters, so it is never
    trained), and an export that drops the biases or a layer (plain diffusers would then
    sample something else than the student)."""
    recipe = tiny_recipe(tiny_sd_path if family == "sd" else tiny_sd3_path, tmp_path / "run")
    recipe["student"].update(target_modules="all", lora_bias=True)
    recipe = load_recipe(recipe)
    teacher, objective, nets = setup_run(recipe)
    backbone = teacher.backbone
    layers = [n for n, m in backbone.named_modules() if hasattr(m, "lora_A")]
    plain = [n for n, m in backbone.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.rsplit(".", 1)[-1] in
             ("student", "critic", "ema") and ".lora_" not in n and ".base_layer" not in n
             and not hasattr(m, "lora_A")]
    assert layers and not plain, f"layers left without a LoRA: {plain[:5]}"
    assert any(n.endswith(("conv_in", "pos_embed.proj")) for n in layers)
    params = nets.roles.params("student")
    biases = [p for p in params if p.ndim == 1]
    assert len(biases) == len(layers)  # one trained bias per targeted layer
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for e, s in zip(nets.roles.params("ema"), params):
            e.copy_(s)
    ours = _samples(lambda gens: generate(nets, PROMPTS, objective.sampler(), gens))
    teacher_only = _samples(lambda gens: generate(nets, PROMPTS, objective.sampler(), gens,
                                                  role="teacher"))
    assert (ours - teacher_only).abs().max() > 1e-2  # the student really differs
    export = export_nets(nets, teacher, recipe, str(tmp_path / "export"), objective=objective)
    with open(os.path.join(export, "distill_config.json")) as f:
        assert json.load(f)["lora"]["lora_bias"] is True
    loaded = _samples(lambda gens: load_student(export)(PROMPTS, generator=gens,
                                                        output_type="latent").images)
    torch.testing.assert_close(loaded, ours, rtol=1e-3, atol=1e-3)


def test_the_layout_keys_are_checked_and_inert_for_full_roles(tiny_sd_path, tmp_path):
    """Catches: a bad target_modules value accepted silently, and the LoRA layout keys blocking
    a switch to a full student by override (a recipe that sets them, e.g. dmd2_sd3.yaml, must
    still take student.mode=full, as rank does)."""
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run")
    recipe["student"].update(target_modules="every")
    with pytest.raises(RecipeError, match="student.target_modules"):
        load_recipe(recipe)
    recipe["student"].update(mode="full", target_modules="all", lora_bias=True)
    assert load_recipe(recipe)["student"]["lora_bias"] is True
