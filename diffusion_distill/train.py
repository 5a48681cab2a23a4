"""The one training loop, written out.

    for step:
        for micro-batch:                       # gradient accumulation
            for role, loss in objective(nets, batch, ctx):
                loss.backward(inputs=params[role])   # each role fills only its own grads
        for each role that got a loss: all-reduce grads, clip, optimizer step
        EMA of the student; log; checkpoint (atomic)

Randomness and data are functions of (seed, step, micro-batch): every process draws the whole
global batch and keeps its own slice. That is what makes a resumed run equal an uninterrupted
one, and a 2-process run equal a 1-process run with the same global batch.
"""
from __future__ import annotations

import json
import math
import os
import time

import torch
import yaml

from .objectives import Objective, build_objective
from .recipe import load_recipe
from .schedules import student_timesteps
from .student import Nets, SeparateRoles, SharedBaseRoles


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


# -- building the pieces from a recipe --------------------------------------------------

def build_teacher(recipe, device="cpu"):
    from .teachers import load_teacher, teacher_from_pipeline

    spec = recipe["teacher"]
    kwargs = {}
    if spec["guidance"] is not None:
        kwargs["guidance_scale"] = spec["guidance"]
    if spec["prediction_type"] is not None:
        kwargs["prediction_type"] = spec["prediction_type"]
    if spec["build"]:
        module, fn = spec["build"].split(":")
        import importlib

        pipe = getattr(importlib.import_module(module), fn)()
        teacher = teacher_from_pipeline(pipe, **kwargs)
    else:
        teacher = load_teacher(spec["path"], **kwargs)
    return teacher.to(device)


def build_nets(recipe, teacher, objective: Objective, networks=None) -> Nets:
    s = recipe["student"]
    ema = recipe["train"]["ema_decay"] is not None and "student" in objective.roles
    if networks is not None:  # a custom teacher's own student / critic networks
        roles = SeparateRoles(teacher.backbone, networks=networks, roles=objective.roles,
                              ema=ema)
    elif s["mode"] == "lora":
        roles = SharedBaseRoles(teacher.backbone, roles=objective.roles, rank=s["rank"],
                                alpha=s["alpha"], target_modules=s["target_modules"], ema=ema)
    elif s["mode"] == "full":
        roles = SeparateRoles(teacher.backbone, roles=objective.roles, ema=ema)
    else:
        raise ValueError(f"student.mode must be 'lora' or 'full', got {s['mode']!r}")
    return Nets(teacher, roles, guidance=recipe["teacher"]["guidance"])


def student_times(recipe, teacher) -> list[float]:
    """The student's sampling times, highest first.

    On VP schedules they are snapped to the scheduler's integer steps (999, 749, ...), so the
    exported LCMScheduler visits exactly the times the student was trained at.
    """
    s = recipe["student"]
    times = [float(t) for t in s["timesteps"]] if s["timesteps"] else \
        student_timesteps(s["num_steps"], teacher.schedule)
    if teacher.schedule.kind == "vp" and teacher.pipe is not None:  # custom: continuous t
        n = teacher.schedule.num_train_timesteps - 1
        times = [round(t * n) / n for t in times]
    return times


def setup_run(recipe: dict, device="cpu", teacher=None, networks=None):
    """(teacher, objective, nets) for a resolved recipe: what training and export share.

    ``teacher`` (e.g. a custom teacher) and ``networks`` ({role: module}) replace what the
    recipe's teacher section would build.
    """
    teacher = build_teacher(recipe, device) if teacher is None else teacher.to(device)
    objective = build_objective(recipe["method"], student_times=student_times(recipe, teacher),
                                total_steps=recipe["train"]["steps"])
    nets = build_nets(recipe, teacher, objective, networks)
    objective.setup(nets)  # e.g. DMD2's GAN head, trained with the critic
    return teacher, objective, nets


def restore_run(run_dir: str, device="cpu"):
    """(nets, teacher, recipe) of a run folder, with its latest checkpoint loaded."""
    from .checkpoint import latest_checkpoint, load_checkpoint

    path = os.path.join(run_dir, "recipe.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir!r} is not a run folder: no recipe.yaml. Give the "
                                "folder `ddistill train` printed (runs/<name> by default).")
    recipe = load_recipe(path)
    torch.manual_seed(recipe["train"]["seed"])
    teacher, _, nets = setup_run(recipe, device)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"run {run_dir!r} has no checkpoint yet")
    weights, _, _ = load_checkpoint(ckpt)
    for role, state in weights.items():
        nets.load_state_dict(role, state)
    return nets, teacher, recipe


