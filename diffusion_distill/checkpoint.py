"""Resumable training state, written atomically; output folders that never replace foreign data.

A checkpoint is a folder ``checkpoints/step_0000200`` of safetensors files holding every
role's weights (keys ``role/name``) and the optimizers' tensors (keys ``o/...``), beside
``optimizers.json`` (the optimizers' structure and numbers: no pickle anywhere) and
``state.json``. One process writes whole tensors into ``weights.safetensors`` and
``optimizers.safetensors``; several processes write through ``torch.distributed.checkpoint``
(DCP's ``HuggingFaceStorageWriter``): each rank its own shard file, every tensor's slice
placed by DCP's sharding header, and ``state.json`` lists the files. Every load, at any
process count, goes through DCP's ``HuggingFaceStorageReader``, which reads both layouts and
reshards (a file without a sharding header holds whole tensors). So there is one format, and
a run resumes at another process count.

A checkpoint is first written under a temporary name (``.tmp_step_...``, never listed) and
then renamed, so a run killed mid-write keeps its last good checkpoint. A checkpoint that
cannot be read (a truncated or missing file, a tensor only partly present, a broken
``state.json`` or optimizer file) is skipped for the one before it, with a warning
(:func:`load_latest_good`, :func:`find_latest_good`).

:func:`atomic_dir` writes any output folder (exports, saved pipelines, checkpoints) the same
way, and replaces an existing folder only when it is one of the same kind (recognised by a
marker file such as ``distill_config.json``); anything else is refused, never deleted.
:func:`atomic_path` / :func:`atomic_file` do the same for one file (results, caches, images).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

PATTERN = re.compile(r"^step_(\d+)$")
WEIGHTS, OPTIM_TENSORS, OPTIM_JSON, STATE = ("weights.safetensors", "optimizers.safetensors",
                                             "optimizers.json", "state.json")


class OutputFolderError(ValueError):
    """An output path that would overwrite something that is not ours to replace."""


class OutputWriteError(ValueError):
    """The environment refused a write (full disk, read-only filesystem, quota): the message
    names the path and the OS error; the previous file or folder is kept."""


# errors of the machine, not of the toolkit: shown to people as one line
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM,
                      errno.EIO, errno.EFBIG, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR}


def _write_failure(e: BaseException) -> str | None:
    """The OS error of a failed write, in words, or None when ``e`` is not one. safetensors
    reports its own IO errors inside its error type, as ``IoError(Os { code: 28, ... })`` or
    ``I/O error: ... (os error 28)`` depending on its version."""
    if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
        return f"[Errno {e.errno}] {e.strerror}"
    m = re.search(r"IoError\(Os \{ code: (\d+)|\(os error (\d+)\)", str(e))
    if m:
        code = int(m.group(1) or m.group(2))
        return f"[Errno {code}] {os.strerror(code)}"
    return None


@contextlib.contextmanager
def _named_write_errors(final: str, what: str):
    try:
        yield
    except OutputWriteError:
        raise
    except Exception as e:
        reason = _write_failure(e)
        if reason is None:
            raise
        raise OutputWriteError(f"could not write {what} {final!r}: {reason}; nothing of it was "
                               "replaced (the previous one, if any, is kept). Free space or "
                               "choose a writable place, then rerun") from e


def check_writable(path: str, what: str = "output"):
    """Before any work: ``path`` (a file or folder to be written) can be written. Refused
    (:class:`OutputFolderError`): a symbolic-link loop, a file where a folder must be, and a
    place the user cannot write (read-only permissions or a read-only filesystem). Missing
    folders on the way are fine: they are created, so the nearest existing one must be
    writable."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputFolderError(f"{what} {path!r} is (or passes through) a loop of symbolic "
                                    "links; fix the links or give another path") from None
        if e.errno == errno.ENOTDIR:
            raise OutputFolderError(f"{what} {path!r} passes through a file as if it were a "
                                    "folder; give a path whose folders are folders") from None
        if e.errno != errno.ENOENT:
            raise OutputFolderError(f"{what} {path!r} cannot be reached ({e.strerror}); give "
                                    "another path") from None
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputFolderError(f"{what} {path!r} passes through the file {parent!r} as if it "
                                "were a folder; give a path whose folders are folders")
    for place in (parent, path if os.path.isdir(path) else None):
        if place and not os.access(place, os.W_OK | os.X_OK):
            ro = hasattr(os, "statvfs") and os.statvfs(place).f_flag & os.ST_RDONLY
            why = "is on a read-only filesystem" if ro else "is not writable by you"
            raise OutputFolderError(f"{what} {path!r} cannot be written: {place!r} {why}; "
                                    "choose a folder you can write")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (corrupt, truncated, or from an older format)."""


def warn(message: str):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name))
             for name in os.listdir(root) if (m := PATTERN.match(name))]
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# -- output folders -------------------------------------------------------------------------

def is_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_dir(final: str, markers=(), what: str = "output folder") -> bool:
    """Check that ``final`` may be written as a folder; True when it exists and will be replaced.

    Allowed: a path that does not exist, an empty folder, or a folder holding one of the
    ``markers`` files (a previous output of the same kind, e.g. ``distill_config.json`` for an
    export). Refused (:class:`OutputFolderError`, nothing touched): a file, the current folder
    or a folder above it, and any other non-empty folder.
    """
    if isinstance(markers, str):
        markers = (markers,)
    kinds = " or ".join(markers) if markers else "nothing"
    if os.path.lexists(final) and not os.path.isdir(final):
        raise OutputFolderError(
            f"{what} {final!r} is a file, not a folder; give a folder path (a new one, or one "
            "written earlier by the same command)")
    if not os.path.isdir(final):
        return False
    if is_inside(os.getcwd(), final):
        raise OutputFolderError(
            f"{what} {final!r} is the current folder (or holds it) and would be replaced; "
            "choose a new folder, e.g. --out runs/NAME/export")
    entries = os.listdir(final)
    if not entries:
        return True
    if any(os.path.isfile(os.path.join(final, m)) for m in markers):
        return True
    shown = ", ".join(sorted(entries)[:5]) + (" ..." if len(entries) > 5 else "")
    raise OutputFolderError(
        f"{what} {final!r} already exists and holds other files ({shown}) but no {kinds}, so "
        "it is not an earlier output of this kind and will not be replaced; choose a new "
        "folder, or remove that one yourself")


@contextlib.contextmanager
def atomic_dir(final: str, markers=(), what: str = "output folder", tmp_name: str | None = None):
    """Yield a temporary folder beside ``final``; on success it takes ``final``'s place.

    ``tmp_name``: a fixed name for the temporary folder (one left behind by a killed run is
    removed first), so that other processes can write into it too; by default a fresh one.

    ``final`` may already exist only as an empty folder or one holding a ``markers`` file
    (see :func:`check_output_dir`); anything else is refused before anything is written. The
    previous folder is kept until the new one is complete, then swapped out by renames and
    removed. A crash or kill mid-write leaves ``final`` as it was (and no half-written folder).
    """
    check_output_dir(final, markers, what)
    parent = os.path.dirname(os.path.abspath(final))
    with _named_write_errors(final, what):
        os.makedirs(parent, exist_ok=True)
        if tmp_name:
            tmp = os.path.join(parent, tmp_name)
            shutil.rmtree(tmp, ignore_errors=True)
            os.mkdir(tmp)
        else:
            tmp = tempfile.mkdtemp(prefix=".tmp_", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the output from others
    try:
        with _named_write_errors(final, what):
            yield tmp
        # Checked again: something may have appeared meanwhile.
        replace = check_output_dir(final, markers, what)
        old = None
        if replace:
            old = tempfile.mkdtemp(prefix=".old_", dir=parent)
            os.rmdir(old)
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old:
                os.replace(old, final)
            raise
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(final: str):
    """Yield a temporary path beside ``final``; when the block succeeds it is renamed onto
    ``final``, so a reader never sees half a file and a crash leaves the old one.

    The name ends in ``.<pid>.tmp``: no image or weight reader picks it up, and two processes
    never share one. On failure the temporary file is removed.
    """
    if os.path.islink(final):
        # write through a link to its target: the link the user made stays a link
        final = os.path.realpath(final)
    with _named_write_errors(final, "file"):
        os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    tmp = f"{final}.{os.getpid()}.tmp"
    try:
        with _named_write_errors(final, "file"):
            yield tmp
            os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(final: str, mode: str = "w", **open_kwargs):
    """``open(final, mode)`` written through :func:`atomic_path`."""
    with atomic_path(final) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


# -- optimizer state without pickle ---------------------------------------------------------

def _flatten(obj, tensors: dict, key: str):
    """``obj`` as JSON-ready data, its tensors moved into ``tensors`` under path keys."""
    if torch.is_tensor(obj):
        tensors[key] = obj.detach() if _is_dtensor(obj) else obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, tensors, f"{key}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{key}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"optimizer state holds a {type(obj).__name__} at {key!r}; only tensors, "
                    "numbers, strings, lists and dicts can be stored without pickle")


def _unflatten(obj, tensors: dict):
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj


def _is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def save_checkpoint(run_dir: str, step: int, weights: dict[str, dict[str, torch.Tensor]],
                    optimizers: dict, state: dict, keep: int = 2) -> str:
    """Write ``checkpoints/step_<step>`` atomically; returns its path.

    One process: whole tensors, written by this process. Several (a process group of more
    than one): EVERY process calls this with its sharded (DTensor) weights and optimizers;
    DCP writes each rank's shard file into one temporary folder, rank 0 then writes the
    JSON files and renames the folder (after every rank's data is on disk, which
    ``dcp.save`` waits for)."""
    final = os.path.join(run_dir, "checkpoints", f"step_{step:07d}")
    world = _world()
    main = world == 1 or torch.distributed.get_rank() == 0
    tensors: dict = {}
    structure = _flatten({r: o.state_dict() for r, o in optimizers.items()}, tensors, "o")
    flat = {f"{role}/{k}": v.detach() if _is_dtensor(v) else v.detach().cpu().contiguous()
            for role, sd in weights.items() for k, v in sd.items()}
    if world == 1:
        with atomic_dir(final, markers=(STATE, WEIGHTS), what="checkpoint folder") as tmp:
            save_file(flat, os.path.join(tmp, WEIGHTS))
            save_file(tensors, os.path.join(tmp, OPTIM_TENSORS))
            _write_json(tmp, structure, {**state, "step": step})
    else:
        _save_sharded(final, {**flat, **tensors}, structure, {**state, "step": step}, main)
    if main:
        for _, old in list_checkpoints(run_dir)[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
        root = os.path.dirname(final)
        for name in os.listdir(root):  # what a killed sharded save left (never a checkpoint)
            m = re.match(r"^\.tmp_step_(\d+)$", name)
            if m and int(m.group(1)) <= step:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return final


def _write_json(folder: str, structure, state: dict) -> None:
    with open(os.path.join(folder, OPTIM_JSON), "w") as f:
        json.dump(structure, f)
    with open(os.path.join(folder, STATE), "w") as f:  # written last: the folder is complete
        json.dump(state, f, indent=1)


def _save_sharded(final: str, flat: dict, structure, state: dict, main: bool) -> None:
    import torch.distributed.checkpoint as dcp

    dist = torch.distributed
    tmp_name = ".tmp_" + os.path.basename(final)  # the same on every rank; never listed

    def write(folder):
        dist.barrier()  # the temporary folder exists before any rank writes into it
        dcp.save(flat, storage_writer=dcp.HuggingFaceStorageWriter(folder,
                                                                   save_distributed=True))

    if main:
        with atomic_dir(final, markers=(STATE,), what="checkpoint folder",
                        tmp_name=tmp_name) as tmp:
            write(tmp)
            files = sorted(f for f in os.listdir(tmp) if f.endswith(".safetensors"))
            # the files and every tensor's whole size: DCP infers a size from the chunks it
            # finds, so a missing last shard would look like a smaller tensor
            _write_json(tmp, structure, {**state, "files": files,
                                         "processes": dist.get_world_size(),
                                         "shapes": {k: list(v.shape) for k, v in flat.items()}})
    else:
        write(os.path.join(os.path.dirname(final), tmp_name))
    dist.barrier()  # no rank goes on before the checkpoint is in place


def _read_json(file):
    with open(file) as f:
        return json.load(f)


def _unreadable(file, e) -> CheckpointError:
    return CheckpointError(f"checkpoint file {file!r} is unreadable ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})")


class Opened:
    """A checkpoint whose files were all checked (present, headers readable, every tensor
    wholly covered by its shards), before any tensor data is read: ``state``, the optimizers'
    ``structure`` and DCP's ``metadata`` (each tensor's full size, dtype and chunks)."""

    def __init__(self, path: str, state: dict, structure, metadata):
        self.path, self.state, self.structure, self.metadata = path, state, structure, metadata

    @property
    def sizes(self) -> dict:
        return {k: m.size for k, m in self.metadata.state_dict_metadata.items()}


def open_checkpoint(path: str) -> Opened:
    """Check a checkpoint folder without reading its tensors; :class:`CheckpointError` naming
    the file when one is missing, unreadable, or a tensor is only partly there (a shard
    missing)."""
    from safetensors import safe_open
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if (not os.path.isfile(os.path.join(path, OPTIM_JSON))
            and os.path.isfile(os.path.join(path, "optimizers.pt"))):
        raise CheckpointError(
            f"checkpoint {path!r} is in the old format (optimizers.pt, a pickle), which is no "
            "longer read; start the run again with --new-run (the old checkpoints are moved "
            "aside, not deleted)")

    def read(name, reader):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"checkpoint file {file!r} is missing")
        try:
            return reader(file)
        except Exception as e:
            raise _unreadable(file, e) from e

    state = read(STATE, _read_json)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint file {os.path.join(path, STATE)!r} has no integer "
                              f"'step' (got {state!r:.200})")
    files = state.get("files") or [WEIGHTS, OPTIM_TENSORS]  # a one-process checkpoint's
    for name in files:
        read(name, lambda f: safe_open(f, framework="pt").keys())  # a truncated file fails
    structure = read(OPTIM_JSON, _read_json)
    try:
        metadata = HuggingFaceStorageReader(path).read_metadata()
    except Exception as e:
        raise _unreadable(path, e) from e
    found = metadata.state_dict_metadata
    for key, shape in (state.get("shapes") or {}).items():
        if key not in found or list(found[key].size) != shape:
            raise CheckpointError(f"checkpoint {path!r} holds {key!r} only partly or not at "
                                  "all: a shard file is missing")
    for key, m in found.items():
        held = sum(math.prod(c.sizes) for c in m.chunks)
        if held != math.prod(m.size):
            raise CheckpointError(f"checkpoint {path!r} holds only {held} of the "
                                  f"{math.prod(m.size)} values of {key!r}: a shard file is "
                                  "missing")
    refs: list = []
    _tensor_refs(structure, refs)
    missing = [r for r in refs if r not in metadata.state_dict_metadata]
    if not isinstance(structure, dict) or missing:
        raise CheckpointError(f"checkpoint file {os.path.join(path, OPTIM_JSON)!r} does not "
                              f"match its tensors (missing {missing[:3]})")
    return Opened(path, state, structure, metadata)


def _tensor_refs(obj, out: list) -> None:
    if isinstance(obj, list):
        for v in obj:
            _tensor_refs(v, out)
    elif isinstance(obj, dict):
        if "__tensor__" in obj:
            out.append(obj["__tensor__"])
        for v in obj.values():
            _tensor_refs(v, out)


def dcp_failure() -> type:
    """DCP's own error (a ``BaseException``, so ``except Exception`` misses it)."""
    from torch.distributed.checkpoint import CheckpointException

    return CheckpointException


