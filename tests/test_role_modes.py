"""Per-role capacity: ``student.mode`` and ``critic.mode`` each ``lora`` or ``full``."""
import json
import os

import pytest
import torch
from conftest import tiny_recipe

from diffusion_distill.build import setup_run
from diffusion_distill.recipe import RecipeError, load_recipe
from diffusion_distill.student import MixedRoles, _is_lora_layer
from diffusion_distill.train import train


def _lora_layers(module):
    return sum(_is_lora_layer(m) for m in module.modules())


@pytest.mark.parametrize("student,critic", [("lora", "full"), ("full", "lora")])
def test_each_role_gets_its_own_capacity(student, critic, tiny_sd3_path, tmp_path):
    """Catches: critic.mode ignored (both roles at the student's mode); a full role copied
    after the adapters were put on the base (it would carry them); a full role routed
    through the shared base (its weights would not change its output)."""
    recipe = tiny_recipe(tiny_sd3_path, tmp_path / "run")
    recipe["student"]["mode"], recipe["critic"] = student, {"mode": critic}
    teacher, _, nets = setup_run(load_recipe(recipe))
    roles = nets.roles
    assert isinstance(roles, MixedRoles)
    full, lora = ("critic", "student") if critic == "full" else ("student", "critic")
    network = nets.network(full)
    assert network is not teacher.backbone and _lora_layers(network) == 0
    n_full = sum(p.numel() for p in nets.params(full))
    n_lora = sum(p.numel() for p in nets.params(lora))
    assert n_full == sum(p.numel() for p in network.parameters()) and n_lora < 0.5 * n_full
    assert all(".lora_" in n for n, p in teacher.backbone.named_parameters()
               if any(p is q for q in nets.params(lora)))
    # the EMA is kept in the student's own mode
    ema = nets.params("ema")
    assert (len(ema) == len(list(network.parameters()))) == (student == "full")

    cond = teacher.prompts(["a red circle", "a blue square"])
    x_t = torch.randn(2, *teacher.latent_shape)
    before = {r: nets.x0(r, x_t, 0.6, cond).detach() for r in ("teacher", "student", "critic")}
    with torch.no_grad():  # give each role its own weights
        for r in ("student", "critic"):
            for p in nets.params(r):
                p.add_(0.02 * torch.randn_like(p))
    after = {r: nets.x0(r, x_t, 0.6, cond) for r in ("teacher", "student", "critic")}
    torch.testing.assert_close(after["teacher"], before["teacher"], rtol=0, atol=0)
    for r in ("student", "critic"):
        assert not torch.allclose(after[r], before[r], atol=1e-4), r
    # each backward fills its own role's gradients and no other's
    for r, other in (("student", "critic"), ("critic", "student")):
        nets.x0(r, x_t, 0.6, cond).square().mean().backward(inputs=nets.params(r))
        assert sum(p.grad is not None for p in nets.params(r)) > 0.8 * len(nets.params(r))
        assert all(p.grad is None for p in nets.params(other))
        for p in nets.params(r):
            p.grad = None


def test_lora_student_beside_full_critic_trains_resumes_and_exports_a_lora(tiny_sd_path,
                                                                          tmp_path):
    """Catches: a checkpoint that loses the full critic (resume would fail or restart it),
    an export that writes the whole pipeline because some role is full."""
    from diffusion_distill.student_pipeline import load_student

    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", steps=4, stop_after=2)
    recipe["critic"] = {"mode": "full"}
    run_dir = train(recipe, progress=False)
    recipe["train"]["stop_after"] = None
    run_dir, nets = train(recipe, progress=False, return_nets=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    teacher = {n.replace(".base_layer", ""): p for n, p in
               nets.teacher_model.backbone.named_parameters() if "lora_" not in n}
    moved = [(p - teacher[n]).abs().max() for n, p in nets.network("critic").named_parameters()]
    assert max(moved) > 0  # the whole critic trained
    export = os.path.join(run_dir, "export")
    with open(os.path.join(export, "distill_config.json")) as f:
        assert json.load(f)["lora"]["rank"] == 4
    assert not os.path.isfile(os.path.join(export, "model_index.json"))
    load_student(export)


def test_critic_mode_is_checked(tiny_sd_path, tmp_path):
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run")
    recipe["critic"] = {"mode": "half"}
    with pytest.raises(RecipeError, match="critic.mode"):
        load_recipe(recipe)
    recipe["critic"] = {"mode": "full"}
    recipe["method"] = {"name": "lcm"}
    with pytest.raises(ValueError, match="trains no critic"):
        setup_run(load_recipe(recipe))
