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


def test_the_quick_switch_computes_what_peft_s_own_switch_does():
    """Roles switch by setting peft's two per-layer fields (no requires_grad walk); every role
    then computes exactly what peft's enable_adapters/set_adapter path computes."""
    for build in (tiny_sd, tiny_sd3):
        teacher = load_teacher(build())
        roles = SharedBaseRoles(teacher.backbone, roles=("student", "critic"), rank=4, ema=True)
        nets = Nets(teacher, roles, guidance=3.0)
        assert roles._fast_switch
        _perturb(roles, "student")
        _perturb(roles, "critic")
        _perturb(roles, "ema")
        cond = teacher.prompts(["a red circle"])
        x_t = torch.randn(1, *teacher.latent_shape)
        order = ("student", "teacher", "critic", "ema", "student", "critic", "teacher")
        quick = [nets.x0(r, x_t, 0.6, cond) for r in order]
        roles._fast_switch = False
        roles.active = "(forced)"  # so that the next activate really runs peft's path
        roles.activate("teacher")
        slow = [nets.x0(r, x_t, 0.6, cond) for r in order]
        for r, a, b in zip(order, quick, slow):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=r)
        assert len({round(float(v.detach().sum()), 4) for v in quick[:4]}) == 4  # four roles
        # trainable adapters stay trainable, the EMA never is, the base stays frozen
        assert all(p.requires_grad for r in ("student", "critic") for p in roles.params(r))
        assert not any(p.requires_grad for p in roles.params("ema"))
        lora = {id(p) for r in ("student", "critic", "ema") for p in roles.params(r)}
        assert not any(p.requires_grad for p in teacher.backbone.parameters()
                       if id(p) not in lora)


def test_rebinding_finds_parameters_a_wrapper_replaced():
    """FSDP2's fully_shard and to_empty put new parameter objects in the backbone;
    parallel.rebind_roles must make every role train those, not the stale ones."""
    from diffusion_distill.parallel import rebind_roles

    _, roles, _ = _setup(tiny_sd)
    owner = next(m for m in roles.backbone.modules() if hasattr(m, "lora_A"))
    old = owner.lora_A["critic"].weight
    owner.lora_A["critic"].weight = torch.nn.Parameter(old.detach().clone())
    assert not any(p is owner.lora_A["critic"].weight for p in roles.params("critic"))
    rebind_roles(roles)
    assert any(p is owner.lora_A["critic"].weight for p in roles.params("critic"))
    assert not any(p is old for p in roles.params("critic"))
    assert [len(roles.params(r)) for r in ("student", "critic", "ema")] == \
        [len(roles.params("critic"))] * 3
