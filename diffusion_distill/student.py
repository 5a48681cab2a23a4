"""Student, critic and EMA as LoRA adapters on one frozen base.

DMD2's public code keeps three full networks (teacher, fake score, generator); here they are
one set of base weights plus small adapters, switched per call:

=========  ==================================  ==============================
role       weights                             trained by
=========  ==================================  ==============================
teacher    base, adapters disabled             nobody (frozen)
student    base + ``student`` LoRA             the student loss
critic     base + ``critic`` LoRA              the critic's denoising loss
ema        base + ``ema`` LoRA                 an exponential moving average
=========  ==================================  ==============================

peft's ``set_adapter`` also flips ``requires_grad`` of the inactive adapters; a graph built
under one adapter and back-propagated after a switch could silently lose gradients. So the
trainable adapters keep ``requires_grad=True`` throughout: a switch sets only peft's per-layer
active-adapter and disabled fields (or, on a peft whose layers lack them, calls its API and
sets ``requires_grad`` back), and the loop always calls ``backward(inputs=params[role])`` so
that a loss only ever fills its own role's gradients.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import nn

from .acceleration import Attention
from .denoiser import Denoiser

TEACHER = "teacher"
DEFAULT_TARGETS = {
    # attention and feed-forward projections of diffusers' UNets and DiT blocks
    "unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
             "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj"],
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                    "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
                    "ff_context.net.0.proj", "ff_context.net.2", "proj_out"],
}


def default_target_modules(backbone: nn.Module) -> list[str]:
    """Module-name suffixes that exist in this backbone among the usual LoRA targets."""
    names = {n for n, _ in backbone.named_modules()}
    candidates = DEFAULT_TARGETS["unet"] + DEFAULT_TARGETS["transformer"]
    found = [c for c in dict.fromkeys(candidates)
             if any(n == c or n.endswith("." + c) for n in names)]
    if not found:
        raise ValueError(
            f"no usual LoRA target (attention/feed-forward projections) found in "
            f"{type(backbone).__name__}; set student.target_modules in the recipe."
        )
    return found


ALL_LAYERS = "all"


def resolve_target_modules(backbone: nn.Module, target_modules) -> list[str]:
    """The recipe's ``student.target_modules`` as module names: None -> the usual attention and
    feed-forward targets; ``"all"`` -> every linear and convolution layer of the backbone (by
    full name; peft wraps both); a list -> as given."""
    if target_modules is None:
        return default_target_modules(backbone)
    if target_modules == ALL_LAYERS:
        return [n for n, m in backbone.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    return list(target_modules)


class _Switching:
    """``use(role)``: a role active for a block, the previous one restored after it (also on
    an exception); each role set says in ``activate`` what switching means for it."""

    @contextlib.contextmanager
    def use(self, role: str):
        previous = self.active
        self.activate(role)
        try:
            yield
        finally:
            self.activate(previous)


class SharedBaseRoles(_Switching):
    """LoRA adapters for each role on one frozen backbone.

    Args:
        backbone: the teacher's backbone; its own weights stay frozen and unchanged.
        roles: names of the trainable adapters (e.g. ``["student", "critic"]``).
        rank, alpha, target_modules: the LoRA shape, shared by all roles
            (``target_modules``: see :func:`resolve_target_modules`).
        lora_bias: each adapter also trains a bias per targeted layer (peft's ``lora_bias``:
            a bias on ``lora_B``), so a role changes biases without touching the shared base's.
        ema: also keep an ``ema`` adapter tracking ``ema_of``.
    """

    def __init__(self, backbone: nn.Module, roles=("student", "critic"), rank: int = 16,
                 alpha: float | None = None, target_modules: list[str] | str | None = None,
                 lora_bias: bool = False, ema: bool = True, ema_of: str = "student"):
        from peft import LoraConfig, inject_adapter_in_model

        self.backbone = backbone
        self.trainable = list(roles)
        self.ema_of = ema_of if ema else None
        self.lora_config = LoraConfig(r=rank, lora_alpha=alpha or rank,
                                      target_modules=resolve_target_modules(backbone,
                                                                            target_modules),
                                      lora_bias=lora_bias, init_lora_weights=True)
        for p in backbone.parameters():
            p.requires_grad_(False)
        names = self.trainable + (["ema"] if ema else [])
        for name in names:
            config = copy.deepcopy(self.lora_config)
            with warnings.catch_warnings():
                # peft warns that a layer without a base bias cannot be merged with its LoRA
                # bias; adapters here are never merged into the shared base
                warnings.filterwarnings("ignore", message=".*lora_bias=True.*has no bias.*")
                if hasattr(backbone, "add_adapter"):  # diffusers models: their own peft hook
                    backbone.add_adapter(config, adapter_name=name)
                else:
                    inject_adapter_in_model(config, backbone, adapter_name=name)
        self._layers = [m for m in backbone.modules() if _is_lora_layer(m)]
        self._params = dict.fromkeys(names)
        self.rebind_params()
        # peft creates an adapter in its base layer's dtype. On a bfloat16 base the adapters
        # are kept float32 (and so their AdamW state): updates of lr x grad ~1e-6 vanish in
        # bf16's 8-bit mantissa. peft casts a layer's input to its LoRA weights' dtype and the
        # sum back to the base's, so the passes need nothing else.
        for name in names:
            for p in self._params[name]:
                p.data = p.data.float()
        # A switch happens several times per training step (teacher, student, critic passes).
        # peft's enable_adapters/set_adapter walk every adapter's parameters to flip
        # requires_grad, which then has to be undone (module docstring): a walk over every
        # adapter parameter per switch. Where the layers keep their state in
        # peft's two plain fields, a switch sets just those; requires_grad is set once here.
        self._fast_switch = all(
            hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters")
            and not getattr(m, "frozen_peft_weight_names", None) for m in self._layers)
        for name in names:
            for p in self._params[name]:
                p.requires_grad_(name in self.trainable)
        if ema:
            self._copy(ema_of, "ema")
        self.active = None
        self.activate(TEACHER)

    def rebind_params(self) -> None:
        """Each role's parameter list from the backbone's current parameters (also after a
        wrapper, e.g. FSDP2's ``fully_shard`` or ``to_empty``, replaced the objects)."""
        named = list(self.backbone.named_parameters())
        self._params = {name: [p for n, p in named if f".{name}." in n and "lora_" in n]
                        for name in self._params}

    def params(self, role: str) -> list[nn.Parameter]:
        if role not in self._params:
            raise KeyError(f"no role {role!r}; roles here: {', '.join(self._params)}")
        return self._params[role]

    def activate(self, role: str):
        if role == self.active:
            return
        if self._fast_switch:
            off, active = role == TEACHER, [role]
            for layer in self._layers:
                layer._disable_adapters = off
                if not off:
                    layer._active_adapter = active
            self.active = role
            return
        for layer in self._layers:
            if role == TEACHER:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(role)
        # Undo peft's requires_grad flips (see module docstring).
        for name in self.trainable:
            for p in self._params[name]:
                p.requires_grad_(True)
        self.active = role


    @torch.no_grad()
    def _copy(self, src: str, dst: str):
        for a, b in zip(self._params[src], self._params[dst]):
            b.copy_(a)

    @torch.no_grad()
    def update_ema(self, decay: float):
        if self.ema_of is None:
            return
        for e, s in zip(self._params["ema"], self._params[self.ema_of]):
            e.lerp_(s, 1 - decay)

    def state_dict(self, role: str) -> dict[str, torch.Tensor]:
        """The role's adapter weights with the adapter name taken out of the keys."""
        from peft import get_peft_model_state_dict

        with warnings.catch_warnings():
            # peft takes a 1-D lora_B for an unsharded FSDP shard; with lora_bias it is the bias
            warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape.*")
            return get_peft_model_state_dict(self.backbone, adapter_name=role)

    def load_state_dict(self, role: str, state: dict[str, torch.Tensor]):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.backbone, state, adapter_name=role)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter weights for {role!r} have keys this model lacks: "
                             f"{unexpected[:5]} ... Was it trained on another base?")


