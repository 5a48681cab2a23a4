"""Attention backends, gradient checkpointing and compilation on the shared backbone: every
backend that runs here gives the default's x0 on each family; the selection really reaches
the attention calls; checkpointing leaves the LoRA gradients unchanged; a compiled backbone
switches adapters without compiling again once each role has been seen."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusion_distill import tiny
from diffusion_distill.acceleration import (
    _wrap_calls,
    available_backends,
    compile_backbone,
    enable_gradient_checkpointing,
    set_attention_backend,
)
from diffusion_distill.student import Nets, SharedBaseRoles
from diffusion_distill.teachers import load_teacher

FAMILIES = {
    "sd": (lambda: tiny.tiny_sd("epsilon"), {}),
    "sdxl": (tiny.tiny_sdxl, {}),
    "sd3": (tiny.tiny_sd3, {}),
    "flux": (tiny.tiny_flux, {"height": 16, "width": 16, "max_sequence_length": 16}),
    "pixart": (tiny.tiny_pixart, {}),
    "sana": (tiny.tiny_sana, {"height": 32, "width": 32}),
}
PROMPTS = ["a red circle", "two blue squares"]


def _teacher(name):
    builder, kwargs = FAMILIES[name]
    return load_teacher(builder(), **kwargs)


def _x0(teacher, seed=0):
    x = torch.randn((2,) + teacher.latent_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return teacher.denoiser(x, 0.6, teacher.prompts(PROMPTS), guidance=3.0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_available_backend_gives_the_default_x0(name):
    teacher = _teacher(name)
    reference = _x0(teacher)
    backends = available_backends("cpu", teacher.backbone)
    assert "native" in backends and "math" in backends
    for backend in backends:
        set_attention_backend(teacher.backbone, backend)
        torch.testing.assert_close(_x0(teacher), reference, rtol=1e-4, atol=1e-5,
                                   msg=f"{name} with {backend}")


def test_the_selection_reaches_the_attention_calls():
    teacher = _teacher("sd")
    # a kernel CPU builds lack: if the context reaches the UNet's attention, the call fails
    _wrap_calls(teacher.backbone, lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]))
    with pytest.raises(RuntimeError):
        _x0(teacher)


def test_unavailable_backend_is_refused_with_the_list():
    teacher = _teacher("sd")
    with pytest.raises(ValueError, match="available here: native, math") as refused:
        set_attention_backend(teacher.backbone, "efficient")  # CUDA only
    # it names the recipe key that exists, not a flag no command has
    assert "train.attention" in str(refused.value) and "--attention" not in str(refused.value)
    with pytest.raises(ValueError, match="cannot run"):
        set_attention_backend(teacher.backbone, "sage")


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_gradient_checkpointing_keeps_the_lora_gradients(name):
    def grads(checkpoint):
        torch.manual_seed(0)
        teacher = _teacher(name)
        roles = SharedBaseRoles(teacher.backbone, roles=("student",), rank=2, ema=False)
        if checkpoint:
            enable_gradient_checkpointing(teacher.backbone, roles)
        with torch.no_grad():  # a LoRA that is not a no-op, so every path has a gradient
            for p in roles.params("student"):
                p.add_(0.05 * torch.randn_like(p))
        nets = Nets(teacher, roles)
        x = torch.randn((2,) + teacher.latent_shape, generator=torch.Generator().manual_seed(1))
        nets.student(x, 0.5, teacher.prompts(PROMPTS)).square().mean().backward(
            inputs=nets.params("student"))
        assert teacher.backbone.is_gradient_checkpointing == checkpoint
        return [p.grad.clone() for p in nets.params("student")]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_checkpointing_without_the_roles_fails_loudly():
    # the hazard the roles argument removes: backward recomputes under the teacher's state
    teacher = _teacher("sd")
    enable_gradient_checkpointing(teacher.backbone)
    roles = SharedBaseRoles(teacher.backbone, roles=("student",), rank=2, ema=False)
    nets = Nets(teacher, roles)
    x = torch.randn((2,) + teacher.latent_shape)
    out = nets.student(x, 0.5, teacher.prompts(PROMPTS)).square().mean()
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        out.backward(inputs=nets.params("student"))


def test_compiled_backbone_switches_roles_without_recompiling():
    import torch._dynamo

    torch._dynamo.reset()
    teacher = _teacher("sd3")
    roles = SharedBaseRoles(teacher.backbone, roles=("student", "critic"), rank=2, ema=False)
    nets = Nets(teacher, roles)
    compile_backbone(teacher.backbone, backend="eager", dynamic=False)
    x, cond = torch.randn((2,) + teacher.latent_shape), teacher.prompts(PROMPTS)

    def frames():
        return sum(torch._dynamo.utils.counters["frames"].values())

    with torch.no_grad():
        for role in ("student", "critic", "teacher"):  # each role seen once
            nets.x0(role, x, 0.5, cond)
        seen = frames()
        for _ in range(3):
            for role in ("student", "critic", "teacher"):
                nets.x0(role, x, 0.5, cond)
    assert frames() == seen, "switching adapters recompiled"
    torch._dynamo.reset()


def test_recipe_keys_train_the_same_student(tiny_sd_path, tmp_path):
    """train.attention=math and train.gradient_checkpointing=true change how, not what."""
    from conftest import tiny_recipe

    from diffusion_distill.train import train

    def weights(out, **train_keys):
        recipe = tiny_recipe(tiny_sd_path, tmp_path / out, steps=2, **train_keys)
        _, nets = train(recipe, progress=False, return_nets=True)
        return [p.detach().clone() for p in nets.params("student")]

    plain = weights("plain")
    lean = weights("lean", attention="math", gradient_checkpointing=True)
    # Adam divides by the gradient's running RMS, so kernel rounding (~1e-7) in a near-zero
    # gradient can move one weight by ~lr * 1e-2; everything else agrees far more closely
    for a, b in zip(plain, lean, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=3e-5)
    with pytest.raises(ValueError, match="train.attention"):
        from diffusion_distill.recipe import load_recipe

        load_recipe(tiny_recipe(tiny_sd_path, tmp_path / "bad", attention="fastest"))


def test_8bit_adamw_is_refused_before_any_work_where_it_cannot_run(tiny_sd_path, tmp_path,
                                                                  monkeypatch):
    import sys

    from conftest import tiny_recipe

    from diffusion_distill.step import optimizer_class
    from diffusion_distill.train import train

    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", steps=2, optimizer="adamw8bit")
    with pytest.raises(ValueError, match="adamw8bit needs a CUDA device.*optimizer=adamw"):
        train(recipe, progress=False)
    assert not (tmp_path / "run").exists()  # nothing was written
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ValueError, match="needs bitsandbytes.*pip install bitsandbytes"):
        optimizer_class({"optimizer": "adamw8bit"}, cuda=True)
    assert optimizer_class({"optimizer": "adamw"}, cuda=False) is torch.optim.AdamW


def test_the_recipe_checks_and_names_the_one_list_of_backends():
    """Every backend acceleration knows is a valid train.attention, and the refusal of an
    unknown one names them all (the recipe's own copy of the list had lost the _hub ones)."""
    from diffusion_distill.acceleration import BACKENDS
    from diffusion_distill.recipe import RecipeError, load_recipe

    for name in BACKENDS:
        assert load_recipe({"train": {"attention": name}})["train"]["attention"] == name
    with pytest.raises(RecipeError, match="train.attention") as refused:
        load_recipe({"train": {"attention": "flashy"}})
    assert all(name in str(refused.value) for name in BACKENDS)
