"""CUDA-only checks (skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them): every
attention backend that runs on the GPU gives the math kernel's x0 in bf16, a bf16 base trains
with float32 adapters, 8-bit AdamW steps, and a compiled backbone gives the eager x0."""
import pytest
import torch
from conftest import tiny_recipe

from diffusion_distill import tiny
from diffusion_distill.acceleration import (
    available_backends,
    compile_backbone,
    set_attention_backend,
)
from diffusion_distill.teachers import load_teacher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["a red circle", "two blue squares"]
FAMILIES = {"sd": (lambda: tiny.tiny_sd("epsilon"), {}),
            "flux": (tiny.tiny_flux, {"height": 16, "width": 16, "max_sequence_length": 16})}


def _teacher(name, dtype=torch.bfloat16):
    builder, kwargs = FAMILIES[name]
    teacher = load_teacher(builder().to(dtype=dtype), **kwargs)
    return teacher.to("cuda")


def _x0(teacher, seed=0):
    x = torch.randn((2,) + teacher.latent_shape,
                    generator=torch.Generator().manual_seed(seed)).to("cuda")
    with torch.no_grad():
        return teacher.denoiser(x, 0.6, teacher.prompts(PROMPTS), guidance=3.0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_cuda_backend_gives_the_math_x0_in_bf16(name):
    teacher = _teacher(name)
    set_attention_backend(teacher.backbone, "math", "cuda")
    reference = _x0(teacher)
    backends = available_backends("cuda", teacher.backbone)
    # a CUDA build has at least the fused kernels besides math
    assert {"flash", "efficient"} & set(backends), backends
    for backend in backends:
        if backend in ("flex", "flash_hub", "sage_hub"):
            continue  # compiled or fetched kernels: the GPU check times them, if at all
        set_attention_backend(teacher.backbone, backend, "cuda")
        torch.testing.assert_close(_x0(teacher), reference, rtol=3e-2, atol=3e-2,
                                   msg=f"{name} with {backend}")


def test_a_bf16_base_trains_float32_adapters_on_cuda(tiny_sd_path, tmp_path):
    from diffusion_distill import train

    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", device="cuda", base_dtype="bfloat16")
    _, nets = train(recipe, progress=False, return_nets=True)
    base = nets.roles.backbone
    lora = [p for n, p in base.named_parameters() if "lora_" in n]
    frozen = [p for n, p in base.named_parameters() if "lora_" not in n]
    assert lora and all(p.dtype == torch.float32 and p.is_cuda for p in lora)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    student = [p for n, p in base.named_parameters() if "lora_B.student" in n]
    assert any(p.abs().sum() > 0 for p in student), "the student never moved off LoRA B = 0"


def test_adamw8bit_steps_on_cuda():
    pytest.importorskip("bitsandbytes")
    from diffusion_distill.step import optimizer_class

    cls = optimizer_class({"optimizer": "adamw8bit"}, cuda=True)
    w = torch.nn.Parameter(torch.ones(4096, device="cuda"))
    opt = cls([w], lr=1e-2)
    for _ in range(5):
        (w**2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert float(w.mean()) < 1.0 - 1e-2  # it moved down the gradient
    state = next(iter(opt.state.values()))
    assert any(t.dtype == torch.uint8 for t in state.values() if torch.is_tensor(t))


def test_a_compiled_backbone_gives_the_eager_x0_on_cuda():
    teacher = _teacher("sd", dtype=torch.float32)
    reference = _x0(teacher)
    compile_backbone(teacher.backbone)
    torch.testing.assert_close(_x0(teacher), reference, rtol=1e-3, atol=1e-3)