class SeparateRoles:
    """Each role its own network (full fine-tuning, or a custom teacher's own networks)."""

    def __init__(self, teacher_backbone: nn.Module, networks: dict[str, nn.Module] | None = None,
                 roles=("student", "critic"), ema: bool = True, ema_of: str = "student"):
        for p in teacher_backbone.parameters():
            p.requires_grad_(False)
        networks = dict(networks or {})
        for role in roles:
            # Full fine-tuning starts every role from the teacher, as DMD does; a trained copy
            # is float32 even beside a bfloat16 base (AdamW on bf16 weights loses the updates).
            networks.setdefault(role, copy.deepcopy(teacher_backbone).float())
        if ema:
            networks["ema"] = copy.deepcopy(networks[ema_of])
        self.networks = {TEACHER: teacher_backbone, **networks}
        self.trainable = list(roles)
        self.ema_of = ema_of if ema else None
        for role in self.trainable:
            self.networks[role].requires_grad_(True)
        if ema:
            self.networks["ema"].requires_grad_(False)
        self.active = TEACHER

    def params(self, role):
        return [p for p in self.networks[role].parameters() if p.requires_grad or role == "ema"]

    def activate(self, role):
        self.active = role

    @contextlib.contextmanager
    def use(self, role):
        previous, self.active = self.active, role
        try:
            yield
        finally:
            self.active = previous

    @torch.no_grad()
    def update_ema(self, decay):
        if self.ema_of is None:
            return
        for e, s in zip(self.networks["ema"].parameters(),
                        self.networks[self.ema_of].parameters()):
            e.lerp_(s, 1 - decay)

    def state_dict(self, role):
        return self.networks[role].state_dict()

    def load_state_dict(self, role, state):
        self.networks[role].load_state_dict(state)


