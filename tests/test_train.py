"""The loop: recipes, resume after a kill, non-finite losses, multi-process equivalence."""
import itertools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import tiny_recipe
from safetensors.torch import load_file

from diffusion_distill.checkpoint import latest_checkpoint, list_checkpoints
from diffusion_distill.objectives import Objective, build_objective, student_context
from diffusion_distill.recipe import RecipeError, load_recipe
from diffusion_distill.step import NonFiniteLossError
from diffusion_distill.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def test_recipe_errors_name_the_key():
    with pytest.raises(RecipeError, match=r"'train.stpes'.*known keys"):
        load_recipe({"train": {"stpes": 3}})
    with pytest.raises(RecipeError, match=r"'train.steps' expects int.*got str"):
        load_recipe({"train": {"steps": "many"}})
    with pytest.raises(RecipeError, match="not key=value"):
        load_recipe({}, ["train.steps"])
    r = load_recipe({}, ["train.steps=7", "method.critic_steps=3"])
    assert r["train"]["steps"] == 7 and r["method"]["critic_steps"] == 3
    with pytest.raises(ValueError, match="has no option"):
        build_objective({"name": "dmd2", "critic_stepz": 3})
    with pytest.raises(ValueError, match="unknown method"):
        build_objective({"name": "dmd9"})


def _recipe_files():
    out = []
    for root, dirs, files in os.walk(os.path.join(ROOT, "recipes")):
        dirs[:] = [d for d in dirs if d != "accelerate"]  # accelerate's launch configs
        out += [os.path.join(root, f) for f in files if f.endswith(".yaml")]
    return sorted(out)


# a hub recipe's teacher (by the words of its id) -> the tiny pipeline of the same family
HUB_FAMILIES = {"stable-diffusion-v1-5": "tiny_sd", "stable-diffusion-xl": "tiny_sdxl",
                "stable-diffusion-3": "tiny_sd3"}


@pytest.fixture(scope="module")
def tiny_family_paths(tmp_path_factory):
    from diffusion_distill import tiny

    paths = {}
    for name in set(HUB_FAMILIES.values()):
        paths[name] = str(tmp_path_factory.mktemp(name))
        getattr(tiny, name)().save_pretrained(paths[name])
    return paths


