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

import contextlib
import json
import os
import platform
import time

import torch
import yaml

from .build import setup_run, student_times  # noqa: F401  (student_times: public here too)
from .recipe import load_recipe
from .step import (  # noqa: F401  (public here too: the loop's pieces)
    LogInterval,
    NonFiniteLossError,
    Randomness,
    StepContext,
    _all_reduce_mean,
    build_optimizers,
    lr_factor,
    optimizer_class,
    train_step,
)


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


# -- the run folder: lock, recipe, resume ---------------------------------------------------

# Keys that make a run a different run: resuming its checkpoints under other values would
# load weights into the wrong shapes, or train them towards another target.
# (The method's options are compared one by one; ``train.ema_decay`` only for on / off.)
IDENTITY_KEYS = ("teacher.path", "teacher.build", "teacher.prediction_type", "student.mode",
                 "student.rank", "student.alpha", "student.target_modules", "student.num_steps",
                 "student.timesteps")
LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextlib.contextmanager
def run_lock(run_dir: str):
    """``run_dir/.lock`` with this process's pid for as long as the run trains. A second
    training into the same folder is refused; a lock whose process is gone is taken over."""
    from .checkpoint import warn

    path = os.path.join(run_dir, LOCK_NAME)
    me = {"pid": os.getpid(), "host": platform.node(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = json.load(f)
                pid = int(owner["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                owner, pid = {}, None
            same_host = owner.get("host", me["host"]) == me["host"]
            if pid is not None and same_host and (pid == me["pid"] or _pid_alive(pid)):
                raise RunLockedError(
                    f"run folder {run_dir!r} is in use: process {pid} is training into it "
                    f"(lock file {path}). Wait for it to finish, stop it, or give this run "
                    "another output.dir") from None
            if pid is not None and not same_host:
                raise RunLockedError(
                    f"run folder {run_dir!r} is locked by process {pid} on {owner['host']!r} "
                    f"(lock file {path}); if that run is over, remove the lock file yourself")
            warn(f"taking over the stale lock {path} " + (
                f"(process {pid} is not running)" if pid is not None else "(unreadable)"))
            os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    mine = False
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError), open(path) as f:
            mine = json.load(f).get("pid") == me["pid"]
        if mine:
            os.remove(path)


class RunLockedError(ValueError):
    pass


def _identity_diff(old: dict, new: dict) -> list[str]:
    from .recipe import _get

    diff = []
    for key in IDENTITY_KEYS:
        try:
            a = _get(old, key)
        except (KeyError, TypeError):
            a = None
        b = _get(new, key)
        if a != b:
            diff.append(f"{key}: {a!r} -> {b!r}")
    a, b = old.get("method") or {}, new["method"]
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            diff.append(f"method.{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}")
    a, b = (old.get("train") or {}).get("ema_decay"), new["train"]["ema_decay"]
    if (a is None) != (b is None):
        change = "removed" if b is None else "added"
        diff.append(f"train.ema_decay: {a!r} -> {b!r} (the EMA role {change})")
    return diff


def check_run_folder(run_dir: str):
    """A run folder is new, empty, or an earlier run's (it has ``recipe.yaml``)."""
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"output.dir {run_dir!r} is a file, not a folder; give a folder for "
                         "the run (e.g. output.dir=runs/NAME)")
    if os.path.isdir(run_dir) and not os.path.isfile(os.path.join(run_dir, "recipe.yaml")):
        entries = [e for e in os.listdir(run_dir) if e != LOCK_NAME]
        if entries:
            raise ValueError(
                f"output.dir {run_dir!r} already holds other files "
                f"({', '.join(sorted(entries)[:5])}{' ...' if len(entries) > 5 else ''}) and "
                "no recipe.yaml, so it is not a run folder; choose a new output.dir (e.g. "
                "output.dir=runs/NAME) or empty it yourself")


def prepare_run_dir(recipe: dict, new_run: bool = False, log=print):
    """Check the run folder against the recipe before anything is written there.

    A folder holding a previous run with checkpoints resumes only under the same recipe
    identity (:data:`IDENTITY_KEYS`) and a ``train.steps`` not below the last checkpoint;
    otherwise this refuses, naming the differing keys. ``new_run``: start over, moving the
    previous ``checkpoints/`` and ``recipe.yaml`` aside (renamed, never deleted). A changed
    ``recipe.yaml`` is kept as ``recipe.previous-<time>.yaml`` before the new one is written.
    """
    from .checkpoint import atomic_file, list_checkpoints
    from .recipe import load_recipe

    run_dir = recipe["output"]["dir"]
    check_run_folder(run_dir)
    path = os.path.join(run_dir, "recipe.yaml")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    found = list_checkpoints(run_dir)
    old_text = None
    if os.path.isfile(path):
        with open(path) as f:
            old_text = f.read()
        try:
            old = load_recipe(path)
        except ValueError as e:
            old = None
            if found and not new_run:
                raise ValueError(f"the run folder's recipe {path} cannot be read ({e}); it has "
                                 "checkpoints, so it is not replaced. Fix it, or pass --new-run "
                                 "to start over (the old files are moved aside)") from None
        diff = _identity_diff(old, recipe) if old is not None else []
        if found and not new_run:
            last = found[-1][0]
            if recipe["train"]["steps"] < last:
                diff.append(f"train.steps: {recipe['train']['steps']} is below the last "
                            f"checkpoint's step {last}")
            if diff:
                raise ValueError(
                    f"run folder {run_dir!r} holds a different run (checkpoints up to step "
                    f"{last}); the recipe differs in: {'; '.join(diff)}. Resume with the same "
                    "recipe, choose another output.dir, or pass --new-run to start over here "
                    "(the old checkpoints and recipe are moved aside, not deleted)")
    if new_run and (found or os.path.isdir(os.path.join(run_dir, "checkpoints"))):
        aside = os.path.join(run_dir, f"checkpoints.previous-{stamp}")
        os.replace(os.path.join(run_dir, "checkpoints"), aside)
        log(f"--new-run: moved the previous checkpoints to {aside}")
    for name in ("metrics.jsonl", "eval.jsonl") if new_run else ():
        if os.path.isfile(os.path.join(run_dir, name)):  # the new run's logs start empty
            stem, ext = os.path.splitext(name)
            os.replace(os.path.join(run_dir, name),
                       os.path.join(run_dir, f"{stem}.previous-{stamp}{ext}"))
    os.makedirs(run_dir, exist_ok=True)
    text = yaml.safe_dump(recipe, sort_keys=False)
    if old_text is not None and old_text != text:
        kept = os.path.join(run_dir, f"recipe.previous-{stamp}.yaml")
        with open(kept, "w") as f:
            f.write(old_text)
        log(f"the recipe changed; the previous one is kept as {kept}")
    if old_text != text:
        with atomic_file(path) as f:
            f.write(text)


def check_device(cfg: dict):
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("recipe key 'train.device' is 'cuda' but no CUDA GPU is available "
                         "here; use train.device=auto (the GPU when there is one) or cpu")


def train(recipe: dict | str, overrides=(), progress: bool = True, teacher=None,
          networks=None, return_nets: bool = False, new_run: bool = False):
    """Run (or resume) a recipe; returns the run folder (and the nets, if asked).

    From Python, ``teacher`` may be any Teacher (e.g. ``custom_teacher(fn, shape)``) and
    ``networks`` the user's own {role: module} for it. ``new_run``: start over in a run
    folder that holds another run (its checkpoints are moved aside, see
    :func:`prepare_run_dir`).
    """
    from accelerate import Accelerator

    from .checkpoint import load_latest_good

    recipe = load_recipe(recipe, overrides)
    check_device(recipe["train"])
    if recipe["teacher"]["build"] and teacher is None:
        # A fresh pipeline trained from scratch: a teacher recipe (recipes/teachers/).
        from .teacher_training import train_teacher

        return train_teacher(recipe, log=print if progress else (lambda s: None))
    cfg = recipe["train"]
    if cfg["mixed_precision"] == "fp16":
        raise ValueError("train.mixed_precision=fp16 needs loss scaling per role, which this "
                         "loop does not do; use bf16 (or no).")
    on_cpu = cfg["device"] == "cpu" or not torch.cuda.is_available()
    optimizer_class(cfg, cuda=not on_cpu)  # refused here, before any model is built
    _release_accelerator_state(cfg["mixed_precision"])
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=cfg["mixed_precision"])
    run_dir = recipe["output"]["dir"]
    main = accelerator.is_main_process
    with contextlib.ExitStack() as stack:
        if main:
            check_run_folder(run_dir)  # before a lock file lands in someone else's folder
            os.makedirs(run_dir, exist_ok=True)
            stack.enter_context(run_lock(run_dir))
            prepare_run_dir(recipe, new_run=new_run, log=print)
            if accelerator.num_processes > 1:
                # corrupt checkpoints are set aside once, here, before every process loads
                load_latest_good(run_dir, set_aside=True)
        accelerator.wait_for_everyone()
        return _train_locked(recipe, accelerator, teacher, networks, return_nets, progress)


def _release_accelerator_state(mixed_precision: str) -> None:
    """Let a second run in the same process use another precision.

    accelerate keeps one process-wide AcceleratorState and refuses an Accelerator whose
    mixed_precision differs from the first one's ("restart your runtime"), so a notebook or
    script that trains a float32 run and then a bf16 one would fail. The precision part of that
    state is dropped between runs; the process group part (PartialState) is kept.
    """
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _train_locked(recipe, accelerator, teacher, networks, return_nets, progress):
    from tqdm.auto import tqdm

    from .checkpoint import CheckpointError, load_latest_good, save_checkpoint

    cfg = recipe["train"]
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    run_dir = recipe["output"]["dir"]
    main = accelerator.is_main_process

    torch.manual_seed(cfg["seed"])  # adapters' random init is the same on every process
    teacher, objective, nets = setup_run(recipe, device, teacher, networks)
    batches = Batches(recipe, teacher, objective.needs_data)

    per_step = world * cfg["grad_accum"]
    if cfg["batch_size"] % per_step:
        raise ValueError(f"train.batch_size={cfg['batch_size']} must be divisible by processes "
                         f"x grad_accum = {world} x {cfg['grad_accum']}")
    local_batch = cfg["batch_size"] // per_step
    optimizers = build_optimizers(objective, nets, cfg)
    weight_roles = list(objective.roles) + (["ema"] if nets.roles.ema_of else [])
    role = recipe["output"]["export_role"]
    if recipe["output"]["export"] and role not in ("ema", "student", *objective.roles):
        raise ValueError(f"recipe key 'output.export_role' is {role!r}, but this method's roles "
                         f"are {['ema', *objective.roles]}; set output.export_role=ema (or one "
                         "of those)")
    if main and recipe["output"]["export"]:
        from .checkpoint import check_output_dir
        from .export import EXPORT_MARKERS

        # refused now, not after the whole training
        check_output_dir(os.path.join(run_dir, "export"), EXPORT_MARKERS, "export folder")

    def apply(weights, optim_states, state):
        missing = [r for r in weight_roles if r not in weights] + \
            [r for r in optimizers if r not in optim_states]
        if missing:
            raise CheckpointError(f"checkpoint of step {state.get('step')} lacks the role(s) "
                                  f"{missing}")
        try:
            for r in weight_roles:
                nets.load_state_dict(r, {k: v.to(device) for k, v in weights[r].items()})
            for r, opt in optimizers.items():
                opt.load_state_dict(optim_states[r])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"the checkpoint in {run_dir!r} does not fit this recipe "
                             f"({str(e).splitlines()[0][:300]}); use the recipe it was "
                             "trained with, or --new-run") from e

    start = 0
    train_seconds = 0.0  # wall time inside train_step only (no eval, logging or checkpoints)
    found = load_latest_good(run_dir, apply, set_aside=main and world == 1)
    if found:
        ckpt, _, _, state = found
        start = state["step"]
        train_seconds = float(state.get("train_seconds", 0.0))
        if main:
            print(f"resuming {run_dir} from step {start} ({ckpt})")

    def checkpoint(step):
        if main:
            save_checkpoint(run_dir, step, {r: nets.state_dict(r) for r in weight_roles},
                            optimizers, {"name": recipe["name"], "train_seconds": train_seconds},
                            keep=cfg["keep_checkpoints"])
        accelerator.wait_for_everyone()

    log_path = os.path.join(run_dir, "metrics.jsonl")
    writer = _tensorboard(run_dir) if main else None
    end = min(cfg["steps"], cfg["stop_after"] or cfg["steps"])
    bar = tqdm(range(start, end), initial=start, total=end, desc=f"train {recipe['name']}",
               disable=not (progress and main))

    def evaluate_now(done):
        row = quick_eval(nets, teacher, recipe, objective)
        row.update(step=done, train_seconds=round(train_seconds, 2))
        with open(os.path.join(run_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                              if isinstance(v, float)))

    evaluated = _trim_eval_log(os.path.join(run_dir, "eval.jsonl"), start) if main else set()
    if cfg["eval_every"] and start == 0 and end > 0 and main and 0 not in evaluated:
        # the starting point of every curve: the student as initialised (LoRA B = 0: the
        # teacher's weights under the student's own few-step sampler)
        evaluate_now(0)
    t_last = time.time()
    interval = LogInterval()
    for step in bar:
        t_step = time.perf_counter()
        logs = train_step(objective, nets, optimizers, batches, step, cfg, local_batch,
                          rank=rank, world=world, device=device, accelerator=accelerator,
                          run_dir=run_dir)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's queued kernels count toward its time
        train_seconds += time.perf_counter() - t_step
        interval.add(logs)
        done = step + 1
        if main and (done % cfg["log_every"] == 0 or done == end):
            now = time.time()
            logs = interval.mean()
            logs.update(step=done, seconds_per_step=(now - t_last) / max(1, interval.steps))
            interval = LogInterval()
            t_last = now
            with open(log_path, "a") as f:
                f.write(json.dumps(logs) + "\n")
            if writer:
                for k, v in logs.items():
                    writer.add_scalar(k, v, done)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss/")})
        if cfg["eval_every"] and (done % cfg["eval_every"] == 0 or done == end) and main:
            evaluate_now(done)
        if done % cfg["checkpoint_every"] == 0 or done == cfg["steps"]:
            checkpoint(done)
    if writer:
        writer.close()
    if end == cfg["steps"] and main and recipe["output"]["export"] and teacher.pipe is not None:
        from .export import export_nets

        export_nets(nets, teacher, recipe, os.path.join(run_dir, "export"), objective=objective)
    accelerator.wait_for_everyone()
    return (run_dir, nets) if return_nets else run_dir


