"""Exported students load with plain diffusers and reproduce the toolkit's own samples."""
import json
import os

import pytest
import torch
from conftest import tiny_recipe

from diffusion_distill.objectives import Objective, build_objective, student_context
from diffusion_distill.recipe import load_recipe
from diffusion_distill.student import generate
from diffusion_distill.student_pipeline import load_student
from diffusion_distill.train import train


@pytest.mark.parametrize("family,steps,method", [
    ("sd", 1, "dmd2"), ("sd", 2, "dmd2"), ("sd3", 2, "dmd2"), ("sd", 2, "phased_dmd")])
def test_plain_diffusers_reproduces_student(family, steps, method, tiny_sd_path, tiny_sd3_path,
                                            tmp_path):
    path = tiny_sd_path if family == "sd" else tiny_sd3_path
    recipe = tiny_recipe(path, tmp_path / "run", method={"name": method, "critic_steps": 1},
                         steps=2)
    recipe["student"]["num_steps"] = steps
    run_dir, nets = train(recipe, progress=False, return_nets=True)
    sampler = build_objective(recipe["method"], nets.teacher_model,
                                **student_context(load_recipe(recipe))).sampler()
    export = os.path.join(run_dir, "export")
    with open(os.path.join(export, "distill_config.json")) as f:
        config = json.load(f)
    assert config["call"]["num_inference_steps"] == steps
    weights = "expert_0/pytorch_lora_weights.safetensors" if method == "phased_dmd" else \
        "pytorch_lora_weights.safetensors"
    assert os.path.isfile(os.path.join(export, weights))

    prompts = ["a red circle", "two green triangles"]
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    torch.manual_seed(3)  # whatever the global RNG: the generator alone fixes the samples
    ours = generate(nets, prompts, sampler, gens)
    student = load_student(export)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    torch.manual_seed(4)
    theirs = student(prompts, generator=gens, output_type="latent").images
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    # Every adapter layer arrived: as many LoRA layers in the loaded pipeline as were trained.
    loaded = sum(n.endswith("lora_A.weight") or ".lora_A." in n
                 for n, _ in student.pipe.components[
                     "unet" if family == "sd" else "transformer"].named_parameters())
    trained = sum(".lora_A." in n and (".ema." in n if method == "dmd2" else ".student_" in n)
                  for n, _ in nets.teacher_model.backbone.named_parameters())
    assert loaded == trained
    # The LoRA really changes the output (the test would be empty if the student = teacher).
    base = generate(nets, prompts, sampler, [torch.Generator().manual_seed(s) for s in (11, 12)],
                    role="teacher")
    assert not torch.allclose(base, ours, atol=1e-4)


def test_export_refuses_another_base(tiny_sd_path, tmp_path):
    from diffusion_distill.tiny import tiny_sd

    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", steps=1)
    run_dir = train(recipe, progress=False)
    other = tmp_path / "other"
    tiny_sd(seed=5).save_pretrained(other)
    with pytest.raises(ValueError, match="trained on a different base"):
        load_student(os.path.join(run_dir, "export"), teacher=str(other))


def test_cli_export_from_run(tiny_sd_path, tmp_path):
    from diffusion_distill.cli import main

    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", steps=1)
    recipe["output"]["export"] = False
    run_dir = train(recipe, progress=False)
    assert main(["export", run_dir, "--out", str(tmp_path / "exp")]) == 0
    assert os.path.isfile(tmp_path / "exp" / "distill_config.json")
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


