"""Student, critic and EMA adapters on one base: gradients stay in their role, the teacher
is never altered by switching."""
import torch

from diffusion_distill.student import Nets, SharedBaseRoles
from diffusion_distill.teachers import load_teacher
from diffusion_distill.tiny import tiny_sd, tiny_sd3


def _setup(build):
    teacher = load_teacher(build())
    roles = SharedBaseRoles(teacher.backbone, roles=("student", "critic"), rank=4)
    return teacher, roles, Nets(teacher, roles, guidance=3.0)


def _perturb(roles, role):
    # Fresh LoRA has B = 0 (the adapter is a no-op); give it weight so a role really differs.
    with torch.no_grad():
        for p in roles.params(role):
            p.add_(0.05 * torch.randn_like(p))


def test_each_backward_fills_only_its_role():
    for build in (tiny_sd, tiny_sd3):
        teacher, roles, nets = _setup(build)
        _perturb(roles, "student")
        _perturb(roles, "critic")
        cond = teacher.prompts(["a red circle", "a blue square"])
        x_t = torch.randn(2, *teacher.latent_shape)
        for role in ("student", "critic"):
            loss = nets.x0(role, x_t, 0.5, cond).square().mean()
            # Switch away before backward: the graph must still reach this role's adapter.
            roles.activate("critic" if role == "student" else "student")
            loss.backward(inputs=nets.params(role))
            other = "critic" if role == "student" else "student"
            # (a few adapters sit on outputs a model discards, e.g. SD3's last context branch)
            filled = [p.grad is not None and p.grad.abs().sum() > 0 for p in nets.params(role)]
            assert sum(filled) > 0.8 * len(filled)
            assert all(p.grad is None for p in nets.params(other))
            assert all(p.grad is None for p in teacher.backbone.parameters()
                       if not p.requires_grad)
            for p in nets.params(role):
                p.grad = None


def test_switching_never_alters_the_teacher():
    teacher, roles, nets = _setup(tiny_sd)
    cond = teacher.prompts(["a red circle"])
    x_t = torch.randn(1, *teacher.latent_shape)
    before = nets.teacher(x_t, 0.7, cond).clone()
    _perturb(roles, "student")
    _perturb(roles, "critic")
    student = nets.student(x_t, 0.7, cond)
    critic = nets.critic(x_t, 0.7, cond)
    after = nets.teacher(x_t, 0.7, cond)
    assert torch.equal(before, after)
    assert not torch.allclose(student, before) and not torch.allclose(student, critic)
    # The original denoiser (adapters disabled) equals a fresh copy of the teacher.
    fresh = load_teacher(tiny_sd())
    torch.testing.assert_close(fresh.denoiser(x_t, 0.7, cond, guidance=3.0), after)


def test_ema_tracks_the_student():
    _, roles, _ = _setup(tiny_sd)
    _perturb(roles, "student")
    for _ in range(200):
        roles.update_ema(0.9)
    for e, s in zip(roles.params("ema"), roles.params("student")):
        torch.testing.assert_close(e, s, atol=1e-6, rtol=1e-5)
