"""student.init: a run's student starts from another export of the same teacher."""
import os

import pytest
import torch
from conftest import tiny_recipe

from diffusion_distill.build import setup_run
from diffusion_distill.export import base_fingerprint
from diffusion_distill.recipe import load_recipe
from diffusion_distill.train import train
from diffusion_distill.warm_start import init_student


def _student_out(nets, role="student"):
    teacher = nets.teacher_model
    x = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return nets.x0(role, x, 0.9, teacher.prompts(["a red circle", "a blue square"]))


def _init(recipe):
    recipe = load_recipe(recipe)
    torch.manual_seed(1)
    teacher, _, nets = setup_run(recipe)
    init_student(nets, teacher, recipe, base_fingerprint(teacher.backbone), log=lambda s: None)
    return nets


@pytest.fixture(scope="module")
def lora_export(tiny_sd_path, tmp_path_factory):
    """A trained 2-step LoRA export (rank 4) of the tiny SD teacher, and its nets."""
    tmp = tmp_path_factory.mktemp("warm")
    recipe = tiny_recipe(tiny_sd_path, tmp / "first", steps=3)
    recipe["student"]["num_steps"] = 2
    run_dir, nets = train(recipe, progress=False, return_nets=True)
    return os.path.join(run_dir, "export"), nets


def test_a_lora_export_starts_the_student_and_its_ema(lora_export, tiny_sd_path, tmp_path):
    """Catches: weights that do not arrive (the student would still be the teacher), keys
    loaded into another adapter, an EMA left at the teacher."""
    export, trained = lora_export
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "dmd")
    recipe["student"]["init"] = export
    nets = _init(recipe)
    want = _student_out(trained, "ema")  # the export serves the EMA
    torch.testing.assert_close(_student_out(nets), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_student_out(nets, "ema"), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_student_out(nets, "teacher"), want, atol=1e-4)
    # and through the loop: a fresh run starts there, a second call resumes its checkpoint
    recipe["train"]["steps"] = 2
    train(recipe, progress=False)


def test_refusals(lora_export, tiny_sd_path, tmp_path):
    from diffusion_distill.tiny import tiny_sd

    export, _ = lora_export
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "dmd")
    recipe["student"]["init"] = export
    recipe["student"]["rank"] = 8
    with pytest.raises(ValueError, match="another LoRA layout.*rank: export 4, this run 8"):
        _init(recipe)
    recipe["student"]["rank"], recipe["student"]["mode"] = 4, "full"
    with pytest.raises(ValueError, match="LoRA export, but student.mode is full"):
        _init(recipe)
    other = tmp_path / "other"
    tiny_sd(seed=5).save_pretrained(other)
    recipe["student"]["mode"], recipe["teacher"]["path"] = "lora", str(other)
    with pytest.raises(ValueError, match="trained on another base"):
        _init(recipe)
    recipe["student"]["init"] = str(other)  # a whole pipeline cannot start a LoRA student
    with pytest.raises(ValueError, match="whole pipeline.*--lora-rank"):
        _init(recipe)


def test_a_whole_pipeline_starts_a_full_student(tiny_sd_path, tmp_path):
    """Catches: a full student left at the teacher's weights."""
    from diffusion_distill.tiny import tiny_sd

    other = tmp_path / "other"
    tiny_sd(seed=5).save_pretrained(other)
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "dmd")
    recipe["student"].update(mode="full", init=str(other))
    nets = _init(recipe)
    theirs = tiny_sd(seed=5).unet.state_dict()
    for k, v in nets.network("student").state_dict().items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=0)
