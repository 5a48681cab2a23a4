"""Sharding a run's networks with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

Only the glue is written here; the engine is torch's:

* :func:`repeated_blocks` names the units FSDP2 gathers one at a time: a UNet's down, mid and
  up blocks, a transformer's blocks (Flux: its double and single stream blocks; Wan: its
  ``blocks``). :func:`shard` calls ``fully_shard`` on each of them and then on the root, so at
  most one block's full weights (plus the root's few loose ones) exist at a time.
* LoRA roles live inside the sharded modules (peft's ``lora_A``/``lora_B`` are parameters of
  the block they adapt), so a block's all-gather brings every role's adapter with it and a
  role switch (:class:`~diffusion_distill.student.SharedBaseRoles`) only flips peft's flags
  while the block is gathered: no extra collective per role.
* After ``fully_shard`` the module's parameters are new ``DTensor`` parameters (each rank's
  shard); :func:`rebind_roles` points a ``SharedBaseRoles`` at them.
* FSDP2 computes gradients on its *unsharded* parameters and reduce-scatters them into the
  sharded ones after backward. The loop's ``backward(inputs=params[role])`` (which keeps a
  loss out of the other roles' gradients) must therefore name the unsharded parameters:
  :class:`ShardedBackward` maps them.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

# children of a diffusers backbone that hold its repeated blocks (a ModuleList, or a block)
BLOCK_CONTAINERS = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks",
                    "single_transformer_blocks", "blocks", "joint_blocks")


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a diffusers backbone, in call order."""
    found = []
    for name in BLOCK_CONTAINERS:
        child = getattr(module, name, None)
        if isinstance(child, nn.ModuleList):
            found.extend(child)
        elif isinstance(child, nn.Module):
            found.append(child)
    return found


def shard(module: nn.Module, mesh, param_dtype: torch.dtype | None = None,
          offload: bool = False) -> nn.Module:
    """``fully_shard`` each repeated block of ``module``, then the module itself.

    Args:
        param_dtype: the dtype weights are gathered and computed in (FSDP2's
            ``MixedPrecisionPolicy``; gradients are reduced in float32). None: as stored.
        offload: keep the shards (and their optimizer state) in CPU memory between uses
            (FSDP2's ``CPUOffloadPolicy``).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype,
                                                   reduce_dtype=torch.float32)
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = repeated_blocks(module)
    if not blocks:
        raise ValueError(f"found no repeated blocks ({', '.join(BLOCK_CONTAINERS)}) in "
                         f"{type(module).__name__}; FSDP would gather the whole network at "
                         "once. Use train.parallel=ddp for it.")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    return module


def rebind_roles(roles) -> None:
    """Point a ``SharedBaseRoles``' per-role parameter lists at the module's current
    parameters (``fully_shard`` and ``to_empty`` replace the parameter objects)."""
    if not hasattr(roles, "_params"):
        return  # SeparateRoles reads its networks' parameters on every call
    named = list(roles.backbone.named_parameters())
    roles._params = {name: [p for n, p in named if f".{name}." in n and "lora_" in n]
                     for name in roles._params}


class ShardedBackward:
    """``backward(loss, inputs=params)`` for parameters that FSDP2 shards.

    FSDP2 builds the graph on its unsharded parameters (one ``nn.Parameter`` per sharded
    one, refilled by each all-gather), so a restriction of backward to some parameters names
    those; FSDP2 then reduce-scatters their gradients into the sharded parameters' ``grad``.
    Parameters no ``fully_shard`` manages are passed through unchanged.
    """

    autocast = contextlib.nullcontext

    def __init__(self, modules):
        self._unsharded = {}
        for root in modules:
            for m in root.modules():
                state = getattr(m, "_get_fsdp_state", None)
                group = state()._fsdp_param_group if state is not None else None
                if group is None:
                    continue
                for fsdp_param in group.fsdp_params:
                    self._unsharded[id(fsdp_param.sharded_param)] = fsdp_param

    def backward(self, loss, inputs):
        names = [self._unsharded[id(p)].unsharded_param if id(p) in self._unsharded else p
                 for p in inputs]
        loss.backward(inputs=names)
