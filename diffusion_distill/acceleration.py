"""Attention kernels, activation checkpointing and compilation of the one shared backbone.

Everything here is applied to the teacher's backbone, so student, critic and EMA (LoRA
adapters on it) get it too. Nothing is written by hand that diffusers or torch does:

* **Attention**: diffusers' attention dispatcher (``ModelMixin.set_attention_backend``) where
  the backbone's attention processors dispatch through it (Flux in diffusers 0.42); the UNet,
  SD3, PixArt and Sana processors call ``F.scaled_dot_product_attention`` directly, so there
  the native variants (``math``, ``efficient``, ``flash``, ``cudnn``) are selected with torch's
  ``sdpa_kernel`` around every backbone call, and ``xformers`` with diffusers'
  ``enable_xformers_memory_efficient_attention``. A backend that cannot run here is refused
  with the list of those that can.
* **Gradient checkpointing**: diffusers' ``enable_gradient_checkpointing`` (the trained paths
  recompute their activations in backward instead of keeping them).
* **Compilation**: ``torch.compile`` of the repeated blocks (``compile_repeated_blocks``,
  regional) where diffusers offers it, else of the whole backbone. Adapter switching only
  flips which LoRA weights are active (weights, not graph structure), see the docs.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

# our names for torch's SDPA kernels (``native`` = torch's own choice)
SDPA_KERNELS = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
# dispatcher-only backends (need the processors to dispatch, their package installed, and a
# CUDA device: sage and the hub kernels are CUDA kernels, and flex compiles one). The ``_hub``
# ones fetch their kernel from the Hugging Face Hub on first use (the ``kernels`` package,
# which recent transformers installs), so offline they work only from a warm cache.
DISPATCH_ONLY = ("flex", "sage", "flash_hub", "sage_hub")
# The one list of ``train.attention`` values (the recipe check and its message read it here).
BACKENDS = ("native", *SDPA_KERNELS, "xformers", *DISPATCH_ONLY)
# Backends that replace the backbone's attention processors (rather than choosing the kernel
# the processors' own scaled_dot_product_attention call runs).
REPLACE_PROCESSORS = ("xformers", *DISPATCH_ONLY)


@dataclass(frozen=True)
class Attention:
    """A run's attention backend: what :func:`set_attention_backend` installed, handed to
    whoever must know it (gradient checkpointing re-enters ``context`` when it recomputes a
    block in backward; an objective may refuse a backend), never read back from the model.

    ``context``: for torch's SDPA kernels on processors that call SDPA directly, the
    ``sdpa_kernel`` context every backbone call enters; None otherwise.
    """

    name: str = "native"
    context: Callable[[], contextlib.AbstractContextManager] | None = None


# The forward hooks that enter an Attention's context, per backbone, so that choosing again
# removes them (only this module installs or removes them).
_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sdpa_runs(kernel: SDPBackend, device) -> bool:
    q = torch.randn(1, 2, 8, 16, device=device,
                    dtype=torch.float16 if torch.device(device).type == "cuda" else torch.float32)
    try:
        with sdpa_kernel([kernel]):
            F.scaled_dot_product_attention(q, q, q)
        return True
    except RuntimeError:
        return False


def _xformers_installed() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # noqa: BLE001  (a broken install raises anything)
        return False
    return True


def _dispatches(backbone) -> bool:
    """Whether the backbone's attention goes through diffusers' dispatcher."""
    import inspect

    for module in backbone.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and "dispatch_attention_fn" in inspect.getsource(
                type(processor).__call__):
            return True
    return False


def available_backends(device="cpu", backbone=None) -> list[str]:
    """The attention backends that run on ``device`` (for ``backbone``, when given)."""
    found = ["native"] + [name for name, k in SDPA_KERNELS.items() if _sdpa_runs(k, device)]
    if torch.device(device).type == "cuda" and _xformers_installed():
        found.append("xformers")
    if backbone is not None and torch.device(device).type == "cuda" and _dispatches(backbone):
        from diffusers.models.attention_dispatch import (
            AttentionBackendName,
            _check_attention_backend_requirements,
        )

        for name in DISPATCH_ONLY:
            try:
                _check_attention_backend_requirements(AttentionBackendName(name))
            except (ValueError, RuntimeError, ImportError):
                continue
            found.append(name)
    return found


def set_attention_backend(backbone, backend: str, device="cpu") -> Attention:
    """Make every attention call of ``backbone`` use ``backend`` (see the module docstring);
    returns the :class:`Attention` to hand to whoever must know it."""
    backend = backend or "native"
    if backend == "native" and backbone not in _HOOKS:
        return Attention()
    available = available_backends(device, backbone)
    if backend not in available:
        raise ValueError(
            f"attention backend {backend!r} cannot run on {device} for "
            f"{type(backbone).__name__}; available here: {', '.join(available)}. Set the "
            "recipe key train.attention to one of those (in the recipe file, or as an "
            "override: train.attention=NAME).")
    for handle in _HOOKS.pop(backbone, []):
        handle.remove()
    context = None
    if backend == "xformers":
        backbone.enable_xformers_memory_efficient_attention()
    elif backend in DISPATCH_ONLY:
        try:
            backbone.set_attention_backend(backend)
        except (ValueError, OSError) as error:  # a hub kernel not in the cache while offline
            raise ValueError(
                f"attention backend {backend!r} could not load its kernel ({error}). Download "
                "it once while online (or unset HF_HUB_OFFLINE), or choose another of: "
                f"{', '.join(b for b in available if b != backend)}.") from error
    elif backend in SDPA_KERNELS:
        if _dispatches(backbone):
            backbone.set_attention_backend(f"_native_{backend}")
        else:
            def context():
                return sdpa_kernel([SDPA_KERNELS[backend]])

            _HOOKS[backbone] = _wrap_calls(backbone, context)
    return Attention(backend, context)


def _wrap_calls(backbone, make_context) -> list:
    """Enter ``make_context()`` for the duration of every forward call of ``backbone``;
    returns the hooks' handles."""
    stack: list[contextlib.AbstractContextManager] = []

    def enter(module, args):
        context = make_context()
        context.__enter__()
        stack.append(context)

    def leave(module, args, output):
        stack.pop().__exit__(None, None, None)

    return [backbone.register_forward_pre_hook(enter), backbone.register_forward_hook(leave)]


