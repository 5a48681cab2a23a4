"""The consistency family (objectives/consistency.py): LCM, TCD, PCM, ECT.

(a) On the 2-D toy (exact Gaussian-mixture teacher) each method's few-step samples move toward
the teacher's distribution; (b) on tiny diffusers teachers a short run exports, and a fresh
diffusers pipeline with the export's LoRA and scheduler reproduces the toolkit's own samples;
(c) a step count the export cannot serve is refused with the ones it can; (d) on the embedded
teachers ECT's 1- and 2-step latents go more than half of the way toward the data.
"""
import json
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
from diffusion_distill.objectives.consistency import SolverGrid, lcm_scalings
from diffusion_distill.recipe import load_recipe
from diffusion_distill.step import build_optimizers, train_step
from diffusion_distill.student import generate
from diffusion_distill.train import train
from diffusion_distill.world.toy2d import MLPDenoiser, energy_distance, toy_teacher

NO_CFG = {"w_min": 0.0, "w_max": 0.0}  # the toy teacher is unconditional: w = 0, g = 1


# -- (a) the toy -----------------------------------------------------------------------------
def _toy(method, steps=2000, num_steps=1, schedule="flow", sample=(1,), lr=1e-3, pretrain=0,
         network=MLPDenoiser):
    """(distances before, after) of the student's samples at each step count in ``sample``.

    Consistency methods train on real data (batches carry x0): this loop feeds the toy's own
    samples through the library's ``train_step``.
    """
    torch.manual_seed(0)
    teacher = toy_teacher(k=8, var=0.02, schedule=schedule)
    mixture = teacher.denoiser.backbone.fn
    recipe = load_recipe({
        "name": "toy", "teacher": {"path": None, "guidance": 1.0},
        "student": {"num_steps": num_steps}, "method": method,
        "data": {"source": "prompts", "prompts": [""]},
        "train": {"steps": steps, "batch_size": 128, "lr": lr, "ema_decay": None,
                  "device": "cpu"},
        "output": {"dir": "/nonexistent"}})
    torch.manual_seed(0)
    student = network(teacher.schedule) if network is EDMMLP else network()
    _, objective, nets = setup_run(recipe, "cpu", teacher, {"student": student})
    if pretrain:  # "initialised from the teacher": a quick denoising fit to the exact teacher
        fit_to_teacher(nets, teacher, pretrain)
    optimizers = build_optimizers(objective, nets, recipe["train"])
    data = mixture.sample(1000, torch.Generator().manual_seed(1))

    def batches(rng, n):
        return {"prompts": [""] * n, "cond": teacher.prompts([""] * n),
                "x0": mixture.sample(n, generator=rng.gen)}

    def distance(n):
        x = generate(nets, [""] * 1000, objective.sampler(n), torch.Generator().manual_seed(2),
                     ema=False)
        return energy_distance(x, data)

    before = {n: distance(n) for n in sample}
    for step in range(steps):
        train_step(objective, nets, optimizers, batches, step, recipe["train"], 128)
    after = {n: distance(n) for n in sample}
    print(method["name"], schedule, "before", before, "after", after)
    return before, after


@pytest.mark.parametrize("method,schedule,num_steps,sample", [
    ({"name": "lcm", "solver_steps": 10, **NO_CFG}, "flow", 1, (1, 4)),
    ({"name": "lcm", "solver_steps": 10, **NO_CFG}, "vp", 1, (1, 4)),
    ({"name": "tcd", "solver_steps": 10, "gamma": 0.0, **NO_CFG}, "flow", 4, (4,)),
    ({"name": "pcm", "phases": 2, "solver_steps": 10, **NO_CFG}, "flow", 2, (2, 4)),
    ({"name": "pcm", "phases": 2, "solver_steps": 10, **NO_CFG}, "vp", 2, (2,)),
], ids=["lcm-flow", "lcm-vp", "tcd-flow-4", "pcm2-flow", "pcm2-vp"])
def test_few_step_samples_move_toward_the_teacher(method, schedule, num_steps, sample):
    before, after = _toy(method, schedule=schedule, num_steps=num_steps, sample=sample)
    for n in sample:
        assert before[n] > 0.04, (n, before)
        assert after[n] < 0.5 * before[n], (n, before, after)


