"""A custom teacher can be class-conditional and guided: ``custom_teacher(encode=, uncond=)``
turns the recipe's prompts into the condition its function and the user's networks take, and
a guided DMD2 student trained on it learns each class; a method's missing roles are named."""
import copy
import math

import pytest
import torch
from torch import nn

from diffusion_distill import custom_teacher
from diffusion_distill.build import setup_run
from diffusion_distill.recipe import load_recipe
from diffusion_distill.student import generate
from diffusion_distill.teachers.custom import make_schedule
from diffusion_distill.train import train
from diffusion_distill.world.toy2d import GaussianMixtureDenoiser, ring_means

K, VAR = 4, 0.02
NULL = K  # the label of the unconditional (dropped) condition


class ClassConditionalMixture(nn.Module):
    """E[x0 | x_t, y]: one Gaussian for label y < K, the whole mixture for the null label."""

    def __init__(self, schedule):
        super().__init__()
        self.means = ring_means(K)
        self.per_class = nn.ModuleList(GaussianMixtureDenoiser(m[None], VAR, schedule)
                                       for m in self.means)
        self.mixture = GaussianMixtureDenoiser(self.means, VAR, schedule)

    def forward(self, x_t, t, cond):
        out = self.mixture(x_t, t)
        for k, denoiser in enumerate(self.per_class):
            mask = (cond == k)[:, None]
            out = torch.where(mask, denoiser(x_t, t), out)
        return out


class ConditionalMLP(nn.Module):
    """The user's student / critic: a label embedding beside x_t and the time features."""

    def __init__(self, width=128):
        super().__init__()
        self.embed = nn.Embedding(K + 1, 16)
        self.net = nn.Sequential(nn.Linear(2 + 16 + 16, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100), 8)))

    def forward(self, x_t, t, cond):
        angles = t[:, None] * self.freqs[None]
        return x_t + self.net(torch.cat([x_t, angles.sin(), angles.cos(), self.embed(cond)], 1))


def labels(prompts):
    return torch.tensor([NULL if p == "" else int(p) for p in prompts])


def _teacher(guidance=2.0):
    fn = ClassConditionalMixture(make_schedule("flow"))
    return custom_teacher(fn, shape=(2,), schedule="flow", prediction_type="sample",
                          encode=labels, uncond="", guidance_scale=guidance)


def _mode_distance(x, prompts):
    means = ring_means(K)
    return float((x - means[labels(prompts)]).norm(dim=1).mean())


def test_guided_conditional_teacher_samples_its_classes():
    teacher = _teacher()
    prompts = [str(k % K) for k in range(400)]
    g = torch.Generator().manual_seed(0)
    x = teacher.sample(prompts, steps=20, guidance=2.0, generator=g)
    # each sample sits on its own class's mode (std 0.14), not elsewhere on the ring (radius 2)
    assert _mode_distance(x, prompts) < 0.4
    with pytest.raises(ValueError, match="one row per prompt"):
        custom_teacher(lambda x, t, c: x, (2,), encode=lambda ps: torch.zeros(1)).prompts(["a", "b"])
    with pytest.raises(ValueError, match="no encode="):
        custom_teacher(lambda x, t, c: x, (2,), uncond="")


def _recipe(tmp_path, method, steps):
    return load_recipe({
        "name": "toy-cond", "teacher": {"path": None, "guidance": 2.0},
        "student": {"num_steps": 1}, "method": method,
        "data": {"source": "prompts", "prompts": [str(k) for k in range(K)]},
        "train": {"steps": steps, "batch_size": 128, "lr": 1e-3, "ema_decay": None,
                  "checkpoint_every": steps, "log_every": 50, "device": "cpu"},
        "output": {"dir": str(tmp_path / "run")}})


def test_guided_dmd2_learns_a_class_conditional_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = _teacher()
    recipe = _recipe(tmp_path, {"name": "dmd2", "critic_steps": 5}, 1000)
    networks = {"student": ConditionalMLP(), "critic": ConditionalMLP()}
    _, objective, nets0 = setup_run(recipe, "cpu", teacher,
                                    {k: copy.deepcopy(v) for k, v in networks.items()})
    prompts = [str(k % K) for k in range(400)]

    def distance(nets):
        x = generate(nets, prompts, objective.sampler(), torch.Generator().manual_seed(2),
                     ema=False)
        return _mode_distance(x, prompts)

    before = distance(nets0)
    _, nets = train(recipe, progress=False, teacher=teacher, networks=networks, return_nets=True)
    after = distance(nets)
    assert before > 1.0  # the untrained student returns roughly its noise
    assert after < 0.5 * before, (before, after)


def test_missing_roles_are_named(tmp_path):
    teacher = _teacher()
    recipe = _recipe(tmp_path, {"name": "phased_dmd", "critic_steps": 2}, 2)
    recipe["student"]["num_steps"] = 2
    with pytest.raises(ValueError, match="student_0.*student_1"):
        setup_run(recipe, "cpu", teacher, {"student": ConditionalMLP(), "critic": ConditionalMLP()})


def test_gan_head_reads_a_user_named_module_of_a_user_network(tmp_path):
    from diffusion_distill.objectives.common import GANHead

    teacher = _teacher()
    recipe = _recipe(tmp_path, {"name": "dmd2", "critic_steps": 2}, 2)
    _, _, nets = setup_run(recipe, "cpu", teacher,
                           {"student": ConditionalMLP(), "critic": ConditionalMLP()})
    with pytest.raises(ValueError, match="set method.gan_feature_module"):
        GANHead.attach(nets)  # a custom network has no family default
    with pytest.raises(ValueError, match="'body' is not a module.*net"):
        GANHead.attach(nets, "body")
    head = GANHead.attach(nets, "net.2")  # the user's hidden layer
    x = torch.randn(8, 2)
    logits = head.logits(nets, x, torch.full((8,), 0.5), teacher.prompts(["1"] * 8))
    assert logits.shape == (8,) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert any(p.grad is not None for p in head.parameters())
