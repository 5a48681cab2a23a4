"""sCM (objectives/scm.py): continuous-time consistency distillation.

(a) the tangent: torch.func.jvp through the student equals a finite difference of the same
directional derivative (a toy MLP, one with dropout, and a tiny diffusers UNet with an active
LoRA); the TrigFlow time map is the closed form for flow; (b) on the 2-D toy the 1-step samples
move toward the teacher's; (c) a tiny SD (epsilon) and SD3 (flow) teacher train, export, and
plain diffusers with the export's LoRA and scheduler reproduces the toolkit's own samples, and
on the embedded SD and SD3 teachers the 1-step latents go more than half of the way to the
teacher's own;
(d) rCM's score regularisation (``score_regularization``): a critic role only when it is on, its
loss terms, its critic learning on a tiny SD3, and on the toy a regularised student that goes
past plain sCM's plateau with every mode kept.
"""
import json
import math
import os

import pytest
import torch
from conftest import tiny_recipe
from consistency_helpers import (
    EDMMLP,
    few_step_learning,
    fit_to_teacher,
    reproduces_through_diffusers,
)

from diffusion_distill.build import setup_run
from diffusion_distill.objectives import build_objective
from diffusion_distill.recipe import load_recipe
from diffusion_distill.step import build_optimizers, train_step
from diffusion_distill.student import generate
from diffusion_distill.train import train
from diffusion_distill.world.toy2d import energy_distance, toy_teacher


def _toy_run(method, schedule="flow", steps=1, lr=3e-4, network=None, lr_critic=None):
    torch.manual_seed(0)
    teacher = toy_teacher(k=8, var=0.02, schedule=schedule)
    recipe = load_recipe({
        "name": "toy", "teacher": {"path": None, "guidance": 1.0},
        "student": {"num_steps": 1}, "method": method,
        "data": {"source": "prompts", "prompts": [""]},
        # a cosine decay to 5%: the normalised tangent gives every sample a unit-size
        # gradient, and a constant rate keeps the samples wandering around the target
        "train": {"steps": steps, "batch_size": 128, "lr": lr, "lr_final": 0.05,
                  "lr_critic": lr_critic, "ema_decay": None, "device": "cpu"},
        "output": {"dir": "/nonexistent"}})
    torch.manual_seed(0)
    networks = {"student": network if network is not None else EDMMLP(teacher.schedule)}
    if method.get("score_regularization"):  # rCM's fake score: its own toy network
        networks["critic"] = EDMMLP(teacher.schedule)
    _, objective, nets = setup_run(recipe, "cpu", teacher, networks)
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
    from diffusion_distill.acceleration import Attention

    nets.attention = Attention("flash")  # what apply_to_run hands over for train.attention
    with pytest.raises(ValueError, match="finite_difference"):
        objective.setup(nets)
    objective.tangent = "finite_difference"
    objective.setup(nets)


# -- (b) the toy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["flow", "vp"])
def test_one_step_samples_move_toward_the_teacher(schedule):
    # sCD starts from the teacher (here a denoising fit to the exact toy teacher), whose own
    # 1-step sample is the collapsed posterior mean; the consistency loss spreads it out.
    *_, before, after, _, logs, _ = _toy_training(
        {"name": "scm", "sigma_data": 1.4, "warmup_steps": 100}, schedule, 400)
    print("scm", schedule, "before", before, "after", after)
    assert all(math.isfinite(row["scm"]) for row in logs)
    assert logs[0]["r"] == 0.0 and logs[-1]["r"] == 1.0  # the warm-up ran its course
    assert before > 0.3, before
    assert after < 0.5 * before, (before, after)


# -- (c) tiny diffusers teachers -------------------------------------------------------------------