def test_an_export_copied_elsewhere_loads_in_a_fresh_process(tmp_path):
    """An embedded teacher is recorded as ``embedded:sd``, not as this checkout's folder, so
    an export moved to another folder (machine, checkout) still loads: here a copy, with the
    run folder gone, loaded by a new Python process from another working directory, gives
    the samples the original gave. Catches an export that records the teacher's absolute path
    (the config check) or a load_student that cannot resolve the reference (the process)."""
    import shutil
    import subprocess
    import sys

    import diffusion_distill

    recipe = tiny_recipe("embedded:sd", tmp_path / "run", steps=2)
    export = os.path.join(train(recipe, progress=False), "export")
    moved = tmp_path / "elsewhere" / "student"
    shutil.copytree(export, moved)
    prompts = ["a red circle"]
    here = load_student(export)(prompts, generator=torch.Generator().manual_seed(5),
                                output_type="latent").images
    shutil.rmtree(tmp_path / "run")
    with open(moved / "distill_config.json") as f:
        text = f.read()
    assert json.loads(text)["teacher"]["pretrained"] == "embedded:sd"
    package = os.path.dirname(os.path.abspath(diffusion_distill.__file__))
    assert package not in text and os.path.dirname(package) not in text
    script = (
        "import sys, torch\n"
        "from diffusion_distill import load_student\n"
        "student = load_student(sys.argv[1])\n"
        "out = student(['a red circle'], generator=torch.Generator().manual_seed(5),\n"
        "              output_type='latent').images\n"
        "torch.save(out, sys.argv[2])\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(package)}
    (tmp_path / "cwd").mkdir()
    subprocess.run([sys.executable, "-c", script, str(moved), str(tmp_path / "there.pt")],
                   check=True, cwd=tmp_path / "cwd", env=env, timeout=120)
    torch.testing.assert_close(torch.load(tmp_path / "there.pt"), here)


def test_explicit_student_times_reach_the_export_or_are_refused(tiny_sd_path, tmp_path):
    """student.timesteps is never dropped: every method either trains and exports the student
    on exactly those times (snapped to the VP scheduler's integer steps), or refuses them when
    the recipe loads, naming the key and why. Catches a method that takes only the count of
    the given times (the consistency methods did: their grid's times reached the export)."""
    from diffusion_distill.build import setup_run
    from diffusion_distill.export import export_nets
    from diffusion_distill.objectives import short_names
    from diffusion_distill.recipe import RecipeError

    given = [1.0, 0.6]
    snapped = [1.0, round(0.6 * 999) / 999]  # the integer DDPM step the scheduler visits
    refused = set()
    for name in sorted(short_names()):
        recipe = tiny_recipe(tiny_sd_path, tmp_path / name, method={"name": name}, steps=10)
        recipe["student"]["timesteps"] = given
        try:
            recipe = load_recipe(recipe)
        except RecipeError as e:
            assert "student.timesteps" in str(e) and "cannot be honoured" in str(e), str(e)
            refused.add(name)
            continue
        teacher, objective, nets = setup_run(recipe)
        assert objective.sampler().times == snapped, name
        out = export_nets(nets, teacher, recipe, str(tmp_path / name / "export"),
                          objective=objective)
        with open(os.path.join(out, "distill_config.json")) as f:
            config = json.load(f)
        assert config["student_times"] == snapped, name
        assert config["sampler"]["times"] == snapped, name
    # the consistency methods sample on their solver's grid: only the count is theirs to take
    assert refused == {"lcm", "tcd", "pcm"}


class UnevenTimes(Objective):
    """A user family whose paper samples a count at times of its own (not evenly spaced)."""

    def __init__(self, student_times=None, student_steps=1):
        self.student_times = self.own_times(student_times, student_steps)

    def default_times(self, num_steps):
        return [1.0, 0.3, 0.1][:num_steps]


def test_the_objective_makes_its_students_times(tiny_sd_path, tmp_path):
    """The run hands the objective the recipe's count and the objective's ``default_times``
    make the times, snapped once to the teacher's grid, and they reach the export. Catches
    build.py making the times itself (evenly spaced: [1.0, 0.5] reached this objective), a
    missing snap (0.3 is not a DDPM step) and a method with times of its own that drops given
    times when built outside recipe loading."""
    from diffusion_distill.build import setup_run
    from diffusion_distill.export import export_nets

    raw = tiny_recipe(tiny_sd_path, tmp_path / "run", method={"name": f"{__name__}:UnevenTimes"},
                      steps=2)
    raw["student"]["num_steps"] = 2
    recipe = load_recipe(raw)
    teacher, objective, nets = setup_run(recipe)
    snapped = [1.0, round(0.3 * 999) / 999]
    assert objective.sampler().times == snapped
    out = export_nets(nets, teacher, recipe, str(tmp_path / "export"), objective=objective)
    with open(os.path.join(out, "distill_config.json")) as f:
        assert json.load(f)["student_times"] == snapped
    with pytest.raises(ValueError, match="cannot be honoured"):
        build_objective({"name": "lcm"}, student_times=[1.0, 0.6], student_steps=2)
    assert build_objective({"name": "lcm"}, student_steps=2).student_times == \
        build_objective({"name": "lcm"}).default_times(2)