class MixedRoles(_Switching):
    """Each role at its own capacity: ``lora`` roles as adapters on the one frozen base,
    ``full`` roles as whole networks (``student.mode`` / ``critic.mode`` in a recipe).

    Used when the modes differ (e.g. a LoRA student beside a full critic); when every role
    has one mode, :class:`SharedBaseRoles` or :class:`SeparateRoles` alone does the job. The
    EMA follows its role's mode (an adapter, or a whole copy). A full role's network is
    copied from the teacher before any adapter is put on the base, so it holds no adapters.

    Args:
        modes: ``{role: "lora" | "full"}`` for every trained role.
        rank, alpha, target_modules, lora_bias: the LoRA shape of the ``lora`` roles.
    """

    def __init__(self, backbone: nn.Module, modes: dict[str, str], rank: int = 16,
                 alpha: float | None = None, target_modules: list[str] | str | None = None,
                 lora_bias: bool = False, ema: bool = True, ema_of: str = "student"):
        unknown = {r: m for r, m in modes.items() if m not in ("lora", "full")}
        if unknown:
            raise ValueError(f"role modes must be 'lora' or 'full', got {unknown}")
        self.modes = dict(modes)
        self.trainable = list(modes)
        self.ema_of = ema_of if ema else None
        full = [r for r in self.trainable if modes[r] == "full"]
        lora = [r for r in self.trainable if modes[r] == "lora"]
        ema_full = ema and modes[ema_of] == "full"
        # copies first: the base gets its adapters below, and a full role must not hold them
        self.full = SeparateRoles(backbone, roles=full, ema=ema_full, ema_of=ema_of)
        self.shared = SharedBaseRoles(backbone, roles=lora, rank=rank, alpha=alpha,
                                      target_modules=target_modules, lora_bias=lora_bias,
                                      ema=ema and not ema_full, ema_of=ema_of)
        self.backbone = backbone
        self.networks = {r: m for r, m in self.full.networks.items() if r != TEACHER}
        self.lora_config = self.shared.lora_config
        self.active = TEACHER

    def _owner(self, role: str):
        """The role set that holds ``role`` (the teacher: the shared base, adapters off)."""
        return self.full if role in self.networks else self.shared

    def is_full(self, role: str) -> bool:
        return role in self.networks

    def rebind_params(self) -> None:
        """The LoRA roles' parameter lists from the base's current parameters (after FSDP2's
        ``fully_shard``); the full roles' networks are read on every call."""
        self.shared.rebind_params()

    def params(self, role: str) -> list[nn.Parameter]:
        return self._owner(role).params(role)

    def activate(self, role: str):
        # a full role's network has no adapters: the base is left as it is
        if role not in self.networks:
            self.shared.activate(role)
        self.active = role


    @torch.no_grad()
    def update_ema(self, decay: float):
        self._owner("ema").update_ema(decay)

    def state_dict(self, role: str):
        return self._owner(role).state_dict(role)

    def load_state_dict(self, role: str, state):
        self._owner(role).load_state_dict(role, state)


def role_is_full(roles, role: str) -> bool:
    """Whether ``role`` is a whole network of its own (not an adapter on the shared base)."""
    if isinstance(roles, MixedRoles):
        return roles.is_full(role)
    return isinstance(roles, SeparateRoles)