def enable_gradient_checkpointing(backbone, roles=None, attention: Attention | None = None) -> None:
    """Checkpoint the backbone's blocks (diffusers' own switch).

    With LoRA roles on one base the recomputation in backward must run under the adapter
    that was active in the forward pass: by the time ``backward`` runs, the loop has usually
    switched to another role (or to the bare teacher), and recomputing a block under that
    adapter gives other activations (torch refuses: "a different number of tensors was
    saved"). ``roles`` (a ``SharedBaseRoles``) makes each checkpoint remember its role; the
    ``attention`` that :func:`set_attention_backend` returned is re-entered the same way.
    """
    if not getattr(backbone, "_supports_gradient_checkpointing", False):
        raise ValueError(f"{type(backbone).__name__} does not support gradient checkpointing; "
                         "set train.gradient_checkpointing: false.")
    if roles is not None and not hasattr(roles, "use"):
        roles = None  # a user's own networks: one role per module, nothing to re-enter

    def checkpoint(function, *args, **kwargs):
        role = roles.active if roles is not None else None
        kernel = attention.context if attention is not None else None

        @contextlib.contextmanager
        def recomputation():
            # the forward's adapter and attention kernel (entered by hooks around the
            # backbone's forward, which a recomputation in backward is outside of)
            with contextlib.ExitStack() as stack:
                if role is not None:
                    stack.enter_context(roles.use(role))
                if kernel is not None:
                    stack.enter_context(kernel())
                yield

        return torch.utils.checkpoint.checkpoint(
            function, *args, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), recomputation()), **kwargs)

    backbone.enable_gradient_checkpointing(checkpoint)


def compile_backbone(backbone, **options):
    """``torch.compile`` the repeated blocks where diffusers can (regional compilation: one
    compiled block reused by every layer), else the whole backbone, in place."""
    if getattr(backbone, "_repeated_blocks", None):
        backbone.compile_repeated_blocks(**options)
    else:
        backbone.compile(**options)
    return backbone


def apply_to_run(train_cfg: dict, nets, device="cpu") -> Attention:
    """The recipe's ``train.attention``, ``train.gradient_checkpointing`` and
    ``train.compile`` on the run's backbone (the shared base, or each network of its own);
    returns the run's :class:`Attention`, which the caller hands on (``nets.attention``)."""
    roles = nets.roles
    shared = getattr(roles, "backbone", None)
    # the shared base (its adapters switch per role) and every whole network of its own
    # (a full role beside LoRA roles, or each user network)
    modules = ([shared] if shared is not None else []) + [
        m for m in getattr(roles, "networks", {}).values() if m is not shared]
    attention = Attention()
    for module in modules:
        backend = train_cfg.get("attention") or "native"
        if backend != "native":
            attention = set_attention_backend(module, backend, device)
        if train_cfg.get("gradient_checkpointing"):
            enable_gradient_checkpointing(module, roles if module is shared else None,
                                          attention)
        if train_cfg.get("compile"):
            compile_backbone(module)
    return attention
