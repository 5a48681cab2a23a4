"""One training step, shared by every loop in the package.

``train_step`` is the step of :mod:`diffusion_distill.train` (distillation),
:mod:`diffusion_distill.teacher_training` (the embedded teachers) and what
``benchmarks/memory.py`` measures: for each accumulation micro-batch the objective yields
``(role, loss)`` pairs, each back-propagated into its own role at once; then per role
clipping and the optimizer step (several processes: FSDP2 averaged the gradients in
backward, see :mod:`.parallel`); then the EMA.

Randomness is a function of (seed, step, micro-batch) (:class:`Randomness`): every process
draws the whole global batch and keeps its slice.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch


class NonFiniteLossError(RuntimeError):
    pass


class Randomness:
    """Global-batch random draws, sliced to this process; seeded by (seed, step, micro)."""

    def __init__(self, seed: int, step: int, micro: int, rank: int = 0, world: int = 1,
                 device="cpu"):
        self.gen = torch.Generator().manual_seed(
            (seed * 1_000_003 + step * 7919 + micro * 31) % (2**63))
        self.rank, self.world, self.device = rank, world, device

    def _slice(self, x):
        n = x.shape[0] // self.world
        return x[self.rank * n:(self.rank + 1) * n].to(self.device)

    def randn(self, *shape):
        return self._slice(torch.randn((shape[0] * self.world, *shape[1:]), generator=self.gen))

    def rand(self, *shape):
        return self._slice(torch.rand((shape[0] * self.world, *shape[1:]), generator=self.gen))

    def randint(self, high, n):
        return self._slice(torch.randint(high, (n * self.world,), generator=self.gen))

    def choice(self, high: int) -> int:
        """One integer in [0, high), the same on every process (e.g. a student step index)."""
        return int(torch.randint(high, (1,), generator=self.gen))

    def uniform(self) -> float:
        """One number in [0, 1), the same on every process (e.g. one guidance scale for the
        whole global batch); one process draws the same value ``rand(1)[0]`` would."""
        return float(torch.rand((1,), generator=self.gen)[0])

    def seed(self) -> int:
        """A seed shared by all processes (e.g. for the procedural data)."""
        return int(torch.randint(2**31 - 1, (1,), generator=self.gen))


class StepContext:
    def __init__(self, step, micro, rng, num_micro, total_steps):
        self.step, self.micro, self.rng = step, micro, rng
        self.total_steps = total_steps
        self.num_micro = num_micro
        self.logs: dict[str, float] = {}

    def log(self, **values):
        for k, v in values.items():
            self.logs[k] = float(v.detach().float().mean()) if torch.is_tensor(v) else float(v)


# -- the loop ---------------------------------------------------------------------------

def lr_factor(step: int, steps: int, final: float | None, warmup: int = 0) -> float:
    """The learning-rate multiplier at ``step``: linear warm-up over ``warmup`` steps, then
    constant (``final`` None) or a cosine from 1 to ``final`` at the last step.

    A function of the step alone, so a resumed run follows the same schedule."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if final is None:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_class(cfg: dict, cuda: bool):
    """The AdamW of ``train.optimizer``: torch's, or bitsandbytes' 8-bit one (its state in 8
    bits: a quarter of AdamW's two fp32 moments). Refused with what to do before any work when
    bitsandbytes is missing or the run is not on CUDA (its 8-bit optimizers are CUDA kernels)."""
    name = cfg.get("optimizer", "adamw")
    if name == "adamw":
        return torch.optim.AdamW
    if not cuda:
        raise ValueError("train.optimizer=adamw8bit needs a CUDA device (bitsandbytes' 8-bit "
                         "optimizers are GPU kernels); this run is on the CPU. Use "
                         "train.optimizer=adamw here.")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ValueError(f"train.optimizer=adamw8bit needs bitsandbytes ({e}); install it "
                         "(pip install bitsandbytes) or use train.optimizer=adamw") from e
    return bnb.optim.AdamW8bit


def build_optimizers(objective, nets, cfg) -> dict:
    """One AdamW per trained role (``train.optimizer``), at the learning rate the objective's
    role settings name."""
    optimizers = {}
    for role in objective.roles:
        key = objective.role_settings(role).lr
        lr = cfg[key] if cfg.get(key) is not None else cfg["lr"]
        params = list(nets.params(role))
        adamw = optimizer_class(cfg, cuda=bool(params) and params[0].is_cuda)
        optimizers[role] = adamw(params, lr=lr, betas=tuple(cfg["betas"]),
                                 weight_decay=cfg["weight_decay"])
        # the recipe's rate for this role, before the schedule's factor
        optimizers[role].base_lr = lr
    return optimizers


