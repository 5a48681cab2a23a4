"""The embedded world's shipped assets and the code that made them."""
import json
import math
import os

import pytest
import torch

from diffusion_distill import world
from diffusion_distill.world.classifier import evaluate_classifier, load_classifier, score_alignment
from diffusion_distill.world.data import eval_prompts, render_prompts

MAX_FILE_BYTES = 20 * 1024 * 1024


def test_assets_are_small_safetensors_and_configs():
    for root, _, files in os.walk(world.ASSETS):
        for name in files:
            path = os.path.join(root, name)
            assert os.path.getsize(path) <= MAX_FILE_BYTES, path
            assert name.endswith((".safetensors", ".json", ".txt")), path


def test_embedded_teacher_path_errors():
    with pytest.raises(ValueError, match="available: sd, sd3"):
        world.embedded_teacher_path("flux")


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_plain_diffusers_loads_and_samples_shipped_teacher(name):
    from diffusers import DiffusionPipeline

    path = world.embedded_teacher_path(name)
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    expected = {"sd": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline"}[name]
    assert type(pipe).__name__ == expected
    out = pipe("a large red circle on the left", num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_shipped_vae_reconstructs_the_world():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.path.join(world.ASSETS, "vae"), local_files_only=True)
    _, labels = eval_prompts("single", 16)
    images = render_prompts(labels)
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mode()
        recon = vae.decode(z).sample
    assert z.shape == (16, 4, 16, 16)
    assert torch.mean((recon - images) ** 2) < 0.01
    scaled = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert 0.6 < scaled.std() < 1.5  # unit-ish latents, as the noise schedules assume


def test_classifier_is_accurate_on_fresh_renders():
    acc = evaluate_classifier(load_classifier(), n=96, seed=31337)
    assert acc["single"] > 0.95 and acc["pair"] > 0.95 and acc["count"] > 0.95, acc


def test_score_alignment_api():
    _, labels = eval_prompts("single", 8)
    images = render_prompts(labels)
    result = score_alignment(images, labels)
    assert set(result) >= {"per_attribute", "whole_prompt", "per_sample"}
    assert set(result["per_attribute"]) == {"count", "shape", "color", "size", "position"}
    assert len(result["per_sample"]) == 8
    # wrong prompts are scored wrong
    wrong = [dict(lab, color="red" if lab["color"] != "red" else "blue") for lab in labels]
    assert score_alignment(images, wrong)["per_attribute"]["color"] < 0.5
    # unsaid attributes are not scored
    vague = [dict(lab, position=None) for lab in labels]
    assert "position" not in score_alignment(images, vague)["per_attribute"]
    with pytest.raises(ValueError, match="one labels dict per image"):
        score_alignment(images, labels[:3])


def test_class_shares_show_a_collapsed_sampler():
    _, labels = eval_prompts("single", 48)
    images = render_prompts(labels)
    fair = score_alignment(images, labels)
    shapes = fair["shares"]["shape"]
    assert abs(sum(c["asked"] for c in shapes.values()) - 1) < 1e-9
    assert fair["worst_share"] > 0.8  # real renders: every class about as often as asked
    # A "student" that draws every prompt as the first prompt's image: one shape for all.
    collapsed = score_alignment(images[:1].expand(len(labels), -1, -1, -1), labels)
    top = labels[0]["shape"]
    assert collapsed["shares"]["shape"][top]["got"] == 1.0
    assert collapsed["worst_share"] == 0.0  # the other classes are never produced


def test_repeated_token_attention_equals_full_context():
    from diffusion_distill.teachers import teacher_from_pipeline
    from diffusion_distill.world.teachers import (
        RepeatedTokenJointAttention,
        build_sd3,
        collapse_repeated_context,
    )

    pipe = build_sd3()
    teacher = teacher_from_pipeline(pipe)
    net = pipe.transformer
    with torch.no_grad():
        for p in net.parameters():  # away from the zero-initialised output layers
            p.add_(0.02 * torch.randn_like(p))
    cond = teacher.prompts(["a red circle left of a blue square", "two green triangles"])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([300.0, 800.0])
    c = cond.tensors
    with torch.no_grad():
        full = net(hidden_states=x, timestep=t, encoder_hidden_states=c["prompt_embeds"],
                   pooled_projections=c["pooled_projections"]).sample
        short, k = collapse_repeated_context(cond)
        assert k == 256 and short.tensors["prompt_embeds"].shape[1] == 17
        net.set_attn_processor(RepeatedTokenJointAttention(k))
        fast = net(hidden_states=x, timestep=t,
                   encoder_hidden_states=short.tensors["prompt_embeds"],
                   pooled_projections=c["pooled_projections"]).sample
    assert torch.allclose(full, fast, atol=1e-5)


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss_denoise"] for line in f]


def test_shortened_teacher_recipe_trains_and_saves_a_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    from diffusion_distill.teacher_training import train_teacher

    out = str(tmp_path / "sd" / "pipeline")
    train_teacher("sd", ["train.steps=24", "train.batch_size=8", "train.log_every=4",
                         "train.checkpoint_every=1000"], out=out, pool=256, cache_dir=None,
                  log=lambda s: None)
    losses = _losses(str(tmp_path / "sd"))
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_shortened_sd3_recipe_runs(tmp_path):
    from diffusion_distill.teacher_training import train_teacher

    out = str(tmp_path / "sd3" / "pipeline")
    train_teacher("sd3", ["train.steps=2", "train.batch_size=4", "train.log_every=1"], out=out,
                  pool=64, cache_dir=None, log=lambda s: None)
    assert os.path.isfile(os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))
    assert all(math.isfinite(x) for x in _losses(str(tmp_path / "sd3")))


