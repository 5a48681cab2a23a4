"""Sharding a run's networks with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

Only the glue is written here; the engine is torch's:

* :func:`shard_units` names the units FSDP2 gathers one at a time: a transformer's blocks
  (Flux: its double and single stream blocks; Wan: its ``blocks``); inside a UNet's down, mid
  and up blocks each resnet, each transformer block and each attention's remainder, then the
  block's remainder (its sampler). :func:`shard` calls ``fully_shard`` on each of them and then
  on the root, so at most one unit's full weights (plus the root's few loose ones, and the
  next unit, which FSDP2 prefetches) exist at a time.
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
import os
import re

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


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The modules :func:`shard` gives a ``fully_shard`` each, inner ones before the block
    that holds them (FSDP2 wants them in that order).

    A transformer's blocks are units as they are. A UNet's down, mid and up blocks are too
    coarse: one SD1.5 up-block holds about a fifth of the network, and FSDP2 gathers the next
    unit while one runs, so two processes would not lower the peak. So inside them each
    resnet is a unit, and in each attention (``Transformer2DModel``) each transformer block
    and then the attention itself (its projections and norm); the block keeps what is left
    (its down- or upsampler)."""
    units = []
    for block in repeated_blocks(module):
        inner = list(getattr(block, "resnets", None) or [])
        for attention in getattr(block, "attentions", None) or []:
            inner += [*(getattr(attention, "transformer_blocks", None) or []), attention]
        held = {id(p) for unit in inner for p in unit.parameters()}
        units += inner
        if any(id(p) not in held for p in block.parameters()):  # else nothing left to gather
            units.append(block)
    return units


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
    for unit in shard_units(module):
        fully_shard(unit, **kwargs)
    fully_shard(module, **kwargs)
    return module


def rebind_roles(roles) -> None:
    """Point a ``SharedBaseRoles``' per-role parameter lists at the module's current
    parameters (``fully_shard`` and ``to_empty`` replace the parameter objects)."""
    if hasattr(roles, "rebind_params"):  # SeparateRoles reads its networks' on every call
        roles.rebind_params()


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


# -- launching ------------------------------------------------------------------------------

PARALLEL = ("auto", "none", "ddp", "fsdp")


def _launcher_processes(cmdline: list[str]) -> int | None:
    """The process count an ``accelerate launch`` command line asks for (its
    ``--num_processes``, or its ``--config_file``'s ``num_processes``); None for anything
    else."""
    joined = " ".join(cmdline)
    if not ("accelerate.commands.launch" in joined
            or any(os.path.basename(a) == "accelerate" and i + 1 < len(cmdline)
                   and cmdline[i + 1] == "launch" for i, a in enumerate(cmdline))):
        return None
    value = None
    for i, arg in enumerate(cmdline):
        for flag in ("--num_processes", "--num-processes", "--config_file", "--config-file"):
            if arg == flag and i + 1 < len(cmdline):
                value = (flag, cmdline[i + 1])
            elif arg.startswith(flag + "="):
                value = (flag, arg.split("=", 1)[1])
            if value and value[0].startswith("--num"):
                return int(value[1])
    if value:  # a config file, and no --num_processes after all
        import yaml

        try:
            with open(value[1]) as f:
                return int((yaml.safe_load(f) or {}).get("num_processes", 1))
        except (OSError, ValueError, TypeError, yaml.YAMLError):
            return None
    return None


def check_launch(world: int) -> None:
    """Refuse a launch that asked for several processes and got one.

    ``accelerate launch --num_processes N`` on a machine without GPUs starts ONE process
    unless also given ``--multi_gpu`` (it sets no variable that says N was asked for), so its
    run would silently train alone. The launcher's command line says what was asked."""
    if world > 1:
        return
    try:
        import psutil

        asked = _launcher_processes(psutil.Process(os.getppid()).cmdline())
    except Exception:  # noqa: BLE001  (no parent to read: nothing was asked)
        return
    if asked and asked > 1:
        raise ValueError(
            f"the launcher asked for {asked} processes but started only this one (rank 0 of "
            "1): `accelerate launch --num_processes N` starts one process on a machine "
            "without GPUs unless also given --multi_gpu. Launch with "
            f"`torchrun --nproc_per_node {asked} -m diffusion_distill.cli train RECIPE` "
            f"(or `accelerate launch --multi_gpu --num_processes {asked} ...`).")


def resolve_parallel(cfg: dict, world: int) -> str:
    """``train.parallel`` for this launch: ``none`` for one process, else ``ddp`` or ``fsdp``
    (``auto``: ddp when several processes run)."""
    choice = cfg.get("parallel", "auto")
    if world == 1:
        return "none"
    if choice == "auto":
        return "ddp"
    if choice == "none":
        raise ValueError(f"train.parallel=none trains in one process, but {world} were "
                         "started; set train.parallel=ddp (or auto), or launch one process.")
    return choice


