"""sCM (objectives/scm.py): continuous-time consistency distillation.

(a) the tangent: torch.func.jvp through the student equals a finite difference of the same
directional derivative (a toy MLP, one with dropout, and a tiny diffusers UNet with an active
LoRA); the TrigFlow time map is the closed form for flow; (b) on the 2-D toy the 1-step samples
move toward the teacher's; (c) a tiny SD (epsilon) and SD3 (flow) teacher train, export, and
plain diffusers with the export's LoRA and scheduler reproduces the toolkit's own samples.
"""
import json
import math
import os

import pytest
import torch
from conftest import tiny_recipe
from test_consistency import EDMMLP, _fit_to_teacher, reproduces_through_diffusers

from diffusion_distill.objectives import build_objective
from diffusion_distill.recipe import load_recipe
from diffusion_distill.student import generate
from diffusion_distill.train import build_optimizers, setup_run, train, train_step
from diffusion_distill.world.toy2d import energy_distance, toy_teacher


def _toy_run(method, schedule="flow", steps=1, lr=3e-4, network=None):
    torch.manual_seed(0)
    teacher = toy_teacher(k=8, var=0.02, schedule=schedule)
    recipe = load_recipe({
        "name": "toy", "teacher": {"path": None, "guidance": 1.0},
        "student": {"num_steps": 1}, "method": method,
        "data": {"source": "prompts", "prompts": [""]},
        # a cosine decay to 5%: the normalised tangent gives every sample a unit-size
        # gradient, and a constant rate keeps the samples wandering around the target
        "train": {"steps": steps, "batch_size": 128, "lr": lr, "lr_final": 0.05,
                  "ema_decay": None, "device": "cpu"},
        "output": {"dir": "/nonexistent"}})
    torch.manual_seed(0)
    student = network if network is not None else EDMMLP(teacher.schedule)
    _, objective, nets = setup_run(recipe, "cpu", teacher, {"student": student})
    return teacher, recipe, objective, nets


# -- (a) the tangent and the time map -----------------------------------------------------------

def _tangents(objective, nets, x_t, u, v, cond, seed=7):
    out = {}
    for kind in ("jvp", "finite_difference"):
        objective.tangent = kind
        out[kind] = objective.tangent_du(nets, x_t, u, v, cond, seed).double()
    return out["jvp"], out["finite_difference"]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("schedule", ["flow", "vp"])
def test_jvp_tangent_equals_finite_difference_on_a_toy_mlp(schedule):
    teacher, _, objective, nets = _toy_run({"name": "scm", "sigma_data": 1.4,
                                            "fd_step": 1e-4}, schedule)
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(64, 2, generator=g)
    u = 0.05 + 0.9 * torch.rand(64, generator=g)
    v = torch.randn(64, 2, generator=g)
    cond = teacher.prompts([""] * 64)
    jvp, fd = _tangents(objective, nets, x_t, u, v, cond)
    print("toy", schedule, "jvp vs finite difference, relative", _rel(jvp, fd))
    assert fd.norm() > 1e-2
    assert _rel(jvp, fd) < 2e-3, _rel(jvp, fd)
    # the tangent is really the derivative along (v, 1): another direction gives another one
    other, _ = _tangents(objective, nets, x_t, u, -v, cond)
    assert _rel(other, jvp) > 0.1


class DropoutMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.SiLU(),
                                       torch.nn.Dropout(0.2), torch.nn.Linear(64, 2))

    def forward(self, x_t, t, cond=None):
        return x_t + self.net(torch.cat([x_t, t[:, None]], 1))


def test_finite_difference_sees_the_same_dropout_mask_as_the_jvp():
    teacher, _, objective, nets = _toy_run({"name": "scm", "fd_step": 1e-4},
                                           network=DropoutMLP())
    nets.network("student").train()
    g = torch.Generator().manual_seed(4)
    x_t, u = torch.randn(32, 2, generator=g), 0.1 + 0.8 * torch.rand(32, generator=g)
    v, cond = torch.randn(32, 2, generator=g), teacher.prompts([""] * 32)
    jvp, fd = _tangents(objective, nets, x_t, u, v, cond)
    print("dropout mlp: jvp vs finite difference, relative", _rel(jvp, fd))
    assert _rel(jvp, fd) < 2e-3, _rel(jvp, fd)
    # another seed: another mask, another tangent (dropout is really on)
    objective.tangent = "finite_difference"
    other = objective.tangent_du(nets, x_t, u, v, cond, 8).double()
    assert _rel(other, fd) > 0.05


def test_jvp_tangent_through_a_tiny_unet_with_its_lora(tiny_sd_path, tmp_path):
    recipe = tiny_recipe(tiny_sd_path, tmp_path, method={"name": "scm", "fd_step": 1e-4})
    recipe = load_recipe(recipe)
    teacher, objective, nets = setup_run(recipe)
    torch.manual_seed(0)
    with torch.no_grad():  # a LoRA that matters (its B matrices start at 0)
        for p in nets.params("student"):
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(5)
    shape = (2, *teacher.latent_shape)
    x_t, v = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    u = torch.tensor([0.3, 0.7])
    cond = teacher.prompts(["a red circle", "two green triangles"])
    jvp, fd = _tangents(objective, nets, x_t, u, v, cond)
    print("tiny unet: jvp vs finite difference, relative", _rel(jvp, fd))
    assert _rel(jvp, fd) < 2e-2, _rel(jvp, fd)
    objective.tangent = "jvp"
    with nets.roles.use("teacher"):  # the student's adapter, whatever is active around it
        again = objective.tangent_du(nets, x_t, u, v, cond, 7)
    assert torch.allclose(again.double(), jvp)