class Batches:
    """Prompts (and real images, when the objective wants them) for each (step, micro)."""

    def __init__(self, recipe, teacher, needs_data: bool):
        d = recipe["data"]
        self.teacher, self.needs_data = teacher, needs_data
        self.source = d["source"]
        if self.source == "world":
            from .world.data import ShapesWorld

            self.world = ShapesWorld(resolution=d["resolution"])
        elif self.source == "folder":
            from .world.data import ImageFolderDataset

            if not d["path"]:
                raise ValueError("data.source is 'folder' but data.path is empty; set "
                                 "data.path=/path/to/images")
            self.folder = ImageFolderDataset(d["path"], resolution=d["resolution"],
                                             on_error=d["on_error"])
        elif self.source == "prompts":
            prompts = d["prompts"]
            if prompts is None and d["path"]:
                with open(d["path"]) as f:
                    prompts = [line.strip() for line in f if line.strip()]
            if not prompts:
                raise ValueError("data.source is 'prompts' but no prompts were given; set "
                                 "data.prompts (a list) or data.path (a .txt, one per line)")
            if needs_data:
                raise ValueError("this method needs real images (e.g. DMD2 with gan_weight > 0)"
                                 "; use data.source=world or folder, or set gan_weight=0")
            self.prompt_list = list(prompts)
        else:
            raise ValueError(f"data.source must be 'world', 'folder' or 'prompts', got "
                             f"{self.source!r}")

    def __call__(self, rng: Randomness, local_batch: int) -> dict:
        n = local_batch * rng.world
        images = None
        if self.source == "world" and not self.needs_data:
            captions, _ = self.world.captions(n, seed=rng.seed())  # no rendering needed
        elif self.source == "world":
            images, captions, _ = self.world.batch(n, seed=rng.seed())
        elif self.source == "prompts":
            index = torch.randint(len(self.prompt_list), (n,), generator=rng.gen).tolist()
            captions = [self.prompt_list[i] for i in index]
        else:
            index = torch.randint(len(self.folder), (n,), generator=rng.gen).tolist()
            images, captions = self.folder.get_many(index)
        lo, hi = rng.rank * local_batch, (rng.rank + 1) * local_batch
        captions = list(captions)[lo:hi]
        batch = {"prompts": captions, "cond": self.teacher.prompts(captions)}
        if self.needs_data:
            batch["x0"] = self.teacher.encode_images(images[lo:hi].to(rng.device))
        return batch


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