_EVAL_PROTOCOLS: dict = {}
_TEACHER_FEATURES: dict = {}  # FD-to-teacher's reference, per teacher and protocol


@torch.no_grad()
def _trim_eval_log(path: str, start: int) -> set[int]:
    """Drop the rows of ``eval.jsonl`` past ``start`` (the step this run resumes from: those
    came from steps that are trained again now) and return the steps still logged, so that
    a restart never writes a step's row twice."""
    from .checkpoint import atomic_file

    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= start:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a row cut short by a crash
    if len(kept) != len(lines):
        with atomic_file(path) as f:
            f.writelines(kept)
    return {json.loads(line).get("step", 0) for line in kept}


def quick_eval(nets, teacher, recipe, objective) -> dict:
    """A cheap evaluation of the current student, for the run log (``eval.jsonl``).

    The same protocol as ``ddistill eval`` (world prompts and seeds, cached reference
    features, EfficientNet-Lite0 feature space, alignment), on ``train.eval_num`` samples
    drawn with the toolkit's own few-step sampler, so curves of FD against training step need
    no extra sampling afterwards. Needs the world (data.source: world).
    """
    from .eval.evaluate import evaluate, fd_to
    from .eval.protocol import Protocol
    from .student import generate

    num = recipe["train"]["eval_num"]
    if num not in _EVAL_PROTOCOLS:
        _EVAL_PROTOCOLS[num] = Protocol(num=num, prompts_kind="single")
    protocol = _EVAL_PROTOCOLS[num]
    sampler = objective.sampler()

    def sample_fn(prompts, seeds):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        latents = generate(nets, list(prompts), sampler, gens)
        return teacher.decode(latents)

    result = evaluate(sample_fn, protocol.prompts, protocol.seeds,
                      reference_features=protocol.reference, labels=protocol.labels,
                      alignment_fn=protocol.alignment_fn, extractor=protocol.extractor,
                      nfe=float(sampler.num_steps), progress=False, keep_images=0,
                      return_features=True)
    result.pop("images", None)
    result["fd_teacher"] = fd_to(teacher_features(teacher, recipe, protocol),
                                 result.pop("features"))
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, dict))}