def read_tensors(opened: Opened, targets: dict, collective: bool = False) -> None:
    """Fill ``targets`` ({key: tensor or DTensor}) from the checkpoint through DCP, which
    reads each process's slice of a DTensor (``collective``: every process calls this) or,
    for whole tensors, the whole of it. A key the checkpoint lacks is a
    :class:`CheckpointError`; a size that differs, a ``ValueError``."""
    import warnings

    import torch.distributed.checkpoint as dcp

    sizes = opened.sizes
    missing = [k for k in targets if k not in sizes]
    if missing:
        raise CheckpointError(f"checkpoint {opened.path!r} lacks {missing[:3]}")
    wrong = [f"{k}: {tuple(sizes[k])} in the checkpoint, {tuple(v.shape)} here"
             for k, v in targets.items() if tuple(sizes[k]) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"sizes differ ({'; '.join(wrong[:3])})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single")
        dcp.load(targets, storage_reader=dcp.HuggingFaceStorageReader(opened.path),
                 no_dist=not collective)


def load_checkpoint(path: str) -> tuple[dict, dict, dict]:
    """(weights per role, optimizer states per role, state), every tensor whole (whatever
    the process count that wrote it); :class:`CheckpointError` naming the file when one is
    missing or unreadable."""
    opened = open_checkpoint(path)
    meta = opened.metadata.state_dict_metadata
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    try:
        read_tensors(opened, flat)
    except CheckpointError:
        raise
    except (Exception, dcp_failure()) as e:
        raise _unreadable(path, e) from e
    weights: dict[str, dict] = {}
    for key, value in flat.items():
        if not key.startswith("o/"):
            role, name = key.split("/", 1)
            weights.setdefault(role, {})[name] = value
    try:
        optim = _unflatten(opened.structure, flat)
        if not isinstance(optim, dict):
            raise TypeError("not a mapping of roles")
    except Exception as e:
        raise CheckpointError(f"checkpoint file {os.path.join(path, OPTIM_JSON)!r} does not "
                              f"match its tensors ({type(e).__name__}: {e})") from e
    return weights, optim, opened.state


