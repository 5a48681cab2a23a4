"""The DMD family learns: on the 2-D toy (exact Gaussian-mixture teacher), a 1-step student
that starts far from the data moves toward it; on a tiny SD pipeline every variant trains."""
import pytest
import torch
from conftest import tiny_recipe

from diffusion_distill.build import setup_run
from diffusion_distill.recipe import load_recipe
from diffusion_distill.student import generate
from diffusion_distill.train import train
from diffusion_distill.world.toy2d import MLPDenoiser, energy_distance, toy_teacher


def _toy(method, tmp_path, steps=300, num_steps=1, schedule="flow"):
    torch.manual_seed(0)
    teacher = toy_teacher(k=8, var=0.02, schedule=schedule)
    recipe = load_recipe({
        "name": "toy", "teacher": {"path": None, "guidance": 1.0},
        "student": {"num_steps": num_steps}, "method": method,
        "data": {"source": "prompts", "prompts": [""]},
        "train": {"steps": steps, "batch_size": 128, "lr": 1e-3, "ema_decay": None,
                  "checkpoint_every": steps, "log_every": 50, "device": "cpu"},
        "output": {"dir": str(tmp_path / "run")}})
    data = teacher.denoiser.backbone.fn.sample(1000, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    networks = {"student": MLPDenoiser(), "critic": MLPDenoiser()}
    if method["name"] == "phased_dmd":
        networks = {f"student_{k}": MLPDenoiser() for k in range(num_steps)}
        networks["critic"] = MLPDenoiser()
    _, objective, nets0 = setup_run(recipe, "cpu", teacher,
                                    {k: _copy(v) for k, v in networks.items()})
    sampler = objective.sampler()

    def distance(nets):
        x = generate(nets, [""] * 1000, sampler, torch.Generator().manual_seed(2), ema=False)
        return energy_distance(x, data)

    before = distance(nets0)
    _, nets = train(recipe, progress=False, teacher=teacher, networks=networks, return_nets=True)
    return before, distance(nets)


def _copy(module):
    import copy

    return copy.deepcopy(module)


@pytest.mark.parametrize("method,num_steps", [
    ({"name": "dmd2", "critic_steps": 5}, 1),
    ({"name": "dmd2", "critic_steps": 5}, 2),
    ({"name": "dmd"}, 1),
    ({"name": "decoupled_dmd", "critic_steps": 5}, 1),
    ({"name": "phased_dmd", "critic_steps": 5}, 2),
], ids=["dmd2-1step", "dmd2-2step", "dmd", "decoupled", "phased-2"])
def test_student_moves_toward_the_data(method, num_steps, tmp_path):
    before, after = _toy(method, tmp_path, num_steps=num_steps)
    # The untrained student is ~0.1 away; a learning method closes most of the gap.
    assert before > 0.05
    assert after < 0.5 * before, (before, after)


def test_dmd2_learns_on_a_vp_custom_teacher(tmp_path):
    before, after = _toy({"name": "dmd2", "critic_steps": 5}, tmp_path, schedule="vp")
    assert before > 0.05
    assert after < 0.5 * before, (before, after)


def test_decoupled_terms_sum_to_the_guided_dmd_direction(tiny_sd_path):
    """With equal normalisers, DM + CA directions are DMD's guided direction: the split is exact."""
    recipe = load_recipe(tiny_recipe(tiny_sd_path, "/tmp/unused"))
    teacher, _, nets = setup_run(recipe)
    with torch.no_grad():
        for p in nets.params("critic"):
            p.add_(0.05 * torch.randn_like(p))
    cond = teacher.prompts(["a red circle", "a blue square"])
    x_t, t, w = torch.randn(2, *teacher.latent_shape), torch.full((2,), 0.6), 3.0
    guided = nets.teacher(x_t, t, cond, guidance=w)
    conditional = nets.teacher(x_t, t, cond, guidance=1.0)
    unconditional = nets.teacher(x_t, t, teacher.denoiser.uncond.expand(2), guidance=1.0)
    fake = nets.critic(x_t, t, cond)
    dm, ca = fake - conditional, -(guided - conditional)
    torch.testing.assert_close(dm + ca, fake - guided)
    torch.testing.assert_close(-ca, (w - 1) * (conditional - unconditional), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", [
    {"name": "dmd2", "critic_steps": 2, "gan_weight": 0.01},
    {"name": "decoupled_dmd", "critic_steps": 2},
    {"name": "phased_dmd", "critic_steps": 2},
], ids=["dmd2-gan", "decoupled", "phased"])
def test_variants_train_on_a_diffusers_teacher(method, tiny_sd_path, tmp_path):
    from diffusion_distill.tiny import WORDS  # noqa: F401  (the prompts use its vocabulary)

    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", method=method, steps=2)
    recipe["student"]["num_steps"] = 2
    if method.get("gan_weight"):
        recipe["data"] = {"source": "world", "resolution": 16}
    run_dir = train(recipe, progress=False)
    import json
    import math
    import os

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        logs = [json.loads(line) for line in f]
    assert all(math.isfinite(v) for row in logs for v in row.values())
    assert os.path.isfile(os.path.join(run_dir, "export", "distill_config.json"))
