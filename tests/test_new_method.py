"""A new method is one class: this file defines one (its loss, its roles, its own sampler) and
runs it through the public API alone — train, export, reload through ``load_student`` and
through plain diffusers, evaluate — with no edit anywhere in the package."""
import json
import os

import torch
import torch.nn.functional as F
from conftest import tiny_recipe

from diffusion_distill.objectives import Objective, RoleSettings
from diffusion_distill.samplers import StudentSampler


class TwoStepDDIMSampler(StudentSampler):
    """Deterministic 2-step sampling at times of this method's own choosing."""

    def __init__(self):
        super().__init__([1.0, 0.6], stochastic=False)


class TwoStepRegression(Objective):
    """The student regresses the guided teacher's x0 at the two times its sampler visits,
    along the teacher's own deterministic path (a toy progressive distillation)."""

    roles = ("student",)

    def __init__(self, student_times=None):
        pass  # the sampler, not the recipe, fixes the times

    def role_settings(self, role):
        return RoleSettings(lr="lr", ema=False)

    def sampler(self, num_steps=None):
        self._check_steps(num_steps)
        return TwoStepDDIMSampler()

    def servable_steps(self):
        return [2]

    def __call__(self, nets, batch, ctx):
        cond = batch["cond"]
        sampler = self.sampler()
        x = ctx.rng.randn(len(cond), *nets.teacher_model.latent_shape)
        loss = 0.0
        for i, t in enumerate(sampler.times):
            with torch.no_grad():
                target = nets.teacher(x, t, cond)
            loss = loss + F.mse_loss(nets.student(x, t, cond), target)
            if i + 1 < len(sampler.times):
                x = sampler.step(nets.schedule, target, x, t, sampler.times[i + 1], None)
        ctx.log(regression=loss)
        yield "student", loss


def test_a_method_defined_here_trains_exports_reloads_and_evaluates(tiny_sd_path, tmp_path):
    import diffusers

    from diffusion_distill import load_student, train  # the public API, as users import it
    from diffusion_distill.eval.protocol import Protocol, evaluate_loaded, load_model
    from diffusion_distill.student import generate

    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run",
                         method={"name": f"{__name__}:TwoStepRegression"}, steps=30, lr=3e-3,
                         checkpoint_every=30, log_every=5)
    recipe["student"]["num_steps"] = 2
    run_dir, nets = train(recipe, progress=False, return_nets=True)

    # It learns: the regression loss falls.
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["regression"] for line in f]
    assert losses[-1] < 0.7 * losses[0], losses

    # The export is rendered from this file's sampler: a deterministic scheduler at its times.
    export = os.path.join(run_dir, "export")
    with open(os.path.join(export, "distill_config.json")) as f:
        config = json.load(f)
    assert config["call"]["timesteps"] == [999, 599]
    assert config["scheduler"]["class"] == "TCDScheduler" and config["call"]["eta"] == 0.0

    prompts = ["a red circle", "two green triangles"]
    ours = generate(nets, prompts, TwoStepDDIMSampler(),
                    [torch.Generator().manual_seed(s) for s in (1, 2)])
    student = load_student(export)
    theirs = student(prompts, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                     output_type="latent").images
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)

    # Plain diffusers with only the export's own config (the README's snippet).
    pipe = diffusers.DiffusionPipeline.from_pretrained(config["teacher"]["pretrained"])
    pipe.load_lora_weights(export)
    pipe.scheduler = getattr(diffusers, config["scheduler"]["class"]).from_config(
        config["scheduler"]["config"])
    plain = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                 output_type="latent", **config["call"]).images
    torch.testing.assert_close(plain, ours, rtol=1e-4, atol=1e-4)

    # A step count the sampler cannot serve is refused with the ones it can.
    try:
        student(prompts, num_inference_steps=4)
        raise AssertionError("4 steps should be refused")
    except ValueError as e:
        assert "[2]" in str(e)

    # And it evaluates like any export.
    result, _ = evaluate_loaded(load_model(export), Protocol(num=8), progress=False)
    assert result["model_kind"] == "student" and result["num_samples"] == 8
    assert result["steps"] == 2