def _is_lora_layer(module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


class Nets:
    """What an objective sees: ``nets.teacher / student / critic (x_t, t, cond) -> x0``.

    The teacher is guided (its recipe's scale) unless told otherwise; every other role is
    unguided, as in DMD where the critic models the student's own, unguided distribution.
    """

    def __init__(self, teacher, roles, guidance: float | None = None):
        self.teacher_model = teacher
        self.roles = roles
        self.schedule = teacher.schedule
        self.guidance = teacher.default_guidance if guidance is None else guidance
        self.extra: dict[str, nn.ModuleDict] = {}
        # the run's attention backend, handed over by acceleration.apply_to_run
        self.attention = Attention()
        base = teacher.denoiser
        # a denoiser per whole network; adapter roles go through the teacher's own
        self._denoisers = {r: Denoiser(m, base.schedule, base.prediction_type, base.call,
                                       uncond=base.uncond)
                           for r, m in getattr(roles, "networks", {}).items()}

    def x0(self, role: str, x_t, t, cond, guidance: float | None = None):
        if guidance is None:
            guidance = self.guidance if role == TEACHER else 1.0
        with self.roles.use(role):
            return self.denoiser(role)(x_t, t, cond, guidance=guidance)

    def denoiser(self, role: str) -> Denoiser:
        """The denoiser that computes ``role`` (the teacher's, for an adapter on the shared
        base; its own, for a role with a whole network)."""
        return self._denoisers.get(role, self.teacher_model.denoiser)

    def teacher(self, x_t, t, cond, guidance=None):
        return self.x0(TEACHER, x_t, t, cond, guidance)

    def student(self, x_t, t, cond, role="student"):
        return self.x0(role, x_t, t, cond)

    def critic(self, x_t, t, cond):
        return self.x0("critic", x_t, t, cond)

    def network(self, role: str) -> nn.Module:
        """The module that computes ``role`` (the shared base, or the role's own network)."""
        if role in getattr(self.roles, "networks", {}):
            return self.roles.networks[role]
        return self.roles.backbone

    def params(self, role):
        extra = self.extra[role].parameters() if role in self.extra else []
        return self.roles.params(role) + list(extra)

    def add_extra(self, role: str, name: str, module: nn.Module):
        """Train a small extra module (e.g. DMD2's GAN head) as part of ``role``."""
        self.extra.setdefault(role, nn.ModuleDict())[name] = module

    def state_dict(self, role) -> dict:
        state = dict(self.roles.state_dict(role))
        if role in self.extra:
            state.update({f"extra.{k}": v for k, v in self.extra[role].state_dict().items()})
        return state

    def load_state_dict(self, role, state):
        own = {k: v for k, v in state.items() if not k.startswith("extra.")}
        self.roles.load_state_dict(role, own)
        if role in self.extra:
            self.extra[role].load_state_dict(
                {k[len("extra."):]: v for k, v in state.items() if k.startswith("extra.")})

    def trainable_modules(self) -> list[nn.Module]:
        if isinstance(self.roles, SeparateRoles):
            return [self.roles.networks[r] for r in self.roles.trainable]
        if isinstance(self.roles, MixedRoles):
            return [self.roles.backbone, *(self.roles.networks[r] for r in self.roles.trainable
                                           if self.roles.is_full(r))]
        return [self.roles.backbone]


def serving_role(nets: Nets, role: str, ema: bool = True) -> str:
    """The adapter that serves a trained ``role`` at sampling time: its EMA when kept."""
    if ema and getattr(nets.roles, "ema_of", None) == role:
        return "ema"
    return role


@torch.no_grad()
def generate(nets: Nets, prompts: list[str], sampler, generator=None, role: str | None = None,
             ema: bool = True) -> torch.Tensor:
    """The few-step student's samples (latents), drawn exactly as the exported pipeline does.

    Args:
        sampler: the objective's :class:`~diffusion_distill.samplers.StudentSampler` (or a
            plain list of times: the default re-noising sampler on one ``student`` adapter).
        role: force one role for every step (e.g. ``"teacher"``, ``"student"``); default: the
            sampler's adapters, each served by its EMA where one is kept (``ema=True``).

    Noise comes from diffusers' ``randn_tensor`` with the same generator(s) and in the same
    order as the pipeline (initial latents, then one draw per re-noising), so the same seeds
    give the same samples here and through ``load_student``.
    """
    from diffusers.utils.torch_utils import randn_tensor

    from .samplers import StudentSampler, on_teacher_grid, seeded_global_rng

    if not isinstance(sampler, StudentSampler):
        sampler = StudentSampler(list(sampler))
    teacher = nets.teacher_model
    device = teacher.device
    shape = (len(prompts),) + tuple(teacher.latent_shape)
    cond = teacher.prompts(prompts)
    schedule = nets.schedule
    times = on_teacher_grid(sampler.times, teacher)  # exactly where the export evaluates
    x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    # SD3/Flux pipelines do not hand the generator to the scheduler, so a stochastic flow
    # step draws from torch's global RNG there; load_student seeds that RNG from the
    # generator (seeded_global_rng), and so do we.
    flow = schedule.kind != "vp"
    step_generator = None if flow else generator
    with seeded_global_rng(generator if flow else None):
        for i, t in enumerate(times):
            r = role or serving_role(nets, sampler.adapters[i], ema)
            x0 = sampler.denoise(schedule, nets.x0(r, x, t, cond), x, t)
            if i + 1 == len(times):
                return sampler.finish(schedule, x0, x, t)
            noise = (randn_tensor(shape, generator=step_generator, device=device,
                                  dtype=torch.float32) if sampler.needs_noise(i) else None)
            x = sampler.step(schedule, x0, x, t, times[i + 1], noise)
    return x