def load_latest_good(run_dir: str, apply=None, set_aside: bool = False, log=warn):
    """The newest checkpoint that loads (and that ``apply(weights, optim, state)`` accepts),
    as (path, weights, optim, state), every tensor whole; None when the run has no
    checkpoint at all.

    A corrupt checkpoint is skipped with a warning naming the file and why; with
    ``set_aside`` (training) it is renamed ``checkpoints/corrupt_step_...`` (kept for
    inspection, never deleted) so the run can write that step again. When every checkpoint
    is bad, :class:`CheckpointError` names them (and nothing is moved).
    """
    def attempt(path):
        weights, optim, state = load_checkpoint(path)
        if apply is not None:
            apply(weights, optim, state)
        return path, weights, optim, state
    return _newest_good(run_dir, attempt, set_aside, log)


def find_latest_good(run_dir: str, roles=(), optim_roles=(), set_aside: bool = False,
                     log=warn) -> Opened | None:
    """Like :func:`load_latest_good`, but reading no tensor data: the newest checkpoint
    whose files all check out (:func:`open_checkpoint`) and that holds the weights of
    ``roles`` and the optimizer state of ``optim_roles``, to be read later by
    :func:`load_into` (after the networks are sharded)."""
    def attempt(path):
        opened = open_checkpoint(path)
        keys = opened.sizes
        held = {k for k, _ in opened.structure.get("__dict__", [])}
        lacking = [r for r in roles if not any(k.startswith(f"{r}/") for k in keys)] + \
            [r for r in optim_roles if r not in held]
        if lacking:
            raise CheckpointError(f"checkpoint of step {opened.state['step']} lacks the "
                                  f"role(s) {lacking}")
        return opened
    return _newest_good(run_dir, attempt, set_aside, log)


