"""DMD's regression loss on cached teacher pairs (method.regression_weight)."""
import os
import shutil

import pytest
import torch
from conftest import tiny_recipe

from diffusion_distill import teacher_pairs
from diffusion_distill.build import setup_run
from diffusion_distill.export import base_fingerprint
from diffusion_distill.recipe import load_recipe
from diffusion_distill.train import train
from diffusion_distill.world.toy2d import MLPDenoiser, toy_teacher


def _toy_run(tmp_path, weight, steps=300):
    torch.manual_seed(0)
    teacher = toy_teacher(k=8, var=0.02, schedule="flow")
    recipe = load_recipe({
        "name": "toy", "teacher": {"path": None, "guidance": 1.0},
        "student": {"num_steps": 1},
        "method": {"name": "dmd2", "critic_steps": 1, "regression_weight": weight,
                   "regression_pairs": 512, "regression_steps": 20},
        "data": {"source": "prompts", "prompts": [""]},
        "train": {"steps": steps, "batch_size": 128, "lr": 1e-3, "ema_decay": None,
                  "checkpoint_every": steps, "log_every": 50, "device": "cpu"},
        "output": {"dir": str(tmp_path / f"run_{weight}")}})
    torch.manual_seed(0)
    networks = {"student": MLPDenoiser(), "critic": MLPDenoiser()}
    run_dir, nets = train(recipe, progress=False, teacher=teacher, networks=networks,
                          return_nets=True)
    # fresh noise (not among the cached pairs): the student's map against the teacher's ODE
    z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = teacher.sample([""] * 1000, noise=z, times=teacher.sample_times(20), guidance=1.0)
        x = nets.student(z, 1.0, teacher.prompts([""] * 1000))
    return run_dir, (x - y).square().sum(1).mean().item()


def test_regression_pulls_the_student_onto_the_teachers_noise_to_sample_map(tmp_path):
    """Distribution matching alone may send z anywhere on the data; the regression term
    makes G(z) the teacher's own sample from z. Catches: pairs whose z and y do not belong
    together (e.g. y drawn from other noise), a regression term that is never added, the
    student evaluated at another time than its sampling time."""
    run_dir, with_reg = _toy_run(tmp_path, 10.0)
    _, without = _toy_run(tmp_path, 0.0)
    assert os.path.isfile(os.path.join(run_dir, teacher_pairs.FILE_NAME))
    # measured: 0.42 against 1.50 (mean squared distance to the teacher's sample from z)
    assert with_reg < 0.5 * without, (with_reg, without)
    assert not os.path.isfile(tmp_path / "run_0.0" / teacher_pairs.FILE_NAME)


def test_pairs_resume_after_an_interruption_and_refuse_another_teacher(tiny_sd_path, tmp_path):
    """Catches: a cache rebuilt from scratch (or with other noise) after an interruption; a
    cache of another teacher silently reused; the same teacher's cache refused because its
    folder moved (a copied run folder, another checkout of an embedded teacher)."""
    from diffusion_distill.tiny import tiny_sd

    recipe = load_recipe(tiny_recipe(tiny_sd_path, tmp_path / "run"))
    teacher, _, _ = setup_run(recipe)

    def fp(t):
        return base_fingerprint(t.backbone)

    def prompts(n, seed):
        return [f"a red circle {i}" for i in range(n)]

    run = str(tmp_path / "run")
    os.makedirs(run)
    whole = teacher_pairs.load_or_make(str(tmp_path), teacher, fp(teacher), prompts, 40, steps=4,
                                       guidance=3.0, log=lambda s: None)
    calls, kill = [], [True]
    sample = teacher.sample

    def interrupted(*args, **kwargs):
        calls.append(len(args[0]))
        if kill[0] and len(calls) == 2:
            raise RuntimeError("killed mid-generation")
        return sample(*args, **kwargs)

    teacher.sample = interrupted
    with pytest.raises(RuntimeError, match="killed"):
        teacher_pairs.load_or_make(run, teacher, fp(teacher), prompts, 40, steps=4, guidance=3.0,
                                   log=lambda s: None)
    calls.clear()
    kill[0] = False
    resumed = teacher_pairs.load_or_make(run, teacher, fp(teacher), prompts, 40, steps=4, guidance=3.0,
                                         log=lambda s: None)
    assert calls == [16, 8]  # the first chunk came from the cache
    torch.testing.assert_close(resumed.z, whole.z, rtol=0, atol=0)
    torch.testing.assert_close(resumed.y, whole.y, rtol=1e-5, atol=1e-5)
    assert resumed.prompts == whole.prompts

    moved = tmp_path / "moved"
    shutil.copytree(tiny_sd_path, moved)
    recipe["teacher"]["path"] = str(moved)
    moved_teacher, _, _ = setup_run(recipe)
    moved_teacher.sample = interrupted
    calls.clear()
    again = teacher_pairs.load_or_make(run, moved_teacher, fp(moved_teacher), prompts, 40,
                                       steps=4, guidance=3.0, log=lambda s: None)
    assert calls == [] and torch.equal(again.y, resumed.y)

    other = tmp_path / "other"
    tiny_sd(seed=5).save_pretrained(other)
    recipe["teacher"]["path"] = str(other)
    other_teacher, _, _ = setup_run(recipe)
    with pytest.raises(ValueError, match="another teacher.*Delete that file"):
        teacher_pairs.load_or_make(run, other_teacher, fp(other_teacher), prompts, 40, steps=4, guidance=3.0)
    with pytest.raises(ValueError, match="other settings.*guidance"):
        teacher_pairs.load_or_make(run, teacher, fp(teacher), prompts, 40, steps=4, guidance=5.0)


def test_regression_weight_is_checked():
    from diffusion_distill.objectives.dmd import DMD2

    with pytest.raises(ValueError, match="regression_weight must be >= 0"):
        DMD2(regression_weight=-1.0)
    with pytest.raises(ValueError, match="1-step student.*2 steps"):
        DMD2(regression_weight=0.25, student_times=[1.0, 0.5])