def train_step(objective, nets, optimizers, batches, step: int, cfg: dict, local_batch: int,
               rank: int = 0, world: int = 1, device="cpu", accelerator=None,
               run_dir: str | None = None, observe=None) -> dict:
    """One optimisation step of every role the objective trains at ``step``.

    The one training step: the loop, the teachers' own training (a ``denoising`` recipe) and
    ``benchmarks/memory.py`` all call this. Returns the step's logs: ``loss/<role>`` and the
    objective's terms, each a mean over the accumulation micro-batches. ``observe(event,
    role)``, if given, is called before and after each backward and optimizer step (events
    ``forward``, ``backward``, ``before_step``, ``step``): how the memory benchmark measures
    this very step.
    """
    observe = observe or (lambda event, role: None)
    touched: list[str] = []
    logs: dict[str, float] = {}
    backward = accelerator.backward if accelerator is not None else \
        (lambda loss, **kw: loss.backward(**kw))
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    for micro in range(cfg["grad_accum"]):
        rng = Randomness(cfg["seed"], step, micro, rank, world, device)
        ctx = StepContext(step, micro, rng, cfg["grad_accum"], cfg["steps"])
        batch = batches(rng, local_batch)
        with autocast():
            for role, loss in objective(nets, batch, ctx):
                if not torch.isfinite(loss).all():
                    from .checkpoint import latest_checkpoint

                    last = latest_checkpoint(run_dir) if run_dir else None
                    raise NonFiniteLossError(
                        f"step {step}: the {role} loss is {loss.item()} (terms: {ctx.logs}); "
                        f"stopped. The last good checkpoint stays at {last or '(none yet)'}; "
                        f"{objective.nonfinite_advice(role)}.")
                loss = loss / cfg["grad_accum"]
                observe("forward", role)
                backward(loss, inputs=nets.params(role))
                observe("backward", role)
                logs[f"loss/{role}"] = logs.get(f"loss/{role}", 0.0) + float(loss.detach())
                if role not in touched:
                    touched.append(role)
        for k, v in ctx.logs.items():
            logs[k] = logs.get(k, 0.0) + v / cfg["grad_accum"]
    factor = lr_factor(step, cfg["steps"], cfg["lr_final"], cfg.get("warmup_steps", 0))
    for role in touched:
        params = nets.params(role)  # several processes: FSDP2 averaged them in backward
        if cfg["clip_grad"]:
            torch.nn.utils.clip_grad_norm_(params, cfg["clip_grad"])
        for group in optimizers[role].param_groups:
            group["lr"] = optimizers[role].base_lr * factor
        observe("before_step", role)
        optimizers[role].step()
        optimizers[role].zero_grad(set_to_none=True)
        observe("step", role)
    if world > 1:
        logs = global_mean(logs, device)
    ema_of = getattr(nets.roles, "ema_of", None)
    if ema_of and ema_of in touched:
        decay = cfg["ema_decay"]
        if cfg.get("ema_warmup"):  # the decay grows to its set value over the first steps
            decay = min(decay, (1 + step) / (10 + step))
        nets.roles.update_ema(decay)
    return logs


class LogInterval:
    """Each logged value as its mean over the steps of a log interval where it occurred.

    A method alternates roles (DMD2: 5 critic steps, then one with the student), so one step's
    values would show only whichever role that step trained; the interval's mean shows all.
    """

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0

    def add(self, logs: dict):
        self.steps += 1
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def mean(self) -> dict:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def global_mean(logs: dict, device) -> dict:
    """Each logged value as its mean over the processes (one all-reduce for all of them), so
    that a run's metrics.jsonl does not depend on how many processes shared its batch. Every
    process logs the same keys (the same objective, step and seed)."""
    keys = sorted(logs)
    values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    values /= torch.distributed.get_world_size()
    return dict(zip(keys, values.tolist()))


STOP = "stop"  # what an ``after_step`` returns to end :func:`run_steps` early


def run_steps(objective, nets, optimizers, batches, cfg: dict, local_batch: int, start: int,
              end: int, after_step, **step_args) -> None:
    """The training loop, the one every run uses (distillation, the teachers' own training).

    For each step in ``[start, end)``: :func:`train_step` (``step_args``: rank, world,
    device, accelerator, run_dir), its wall time (a CUDA step's queued kernels included), and
    every ``train.log_every`` steps (and at ``end``) the interval's mean logs with ``step`` and
    ``seconds_per_step``. ``after_step(done, logged, seconds)`` does what differs between
    runs (log rows, evaluation, checkpoints, a time budget); ``logged`` is None between log
    rows. It may return :data:`STOP`.
    """
    device = torch.device(step_args.get("device", "cpu"))
    interval, t_last = LogInterval(), time.time()
    for step in range(start, end):
        t_step = time.perf_counter()
        logs = train_step(objective, nets, optimizers, batches, step, cfg, local_batch,
                          **step_args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's queued kernels count toward its time
        seconds = time.perf_counter() - t_step
        interval.add(logs)
        done = step + 1
        logged = None
        if done % cfg["log_every"] == 0 or done == end:
            now = time.time()
            logged = dict(interval.mean(), step=done,
                          seconds_per_step=(now - t_last) / max(1, interval.steps))
            interval, t_last = LogInterval(), now
        if after_step(done, logged, seconds) == STOP:
            return