@pytest.mark.parametrize("teacher_path", ["embedded:sd", "embedded:sd3"], ids=["sd", "sd3"])
def test_one_step_samples_move_toward_the_teachers_on_a_diffusers_teacher(teacher_path, tmp_path):
    """sCD on the embedded teachers (epsilon UNet, flow transformer): 150 steps at batch 4, lr
    2e-3, the 1-step latents go more than half of the way to the teacher's own 50-step CFG-3
    latents (energy distance), drawing the top where the 1-step sample is made
    (``P_mean: 1.0``) with the tangent a central difference over 20 timesteps. Measured: sd
    0.746 -> 0.323, sd3 2.098 -> 0.857; ~55 s each on one thread (the difference costs two
    passes, the guided teacher two more).

    Catches the exact JVP tangent on the epsilon UNet once the top is drawn (250 steps: 84.5,
    diverged: it follows the time embedding's wiggle between DDPM timesteps; a 5-timestep
    difference 6.14), and the paper's ``P_mean: -1.0``, which draws the top 0.4% of the time
    (250 steps: sd 0.739 with the JVP, sd3 1.357 = 35% of the way; docs/consistency.md)."""
    method = {"name": "scm", "sigma_data": 1.0, "warmup_steps": 30, "P_mean": 1.0,
              "tangent": "finite_difference", "fd_step": 0.02}
    moves, _ = few_step_learning(teacher_path, tmp_path / "run", method, steps=150, lr=2e-3,
                                 batch_size=4, num_steps=(1,), target="teacher")
    before, after = moves[1]
    print(f"\nscm 1 step, {teacher_path}: energy to the teacher's {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before, (before, after)


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
    reproduces_through_diffusers(export, config, nets, objective, (1, 4), family == "sd3")
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


# -- (d) rCM's score regularisation ------------------------------------------------------------

def test_without_score_regularization_there_is_no_critic(tiny_sd_path, tmp_path):
    for method in ({"name": "scm"}, {"name": "scm", "score_regularization": 0.0}):
        objective = build_objective(method)
        assert objective.roles == ("student",) and objective.score_regularization == 0.0
    assert build_objective({"name": "scm", "score_regularization": 0.01}).roles == \
        ("student", "critic")
    with pytest.raises(ValueError, match="score_regularization"):
        build_objective({"name": "scm", "score_regularization": -0.1})
    # on a diffusers teacher: no critic adapter on the base, and a step yields the student only
    recipe = load_recipe(tiny_recipe(tiny_sd_path, tmp_path, method={"name": "scm"}))
    _, objective, nets = setup_run(recipe)
    assert nets.roles.trainable == ["student"]
    assert "critic" not in nets.roles.backbone.peft_config
    from diffusion_distill.step import Randomness, StepContext

    ctx = StepContext(0, 0, Randomness(0, 0, 0), 1, 4)
    batch = {"cond": nets.teacher_model.prompts(["a red circle"] * 2),
             "x0": torch.randn(2, *nets.teacher_model.latent_shape)}
    assert [role for role, _ in objective(nets, batch, ctx)] == ["student"]
    assert "dmd" not in ctx.logs and "critic_denoise" not in ctx.logs


def test_score_regularization_trains_a_critic_and_adds_the_dmd_term(tiny_sd3_path, tmp_path):
    lam = 0.01
    method = {"name": "scm", "warmup_steps": 0, "score_regularization": lam, "critic_steps": 2}
    recipe = tiny_recipe(tiny_sd3_path, tmp_path / "run", method=method, steps=16, lr=1e-3,
                         checkpoint_every=16)
    recipe["data"] = {"source": "world", "resolution": 16}
    run_dir, nets = train(recipe, progress=False, return_nets=True)
    objective = build_objective(method, student_times=[1.0])
    assert objective.roles == ("student", "critic")
    assert sorted(nets.roles.trainable) == ["critic", "student"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    student_rows = [r for r in rows if "loss/student" in r]
    assert [r["step"] for r in student_rows] == list(range(1, 17, 2))  # every 2nd step
    assert all("loss/critic" in r for r in rows)  # the critic trains on every step
    for r in student_rows:  # the student's loss is both terms: sCM + lambda DMD
        assert math.isfinite(r["scm"]) and r["dmd"] > 0 and r["dmd_grad_norm"] > 0
        assert r["loss/student"] == pytest.approx(r["scm"] + lam * r["dmd"], rel=1e-4)
    assert not any("dmd" in r for r in rows if "loss/student" not in r)
    # the critic adapter trained (its B matrices start at 0); that it learns the student's
    # samples is measured on the toy (test_score_regularization_goes_past_the_scm_plateau...)
    assert any(p.abs().sum() > 0 for n, p in nets.roles.backbone.named_parameters()
               if "lora_B" in n and ".critic." in n)
    # the export is the student's alone and plain diffusers still reproduces it
    export = os.path.join(run_dir, "export")
    with open(os.path.join(export, "distill_config.json")) as f:
        config = json.load(f)
    assert config["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler"
    reproduces_through_diffusers(export, config, nets, objective, (1,), True)


def _toy_training(method, schedule, steps, lr=3e-4, lr_critic=None):
    """(objective, nets, teacher, energy distance before, after, mode shares after, logs, the
    critic's initial weights) of a 1-step sCM / rCM student on the toy; the student (and rCM's
    critic) start as the teacher."""
    import copy

    from diffusion_distill.world.toy2d import ring_means

    teacher, recipe, objective, nets = _toy_run(method, schedule, steps, lr=lr,
                                                lr_critic=lr_critic)
    fit_to_teacher(nets, teacher, 800)
    if "critic" in objective.roles:  # the fake score starts as the (fitted) teacher, as in rCM
        nets.roles.networks["critic"].load_state_dict(nets.roles.networks["student"].state_dict())
    initial = {role: copy.deepcopy(net.state_dict()) for role, net in nets.roles.networks.items()
               if role == "critic"}
    mixture = teacher.denoiser.backbone.fn
    data = mixture.sample(1000, torch.Generator().manual_seed(1))
    optimizers = build_optimizers(objective, nets, recipe["train"])

    def batches(rng, n):
        return {"prompts": [""] * n, "cond": teacher.prompts([""] * n),
                "x0": mixture.sample(n, generator=rng.gen)}

    def quality():
        x = generate(nets, [""] * 1000, objective.sampler(1), torch.Generator().manual_seed(2),
                     ema=False)
        nearest = torch.cdist(x, ring_means(8)).argmin(1)
        return energy_distance(x, data), torch.bincount(nearest, minlength=8).float() / len(x)

    before, _ = quality()
    logs = [train_step(objective, nets, optimizers, batches, step, recipe["train"], 128)
            for step in range(steps)]
    after, shares = quality()
    return objective, nets, teacher, before, after, shares, logs, initial.get("critic")


def test_score_regularization_goes_past_the_scm_plateau_and_keeps_every_mode():
    # plain sCM as test (b) trains it: 400 student updates
    *_, scm_before, scm_after, _, _, _ = _toy_training(
        {"name": "scm", "sigma_data": 1.4, "warmup_steps": 100}, "flow", 400)
    # rCM: the same warm-up, then a student step (sCM + lambda DMD) every 5th step: 280 student
    # updates in 1000 steps. lambda 1: on this 2-D toy the paper's 0.01 leaves the DMD term a
    # percent of the sCM one and the run lands where plain sCM does (docs/consistency.md)
    method = {"name": "scm", "sigma_data": 1.4, "warmup_steps": 100,
              "score_regularization": 1.0, "critic_steps": 5}
    _, _, _, before, after, shares, logs, _ = _toy_training(method, "flow", 1000)
    print(f"\nsCM 1-step toy: energy {scm_before:.4f} -> {scm_after:.4f}; rCM (lambda 1): "
          f"{before:.4f} -> {after:.4f}, mode shares {[round(float(v), 3) for v in shares]}")
    assert before > 0.3 and abs(before - scm_before) < 1e-6  # the same start
    assert after < 0.5 * before, (before, after)
    assert shares.min() > 0.06, shares  # every one of the 8 modes (uniform: 0.125)
    assert after < 0.5 * scm_after, (scm_after, after)  # past plain sCM's plateau
    student = [row for row in logs if "dmd" in row]
    assert len(student) == 180 and all(math.isfinite(row["dmd"]) for row in student)
    assert not any("loss/critic" in row for row in logs[:100])  # no critic in the warm-up


def test_the_critic_learns_the_students_own_samples_on_the_toy():
    """rCM's critic (the toy's own network, starting as the fitted teacher) trains on the
    student's rollouts: its denoising loss on a fixed batch of them (fixed times and noise)
    falls. The student barely moves here (lr 1e-7), so its samples stay the teacher's collapsed
    1-step posterior mean, which the teacher itself denoises badly."""
    from diffusion_distill.objectives.common import critic_denoising_loss
    from diffusion_distill.step import Randomness, StepContext

    method = {"name": "scm", "sigma_data": 1.4, "warmup_steps": 0, "score_regularization": 0.01,
              "critic_steps": 5}
    objective, nets, teacher, before, after, _, logs, initial_critic = _toy_training(
        method, "flow", 150, lr=1e-7, lr_critic=1e-3)
    assert sum("loss/critic" in row for row in logs) == 150
    assert sum("loss/student" in row for row in logs) == 30
    cond = teacher.prompts([""] * 2000)

    def critic_loss():
        ctx = StepContext(0, 0, Randomness(123, 0, 0), 1, 1)
        with torch.no_grad():
            fake = objective.rollout(nets, cond, ctx, grad=False, device="cpu")
            t = objective.critic_time(nets.schedule, len(cond), ctx, "cpu")
            return float(critic_denoising_loss(nets, fake, cond, t, ctx))

    trained = critic_loss()
    nets.roles.networks["critic"].load_state_dict(initial_critic)
    initial = critic_loss()
    print(f"\ntoy critic denoising loss on the student's samples: {initial:.4f} (as it "
          f"started: the teacher) -> {trained:.4f} (trained 150 steps); student energy "
          f"{before:.4f} -> {after:.4f}")
    assert abs(after - before) < 0.05 * before  # the samples it learned are still the student's
    assert trained < 0.7 * initial, (initial, trained)  # measured: 0.409 -> 0.224