def test_teacher_training_applies_or_refuses_every_scale_key(tmp_path, monkeypatch):
    """train.attention / gradient_checkpointing / compile reach the teacher's backbone; a key
    this loop cannot apply is refused before any work. Catches the old loop, which checked
    these keys in the recipe and then ignored them (efficient attention 'ran' on a CPU)."""
    from diffusion_distill import acceleration
    from diffusion_distill.teacher_training import train_teacher

    def run(*keys):
        return train_teacher("sd", ["train.steps=1", "train.batch_size=2", *keys],
                             out=str(tmp_path / "sd" / "pipeline"), pool=8, cache_dir=None,
                             log=lambda s: None)

    with pytest.raises(ValueError, match="'efficient' cannot run on cpu"):
        run("train.attention=efficient")  # CUDA-only: refused only if it is applied
    with pytest.raises(ValueError, match="train.mixed_precision.*teacher training"):
        run("train.mixed_precision=bf16")
    seen = []
    monkeypatch.setattr(acceleration, "enable_gradient_checkpointing",
                        lambda module, roles=None, attention=None: seen.append(attention))
    monkeypatch.setattr(acceleration, "compile_backbone", lambda module: seen.append("compiled"))
    run("train.attention=math", "train.gradient_checkpointing=true", "train.compile=true")
    attentions = [s for s in seen if s != "compiled"]  # one per network (teacher, student, ema)
    assert attentions and len(attentions) == seen.count("compiled")
    # each checkpointing got the run's kernel, to re-enter when it recomputes
    assert all(a.name == "math" and a.context is not None for a in attentions)


def test_teacher_training_and_distillation_run_the_one_loop(tmp_path, monkeypatch,
                                                           tiny_sd_path):
    """Both trainings go through step.run_steps; catches a loop of its own beside it (the
    teacher's training had one, with its own logging and step timing)."""
    import importlib

    from conftest import tiny_recipe

    from diffusion_distill import step
    from diffusion_distill.teacher_training import train_teacher
    from diffusion_distill.train import train

    train_module = importlib.import_module("diffusion_distill.train")  # not the function

    calls = []
    real = step.run_steps

    def counted(*args, **kwargs):
        calls.append(args[5])  # local_batch
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "run_steps", counted)
    monkeypatch.setattr(train_module, "run_steps", counted)
    out = str(tmp_path / "sd" / "pipeline")
    train_teacher("sd", ["train.steps=2", "train.batch_size=2", "train.log_every=1"], out=out,
                  pool=8, cache_dir=None, log=lambda s: None)
    assert len(calls) == 1 and os.path.isfile(os.path.join(out, "model_index.json"))
    with open(tmp_path / "sd" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2] and all("seconds_per_step" in r for r in rows)
    train(tiny_recipe(tiny_sd_path, tmp_path / "run", steps=1), progress=False)
    assert len(calls) == 2


def test_an_interrupted_teacher_training_resumes_to_the_uninterrupted_teacher(tmp_path):
    """Teacher training goes through the run folder as distillation does: stopped after 2 of
    4 steps (train.stop_after, as a kill after the checkpoint) and run again, it resumes from
    its checkpoint and ends with the weights of an uninterrupted 4-step run; a second training
    into a locked folder is refused. Catches a run that starts over instead of resuming (the
    old pipeline-only saves), a checkpoint without the EMA or the optimizer state (Adam's
    moments restart: the weights differ), and data drawn from a stream that is not a
    function of the step (the resumed half draws other latents)."""
    from safetensors.torch import load_file

    from diffusion_distill.checkpoint import list_checkpoints
    from diffusion_distill.run_folder import RunLockedError, run_lock
    from diffusion_distill.teacher_training import train_teacher

    keys = ["train.steps=4", "train.batch_size=2", "train.checkpoint_every=2",
            "train.log_every=1", "train.ema_decay=0.5"]

    said = []

    def run(folder, *extra):
        out = str(tmp_path / folder / "pipeline")
        train_teacher("sd", [*keys, *extra], out=out, pool=8, cache_dir=None, log=said.append)
        return load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))

    whole = run("whole")
    half = run("resumed", "train.stop_after=2")
    assert [s for s, _ in list_checkpoints(str(tmp_path / "resumed"))] == [2]
    said.clear()
    resumed = run("resumed")
    assert any("resuming" in line and "from step 2" in line for line in said), said
    assert any(not torch.equal(half[k], resumed[k]) for k in half)  # it trained on
    assert whole.keys() == resumed.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=0)
    with open(tmp_path / "resumed" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    with run_lock(str(tmp_path / "resumed")), pytest.raises(RunLockedError):
        run("resumed", "train.steps=6")