def _newest_good(run_dir, attempt, set_aside, log):
    found = list_checkpoints(run_dir)
    if not found:
        return None
    errors, bad = [], []
    for _, path in reversed(found):
        try:
            result = attempt(path)
        except CheckpointError as e:
            if "old format" in str(e):
                raise
            errors.append(str(e))
            older = [p for _, p in found if p < path]
            log(f"{e}; " + (f"falling back to the previous checkpoint {older[-1]!r}"
                            if older else "no earlier checkpoint to fall back to"))
            bad.append(path)
            continue
        for corrupt in bad if set_aside else ():
            aside = os.path.join(os.path.dirname(corrupt), f"corrupt_{os.path.basename(corrupt)}"
                                 f"_{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(corrupt, aside)
            log(f"moved the unreadable checkpoint to {aside!r}")
        return result
    raise CheckpointError(
        f"no readable checkpoint in {os.path.join(run_dir, 'checkpoints')!r}: "
        + "; ".join(errors) + ". Start the run again with --new-run (the old checkpoints are "
        "moved aside, not deleted).")


def load_into(opened: Opened, nets, optimizers: dict, roles, run_dir: str,
              collective: bool = False) -> None:
    """A checkpoint's role weights and optimizer states into a run's networks and optimizers
    (built on them), read by DCP straight into each process's shards when the parameters are
    DTensors (``collective``: every process calls this), whole tensors otherwise. A
    checkpoint that does not fit the networks is refused (:func:`not_fitting`)."""
    weights = {f"{r}/{k}": torch.empty_like(v) for r in roles
               for k, v in nets.state_dict(r).items()}
    sizes = opened.sizes
    optim = {}
    for r, opt in optimizers.items():
        params = [p for group in opt.param_groups for p in group["params"]]
        for key in sizes:
            if not key.startswith(f"o/{r}/state/"):
                continue
            i = int(key.split("/")[3])
            dtype = opened.metadata.state_dict_metadata[key].properties.dtype
            p = params[i] if i < len(params) else None
            optim[key] = (torch.empty_like(p, dtype=dtype)
                          if p is not None and _is_dtensor(p) and p.shape == sizes[key]
                          else torch.empty(sizes[key], dtype=dtype))
    try:
        read_tensors(opened, {**weights, **optim}, collective)
        for r in roles:
            n = len(r) + 1
            nets.load_state_dict(r, {k[n:]: v for k, v in weights.items()
                                     if k.startswith(f"{r}/")})
        states = _unflatten(opened.structure, optim)
        for r, opt in optimizers.items():
            opt.load_state_dict(states[r])
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError) as e:
        raise not_fitting(run_dir, e) from e