def test_trigflow_time_of_a_flow_teacher_is_the_closed_form():
    objective = build_objective({"name": "scm", "sigma_data": 0.5})
    from diffusion_distill.schedules import FlowSchedule

    u = torch.linspace(0.01, 0.99, 50)
    (alpha, sigma, s), (_, _, d_s) = objective.trig(FlowSchedule(), u)
    u = u.double()
    assert torch.allclose(alpha, 1 - u) and torch.allclose(sigma, u)
    assert torch.allclose(s.tan(), u / ((1 - u) * 0.5), rtol=1e-6)
    assert torch.allclose(d_s, 0.5 / ((1 - u) ** 2 * 0.25 + u ** 2), rtol=1e-6)


def test_options_are_checked():
    with pytest.raises(ValueError, match="finite_difference"):
        build_objective({"name": "scm", "tangent": "autodiff"})
    with pytest.raises(ValueError, match="tangent_norm"):
        build_objective({"name": "scm", "tangent_norm": "l1"})
    objective = build_objective({"name": "scm", "warmup_steps": 10})
    assert [objective.warmup(k) for k in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert build_objective({"name": "scm"}, total_steps=400).warmup_steps == 100


def test_jvp_refuses_a_pinned_fused_attention_kernel():
    _, _, objective, nets = _toy_run({"name": "scm"})
    nets.network("student")._dd_attention = "flash"
    with pytest.raises(ValueError, match="finite_difference"):
        objective.setup(nets)
    objective.tangent = "finite_difference"
    objective.setup(nets)


# -- (b) the toy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["flow", "vp"])
def test_one_step_samples_move_toward_the_teacher(schedule):
    # sCD starts from the teacher (here a denoising fit to the exact toy teacher), whose own
    # 1-step sample is the collapsed posterior mean; the consistency loss spreads it out.
    steps = 400
    teacher, recipe, objective, nets = _toy_run(
        {"name": "scm", "sigma_data": 1.4, "warmup_steps": 100}, schedule, steps)
    _fit_to_teacher(nets, teacher, 800)
    mixture = teacher.denoiser.backbone.fn
    data = mixture.sample(1000, torch.Generator().manual_seed(1))
    optimizers = build_optimizers(objective, nets, recipe["train"])

    def batches(rng, n):
        return {"prompts": [""] * n, "cond": teacher.prompts([""] * n),
                "x0": mixture.sample(n, generator=rng.gen)}

    def distance():
        x = generate(nets, [""] * 1000, objective.sampler(1), torch.Generator().manual_seed(2),
                     ema=False)
        return energy_distance(x, data)

    before = distance()
    logs = [train_step(objective, nets, optimizers, batches, step, recipe["train"], 128)
            for step in range(steps)]
    after = distance()
    print("scm", schedule, "before", before, "after", after)
    assert all(math.isfinite(row["scm"]) for row in logs)
    assert logs[0]["r"] == 0.0 and logs[-1]["r"] == 1.0  # the warm-up ran its course
    assert before > 0.3, before
    assert after < 0.5 * before, (before, after)


# -- (c) tiny diffusers teachers -------------------------------------------------------------------

@pytest.mark.parametrize("family,method,scheduler", [
    ("sd", {"name": "scm", "warmup_steps": 1}, "LCMScheduler"),
    ("sd3", {"name": "scm", "warmup_steps": 1, "adaptive_weighting": True},
     "FlowMatchEulerDiscreteScheduler"),
    ("sd3", {"name": "scm", "warmup_steps": 1, "tangent": "finite_difference"},
     "FlowMatchEulerDiscreteScheduler"),
], ids=["sd-jvp", "sd3-jvp-adaptive", "sd3-fd"])
def test_plain_diffusers_reproduces_the_student(family, method, scheduler, tiny_sd_path,
                                                tiny_sd3_path, tmp_path):

    path = tiny_sd_path if family == "sd" else tiny_sd3_path
    recipe = tiny_recipe(path, tmp_path / "run", method=method, steps=3, lr=1e-3,
                         checkpoint_every=3)
    recipe["data"] = {"source": "world", "resolution": 16}  # real x0 for the noised points
    run_dir, nets = train(recipe, progress=False, return_nets=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [row["r"] for row in rows] == [0.0, 1.0, 1.0]
    assert all(math.isfinite(row["scm"]) and row["tangent_norm"] > 0 for row in rows)
    export = os.path.join(run_dir, "export")
    with open(os.path.join(export, "distill_config.json")) as f:
        config = json.load(f)
    assert config["scheduler"]["class"] == scheduler
    objective = build_objective(method, student_times=[1.0])
    reproduces_through_diffusers(export, config, nets, objective, (1, 2), family == "sd3")
    if method.get("adaptive_weighting"):  # w_phi trained with the student, kept in checkpoints
        w = nets.extra["student"]["scm_logvar"].linear
        assert w.weight.abs().sum() > 0


def test_recipes_load():
    from diffusion_distill.recipe import find_recipe

    root = os.path.join(os.path.dirname(__file__), "..", "recipes")
    for name in ("scm_sd", "scm_sd3"):
        recipe = load_recipe(find_recipe(os.path.join(root, name + ".yaml")))
        _, objective, nets = setup_run(recipe)
        assert type(objective).__name__ == "SCM" and nets.params("student")
        assert objective.needs_data and recipe["data"]["source"] == "world"
        assert objective.sampler().num_steps == recipe["student"]["num_steps"]