def train(recipe: dict | str, overrides=(), progress: bool = True, teacher=None,
          networks=None, return_nets: bool = False):
    """Run (or resume) a recipe; returns the run folder (and the nets, if asked).

    From Python, ``teacher`` may be any Teacher (e.g. ``custom_teacher(fn, shape)``) and
    ``networks`` the user's own {role: module} for it.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    recipe = load_recipe(recipe, overrides)
    cfg = recipe["train"]
    if cfg["mixed_precision"] == "fp16":
        raise ValueError("train.mixed_precision=fp16 needs loss scaling per role, which this "
                         "loop does not do; use bf16 (or no).")
    accelerator = Accelerator(cpu=cfg["device"] == "cpu" or not torch.cuda.is_available(),
                              mixed_precision=cfg["mixed_precision"])
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    run_dir = recipe["output"]["dir"]
    main = accelerator.is_main_process
    if main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "recipe.yaml"), "w") as f:
            yaml.safe_dump(recipe, f, sort_keys=False)

    torch.manual_seed(cfg["seed"])  # adapters' random init is the same on every process
    teacher, objective, nets = setup_run(recipe, device, teacher, networks)
    batches = Batches(recipe, teacher, objective.needs_data)

    per_step = world * cfg["grad_accum"]
    if cfg["batch_size"] % per_step:
        raise ValueError(f"train.batch_size={cfg['batch_size']} must be divisible by processes "
                         f"x grad_accum = {world} x {cfg['grad_accum']}")
    local_batch = cfg["batch_size"] // per_step
    lrs = {role: (cfg["lr_critic"] if role != "student" and cfg["lr_critic"] else cfg["lr"])
           for role in objective.roles}
    optimizers = {role: torch.optim.AdamW(nets.params(role), lr=lrs[role],
                                          betas=tuple(cfg["betas"]),
                                          weight_decay=cfg["weight_decay"])
                  for role in objective.roles}
    weight_roles = list(objective.roles) + (["ema"] if nets.roles.ema_of else [])

    start = 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt:
        weights, optim_states, state = load_checkpoint(ckpt)
        for role in weight_roles:
            nets.load_state_dict(role, {k: v.to(device) for k, v in weights[role].items()})
        for role, opt in optimizers.items():
            opt.load_state_dict(optim_states[role])
        start = state["step"]
        if main:
            print(f"resuming {run_dir} from step {start} ({ckpt})")

    def checkpoint(step):
        if main:
            save_checkpoint(run_dir, step, {r: nets.state_dict(r) for r in weight_roles},
                            optimizers, {"name": recipe["name"]}, keep=cfg["keep_checkpoints"])
        accelerator.wait_for_everyone()

    log_path = os.path.join(run_dir, "metrics.jsonl")
    writer = _tensorboard(run_dir) if main else None
    end = min(cfg["steps"], cfg["stop_after"] or cfg["steps"])
    bar = tqdm(range(start, end), initial=start, total=end, desc=f"train {recipe['name']}",
               disable=not (progress and main))
    t_last = time.time()
    for step in bar:
        touched: list[str] = []
        logs: dict[str, float] = {}
        for micro in range(cfg["grad_accum"]):
            rng = Randomness(cfg["seed"], step, micro, rank, world, device)
            ctx = StepContext(step, micro, rng, cfg["grad_accum"], cfg["steps"])
            batch = batches(rng, local_batch)
            with accelerator.autocast():
                for role, loss in objective(nets, batch, ctx):
                    if not torch.isfinite(loss).all():
                        raise NonFiniteLossError(
                            f"step {step}: the {role} loss is {loss.item()} (terms: "
                            f"{ctx.logs}); stopped. The last good checkpoint stays at "
                            f"{latest_checkpoint(run_dir) or '(none yet)'}; lower train.lr or "
                            "check the data.")
                    loss = loss / cfg["grad_accum"]
                    accelerator.backward(loss, inputs=nets.params(role))
                    logs[f"loss/{role}"] = logs.get(f"loss/{role}", 0.0) + float(loss.detach())
                    if role not in touched:
                        touched.append(role)
            for k, v in ctx.logs.items():
                logs[k] = logs.get(k, 0.0) + v / cfg["grad_accum"]
        factor = lr_factor(step, cfg["steps"], cfg["lr_final"])
        for role in touched:
            params = nets.params(role)
            if world > 1:
                _all_reduce_mean(params)
            if cfg["clip_grad"]:
                torch.nn.utils.clip_grad_norm_(params, cfg["clip_grad"])
            for group in optimizers[role].param_groups:
                group["lr"] = lrs[role] * factor
            optimizers[role].step()
            optimizers[role].zero_grad(set_to_none=True)
        if "student" in touched and nets.roles.ema_of:
            nets.roles.update_ema(cfg["ema_decay"])
        done = step + 1
        if main and (done % cfg["log_every"] == 0 or done == end):
            now = time.time()
            logs.update(step=done, seconds_per_step=(now - t_last) / cfg["log_every"])
            t_last = now
            with open(log_path, "a") as f:
                f.write(json.dumps(logs) + "\n")
            if writer:
                for k, v in logs.items():
                    writer.add_scalar(k, v, done)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss/")})
        if cfg["eval_every"] and (done % cfg["eval_every"] == 0 or done == end) and main:
            row = quick_eval(nets, teacher, recipe, objective)
            row.update(step=done)
            with open(os.path.join(run_dir, "eval.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                  if isinstance(v, float)))
        if done % cfg["checkpoint_every"] == 0 or done == cfg["steps"]:
            checkpoint(done)
    if writer:
        writer.close()
    if end == cfg["steps"] and main and recipe["output"]["export"] and teacher.pipe is not None:
        from .export import export_nets

        export_nets(nets, teacher, recipe, os.path.join(run_dir, "export"))
    accelerator.wait_for_everyone()
    return (run_dir, nets) if return_nets else run_dir


_EVAL_PROTOCOLS: dict = {}


@torch.no_grad()
def quick_eval(nets, teacher, recipe, objective) -> dict:
    """A cheap evaluation of the current student, for the run log (``eval.jsonl``).

    The same protocol as ``ddistill eval`` (world prompts and seeds, cached reference
    features, EfficientNet-Lite0 feature space, alignment), on ``train.eval_num`` samples
    drawn with the toolkit's own few-step sampler, so curves of FD against training step need
    no extra sampling afterwards. Needs the world (data.source: world).
    """
    from .eval.cli import Protocol
    from .eval.evaluate import evaluate
    from .student import generate

    num = recipe["train"]["eval_num"]
    if num not in _EVAL_PROTOCOLS:
        _EVAL_PROTOCOLS[num] = Protocol(num=num, prompts_kind="single")
    protocol = _EVAL_PROTOCOLS[num]
    times = student_times(recipe, teacher)
    experts = sum(r.startswith("student_") for r in objective.roles)
    role = "ema" if getattr(nets.roles, "ema_of", None) else "student"

    def sample_fn(prompts, seeds):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        latents = generate(nets, list(prompts), times, gens, role=role, experts=experts)
        return teacher.decode(latents)

    result = evaluate(sample_fn, protocol.prompts, protocol.seeds,
                      reference_features=protocol.reference, labels=protocol.labels,
                      alignment_fn=protocol.alignment_fn, extractor=protocol.extractor,
                      nfe=float(len(times)), progress=False, keep_images=0)
    result.pop("images", None)
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, dict))}


def _all_reduce_mean(params):
    # One flat buffer: a single collective per role instead of one per tensor.
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).clone()
        offset += n


def _tensorboard(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001  tensorboard is optional (and its import can fail oddly)
        return None
    return SummaryWriter(os.path.join(run_dir, "tb"))


def add_parser(sub):
    p = sub.add_parser("train", help="train (or resume) a recipe")
    p.add_argument("recipe", help="a YAML file in recipes/")
    p.add_argument("overrides", nargs="*", help="key.path=value, e.g. train.steps=200")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=lambda a: print(train(a.recipe, a.overrides,
                                              progress=not a.no_progress)))

