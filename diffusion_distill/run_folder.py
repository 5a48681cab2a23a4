"""The run folder: who may train into it (the lock), whether it is this run's (identity)
and what resuming keeps (checkpoints, logs, the recipe it was trained with).

Everything here runs on the main process, before (or between) training steps.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import time

import yaml

# Keys that make a run a different run: resuming its checkpoints under other values would
# load weights into the wrong shapes, or train them towards another target.
# (The method's options are compared one by one; ``train.ema_decay`` only for on / off.)
IDENTITY_KEYS = ("teacher.path", "teacher.build", "teacher.prediction_type", "student.mode",
                 "critic.mode", "student.init",
                 "student.rank", "student.alpha", "student.target_modules", "student.lora_bias",
                 "student.num_steps",
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
    from .recipe import DEFAULTS, recipe_value

    diff = []
    for key in IDENTITY_KEYS:
        try:
            a = recipe_value(old, key)
        except (KeyError, TypeError):  # a run recorded before the key existed ran its default
            a = recipe_value(DEFAULTS, key)
        b = recipe_value(new, key)
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


def trim_eval_log(path: str, start: int) -> set[int]:
    """Drop the rows of a run log (``eval.jsonl``, ``metrics.jsonl``) past ``start`` (the step
    this run resumes from: those came from steps that are trained again now) and return the
    steps still logged, so that a restart never writes a step's row twice."""
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