def teacher_features(teacher, recipe, protocol) -> torch.Tensor:
    """Features of the teacher's own samples (its pipeline's sampler, default steps, the
    recipe's CFG scale) on the protocol's prompts and seeds: what FD-to-teacher compares the
    student with. Sampled once, then cached on disk by the teacher's weights (a custom teacher
    without a folder: once per process)."""
    from .eval.evaluate import cached_features
    from .eval.protocol import model_fingerprint

    path = recipe["teacher"].get("path")
    weights = model_fingerprint(path) if isinstance(path, str) else None
    guidance = recipe["teacher"].get("guidance")
    key = {"what": "teacher samples", "teacher": path, "weights": weights,
           "steps": teacher.default_steps, "guidance": guidance, **protocol.describe()}
    # without weights on disk, only this very teacher object may reuse its samples
    memo = json.dumps({**key, "object": None if weights else id(teacher)}, sort_keys=True,
                      default=str)
    if memo not in _TEACHER_FEATURES:
        def make_images():
            images = []
            for i in range(0, len(protocol.prompts), 16):
                seeds = protocol.seeds[i:i + 16]
                noise = torch.stack([torch.randn(teacher.latent_shape,
                                                 generator=torch.Generator().manual_seed(s))
                                     for s in seeds])
                with torch.no_grad():
                    latents = teacher.sample(protocol.prompts[i:i + 16], guidance=guidance,
                                             noise=noise)
                    images.append(teacher.decode(latents).float().cpu())
            return torch.cat(images)

        _TEACHER_FEATURES[memo] = (
            cached_features(key, make_images, protocol.extractor) if weights is not None
            else protocol.extractor.extract(make_images()))
    return _TEACHER_FEATURES[memo]


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
    p.add_argument("--new-run", action="store_true",
                   help="start over in an output.dir that holds another run (its checkpoints "
                        "and recipe.yaml are moved aside, never deleted)")
    p.set_defaults(func=lambda a: print(train(a.recipe, a.overrides, progress=not a.no_progress,
                                              new_run=a.new_run)))