@pytest.mark.parametrize("path", _recipe_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_recipe_instantiates(path, tiny_family_paths):
    """Every shipped recipe builds: teacher, objective and a trainable adapter per role. A
    hub recipe's teacher cannot be downloaded here, so the same recipe (method, student
    shape, times) is built on the tiny pipeline of its teacher's family."""
    from diffusion_distill.build import setup_run

    recipe = load_recipe(path)
    if "/hub/" in path:
        family = [f for words, f in HUB_FAMILIES.items() if words in recipe["teacher"]["path"]]
        assert len(family) == 1, f"no tiny family for {recipe['teacher']['path']!r}"
        recipe["teacher"]["path"] = tiny_family_paths[family[0]]
        recipe["train"].update(device="cpu", mixed_precision="no")
    _, objective, nets = setup_run(recipe)
    assert objective.roles == build_objective(recipe["method"], **student_context(recipe)).roles \
        or recipe["method"]["name"] == "phased_dmd"  # phased: a role per student step
    assert all(len(nets.params(r)) > 0 for r in objective.roles)


def _weights(run_dir):
    return load_file(os.path.join(latest_checkpoint(run_dir), "weights.safetensors"))


def test_resume_after_kill_equals_uninterrupted(tiny_sd_path, tmp_path):
    # lr_final: the decaying learning rate must also resume where it stopped
    steps = {"steps": 6, "checkpoint_every": 2, "lr_final": 0.1}
    full = tiny_recipe(tiny_sd_path, tmp_path / "full", **steps)
    train(full, progress=False)

    # The same run, killed (SIGKILL) once a mid-run checkpoint exists, then resumed.
    cut = tiny_recipe(tiny_sd_path, tmp_path / "cut", **steps)
    path = tmp_path / "cut.yaml"
    path.write_text(yaml.safe_dump(cut))
    proc = subprocess.Popen([PY, "-m", "diffusion_distill.cli", "train", str(path),
                             "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            # the same thread count as this process: same float summation order
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 2 for s, _ in list_checkpoints(cut["output"]["dir"])):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [s for s, _ in list_checkpoints(cut["output"]["dir"])]
    assert done and max(done) < 6, f"the kill came too late to test anything: {done}"
    train(cut, progress=False)
    a, b = _weights(full["output"]["dir"]), _weights(cut["output"]["dir"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_lr_factor_warms_up_then_decays_to_its_final_fraction():
    from diffusion_distill.step import lr_factor

    assert [lr_factor(s, 100, None) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert lr_factor(0, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(99, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(49, 100, 0.0) == pytest.approx(0.5, abs=0.02)  # cosine: half-way at mid-run
    decay = [lr_factor(s, 100, 0.1, warmup=10) for s in range(100)]
    assert decay[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(a >= b for a, b in itertools.pairwise(decay[9:]))  # monotone after warm-up
    assert decay[-1] == pytest.approx(0.1)


class Exploding(Objective):
    """A denoising loss that turns infinite at step 3."""

    roles = ("student",)

    def __init__(self, student_times=None, total_steps=None):
        pass

    def __call__(self, nets, batch, ctx):
        x = ctx.rng.randn(len(batch["cond"]), *nets.teacher_model.latent_shape)
        loss = nets.student(x, 0.5, batch["cond"]).square().mean()
        ctx.log(denoise=loss)
        yield "student", loss * (float("inf") if ctx.step == 3 else 1.0)

    def nonfinite_advice(self, role):
        return f"defuse the {role}"


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_sd_path, tmp_path):
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", method={"name": "test_train:Exploding"},
                         steps=6, checkpoint_every=2)
    # the advice is the objective's, not one the loop writes for every method
    with pytest.raises(NonFiniteLossError,
                       match=r"step 3: the student loss is inf.*denoise.*defuse the student\.$"):
        train(recipe, progress=False)
    assert [s for s, _ in list_checkpoints(recipe["output"]["dir"])] == [2]
    load_file(os.path.join(latest_checkpoint(recipe["output"]["dir"]), "weights.safetensors"))


def test_cheap_evaluation_goes_into_the_run_log(tiny_sd_path, tmp_path):
    import json

    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", steps=2, eval_every=2, eval_num=8)
    run_dir = train(recipe, progress=False)
    with open(os.path.join(run_dir, "eval.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [0, 2]  # the initialisation, then every eval_every
    last = rows[-1]
    assert last["fd"] > 0 and 0 <= last["recall"] <= 1 and last["nfe"] == 1
    assert "efficientnet" in last["feature_space"]
    # FD to the teacher's own samples (its pipeline's sampler, same prompts and seeds) beside
    # FD to the data: two different distances, both finite.
    assert 0 < last["fd_teacher"] < float("inf") and last["fd_teacher"] != last["fd"]
    # training wall time, for time-to-quality curves: none before the first step
    assert rows[0]["train_seconds"] == 0 and last["train_seconds"] > 0
    assert last["fd"] != rows[0]["fd"]  # two steps of training changed the samples


def test_a_resumed_run_logs_each_evaluated_step_once(tiny_sd_path, tmp_path):
    import json

    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", steps=4, eval_every=1, eval_num=8,
                         checkpoint_every=2, stop_after=3)
    run_dir = train(recipe, progress=False)  # evaluates 0..3, checkpoints at 2 (and 3?)
    recipe["train"]["stop_after"] = None
    train(recipe, progress=False)  # resumes from its last checkpoint, trains on to 4
    with open(os.path.join(run_dir, "eval.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [0, 1, 2, 3, 4], steps


def test_a_source_without_images_is_refused_with_the_objectives_reason():
    """The refusal names what the objective needs real images for: DMD2's gan_weight only
    when it is DMD2's GAN term that needs them, never for another method."""
    from diffusion_distill.batches import Batches
    from diffusion_distill.objectives import build_objective
    from diffusion_distill.recipe import load_recipe

    recipe = load_recipe({"data": {"source": "prompts", "prompts": ["a red circle"]}})
    gan = build_objective({"name": "dmd2", "gan_weight": 0.1})
    with pytest.raises(ValueError, match=r"prompts.*gan_weight=0.1 > 0.*gan_weight=0"):
        Batches(recipe, None, gan)
    lcm = build_objective({"name": "lcm"})
    with pytest.raises(ValueError, match="LCM trains on real images") as refused:
        Batches(recipe, None, lcm)
    assert "gan_weight" not in str(refused.value)
    Batches(recipe, None, build_objective({"name": "dmd2"}))  # no GAN term: prompts suffice