def run_roles(objective, nets) -> list[str]:
    """The roles a run's checkpoints hold: the objective's, and the EMA where there is one."""
    return list(objective.roles) + (["ema"] if nets.roles.ema_of else [])


def not_fitting(run_dir: str, e: BaseException) -> ValueError:
    """The refusal of a checkpoint whose tensors do not fit the recipe's networks."""
    return ValueError(f"the checkpoint in {run_dir!r} does not fit this recipe "
                      f"({str(e).splitlines()[0][:300]}); use the recipe it was trained "
                      "with, or --new-run")


def load_role_weights(nets, weights, optim_states, state, roles, optim_roles, run_dir,
                      device="cpu") -> None:
    """A checkpoint's role weights into ``nets``; one that lacks a role (weights, or the
    optimizer state of one of ``optim_roles``) is a :class:`CheckpointError` (the next older
    one is tried), one that does not fit the networks is refused (:func:`not_fitting`)."""
    missing = [r for r in roles if r not in weights] + \
        [r for r in optim_roles if r not in optim_states]
    if missing:
        raise CheckpointError(f"checkpoint of step {state.get('step')} lacks the role(s) "
                              f"{missing}")
    try:
        for r in roles:
            nets.load_state_dict(r, {k: v.to(device) for k, v in weights[r].items()})
    except (RuntimeError, ValueError, KeyError) as e:
        raise not_fitting(run_dir, e) from e


def restorer(nets, optimizers: dict, roles: list[str], run_dir: str, device="cpu"):
    """``apply`` for :func:`load_latest_good` in a one-process run: the role weights and the
    optimizers' states (built on those same parameters) into the run."""
    def apply(weights, optim_states, state):
        load_role_weights(nets, weights, optim_states, state, roles, optimizers, run_dir,
                          device)
        try:
            for r, opt in optimizers.items():
                opt.load_state_dict(optim_states[r])
        except (RuntimeError, ValueError, KeyError) as e:
            raise not_fitting(run_dir, e) from e
    return apply