# -- the loop's networks under FSDP2 -----------------------------------------------------------

class ShardedRun:
    """A run's networks under FSDP2, for several processes.

    ``ddp``: a 2-D mesh (processes, 1): every process holds whole weights and FSDP2 averages
    the gradients after each backward (HSDP with shards of one: data parallel through the
    engine). ``fsdp``: a 1-D mesh: weights, gradients and AdamW state split over the
    processes, each block gathered while it runs. Either way the loop sees DTensor parameters;
    checkpoints are written and read through ``torch.distributed.checkpoint`` (each process
    its shards; see :mod:`.checkpoint`), so a run resumes at any process count.

    Built after a fresh run's warm start and before the optimizers, which then hold each
    process's shard of the state; a checkpoint is read after both (DCP fills the shards).
    """

    def __init__(self, nets, parallel: str, world: int, device, param_dtype=None,
                 offload: bool = False, autocast=None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        shape = (world, 1) if parallel == "ddp" else (world,)
        names = ("replicate", "shard") if parallel == "ddp" else ("shard",)
        self.mesh = init_device_mesh(torch.device(device).type, shape, mesh_dim_names=names)
        roles = nets.roles
        shared = getattr(roles, "backbone", None)
        # the shared base (LoRA roles) and every whole network of its own (all roles of a full
        # run; a full critic beside LoRA students, critic.mode: full)
        self.modules = ([shared] if shared is not None else []) + [
            m for m in dict.fromkeys(getattr(roles, "networks", {}).values()) if m is not shared]
        for module in self.modules:
            if parallel == "ddp" and not repeated_blocks(module):
                fully_shard(module, mesh=self.mesh)  # a user's network: one unit, replicated
            else:
                shard(module, self.mesh, param_dtype=param_dtype, offload=offload)
        for extra in nets.extra.values():  # small trained heads (a GAN head): one unit each
            fully_shard(extra, mesh=self.mesh)
            self.modules.append(extra)
        rebind_roles(roles)
        self._backward = ShardedBackward(self.modules)
        self.autocast = autocast or contextlib.nullcontext

    def backward(self, loss, inputs):
        self._backward.backward(loss, inputs)


# -- a process lost ----------------------------------------------------------------------------

class ProcessLostError(RuntimeError):
    """Another process of a several-process run ended (or stopped answering): this one stops
    too, saying which it is and how the run goes on."""


# what a collective says when a peer is gone (gloo, NCCL) or never answers (the timeout)
LOST_PEER = ("connection closed by peer", "connection reset", "broken pipe", "timed out",
             "timeout", "gloo", "nccl", "socket")


def _is_lost_peer(e: BaseException) -> bool:
    import torch.distributed as dist
    from torch.distributed.checkpoint import CheckpointException

    if isinstance(e, (dist.DistError, CheckpointException)):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in LOST_PEER)


def lost_process_message(rank: int, world: int, run_dir: str, timeout: float, cause: str) -> str:
    from .checkpoint import latest_checkpoint

    last = latest_checkpoint(run_dir)
    resume = (f"it resumes from checkpoint {int(os.path.basename(last).rsplit('_', 1)[1])} "
              f"({last})" if last else "it starts over: no checkpoint was written yet")
    return (f"process {rank} of {world} stopped ({cause}): another process of this run ended "
            "or did not answer within "
            f"train.dist_timeout={timeout:g} s (its own error, or the launcher's report, names "
            "its rank and why; if it is an error of the run, deal with it first). Rerun the "
            f"same command: {resume}")


@contextlib.contextmanager
def stop_when_a_process_is_lost(rank: int, world: int, run_dir: str, timeout: float):
    """Turn the loss of another process into :class:`ProcessLostError` with the toolkit's
    message, on whichever process notices it first: a collective that fails (the peer's
    sockets closed, or no answer within the process group's ``timeout``), or the launcher's
    SIGTERM (torchrun stops the others when one fails). Never a hang, never a bare
    traceback from deep inside a collective."""
    import signal

    if world == 1:
        yield
        return

    def terminated(signum, frame):
        raise ProcessLostError(lost_process_message(rank, world, run_dir, timeout,
                                                    "stopped by its launcher, SIGTERM"))
    try:
        previous = signal.signal(signal.SIGTERM, terminated)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        yield
    except ProcessLostError:
        raise
    except BaseException as e:
        if not _is_lost_peer(e):
            raise
        # gloo's "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:7056. This is ...":
        # its first sentence, without the source location
        text = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(e).split()))
        cause = text.split(". ")[0][:200] or type(e).__name__
        raise ProcessLostError(lost_process_message(rank, world, run_dir, timeout,
                                                    cause)) from e
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
