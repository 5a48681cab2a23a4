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

The pieces live in their own modules: the step in :mod:`.step`, the data in :mod:`.batches`,
the run folder's lock and resume policy in :mod:`.run_folder`, the logs in :mod:`.run_log`,
the in-training evaluation in :mod:`.eval.in_training`, the command in :mod:`.train_cli`.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .batches import Batches, check_data_path
from .build import setup_run
from .checkpoint import check_writable
from .recipe import load_recipe
from .run_folder import check_run_folder, prepare_run_dir, run_lock, trim_eval_log
from .step import build_optimizers, optimizer_class, run_steps


def check_device(cfg: dict):
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("recipe key 'train.device' is 'cuda' but no CUDA GPU is available "
                         "here; use train.device=auto (the GPU when there is one) or cpu")


def train(recipe: dict | str, overrides=(), progress: bool = True, teacher=None,
          networks=None, return_nets: bool = False, new_run: bool = False,
          teacher_changed: bool = False, data=None):
    """Run (or resume) a recipe; returns the run folder (and the nets, if asked).

    From Python, ``teacher`` may be any Teacher (e.g. ``custom_teacher(fn, shape)``) and
    ``networks`` the user's own {role: module} for it. ``data``: the user's own samples,
    in place of the recipe's data source: x0 in the teacher's space (a custom teacher's
    ``shape``, a pipeline's latents) as a tensor ``(N, *shape)``, ``(x0, prompts)`` (one
    prompt or integer class label per sample), ``{"x0": ..., "prompts": ...}`` or a Dataset of
    ``x0`` or ``(x0, prompt)`` items; methods that train on real samples (``needs_data``)
    draw their x0 from it. ``new_run``: start over in a run
    folder that holds another run (its checkpoints are moved aside, see
    :func:`prepare_run_dir`). ``teacher_changed``: resume although the teacher's weights
    differ from those the checkpoints were trained on (refused otherwise).
    """
    from accelerate import Accelerator

    from .checkpoint import find_latest_good

    recipe = load_recipe(recipe, overrides)
    check_device(recipe["train"])
    if recipe["teacher"]["build"] and teacher is None:
        # A fresh pipeline trained from scratch: a teacher recipe (recipes/teachers/).
        from .teacher_training import train_teacher

        return train_teacher(recipe, log=print if progress else (lambda s: None),
                             new_run=new_run)
    cfg = recipe["train"]
    if cfg["mixed_precision"] == "fp16":
        raise ValueError("train.mixed_precision=fp16 needs loss scaling per role, which this "
                         "loop does not do; use bf16 (or no).")
    on_cpu = cfg["device"] == "cpu" or not torch.cuda.is_available()
    optimizer_class(cfg, cuda=not on_cpu)  # refused here, before any model is built
    from .resources import check_batch_fits

    check_batch_fits(recipe, "cpu" if on_cpu else "cuda",
                     int(os.environ.get("WORLD_SIZE", "1")))  # before any model is built
    if data is None:
        check_data_path(recipe)
    _release_accelerator_state(cfg["mixed_precision"])
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    # a finite wait in every collective: a lost process stops the others, never a hang
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg["dist_timeout"]))
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=cfg["mixed_precision"],
                              kwargs_handlers=[timeout])
    from .parallel import check_launch, resolve_parallel, stop_when_a_process_is_lost

    check_launch(accelerator.num_processes)  # asked for N processes, got one: refused
    parallel = resolve_parallel(cfg, accelerator.num_processes)
    run_dir = recipe["output"]["dir"]
    main = accelerator.is_main_process
    if main and accelerator.num_processes > 1:
        print(f"{accelerator.num_processes} processes, train.parallel={parallel}")
    with contextlib.ExitStack() as stack:
        if main:
            check_writable(run_dir, "output.dir")  # a read-only place, a loop of links
            check_run_folder(run_dir)  # before a lock file lands in someone else's folder
            os.makedirs(run_dir, exist_ok=True)
            stack.enter_context(run_lock(run_dir))
            prepare_run_dir(recipe, new_run=new_run, log=print)
            if accelerator.num_processes > 1:
                # corrupt checkpoints are set aside once, here, before every process loads
                find_latest_good(run_dir, set_aside=True)
        stack.enter_context(stop_when_a_process_is_lost(
            accelerator.process_index, accelerator.num_processes, run_dir, cfg["dist_timeout"]))
        accelerator.wait_for_everyone()
        return _train_locked(recipe, accelerator, teacher, networks, return_nets, progress,
                             teacher_changed, data, parallel)


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


