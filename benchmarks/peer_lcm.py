"""One LCM-LoRA training step of ours beside diffusers' own, on the same tiny SD teacher.

The peer is diffusers' ``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py``
(not vendored here: pass its path with ``--peer-script``; a clone of diffusers has it). Its
``main()`` runs unchanged, its whole loss step (VAE encoding, the skipping-step DDIM solver on
the teacher with CFG, the student's boundary-condition prediction, the no-grad target, Huber
loss, backward, clip, AdamW) included. Only two things around it are replaced:

* its webdataset loader (``SDText2ImageDataset``) by the embedded world's images and
  captions, the same stream our step reads, since the world is not a tar-shard dataset;
* ``torchvision``/``webdataset``/``braceexpand``, if not importable (on the 2-core CPU VM
  torchvision does not install beside torch 2.13), by empty modules: the script uses them only
  in that loader.

Each side runs in its own fresh subprocess (peaks do not mix) with the same LoRA shape (rank,
alpha, target modules), batch size, resolution, solver steps (50), guidance range and loss
(Huber, c = 0.001), ``--warmup`` steps untimed then ``--steps`` timed. A step's time is the
interval between consecutive optimizer steps (data, encoders, both passes, backward, update)
on both sides. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's
high-water resident set (``ru_maxrss``: weights, activations and the Python runtime).

Structural differences, reported in the JSON rather than hidden: the peer loads the UNet twice
(a frozen teacher and a student copy wrapped by peft), ours puts the student and EMA adapters on
the one frozen base; ours keeps an EMA adapter, the peer none; on CPU the peer runs its teacher
under ``torch.autocast("cpu")`` (bf16), as its code does on any device but MPS.

    python benchmarks/peer_lcm.py --peer-script ~/diffusers/examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types

from harness import HERE, ROOT, provenance, write_json

SOLVER_STEPS = 50
W_MIN, W_MAX = 2.0, 6.0   # LCM's convention: cond + w (cond - uncond), in both codes
HUBER_C = 0.001


def _peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is in KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _target_modules(teacher: str) -> list[str]:
    from diffusers import UNet2DConditionModel

    from diffusion_distill.assets import resolve_teacher_path
    from diffusion_distill.student import default_target_modules

    unet = UNet2DConditionModel.from_pretrained(resolve_teacher_path(teacher), subfolder="unet")
    return default_target_modules(unet)


def run_ours(a) -> dict:
    """The toolkit's LCM step: recipes/lcm_sd.yaml with the shared shape, through ``train``."""
    from diffusion_distill.recipe import load_recipe
    from diffusion_distill.train import train

    total = a.warmup + a.steps
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(os.path.join(ROOT, "recipes", "lcm_sd.yaml"), [
            f"teacher.path={a.teacher}", f"student.rank={a.rank}", f"student.alpha={a.rank}",
            f"method.solver_steps={SOLVER_STEPS}", f"method.w_min={W_MIN}",
            f"method.w_max={W_MAX}", "method.loss=huber", f"method.huber_c={HUBER_C}",
            "method.target=student", f"data.resolution={a.resolution}",
            f"train.batch_size={a.batch_size}", f"train.steps={total}", "train.log_every=1",
            f"train.checkpoint_every={total}", "train.eval_every=0",
            f"train.device={a.device}", "output.export=false", f"output.dir={tmp}/run"])
        run_dir = train(recipe, progress=False)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    rows = [r for r in rows if "seconds_per_step" in r]
    return {"step_seconds": [r["seconds_per_step"] for r in rows][a.warmup:],
            "loss": [r["loss/student"] for r in rows][a.warmup:],
            "peak_bytes": _peak_bytes(a.device)}


def _stub_attribute(attr):
    if attr.startswith("__"):  # what introspection asks (__file__, __path__, ...): not there
        raise AttributeError(attr)
    return types.SimpleNamespace()


def _stub_missing(names):
    """Empty modules for imports the peer script needs only in its webdataset loader."""
    stubbed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001  (torchvision fails with RuntimeError here, not ImportError)
            for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[k]
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if sub not in sys.modules:
                    mod = types.ModuleType(sub)
                    mod.__getattr__ = _stub_attribute
                    sys.modules[sub] = mod
                    if i > 1:
                        setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], mod)
            stubbed.append(name)
    return stubbed