@pytest.mark.parametrize("schedule,sample", [("vp", (1, 2)), ("flow", (1,))])
def test_ect_moves_toward_the_data(schedule, sample):
    # ECT tunes a diffusion model: the student starts as the teacher (fitted to it), whose own
    # 1-step sample is the collapsed posterior mean; consistency training from data spreads it.
    before, after = _toy({"name": "ect", "sigma_data": 1.4}, steps=1500, schedule=schedule,
                         sample=sample, pretrain=1000, network=EDMMLP)
    for n in sample:
        assert before[n] > 0.1, (n, before)
        assert after[n] < 0.5 * before[n], (n, before, after)



@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow", "sample"])
def test_native_gain_puts_an_x0_difference_in_the_backbones_own_units(prediction_type):
    """ECT's ``weighting: native`` divides the pair's x0 difference by this gain. Checked
    against converting both x0s to the backbone's output at the online point (``from_x0``):
    catches an inverted gain (alpha / sigma for eps: the top of SD's schedule would weigh
    1/214 of a unit where it should weigh 214x) and one read at the wrong time."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from diffusion_distill.objectives.common import native_gain
    from diffusion_distill.parameterization import from_x0
    from diffusion_distill.schedules import FlowSchedule, VPSchedule

    if prediction_type == "flow":
        schedule = FlowSchedule()
    else:
        schedule = VPSchedule(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                            beta_end=0.012).alphas_cumprod)
    nets = SimpleNamespace(schedule=schedule, teacher_model=SimpleNamespace(
        denoiser=SimpleNamespace(prediction_type=prediction_type)))
    t = torch.tensor([0.05, 0.3, 0.7, 0.999 if prediction_type == "flow" else 1.0])
    gain = native_gain(nets, t)
    g = torch.Generator().manual_seed(0)
    a, b, x_t = (torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    alpha, sigma = schedule.alpha_sigma(t.double())
    native = (from_x0(a, x_t, alpha, sigma, prediction_type)
              - from_x0(b, x_t, alpha, sigma, prediction_type)).flatten(1).norm(dim=1)
    torch.testing.assert_close(native, (a - b).flatten(1).norm(dim=1) / gain)
    if prediction_type == "epsilon":  # SD's top: x0 moves 14.6x per unit of eps
        assert 14 < float(gain[-1]) < 15

# -- the pieces against diffusers ---------------------------------------------------------------

def test_grid_and_boundary_condition_are_diffusers():
    from diffusers import LCMScheduler

    grid = SolverGrid(50, 1000)
    assert grid.k == [n * 20 - 1 for n in range(1, 51)]
    scheduler = LCMScheduler()
    for n in (1, 2, 4, 8):
        scheduler.set_timesteps(n)
        assert grid.inference_timesteps(n) == [int(k) for k in scheduler.timesteps]
    for k in (0, 19, 259, 999):
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(k))
        ours = lcm_scalings(k)
        assert float(ours[0]) == pytest.approx(float(c_skip), rel=1e-6, abs=1e-12)
        assert float(ours[1]) == pytest.approx(float(c_out), rel=1e-6)
    assert lcm_scalings(0) == (1.0, 0.0)  # f(x, 0) = x


# -- (b) tiny diffusers teachers: export and plain diffusers --------------------------------------

def _run(path, tmp_path, method, steps=2, ema_decay=None):
    recipe = tiny_recipe(path, tmp_path / "run", method=method, steps=steps, lr=1e-3,
                         ema_decay=ema_decay, checkpoint_every=steps)
    recipe["data"] = {"source": "world", "resolution": 16}  # real x0 for the consistency pairs
    recipe["student"]["num_steps"] = method.get("phases", 1)  # PCM: one step per phase
    return train(recipe, progress=False, return_nets=True)


@pytest.mark.parametrize("family,method,steps,scheduler", [
    ("sd", {"name": "lcm", "w_min": 1.0, "w_max": 3.0, "loss": "huber"}, (1, 4), "LCMScheduler"),
    ("sd3", {"name": "lcm", "w_min": 1.0, "w_max": 3.0}, (1, 4),
     "FlowMatchEulerDiscreteScheduler"),
    ("sd", {"name": "tcd", "w_min": 1.0, "w_max": 3.0, "gamma": 0.3}, (1, 4), "TCDScheduler"),
    ("sd", {"name": "pcm", "phases": 2, "w_min": 1.0, "w_max": 3.0}, (2, 4), "TCDScheduler"),
    ("sd3", {"name": "pcm", "phases": 2, "w_min": 1.0, "w_max": 3.0}, (2, 4),
     "FlowMatchEulerDiscreteScheduler"),
    ("sd", {"name": "ect"}, (1, 4), "LCMScheduler"),
    ("sd3", {"name": "tcd", "w_min": 1.0, "w_max": 3.0, "gamma": 0.0}, (1, 4),
     "FlowMatchEulerDiscreteScheduler"),
    ("sd3", {"name": "ect"}, (1, 4), "FlowMatchEulerDiscreteScheduler"),
    ("sdxl", {"name": "lcm", "w_min": 1.0, "w_max": 3.0}, (1, 4), "LCMScheduler"),
], ids=["lcm-sd", "lcm-sd3", "tcd-sd", "pcm-sd", "pcm-sd3", "ect-sd", "tcd-sd3", "ect-sd3",
        "lcm-sdxl"])
def test_plain_diffusers_reproduces_the_student(family, method, steps, scheduler, tiny_sd_path,
                                                tiny_sd3_path, tmp_path):

    if family == "sdxl":
        from diffusion_distill.tiny import tiny_sdxl

        path = str(tmp_path / "tiny_sdxl")
        tiny_sdxl().save_pretrained(path)
    else:
        path = tiny_sd_path if family == "sd" else tiny_sd3_path
    run_dir, nets = _run(path, tmp_path, method)
    objective = build_objective(method)
    export = os.path.join(run_dir, "export")
    with open(os.path.join(export, "distill_config.json")) as f:
        config = json.load(f)
    assert config["scheduler"]["class"] == scheduler
    prompts, seeds = ["a red circle", "two green triangles"], (11, 12)
    pipe = reproduces_through_diffusers(export, config, nets, objective, steps, family == "sd3")
    if method["name"] == "lcm" and family in ("sd", "sdxl"):
        # the usual LCM-LoRA lines: LCMScheduler from the teacher's own scheduler config
        from diffusers import LCMScheduler

        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        stock = pipe(prompts, num_inference_steps=4, guidance_scale=1.0, output_type="latent",
                     generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        ours = generate(nets, prompts, objective.sampler(4),
                        [torch.Generator().manual_seed(s) for s in seeds])
        torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-4)
    if method["name"] == "tcd" and family == "sd":
        assert config["steps"]["4"]["call"]["eta"] == 0.3
        assert sorted(int(n) for n in config["steps"]) == list(range(1, 9))


def test_lcm_with_an_ema_target_trains(tiny_sd_path, tmp_path):
    import math

    method = {"name": "lcm", "target": "ema", "w_min": 1.0, "w_max": 3.0}
    run_dir, _ = _run(tiny_sd_path, tmp_path, method, steps=2, ema_decay=0.95)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert all(math.isfinite(row["consistency"]) for row in rows)
    with pytest.raises(ValueError, match="ema_decay"):
        _run(tiny_sd_path, tmp_path / "b", method, steps=1, ema_decay=None)


# -- (c) refusals -------------------------------------------------------------------------------

def test_step_counts_the_export_cannot_serve_are_refused(tiny_sd_path, tmp_path):
    from diffusion_distill.student_pipeline import load_student

    lcm = build_objective({"name": "lcm"})
    assert lcm.servable_steps() == [1, 2, 4, 8]
    with pytest.raises(ValueError, match=r"\[1, 2, 4, 8\]"):
        lcm.sampler(3)
    pcm = build_objective({"name": "pcm", "phases": 2})
    assert pcm.servable_steps() == [2, 4, 6, 8]
    with pytest.raises(ValueError, match=r"\[2, 4, 6, 8\]"):
        pcm.sampler(3)
    run_dir, _ = _run(tiny_sd_path, tmp_path, {"name": "pcm", "phases": 2, "w_min": 1.0,
                                                "w_max": 2.0}, steps=1)
    student = load_student(os.path.join(run_dir, "export"))
    assert student.servable_steps == [2, 4, 6, 8]
    with pytest.raises(ValueError, match=r"\[2, 4, 6, 8\]"):
        student(["a red circle"], num_inference_steps=3, output_type="latent")


def test_tcd_on_a_flow_teacher_exports_only_gamma_0_or_1(tiny_sd3_path):
    from diffusion_distill.build import build_teacher

    teacher = build_teacher(load_recipe({"teacher": {"path": tiny_sd3_path}}))
    tcd = build_objective({"name": "tcd", "gamma": 0.3})
    with pytest.raises(ValueError, match="gamma"):
        tcd.sampler(2).render(teacher)
    for gamma, stochastic in ((0.0, False), (1.0, True)):
        rendered = build_objective({"name": "tcd", "gamma": gamma}).sampler(2).render(teacher)
        assert rendered["scheduler"]["config"]["stochastic_sampling"] is stochastic


def test_recipes_load():
    from diffusion_distill.recipe import find_recipe

    root = os.path.join(os.path.dirname(__file__), "..", "recipes")
    names = [f"{m}_{f}" for m in ("lcm", "tcd", "pcm", "ect") for f in ("sd", "sd3")]
    names += ["hub/lcm_sd15", "hub/lcm_sdxl", "hub/lcm_sd3", "hub/tcd_sdxl", "hub/pcm_sd15",
              "hub/pcm_sdxl"]
    for name in names:
        recipe = load_recipe(find_recipe(os.path.join(root, name + ".yaml")))
        if name.startswith("hub/"):  # hub teachers cannot be downloaded here
            objective = build_objective(recipe["method"], total_steps=recipe["train"]["steps"],
                                        student_steps=recipe["student"]["num_steps"])
        else:
            _, objective, nets = setup_run(recipe)
            assert nets.params("student")
            assert objective.needs_data and recipe["data"]["source"] == "world"
        assert objective.sampler().num_steps == recipe["student"]["num_steps"]


@pytest.mark.parametrize("method,num_steps,steps,base_dtype", [
    ({"name": "lcm", "w_min": 2.0, "w_max": 2.0}, 1, 150, "float32"),
    ({"name": "lcm", "w_min": 2.0, "w_max": 2.0}, 1, 150, "bfloat16"),
    ({"name": "tcd", "w_min": 2.0, "w_max": 2.0, "gamma": 0.3}, 1, 150, "float32"),
    ({"name": "pcm", "phases": 2, "w_min": 2.0, "w_max": 2.0}, 2, 250, "float32"),
], ids=["lcm-1", "lcm-1-bf16", "tcd-1", "pcm-2"])
def test_few_step_samples_move_toward_a_diffusers_teachers_own(method, num_steps, steps,
                                                                base_dtype, tmp_path):
    """On the embedded SD teacher (a small trained diffusers pipeline): the student's few-step
    latents move toward the teacher's own 50-step latents (CFG 3 = LCM's w 2 + 1) by more
    than half of the energy distance they start at (the teacher's weights, few steps).
    ``lcm-1-bf16`` trains the float32 LoRA on a bfloat16 base (train.base_dtype) under bf16
    autocast, against the float32 teacher's reference."""
    from conftest import PROMPTS

    from diffusion_distill.world.toy2d import energy_distance

    recipe = tiny_recipe("embedded:sd", tmp_path / "run", method=method, steps=steps,
                         lr=1e-3, checkpoint_every=steps)
    recipe["data"] = {"source": "world", "resolution": 32}
    recipe["student"]["num_steps"] = num_steps
    recipe["output"]["export"] = False
    teacher, objective, initial = setup_run(load_recipe(recipe), "cpu")  # float32: reference
    if base_dtype != "float32":
        recipe["train"].update(base_dtype=base_dtype, mixed_precision="bf16")
        initial = setup_run(load_recipe(recipe), "cpu")[2]
    prompts = (PROMPTS * 64)[:128]
    noise = torch.randn(128, *teacher.latent_shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference = torch.cat([teacher.sample(prompts[i:i + 32], guidance=3.0,
                                              noise=noise[i:i + 32])
                               for i in range(0, 128, 32)]).flatten(1)

    def distance(nets):
        x = generate(nets, prompts, objective.sampler(), torch.Generator().manual_seed(3))
        return float(energy_distance(x.flatten(1), reference))

    before = distance(initial)
    _, nets = train(load_recipe(recipe), progress=False, return_nets=True)
    after = distance(nets)
    print(f"\n{method['name']} {num_steps} step(s), embedded sd: energy {before:.3f} -> "
          f"{after:.3f}")
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("teacher_path,method", [
    ("embedded:sd", {"name": "ect", "stage_every": 300, "weighting": "native"}),
    ("embedded:sd3", {"name": "ect", "stage_every": 300, "weighting": "native", "P_mean": 1.0}),
], ids=["sd", "sd3"])
def test_ect_few_step_samples_move_toward_the_data_on_a_diffusers_teacher(teacher_path, method,
                                                                          tmp_path):
    """ECT on the embedded teachers (epsilon UNet, flow transformer), from the teacher's
    weights, 300 steps at batch 4, lr 2e-3, one curriculum stage: the 1- and 2-step latents go
    more than half of the way from where they start to where the teacher's own unguided
    50-step latents sit (energy distance to the VAE-encoded world images; no student of this
    teacher gets below that). Measured: sd 1 step 0.686 -> 0.424 (62% of the way to 0.265),
    2 steps 0.455 -> 0.345 (58%); sd3 1.564 -> 0.750 (62% of the way to 0.258), 1.559 ->
    0.633 (71%). ~50 s each on one thread.

    Catches the curriculum advancing within such a budget (the recipes' four stages, 75 steps
    each, lr 1e-3: sd 1 step 0.694, 2 steps 0.448: no way made; docs/consistency.md) and a
    pair without the shared noise (x_r noised with its own eps: sd 1.054 and 0.662, away from
    the data). One stage because every stage change undid the first stage's progress at
    such budgets; sd3 draws its top (P_mean 1.0: 20%) where its 1-step sample is made (0.905
    / 0.771 at 0.0, 1.040 / 0.953 at ECT's -1.1); sd keeps ECT's -1.1 (1.0: 0.473 / 0.380,
    the epsilon UNet's x0 moving 14.6x per unit of its output up there)."""
    moves, floor = few_step_learning(teacher_path, tmp_path / "run", method, steps=300,
                                     lr=2e-3, batch_size=4, num_steps=(1, 2), target="data")
    for k, (before, after) in moves.items():
        way = (before - after) / (before - floor)
        print(f"\nect {k} step(s), {teacher_path}: energy to the data {before:.3f} -> "
              f"{after:.3f} (the teacher's 50 steps: {floor:.3f}): {way:.0%} of the way")
        assert way > 0.5, (k, before, after, floor)