def _train_locked(recipe, accelerator, teacher, networks, return_nets, progress,
                  teacher_changed=False, data=None, parallel="none"):
    from tqdm.auto import tqdm

    from .checkpoint import find_latest_good, load_into, run_roles, save_checkpoint
    from .eval.in_training import InTrainingEval
    from .run_log import RunLog

    cfg = recipe["train"]
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    run_dir = recipe["output"]["dir"]
    main = accelerator.is_main_process

    torch.manual_seed(cfg["seed"])  # adapters' random init is the same on every process
    teacher, objective, nets = setup_run(recipe, device, teacher, networks)
    batches = Batches(recipe, teacher, objective, data)
    from .export import base_fingerprint
    from .objectives import RunFiles

    files = RunFiles(run_dir, batches.prompts, cfg["seed"], base_fingerprint(teacher.backbone))
    if main:  # what the method caches in the run folder: made by one process, read by all
        objective.prepare(nets, files)
    accelerator.wait_for_everyone()
    if not main:
        objective.prepare(nets, files)

    per_step = world * cfg["grad_accum"]
    if cfg["batch_size"] % per_step:
        raise ValueError(f"train.batch_size={cfg['batch_size']} must be divisible by processes "
                         f"x grad_accum = {world} x {cfg['grad_accum']}")
    local_batch = cfg["batch_size"] // per_step
    weight_roles = run_roles(objective, nets)
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

    # The checkpoint is chosen (its files checked, no tensor read) before sharding, read after
    # the networks are sharded and the optimizers built on them: DCP reads each process's
    # slice of every tensor, whatever the process count that wrote it.
    start = 0
    train_seconds = 0.0  # wall time inside train_step only (no eval, logging or checkpoints)
    found = find_latest_good(run_dir, weight_roles, objective.roles,
                             set_aside=main and world == 1)
    fingerprint = files.teacher_fingerprint  # recorded in each checkpoint's state
    if found:
        ckpt, state = found.path, found.state
        start = state["step"]
        recorded = state.get("teacher_fingerprint")
        if recorded and fingerprint and recorded != fingerprint and not teacher_changed:
            raise ValueError(
                f"run folder {run_dir!r} was trained (to step {start}) on a teacher whose base "
                f"weights have fingerprint {recorded}, but teacher.path "
                f"{recipe['teacher']['path']!r} now has {fingerprint}: its weights changed "
                "since. Resume onto the original teacher, start over with --new-run, or pass "
                "--teacher-changed to continue on the new weights")
        train_seconds = float(state.get("train_seconds", 0.0))
        if main:
            print(f"resuming {run_dir} from step {start} ({ckpt})")
    elif recipe["student"]["init"]:  # a fresh run's warm start (a resume has its checkpoint)
        from .warm_start import init_student

        init_student(nets, teacher, recipe, files.teacher_fingerprint,
                     log=print if main else (lambda s: None))

    sharded = None
    if parallel != "none":  # several processes: FSDP2 over the loaded networks
        from .build import BASE_DTYPES
        from .parallel import ShardedRun

        dtype = BASE_DTYPES[cfg["base_dtype"]]
        sharded = ShardedRun(nets, parallel, world, device,
                             param_dtype=None if dtype == torch.float32 else dtype,
                             offload=cfg["fsdp_offload"], autocast=accelerator.autocast)
    optimizers = build_optimizers(objective, nets, cfg)
    if found:
        load_into(found, nets, optimizers, weight_roles, run_dir, collective=sharded is not None)

    def checkpoint(step):
        if sharded is not None or main:  # sharded: every process writes its shards (DCP)
            save_checkpoint(run_dir, step, {r: nets.state_dict(r) for r in weight_roles},
                            optimizers, {"name": recipe["name"], "train_seconds": train_seconds,
                                         "teacher_fingerprint": fingerprint},
                            keep=cfg["keep_checkpoints"])
        accelerator.wait_for_everyone()

    log = RunLog(run_dir) if main else None
    end = min(cfg["steps"], cfg["stop_after"] or cfg["steps"])
    bar = tqdm(initial=start, total=end, desc=f"train {recipe['name']}",
               disable=not (progress and main))

    evaluator = None

    def evaluate_now(done):
        nonlocal evaluator
        evaluator = evaluator or InTrainingEval(teacher, recipe)
        row = evaluator(nets, objective)  # sharded: every process runs it (collectives)
        if not main:
            return
        row.update(step=done, train_seconds=round(train_seconds, 2))
        log.eval(row)
        bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                              if isinstance(v, float)))

    evaluated = trim_eval_log(os.path.join(run_dir, "eval.jsonl"), start) if main else set()
    if main:  # rows of steps after the checkpoint are logged again as they are retrained
        trim_eval_log(os.path.join(run_dir, "metrics.jsonl"), start)
    evaluates = main or sharded is not None
    if cfg["eval_every"] and start == 0 and end > 0 and evaluates and 0 not in evaluated:
        # the starting point of every curve: the student as initialised (LoRA B = 0: the
        # teacher's weights under the student's own few-step sampler)
        evaluate_now(0)

    def after_step(done, logged, seconds):
        nonlocal train_seconds
        train_seconds += seconds  # inside train_step only (no eval, logging or checkpoints)
        bar.update(1)
        if main and logged is not None:
            log.metrics(logged, done)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items() if k.startswith("loss/")})
        if cfg["eval_every"] and (done % cfg["eval_every"] == 0 or done == end) and evaluates:
            evaluate_now(done)
        if done % cfg["checkpoint_every"] == 0 or done == cfg["steps"]:
            checkpoint(done)

    run_steps(objective, nets, optimizers, batches, cfg, local_batch, start, end, after_step,
              rank=rank, world=world, device=device, accelerator=sharded or accelerator,
              run_dir=run_dir)
    bar.close()
    if log:
        log.close()
    if end == cfg["steps"] and main and recipe["output"]["export"] and teacher.pipe is not None:
        from .export import export_nets

        if sharded is not None:  # the export reads whole weights: the last checkpoint's
            from .build import restore_run

            restored = restore_run(run_dir, "cpu")
            export_nets(restored.nets, restored.teacher, recipe, os.path.join(run_dir, "export"),
                        objective=restored.objective)
        else:
            export_nets(nets, teacher, recipe, os.path.join(run_dir, "export"),
                        objective=objective)
    accelerator.wait_for_everyone()
    return (run_dir, nets) if return_nets else run_dir