def run_peer(a) -> dict:
    """diffusers' script, its ``main()`` unchanged, fed the world's images and captions."""
    # The libraries probe for torchvision: they are imported (and probe) before any stub.
    import accelerate  # noqa: F401
    import diffusers
    import diffusers.optimization
    import diffusers.training_utils  # noqa: F401
    import peft  # noqa: F401
    import torch
    from diffusers import (  # noqa: F401
        AutoencoderKL,
        DDPMScheduler,
        LCMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers.utils import is_torchvision_available

    from diffusion_distill.assets import resolve_teacher_path
    from diffusion_distill.world.data import ShapesWorld

    is_torchvision_available()  # cached: the stubs below never reach transformers' checks
    stubbed = _stub_missing(["torchvision.transforms.functional", "torchvision.transforms",
                             "webdataset.tariterators", "webdataset", "braceexpand"])
    spec = importlib.util.spec_from_file_location("peer_lcm_script", a.peer_script)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)

    total = a.warmup + a.steps
    world = ShapesWorld(seed=0, resolution=a.resolution)

    class WorldBatches:
        """The script's dataset interface: ``train_dataloader`` with ``num_batches``."""

        def __init__(self, per_gpu_batch_size, **_):
            self.batch_size = per_gpu_batch_size

        @property
        def train_dataloader(self):
            outer = self

            class Loader:
                num_batches = total
                num_samples = total * outer.batch_size

                def __iter__(self):
                    for i in range(total):
                        images, captions, _ = world.batch(outer.batch_size, i)
                        yield images, captions
            return Loader()

    peer.SDText2ImageDataset = WorldBatches

    times = []
    base_adamw = torch.optim.AdamW

    class TimedAdamW(base_adamw):
        def step(self, *args, **kwargs):
            out = super().step(*args, **kwargs)
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            return out

    losses = []
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "--pretrained_teacher_model", resolve_teacher_path(a.teacher),
            "--output_dir", os.path.join(tmp, "out"), "--train_shards_path_or_url", "world",
            "--resolution", str(a.resolution), "--train_batch_size", str(a.batch_size),
            "--max_train_steps", str(total), "--lora_rank", str(a.rank),
            "--lora_alpha", str(a.rank), "--lora_target_modules", ",".join(a.target_modules),
            "--num_ddim_timesteps", str(SOLVER_STEPS), "--w_min", str(W_MIN),
            "--w_max", str(W_MAX), "--loss_type", "huber", "--huber_c", str(HUBER_C),
            "--learning_rate", "3e-4", "--max_grad_norm", "1.0", "--mixed_precision", "no",
            "--checkpointing_steps", str(10 * total), "--validation_steps", str(10 * total),
            "--dataloader_num_workers", "0", "--seed", "0"]
        old_argv = sys.argv
        sys.argv = ["train_lcm_distill_lora_sd_wds.py", *argv]
        try:
            args = peer.parse_args()
        finally:
            sys.argv = old_argv
        args.report_to = None  # no tracker: tensorboard/wandb are not part of the step
        torch.optim.AdamW = TimedAdamW
        logged = peer.accelerate.Accelerator.log

        def log(self, values, step=None, log_kwargs=None):
            if "loss" in values:
                losses.append(float(values["loss"]))
            return logged(self, values, step=step, log_kwargs=log_kwargs or {})

        peer.accelerate.Accelerator.log = log
        try:
            peer.main(args)
        finally:
            torch.optim.AdamW = base_adamw
            peer.accelerate.Accelerator.log = logged
    steps = [t1 - t0 for t0, t1 in itertools.pairwise(times)]
    return {"step_seconds": steps[a.warmup - 1:], "loss": losses[a.warmup:],
            "peak_bytes": _peak_bytes(a.device), "stubbed_modules": stubbed}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer-script", required=True,
                   help="path of diffusers' train_lcm_distill_lora_sd_wds.py")
    p.add_argument("--teacher", default="tiny",
                   help="an SD-1.x-style pipeline folder with 77-token prompts (default: a tiny "
                        "one built from config)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None, help="default: benchmarks/results/peer_lcm_<device>.json")
    p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--side-out", help=argparse.SUPPRESS)
    p.add_argument("--target-modules", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not os.path.isfile(a.peer_script):
        p.error(f"--peer-script {a.peer_script!r} is not a file; give the path of diffusers' "
                "examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py (clone "
                "https://github.com/huggingface/diffusers)")
    if a.warmup < 1 or a.steps < 2:
        p.error(f"--warmup {a.warmup} / --steps {a.steps}: need at least 1 warm-up and 2 timed "
                "steps")

    if a.side:  # a worker: one side, one fresh process
        result = run_ours(a) if a.side == "ours" else run_peer(a)
        write_json(a.side_out, result)
        return 0

    sides = {}
    teacher_name = a.teacher
    with tempfile.TemporaryDirectory() as tmp:
        if a.teacher == "tiny":
            # The peer hard-codes SD's 77-token prompts; the embedded teacher's text encoder has
            # 16 positions. A tiny SD pipeline built from config (random weights, 77 positions,
            # 32 px) serves both: step time and memory do not depend on the weights' values.
            from diffusion_distill.tiny import tiny_sd

            a.teacher = os.path.join(tmp, "tiny_sd")
            tiny_sd(sample_size=a.resolution // 2).save_pretrained(a.teacher)
        modules = _target_modules(a.teacher)
        for side in ("ours", "peer"):
            out = os.path.join(tmp, side + ".json")
            cmd = [sys.executable, os.path.abspath(__file__), "--peer-script", a.peer_script,
                   "--teacher", a.teacher, "--device", a.device,
                   "--batch-size", str(a.batch_size), "--resolution", str(a.resolution),
                   "--rank", str(a.rank), "--warmup", str(a.warmup), "--steps", str(a.steps),
                   "--side", side, "--side-out", out, "--target-modules", *modules]
            print(f"[peer_lcm] {side}: {a.warmup} + {a.steps} steps ...", flush=True)
            subprocess.run(cmd, check=True)
            with open(out) as f:
                sides[side] = json.load(f)
            s = sides[side]
            s["median_step_seconds"] = statistics.median(s["step_seconds"])
            s["peak_gb"] = s["peak_bytes"] / 1e9
            print(f"[peer_lcm] {side}: {s['median_step_seconds']:.3f} s/step, peak "
                  f"{s['peak_gb']:.2f} GB", flush=True)
    result = {
        "what": "one LCM-LoRA training step, ours vs diffusers' train_lcm_distill_lora_sd_wds.py",
        **provenance("peer_lcm.py", argv, device=a.device),
        "setup": {"teacher": teacher_name, "batch_size": a.batch_size, "resolution": a.resolution,
                  "lora_rank": a.rank, "lora_alpha": a.rank, "target_modules": modules,
                  "solver_steps": SOLVER_STEPS, "w_range": [W_MIN, W_MAX],
                  "loss": f"huber c={HUBER_C}", "warmup_steps": a.warmup,
                  "timed_steps": a.steps,
                  "peak": "torch.cuda.max_memory_allocated" if a.device == "cuda"
                  else "ru_maxrss (process high-water resident set)"},
        "differences": [
            ("the peer holds two UNets (frozen teacher + peft-wrapped student copy); ours one "
             "frozen base with student and EMA adapters"),
            "ours keeps an EMA adapter; the peer none",
            "the peer runs its teacher under torch.autocast(device) as written (bf16 on CPU)"],
        "ours": sides["ours"], "peer": sides["peer"],
        "ratio_time": sides["ours"]["median_step_seconds"] / sides["peer"]["median_step_seconds"],
        "ratio_peak_memory": sides["ours"]["peak_bytes"] / sides["peer"]["peak_bytes"],
    }
    out = a.out or os.path.join(HERE, "results", f"peer_lcm_{a.device}.json")
    write_json(out, result)
    print(f"[peer_lcm] ours / peer: time x{result['ratio_time']:.2f}, peak memory "
          f"x{result['ratio_peak_memory']:.2f} -> {out}")
    return 0


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


if __name__ == "__main__":
    sys.exit(main())
