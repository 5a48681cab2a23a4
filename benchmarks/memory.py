"""Peak memory and step time: plain LoRA vs DMD2 on one shared base vs DMD2 on three networks.

Three measurements, each in its own fresh subprocess so that peaks do not mix:

* ``plain_lora``: one LoRA adapter (r=16) on the UNet, eps-MSE denoising loss, AdamW step.
  Written with diffusers/peft directly (``unet.add_adapter``), as a LoRA fine-tune script would.
* ``dmd2_lora``: one DMD2 student step plus one critic step with the toolkit's own pieces:
  ``Teacher`` (``Denoiser`` + ``call_unet`` + ``VPSchedule``, CFG on), ``SharedBaseRoles``
  (student, critic and EMA adapters on the one frozen base), ``Nets``, ``DMD2``, and the
  training loop's own ``train.train_step`` (backward per yielded role, then clip and an AdamW
  step per role and the EMA update), observed phase by phase. A critic-only (TTUR) step is
  timed too.
* ``dmd2_lora_ckpt``: ``dmd2_lora`` with gradient checkpointing of the UNet's blocks
  (``acceleration.enable_gradient_checkpointing``, recomputing under the forward's role).
* ``dmd2_lora_bf16``: ``dmd2_lora`` on a bfloat16 base (``train.base_dtype: bfloat16``): the
  UNet is built in bf16, the LoRA roles and their AdamW state stay float32, and the
  ``Denoiser`` casts the inputs to the base's dtype (no autocast: a CPU measurement).
* ``dmd2_lora_full_critic``: the same step with a LoRA student (and its EMA adapter) on the
  frozen base beside a whole critic network (``critic.mode: full``, ``MixedRoles``): two
  networks, AdamW on the critic's every weight.
* ``dmd2_full``: the same step with three separate full networks (``SeparateRoles``: frozen
  teacher, full student and critic copies, AdamW on both). On a machine that cannot hold it,
  the worker stops before it would pass the memory budget (it never asks for more) and the
  full peak is *estimated* from parameter counts; the JSON says which parts were measured.

The model is Stable Diffusion 1.5's UNet2DConditionModel built from config with random
weights (860M parameters; 512 px -> 4x64x64 latents; text states random (1, 77, 768)), batch 1,
fp32. ``--small`` uses a tiny UNet for a quick smoke run (seconds).

Peaks: on CPU the process's ``ru_maxrss`` (high-water resident set, includes building the
model), plus a psutil sampling thread for the per-phase breakdown; on ``--device cuda``
``torch.cuda.max_memory_allocated`` (the ``cuda`` path is written but was not run here).

    python benchmarks/memory.py                 # full size, CPU, writes results/memory_cpu.json
    python benchmarks/memory.py --small         # smoke run, writes results/memory_cpu_small.json
    python benchmarks/memory.py --device cuda   # GPU: results/memory_cuda.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from harness import HERE, provenance, write_json
from memory_plan import SD15_UNET

GB = 1e9
MEASUREMENTS = ("plain_lora", "dmd2_lora", "dmd2_full", "dmd2_lora_ckpt", "dmd2_lora_bf16",
                "dmd2_lora_full_critic")

# the published SD1.5 UNet config, written once in memory_plan.py
SMALL_UNET = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
    "attention_head_dim": 4, "norm_num_groups": 8,
}
TEXT_TOKENS = 77
RANK = 16
GUIDANCE = 4.5
CRITIC_STEPS = 5  # DMD2's TTUR: a student step at every 5th step, critic steps at all of them
LR = 1e-4
CLIP_GRAD = 1.0   # the recipe default the loop applies
EMA_DECAY = 0.99


# -- memory monitor (inside a worker) -----------------------------------------------------

class Monitor:
    """Current / peak memory, per-phase peaks, and a hard budget on CPU.

    ``mark(name)`` records the memory now and the peak since the previous mark. On CPU a
    sampling thread watches RSS; if it ever passes ``budget`` the worker writes what it has
    and exits at once (code 3), so a measurement can never take the machine down.
    """

    def __init__(self, device: str, budget: float, events_path: str, interval: float = 0.005):
        import psutil
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.startswith("cuda")
        self.proc = psutil.Process()
        self.budget = budget
        self.events_path = events_path
        self.events: list[dict] = []
        self.t0 = time.perf_counter()
        self._window = self._peak = self.now()
        self._stop = False
        if not self.cuda:
            self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
            self._thread.start()

    def now(self) -> int:
        if self.cuda:
            return self.torch.cuda.memory_allocated()
        return self.proc.memory_info().rss

    def _sample(self, interval):
        while not self._stop:
            r = self.proc.memory_info().rss
            self._window = max(self._window, r)
            self._peak = max(self._peak, r)
            if r > self.budget:
                self.record("ABORT: memory budget reached", aborted=True)
                os._exit(3)
            time.sleep(interval)

    def mark(self, name: str, **extra) -> dict:
        if self.cuda:
            self.torch.cuda.synchronize()
            window = self.torch.cuda.max_memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
            self._peak = max(self._peak, window)
        else:
            window = max(self._window, self.now())
        event = self.record(name, window_peak=window, **extra)
        self._window = self.now()
        return event

    def record(self, name, **extra) -> dict:
        event = {"event": name, "t": round(time.perf_counter() - self.t0, 3),
                 "now_gb": round(self.now() / GB, 3)}
        for k, v in extra.items():
            event[k] = round(v / GB, 3) if k == "window_peak" else v
        if "window_peak" in event:
            event["window_peak_gb"] = event.pop("window_peak")
        self.events.append(event)
        with open(self.events_path, "a") as f:
            f.write(json.dumps(event) + "\n")
        return event

    def peak(self) -> int:
        if self.cuda:
            return max(self._peak, self.torch.cuda.max_memory_allocated())
        # ru_maxrss: kilobytes on Linux; the exact high-water mark of the whole process
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def would_exceed(self, extra_bytes: int) -> bool:
        return not self.cuda and self.now() + extra_bytes > self.budget

    def stop(self):
        self._stop = True


# -- building the model ------------------------------------------------------------------

def build(small: bool, device: str, dtype=None):
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    config = SMALL_UNET if small else SD15_UNET
    default = torch.get_default_dtype()
    # born in its dtype: a float32 copy first would be the process's high-water mark
    torch.set_default_dtype(dtype or default)
    try:
        unet = UNet2DConditionModel(**config).to(device)
    finally:
        torch.set_default_dtype(default)
    unet.eval()  # no dropout in these UNets anyway; the base stays frozen
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="epsilon", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    text_dim = config["cross_attention_dim"]
    text = torch.randn(1, TEXT_TOKENS, text_dim, device=device)
    uncond_text = torch.randn(1, TEXT_TOKENS, text_dim, device=device)
    latent_shape = (config["in_channels"], config["sample_size"], config["sample_size"])
    return unet, scheduler, text, uncond_text, latent_shape


def count(params) -> int:
    return sum(p.numel() for p in params)


def sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- (a) plain LoRA ------------------------------------------------------------------------

def run_plain_lora(args, mon: Monitor) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    from diffusion_distill.student import default_target_modules

    t_build = time.perf_counter()
    unet, scheduler, text, _, latent_shape = build(args.small, args.device)
    base_params = count(unet.parameters())
    unet.requires_grad_(False)
    targets = default_target_modules(unet)  # the same targets the toolkit's adapters use
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets,
                                init_lora_weights=True))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    acp = scheduler.alphas_cumprod.to(args.device)
    mon.mark("built", seconds=round(time.perf_counter() - t_build, 1))

    def step(i):
        g = torch.Generator().manual_seed(1000 + i)
        x0 = torch.randn(1, *latent_shape, generator=g).to(args.device)
        noise = torch.randn(1, *latent_shape, generator=g).to(args.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(x_t, t.to(args.device), encoder_hidden_states=text).sample
        loss = F.mse_loss(pred, noise)
        mon.mark("forward")
        loss.backward(inputs=params)
        mon.mark("backward")
        torch.nn.utils.clip_grad_norm_(params, CLIP_GRAD)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.mark("optimizer step")
        return {"loss": loss.item()}

    times, losses = timed_steps(step, args, mon)
    return {"base_params": base_params, "trainable_params": count(params),
            "adapters": 1, "lora_targets": targets, "step_seconds": times,
            "losses": losses}


def timed_steps(step, args, mon):
    """Wall seconds of ``args.steps`` steps after one warm-up (CPU seconds go in the events:
    on a shared machine they are less disturbed by other processes than wall time)."""
    times, losses = [], []
    for i in range(1 + args.steps):
        sync(args.device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = step(i)
        sync(args.device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        mon.mark(f"step {i} done" + (" (warm-up)" if i == 0 else ""), seconds=round(dt, 2),
                 cpu_seconds=round(dc, 2), loadavg_1min=round(os.getloadavg()[0], 2))
        losses.append(out)
        if i > 0:
            times.append(round(dt, 3))
    return times, losses


# -- (b) / (c) DMD2 -----------------------------------------------------------------------

def run_dmd2(args, mon: Monitor, full: bool, checkpointing: bool = False,
             bf16_base: bool = False, critic_full: bool = False) -> dict:
    import torch

    from diffusion_distill.denoiser import Cond, Denoiser
    from diffusion_distill.objectives.dmd import DMD2
    from diffusion_distill.schedules import VPSchedule
    from diffusion_distill.step import build_optimizers, train_step
    from diffusion_distill.student import (
        MixedRoles,
        Nets,
        SeparateRoles,
        SharedBaseRoles,
        role_is_full,
    )
    from diffusion_distill.teachers.base import Teacher
    from diffusion_distill.teachers.sd import call_unet

    t_build = time.perf_counter()
    unet, scheduler, text, uncond_text, latent_shape = build(
        args.small, args.device, torch.bfloat16 if bf16_base else None)
    base_params = count(unet.parameters())
    denoiser = Denoiser(unet, VPSchedule.from_scheduler(scheduler), "epsilon", call_unet,
                        uncond=Cond({"prompt_embeds": uncond_text}), guidance_scale=GUIDANCE)
    teacher = Teacher("sd", denoiser, latent_shape, default_guidance=GUIDANCE)
    mon.mark("teacher built", seconds=round(time.perf_counter() - t_build, 1))
    objective = DMD2(critic_steps=CRITIC_STEPS, guidance=GUIDANCE, student_times=[1.0])
    if full:
        # Three full networks: the frozen teacher plus full student and critic copies. (An EMA
        # of the full student would be a fourth copy; DMD2's code keeps one. Left out here.)
        roles = SeparateRoles(unet, roles=objective.roles, ema=False)
    elif critic_full:
        roles = MixedRoles(unet, {"student": "lora", "critic": "full"}, rank=RANK, ema=True)
    else:
        roles = SharedBaseRoles(unet, roles=objective.roles, rank=RANK, ema=True)
    if checkpointing:
        from diffusion_distill.acceleration import enable_gradient_checkpointing

        enable_gradient_checkpointing(unet, roles)  # recomputes under the forward's role
    nets = Nets(teacher, roles, guidance=GUIDANCE)
    objective.setup(nets)
    # The settings train_step reads, as a recipe's train section would give them.
    cfg = {"grad_accum": 1, "seed": 0, "steps": 1000, "lr": LR, "lr_critic": None,
           "lr_final": None, "betas": [0.9, 0.999], "weight_decay": 0.0,
           "clip_grad": CLIP_GRAD, "ema_decay": EMA_DECAY}
    optimizers = build_optimizers(objective, nets, cfg)
    trainable = {r: count(nets.params(r)) for r in objective.roles}
    mon.mark("roles built", seconds=round(time.perf_counter() - t_build, 1))
    batch = {"prompts": ["a random prompt"], "cond": Cond({"prompt_embeds": text})}

    def param_bytes(role):
        return sum(p.numel() * p.element_size() for p in nets.params(role))

    def guard(what, extra):
        if mon.would_exceed(extra):
            mon.record(f"STOP before {what}: needs {extra / GB:.2f} GB more than the "
                       f"{mon.budget / GB:.1f} GB budget allows", stopped=True,
                       stop_needs_gb=round(extra / GB, 3))
            raise BudgetStop(what)

    def observe(event, role):
        # Marks and budget guards around the phases of the toolkit's own train_step.
        if event == "forward":
            mon.mark(f"{role} forward" + (" (+ teacher CFG and critic passes)"
                                          if role == "student" else ""))
            # a full network's backward allocates a gradient the size of its weights
            if role_is_full(roles, role) and nets.params(role)[0].grad is None:
                guard(f"{role} backward", param_bytes(role))
        elif event == "backward":
            mon.mark(f"{role} backward")
        elif event == "before_step" and role_is_full(roles, role) and not optimizers[role].state:
            guard(f"{role} AdamW step (first: allocates exp_avg, exp_avg_sq)",
                  2 * param_bytes(role))
        elif event == "step":
            mon.mark(f"{role} optimizer step")

    def step(i, kind="student"):
        # The loop's own step (train.train_step): backward per yielded role, then per role
        # clip + AdamW step + zero_grad, then the EMA update.
        step_index = CRITIC_STEPS * i + (0 if kind == "student" else 1)
        logs = train_step(objective, nets, optimizers, lambda rng, n: batch, step_index, cfg,
                          local_batch=1, device=args.device, observe=observe)
        return {k[len("loss/"):]: v for k, v in logs.items() if k.startswith("loss/")}

    result = {"base_params": base_params, "trainable_params": trainable,
              "networks": 1 + sum(role_is_full(roles, r) for r in objective.roles),
              "adapters": sum(not role_is_full(roles, r) for r in objective.roles)
              + (1 if roles.ema_of and not role_is_full(roles, "ema") else 0)}
    try:
        times, losses = timed_steps(step, args, mon)
        result.update(step_seconds=times, losses=losses)
        if not args.steps:  # warm-up only: a memory measurement
            return result
        sync(args.device)
        t0, c0 = time.perf_counter(), time.process_time()
        step(args.steps + 1, kind="critic")
        sync(args.device)
        result["critic_only_step_seconds"] = round(time.perf_counter() - t0, 3)
        mon.mark("critic-only step done", seconds=result["critic_only_step_seconds"],
                 cpu_seconds=round(time.process_time() - c0, 2),
                 loadavg_1min=round(os.getloadavg()[0], 2))
    except BudgetStop as stop:
        result.update(completed=False, stopped_before=str(stop))
    except Exception as e:  # CUDA OOM and the like: record it, re-raise anything else
        if "out of memory" not in str(e).lower():
            raise
        result.update(completed=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    return result


class BudgetStop(RuntimeError):
    pass


# -- worker / parent ----------------------------------------------------------------------

def worker(args):
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    events = args.out + ".events"
    mon = Monitor(args.device, args.budget_gb * GB, events)
    mon.mark("start (imports done)")
    if args.worker == "plain_lora":
        result = run_plain_lora(args, mon)
    else:
        result = run_dmd2(args, mon, full=args.worker == "dmd2_full",
                          checkpointing=args.worker == "dmd2_lora_ckpt",
                          bf16_base=args.worker == "dmd2_lora_bf16",
                          critic_full=args.worker == "dmd2_lora_full_critic")
    result.setdefault("completed", True)
    mon.mark("end")
    mon.stop()
    result["peak_gb"] = round(mon.peak() / GB, 3)
    result["peak_source"] = ("torch.cuda.max_memory_allocated" if args.device != "cpu"
                             else "getrusage(RUSAGE_SELF).ru_maxrss")
    result["events"] = mon.events
    if result.get("step_seconds"):
        result["median_step_seconds"] = round(statistics.median(result["step_seconds"]), 3)
        cpu = [e["cpu_seconds"] for e in mon.events
               if e["event"].startswith("step ") and "warm-up" not in e["event"]]
        result["median_step_cpu_seconds"] = round(statistics.median(cpu), 2)
    write_json(args.out, result)


def run_worker(name, args) -> dict:
    fd, out = tempfile.mkstemp(prefix=f"mem_{name}_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--out", out,
           "--device", args.device, "--steps", str(args.steps), "--threads", str(args.threads),
           "--budget-gb", str(args.budget_gb)] + (["--small"] if args.small else [])
    print(f"[{name}] fresh process ...", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        # glibc: allocations above this go to mmap and are returned to the system when freed,
        # so RSS follows live tensors instead of the heap's high-water mark (see README)
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    proc = subprocess.run(cmd, env=env, check=False)
    wall = time.perf_counter() - t0
    result = {}
    if proc.returncode == 0 and os.path.getsize(out):
        with open(out) as f:
            result = json.load(f)
    else:
        # aborted (budget watchdog, code 3) or killed: keep the events it wrote
        events = []
        if os.path.exists(out + ".events"):
            with open(out + ".events") as f:
                events = [json.loads(line) for line in f if line.strip()]
        result = {"completed": False, "returncode": proc.returncode, "events": events,
                  "peak_gb_observed": max([e.get("window_peak_gb", e["now_gb"])
                                           for e in events] or [0])}
    result["process_wall_seconds"] = round(wall, 1)
    for path in (out, out + ".events"):
        if os.path.exists(path):
            os.remove(path)
    return result


def estimate_full(full: dict, lora: dict) -> dict:
    """Peak of the three-network step from parameter counts (fp32, AdamW), for when it can't run.

    The loop back-propagates the student and the critic before stepping either optimizer, so
    both full gradients are alive at the student's step; AdamW's state (exp_avg, exp_avg_sq)
    is allocated at each role's first step; the student's gradients are freed (set_to_none)
    before the critic steps. With P the base parameter count (4 bytes each), weights 3P:
      student step:  3P weights + 2P grads + 2P student state           = 7P
      critic step:   3P weights + 1P grad  + 2P student + 2P critic state = 8P
    plus the process's baseline (torch, libraries: RSS before the model was built). Backward
    peaks (weights + grads + activations, about 5P + activations) are below 8P at SD1.5 size.
    """
    P = full["base_params"] * 4
    baseline = next((e["now_gb"] for e in full.get("events", [])
                     if e["event"].startswith("start")), 0.0) * GB
    act = max(0.0, lora["peak_gb"] * GB - lora_static_bytes(lora))
    peak = max(8 * P, 5 * P + act) + baseline
    return {"estimated_peak_gb": round(peak / GB, 2),
            "with_ema_copy_gb": round((peak + P) / GB, 2),
            "breakdown_gb": {"weights_3_copies": round(3 * P / GB, 2),
                             "grads_critic": round(P / GB, 2),
                             "adamw_state_student_and_critic": round(4 * P / GB, 2),
                             "process_baseline": round(baseline / GB, 2)},
            "method": "estimated from parameter counts (see estimate_full docstring)"}


def lora_static_bytes(lora: dict) -> float:
    """RSS of the built DMD2-LoRA process before its first step (weights + adapters)."""
    for e in lora.get("events", []):
        if e["event"] == "roles built":
            return e["now_gb"] * GB
    return 0.0


def machine(args) -> dict:
    import diffusers
    import peft
    import psutil
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    info = {"device": args.device, "cpu": cpu, "cpu_cores_visible": os.cpu_count(),
            "torch_threads": args.threads, "ram_gb": round(psutil.virtual_memory().total / GB, 1),
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "python": platform.python_version(),
            "platform": platform.platform(),
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    if args.malloc_mmap_threshold:
        info["malloc_env"]["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parent(args):
    which = args.only or list(MEASUREMENTS)
    results = {name: run_worker(name, args) for name in which}
    plain, lora, full, ckpt, bf16, full_critic = (results.get(k, {}) for k in MEASUREMENTS)
    ratios = {}

    def versus(name, variant):
        # a variant of the DMD2 LoRA step against the step itself: peak, then step time
        if variant.get("peak_gb") and lora.get("peak_gb"):
            ratios[f"{name}_over_dmd2_lora_peak"] = round(variant["peak_gb"] / lora["peak_gb"], 3)
            if variant.get("median_step_seconds") and lora.get("median_step_seconds"):
                ratios[f"{name}_over_dmd2_lora_step_time"] = round(
                    variant["median_step_seconds"] / lora["median_step_seconds"], 2)

    versus("dmd2_lora_bf16_base", bf16)
    versus("dmd2_lora_checkpointed", ckpt)
    versus("dmd2_lora_full_critic", full_critic)
    if full_critic and not full_critic.get("completed") and lora.get("peak_gb"):
        # a whole critic adds one copy of the base, its gradient and AdamW's two moments
        P = full_critic["base_params"] * 4 if "base_params" in full_critic else None
        if P:
            full_critic["estimate"] = {
                "estimated_peak_gb": round(lora["peak_gb"] + 4 * P / GB, 2),
                "method": "the DMD2 LoRA step's peak + 4 x the base's fp32 bytes (critic "
                          "copy, its gradient, AdamW exp_avg and exp_avg_sq)"}
    if plain.get("peak_gb") and lora.get("peak_gb"):
        ratios["dmd2_lora_over_plain_lora_peak"] = round(lora["peak_gb"] / plain["peak_gb"], 3)
        ratios["goal_dmd2_lora_over_plain_lora"] = 1.1
        if plain.get("median_step_seconds") and lora.get("median_step_seconds"):
            ratios["dmd2_lora_over_plain_lora_step_time"] = round(
                lora["median_step_seconds"] / plain["median_step_seconds"], 2)
    if full and lora.get("peak_gb"):
        if full.get("completed") and full.get("peak_gb"):
            ratios["dmd2_lora_over_three_copies_peak"] = round(
                lora["peak_gb"] / full["peak_gb"], 3)
            ratios["three_copies_peak_source"] = "measured"
            if full.get("median_step_seconds") and lora.get("median_step_seconds"):
                ratios["dmd2_lora_over_three_copies_step_time"] = round(
                    lora["median_step_seconds"] / full["median_step_seconds"], 2)
        else:
            full["estimate"] = estimate_full(full, lora)
            ratios["dmd2_lora_over_three_copies_peak"] = round(
                lora["peak_gb"] / full["estimate"]["estimated_peak_gb"], 3)
            ratios["three_copies_peak_source"] = ("estimated (the run stopped before the "
                                                  "memory budget; see dmd2_full.estimate)")
    out = {
        "what": "peak memory and step time, batch 1, fp32: plain LoRA fine-tune step vs one "
                "DMD2 student+critic step with LoRA roles on one base vs with three full "
                "networks",
        "model": "tiny UNet2DConditionModel (smoke run)" if args.small else
                 "SD1.5-shaped UNet2DConditionModel, random weights, 512 px (latent 4x64x64), "
                 "text states random (1, 77, 768)",
        "unet_config": SMALL_UNET if args.small else SD15_UNET,
        "settings": {"lora_rank": RANK, "guidance": GUIDANCE, "critic_steps": CRITIC_STEPS,
                     "student_times": [1.0], "batch": 1, "dtype": "float32",
                     "optimizer": "AdamW", "clip_grad": CLIP_GRAD, "timed_steps": args.steps,
                     "warmup_steps": 1, "memory_budget_gb": args.budget_gb},
        **provenance("memory.py"),
        "machine_details": machine(args),
        "ratios": ratios,
        "results": results,
    }
    if args.device.startswith("cuda"):
        out["note"] = "peaks are torch.cuda.max_memory_allocated (tensors only, not the CUDA " \
                      "context or the allocator's cache)"
    path = args.json or os.path.join(
        HERE, "results", f"memory_{args.device.split(':')[0]}{'_small' if args.small else ''}.json")
    write_json(path, out)
    print_table(out)
    print(f"wrote {os.path.relpath(path)}")
    return out


def print_table(out):
    rows = [("measurement", "peak GB", "step s (median)", "note")]
    for name, r in out["results"].items():
        if r.get("completed", False):
            note = ""
            if "critic_only_step_seconds" in r:
                note = f"critic-only step {r['critic_only_step_seconds']:.2f} s"
            step = r.get("median_step_seconds")
            rows.append((name, f"{r['peak_gb']:.2f}", f"{step:.2f}" if step else "-", note))
        else:
            est = r.get("estimate", {})
            seen = r.get("peak_gb", r.get("peak_gb_observed", 0))
            why = r.get("stopped_before", r.get("error", "aborted"))
            rows.append((name, f"~{est.get('estimated_peak_gb', float('nan')):.1f} (est.)",
                         "-", f"stopped before {why}; {seen:.2f} GB reached"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    for k, v in out["ratios"].items():
        print(f"{k}: {v}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (measured) or cuda (written, untested)")
    p.add_argument("--small", action="store_true", help="tiny UNet: a quick smoke run")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps after one warm-up (default 2 full size, 3 small)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--budget-gb", type=float, default=None,
                   help="CPU: a worker stops before its RSS would pass this (default: 18, or "
                        "available memory minus 2 GB if less)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="CPU: run the workers with glibc's MALLOC_MMAP_THRESHOLD_=BYTES, so that "
                        "freed tensors go back to the system and peak RSS tracks live memory")
    p.add_argument("--only", nargs="+", choices=MEASUREMENTS, help="run only these")
    p.add_argument("--json", help="output path (default benchmarks/results/memory_<device>.json)")
    p.add_argument("--worker", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.small else 2
    if args.steps < 0:
        p.error("--steps must be >= 0 (0: warm-up step only, for memory)")
    if args.budget_gb is None:
        import psutil

        args.budget_gb = round(min(18.0, psutil.virtual_memory().available / GB - 2.0), 1)
    if args.worker:
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
