"""Per-GPU peak memory of one training step at real sizes, planned without a GPU.

Each cell builds a real architecture on the meta device from its published config (written
below; nothing is downloaded), sets the run up with the toolkit's own pieces (``Teacher`` over
a ``Denoiser`` with the family's call function, ``SharedBaseRoles`` / ``SeparateRoles``,
``Nets``, the objective, ``acceleration.apply_to_run`` for gradient checkpointing,
``parallel.shard`` for FSDP2), materialises it as fake tensors (``FakeTensorMode``: shapes and
bytes, no memory, no arithmetic) and runs the loop's own ``step.train_step`` once under
torch's memory tracker. World size 1 is the single-process run (no sharding; ``MemTracker``);
world sizes 2 and 8 use a fake process group of that size and FSDP2 ``fully_shard`` on every
unit of ``parallel.shard_units`` and the root (``FSDPMemTracker``), which plans rank 0's bytes.

What one cell is:

* **setups**: ``plain_lora`` (a LoRA fine-tune: one adapter, the denoising loss on data, no
  EMA); ``dmd2_lora`` (DMD2 student + critic + EMA adapters on the one frozen base: the
  toolkit's default); ``dmd2_full`` (``student.mode: full``: the frozen base plus float32
  student, critic and EMA networks, AdamW on two); ``three_copies`` (DMD2's public layout:
  teacher, fake score and generator as three float32 networks, AdamW on two, no EMA);
  ``lcm_lora`` (LCM-LoRA as the toolkit runs it: one adapter on the base, the teacher is the
  base with the adapter off); ``lcm_two_unet`` (diffusers' ``train_lcm_distill_lora_*``
  layout: a frozen teacher plus a second copy of the base carrying the peft adapter).
* one step that trains every role the method has (DMD2: a student step, which trains the
  critic too); AdamW state already exists (allocated by a zero-gradient step beforehand), so
  the figure is the steady state, not the first step; AdamW in its foreach form (what torch
  picks on CUDA).
* the base (and teacher) in bfloat16, LoRA adapters, trained full networks and all optimizer
  state in float32 (the toolkit's ``train.base_dtype: bfloat16``); the loss arithmetic as the
  objectives do it. ``three_copies`` keeps its three networks float32, as its code does.
* batch 1 and 4 per GPU, gradient checkpointing of the backbone's blocks on and off.

Scalar reads (a logged loss, the finite-loss check) return 1 on fake tensors (bytes do not
depend on values). The tracker counts tensors only: add the CUDA context and allocator slack
(about 1-3 GB on a GPU) before comparing with a card's capacity; the README's "fits" column
leaves 10% of 80 GB for that.

Validation (``--validate``): the SD1.5-shaped float32 DMD2-LoRA step that
``benchmarks/memory.py`` measures on CPU (``results/memory_cpu_mmap.json``, live tensors)
planned the same way; the JSON records planned / measured.

    python benchmarks/memory_plan.py --validate       # ~2 min
    python benchmarks/memory_plan.py                  # the grid, resumable; ~40 min on 2 cores
    python benchmarks/memory_plan.py --archs sd15 --setups dmd2_lora --worlds 1 8
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import subprocess
import sys
import time

from harness import HERE, ROOT, provenance, write_json

GB = 1e9
RANK = 16            # LoRA rank of every adapter (memory.py's)
GUIDANCE = 4.5
CRITIC_STEPS = 5
CAPACITY_GB = 80.0
HEADROOM = 0.9       # "fits": planned tensors <= 90% of the card (context, allocator slack)

# -- architectures: published configs written in code -------------------------------------

SD15_UNET = {  # runwayml/stable-diffusion-v1-5 unet/config.json (as benchmarks/memory.py)
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}
SD35_LARGE = {  # stabilityai/stable-diffusion-3.5-large transformer/config.json
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
    "num_layers": 38, "attention_head_dim": 64, "num_attention_heads": 38,
    "joint_attention_dim": 4096, "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192, "qk_norm": "rms_norm",
}
FLUX_DEV = {  # black-forest-labs/FLUX.1-dev transformer/config.json
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
WAN21_14B = {  # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json
    "patch_size": (1, 2, 2), "num_attention_heads": 40, "attention_head_dim": 128,
    "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256,
    "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
WAN_FRAMES, WAN_HEIGHT, WAN_WIDTH = 81, 480, 832   # Wan 2.1's default clip: 5 s at 16 fps


def call_wan(transformer, x_t, model_time, cond):
    """Wan 2.1 T2V: flow prediction on video latents (B, C, F, H, W)."""
    return transformer(hidden_states=x_t, timestep=model_time,
                       encoder_hidden_states=cond.tensors["prompt_embeds"],
                       return_dict=False)[0]


def arch(name: str) -> dict:
    """The class, config, latent shape, text states and family call of one architecture."""
    import diffusers

    from diffusion_distill.teachers.flux import call_flux_guided
    from diffusion_distill.teachers.sd import call_unet
    from diffusion_distill.teachers.sd3 import call_sd3

    if name == "sd15":
        return {"cls": diffusers.UNet2DConditionModel, "config": SD15_UNET, "kind": "vp",
                "latent": (4, 64, 64), "text": {"prompt_embeds": (77, 768)}, "call": call_unet,
                "prediction": "epsilon", "what": "SD1.5 UNet, 512 px (latent 4x64x64)"}
    if name == "sdxl":
        return {"cls": diffusers.UNet2DConditionModel, "config": SDXL_UNET, "kind": "vp",
                "latent": (4, 128, 128), "call": call_unet, "prediction": "epsilon",
                "text": {"prompt_embeds": (77, 2048), "text_embeds": (1280,),
                         "time_ids": (6,)},
                "what": "SDXL base UNet, 1024 px (latent 4x128x128)"}
    if name == "sd35_large":
        return {"cls": diffusers.SD3Transformer2DModel, "config": SD35_LARGE, "kind": "flow",
                "latent": (16, 128, 128), "call": call_sd3, "prediction": "flow",
                "text": {"prompt_embeds": (333, 4096), "pooled_projections": (2048,)},
                "what": "SD3.5-large transformer, 1024 px (latent 16x128x128, 333 text tokens)"}
    if name == "flux_dev":
        return {"cls": diffusers.FluxTransformer2DModel, "config": FLUX_DEV, "kind": "flow",
                "latent": (16, 128, 128), "call": call_flux_guided, "prediction": "flow",
                "text": {"prompt_embeds": (512, 4096), "pooled_projections": (768,)},
                "what": "FLUX.1-dev transformer, 1024 px (latent 16x128x128, 512 text tokens)"}
    if name == "wan21_14b":
        f = (WAN_FRAMES - 1) // 4 + 1
        return {"cls": diffusers.WanTransformer3DModel, "config": WAN21_14B, "kind": "flow",
                "latent": (16, f, WAN_HEIGHT // 8, WAN_WIDTH // 8), "call": call_wan,
                "prediction": "flow", "text": {"prompt_embeds": (512, 4096)},
                "what": f"Wan 2.1 T2V 14B transformer, {WAN_FRAMES} frames at "
                        f"{WAN_WIDTH}x{WAN_HEIGHT} (latent 16x{f}x{WAN_HEIGHT // 8}x"
                        f"{WAN_WIDTH // 8})"}
    raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}")


ARCHS = ("sd15", "sdxl", "sd35_large", "flux_dev", "wan21_14b")
SETUPS = ("plain_lora", "dmd2_lora", "dmd2_full", "three_copies", "lcm_lora", "lcm_two_unet")
WORLDS = (1, 2, 8)
BATCHES = (1, 4)


# -- one cell -------------------------------------------------------------------------------

@contextlib.contextmanager
def scalar_reads_are_one():
    """Fake tensors hold no values; a logged loss or the finite check reads 1 (True for a
    bool, 0 for an integer draw) so that the loop's own step runs unchanged."""
    import torch
    from torch._subclasses import fake_impls

    table = fake_impls.op_implementations_dict
    ops = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)
    saved = {op: table[op] for op in ops}

    def read(fake_mode, func, arg):
        if arg.dtype == torch.bool:
            return True
        return 1.0 if arg.dtype.is_floating_point else 0

    for op in ops:
        table[op] = read
    try:
        yield
    finally:
        table.update(saved)


def totals_tracker(root=None, optimizer=None):
    """torch's ``MemTracker`` (unsharded run) or ``FSDPMemTracker`` (``root`` sharded),
    counting totals only. The per-module records of ``MemTracker`` are switched off: they walk
    every parameter of a module at each of its calls and deep-copy a snapshot (most of the
    planning time on a 700-module UNet called seven times a step), hook every parameter's
    gradient (which fails on the frozen base) and refuse a root module called twice in one
    forward, which every distillation step does. Peaks are kept by the dispatch hook, and
    FSDP's frees by the tracker's ``resize_`` hook, both unchanged."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    class Totals(FSDPMemTracker if root is not None else MemTracker):
        def _pre_fw_hook(self, module, inputs):
            pass

        def _post_fw_hook(self, module, inputs, outputs):
            pass

        def _pre_bw_hook(self, module, args):
            pass

        def _post_bw_hook(self, module, args):
            pass

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    return Totals(root, optimizer) if root is not None else Totals()


TRAIN_CFG = {"grad_accum": 1, "seed": 0, "steps": 1000, "lr": 1e-5, "lr_critic": None,
             "lr_final": None, "betas": [0.9, 0.999], "weight_decay": 0.0, "clip_grad": 1.0,
             "ema_decay": 0.99}  # the settings train_step reads, as a recipe gives them


def build_setup(arch_name: str, setup: str, checkpointing: bool, dtype, device="meta"):
    """One setup's run pieces with the toolkit's own classes, on ``device`` ("meta" for a
    plan, "cuda" for the GPU check: random weights). Returns a namespace; its ``networks``
    are the distinct modules the step runs (the shared base, or each role's network)."""
    from types import SimpleNamespace

    import torch

    from diffusion_distill.acceleration import apply_to_run
    from diffusion_distill.denoiser import Denoiser
    from diffusion_distill.objectives.consistency import LCM
    from diffusion_distill.objectives.denoising import Denoising
    from diffusion_distill.objectives.dmd import DMD2
    from diffusion_distill.schedules import FlowSchedule, VPSchedule
    from diffusion_distill.student import Nets, SeparateRoles, SharedBaseRoles
    from diffusion_distill.teachers.base import Teacher

    a = arch(arch_name)
    torch.manual_seed(0)
    with torch.device(device):
        base = a["cls"](**a["config"]).to(dtype)
    base.eval()
    if a["kind"] == "vp":  # SD's scaled-linear betas
        schedule = VPSchedule(torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    else:
        schedule = FlowSchedule(1000)
    guidance = 3.5 if arch_name == "flux_dev" else GUIDANCE
    denoiser = Denoiser(base, schedule, a["prediction"], a["call"], guidance_scale=guidance)
    teacher = Teacher(arch_name, denoiser, a["latent"], default_guidance=guidance)
    if setup == "plain_lora":
        objective = Denoising(p_uncond=0.0)
    elif setup.startswith("lcm"):
        # Flux-dev has no CFG (guidance is an input): LCM's w range is then the plain teacher
        guided = {"w_min": 0.0, "w_max": 0.0} if arch_name == "flux_dev" else {}
        objective = LCM(**guided)
    else:
        objective = DMD2(critic_steps=CRITIC_STEPS, guidance=guidance, student_times=[1.0])
    ema = setup in ("dmd2_lora", "dmd2_full")
    with torch.device(device):
        if setup in ("plain_lora", "dmd2_lora", "lcm_lora"):
            roles = SharedBaseRoles(base, roles=objective.roles, rank=RANK, ema=ema)
        elif setup == "lcm_two_unet":
            student = copy.deepcopy(base)
            # the copy's adapter is always on: the copy is the student network
            SharedBaseRoles(student, roles=("student",), rank=RANK, ema=False).activate(
                "student")
            roles = SeparateRoles(base, networks={"student": student}, roles=("student",),
                                  ema=False)
            for n, p in student.named_parameters():  # the copy's base stays frozen
                p.requires_grad_("lora_" in n)
        else:
            roles = SeparateRoles(base, roles=objective.roles, ema=ema)
    nets = Nets(teacher, roles, guidance=guidance)
    apply_to_run({"gradient_checkpointing": checkpointing}, nets, device)
    networks = ([roles.backbone] if isinstance(roles, SharedBaseRoles)
                else list(dict.fromkeys(roles.networks.values())))
    return SimpleNamespace(arch=a, base=base, denoiser=denoiser, teacher=teacher,
                           objective=objective, roles=roles, nets=nets, networks=networks,
                           base_params=sum(p.numel() for p in base.parameters()))


def make_batch(run, batch: int, device) -> dict:
    """Random text states and latents of the architecture's shapes (and the empty prompt's
    states for CFG), on ``device``."""
    import torch

    from diffusion_distill.denoiser import Cond

    text = {k: torch.randn(batch, *s, device=device) for k, s in run.arch["text"].items()}
    if run.arch["call"].__name__ == "call_flux_guided":
        # Flux-dev's guidance is an input: a plain denoising pass (plain_lora) passes it too
        text["guidance"] = torch.full((batch,), 3.5, device=device)
    else:  # Flux-dev: embedded guidance, no CFG
        run.denoiser.uncond = Cond({k: v[:1].clone() for k, v in text.items()})
        for own in (getattr(run.nets, "_denoisers", None) or {}).values():
            own.uncond = run.denoiser.uncond  # each full network's Denoiser (SeparateRoles)
    return {"prompts": ["p"] * batch, "cond": Cond(text),
            "x0": torch.randn(batch, *run.arch["latent"], device=device)}


def plan_cell(arch_name: str, setup: str, world: int, batch: int, checkpointing: bool,
              base_dtype: str = "bfloat16", warm_optimizer: bool = True) -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffusion_distill.parallel import ShardedBackward, rebind_roles, shard
    from diffusion_distill.step import build_optimizers, train_step

    t0 = time.perf_counter()
    dtype = torch.float32 if setup == "three_copies" else getattr(torch, base_dtype)
    run = build_setup(arch_name, setup, checkpointing, dtype, "meta")
    objective, nets, networks = run.objective, run.nets, run.networks
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        for net in networks:
            # gathered and computed in the base's dtype; float32 shards (LoRA, full roles)
            # are cast for compute and their gradients reduced in float32
            shard(net, mesh, param_dtype=None if dtype == torch.float32 else dtype)
    built = time.perf_counter() - t0
    with FakeTensorMode(allow_non_fake_inputs=True), scalar_reads_are_one():
        for net in networks:
            net.to_empty(device="cpu")
        rebind_roles(run.roles)
        data = make_batch(run, batch, "cpu")
        objective.setup(nets)
        optimizers = build_optimizers(objective, nets, TRAIN_CFG)
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["foreach"] = True  # torch's choice on CUDA
                for p in group["params"]:
                    p.grad = torch.zeros_like(p) if warm_optimizer else None
            opt.step()  # with no gradients (warm_optimizer False) a no-op: the first step
            opt.zero_grad(set_to_none=True)
        if world > 1:
            tracker = totals_tracker(networks[0], optimizers[objective.roles[0]])
            engine = ShardedBackward(networks)
        else:
            tracker, engine = totals_tracker(), None
        with tracker:
            # what exists before the step: every network's weights (rank 0's shards) and
            # every role's optimizer state
            tracker.track_external(*(networks if world == 1 else networks[1:]),
                                   *optimizers.values())
            t1 = time.perf_counter()
            train_step(objective, nets, optimizers, lambda rng, n: data, 0, TRAIN_CFG,
                       local_batch=batch, accelerator=engine)
        peak = tracker.get_tracker_snapshot("peak")
    peak_bytes = max(v["Total"] for v in peak.values())
    return {"arch": arch_name, "setup": setup, "world": world, "batch": batch,
            "gradient_checkpointing": checkpointing, "base_dtype": str(dtype).split(".")[-1],
            "base_params": run.base_params,
            "trainable_params": {r: sum(p.numel() for p in nets.params(r))
                                 for r in objective.roles},
            "planned_peak_gb": round(peak_bytes / GB, 3),
            "fits_80gb": peak_bytes <= HEADROOM * CAPACITY_GB * GB,
            "seconds": {"build": round(built, 1), "step": round(time.perf_counter() - t1, 1)}}


def cell_key(c: dict) -> str:
    return (f"{c['arch']}/{c['setup']}/w{c['world']}/b{c['batch']}/"
            f"{'ckpt' if c['gradient_checkpointing'] else 'nockpt'}")


# -- worker: one architecture at one world size, many cells, in one process -----------------

def worker(args):
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.set_num_threads(1)
    if args.world > 1:
        dist.init_process_group("fake", rank=0, world_size=args.world, store=FakeStore())
    for spec in json.loads(args.cells):
        try:
            result = plan_cell(**spec)
        except Exception as e:  # noqa: BLE001  (record it: the grid goes on)
            result = {**spec, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            result.pop("base_dtype", None)
        print(json.dumps(result), flush=True)


def run_cells(specs: list[dict], world: int) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--world", str(world),
           "--cells", json.dumps(specs)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            yield json.loads(line)
    proc.wait()


def machine() -> dict:
    import diffusers
    import peft
    import torch

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_cores_visible": os.cpu_count()}


def measured_live_peak() -> dict | None:
    """memory.py's CPU DMD2-LoRA peak with RSS tracking live tensors (mmap run), less the
    process's baseline before the model existed: the tensors of the step."""
    path = os.path.join(HERE, "results", "memory_cpu_mmap.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        run = json.load(f)["results"]["dmd2_lora"]
    baseline = next(e["now_gb"] for e in run["events"] if e["event"].startswith("start"))
    return {"file": os.path.relpath(path, ROOT), "peak_rss_gb": run["peak_gb"],
            "baseline_gb": baseline, "tensors_gb": round(run["peak_gb"] - baseline, 3)}


def grid(args) -> list[dict]:
    """The cells asked for. By default every setup at batch 1 with checkpointing, and DMD2-LoRA
    also at batch 4 and without checkpointing; ``--batches`` / ``--checkpointing`` ask for
    the full product instead."""
    if args.batches is None and args.checkpointing is None:
        combos = [(s, 1, True) for s in args.setups]
        if "dmd2_lora" in args.setups:
            combos += [("dmd2_lora", 4, True), ("dmd2_lora", 1, False)]
    else:
        combos = [(s, b, ck) for s in args.setups for b in (args.batches or [1])
                  for ck in (args.checkpointing or [True])]
    return [{"arch_name": a, "setup": s, "world": w, "batch": b, "checkpointing": ck}
            for a in args.archs for (s, b, ck) in combos for w in args.worlds]


def key_of(spec: dict) -> str:
    return cell_key({**spec, "arch": spec["arch_name"],
                     "gradient_checkpointing": spec["checkpointing"]})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    p.add_argument("--worlds", nargs="+", type=int, default=list(WORLDS))
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="per-GPU batch sizes (default: see grid())")
    p.add_argument("--checkpointing", nargs="+", default=None, choices=["on", "off"])
    p.add_argument("--all-worlds", action="store_true",
                   help="plan every world size; by default a larger one is skipped once a "
                        "smaller one fits (the table's question is the smallest that fits)")
    p.add_argument("--validate", action="store_true",
                   help="only plan memory.py's measured SD1.5 float32 step and compare")
    p.add_argument("--table", action="store_true", help="print the README table from the JSON")
    p.add_argument("--rerun", action="store_true", help="plan cells already in the JSON again")
    p.add_argument("--json", default=os.path.join(HERE, "results", "memory_plan.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cells", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.table:
        with open(args.json) as f:
            print(table(json.load(f)))
        return None
    if args.checkpointing is not None:
        args.checkpointing = [c == "on" for c in args.checkpointing]
    out = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            out = json.load(f)
    out.update({
        "what": "planned per-GPU peak (tensors) of one training step: FakeTensorMode, fake "
                "process group, FSDP2 fully_shard per parallel.shard_units unit + root at "
                "world > 1, torch's "
                "MemTracker / FSDPMemTracker; the toolkit's own roles, objectives and "
                "train_step",
        **provenance("memory_plan.py", argv), "machine_details": machine(),
        "lora_rank": RANK, "capacity_gb": CAPACITY_GB,
        "fits_rule": f"planned_peak_gb <= {HEADROOM} x {CAPACITY_GB}",
        "architectures": {a: arch(a)["what"] for a in ARCHS},
    })
    cells = out.setdefault("cells", {})
    if args.validate:
        t0 = time.perf_counter()
        # memory.py's measured step: its first (AdamW state is allocated at its end)
        spec = {"arch_name": "sd15", "setup": "dmd2_lora", "world": 1, "batch": 1,
                "checkpointing": False, "base_dtype": "float32", "warm_optimizer": False}
        planned = next(iter(run_cells([spec], 1)))
        measured = measured_live_peak()
        v = {"planned": planned, "measured": measured,
             "seconds": round(time.perf_counter() - t0, 1)}
        if measured and "planned_peak_gb" in planned:
            v["planned_over_measured"] = round(planned["planned_peak_gb"]
                                               / measured["tensors_gb"], 3)
            v["target"] = "within 15% (0.85-1.15)"
        out["validation"] = v
        write_json(args.json, out)
        print(json.dumps(v, indent=1))
        return out
    wanted = grid(args)
    todo = [c for c in wanted if args.rerun or "planned_peak_gb" not in cells.get(key_of(c), {})]
    print(f"{len(todo)} cells to plan ({len(wanted) - len(todo)} already in "
          f"{os.path.relpath(args.json)})", flush=True)

    def fits_smaller(c):
        smaller = [cells.get(key_of({**c, "world": w})) for w in WORLDS if w < c["world"]]
        return any(r and r.get("fits_80gb") for r in smaller)

    done = 0
    for w in sorted(set(args.worlds)):  # smallest first: a fit there skips the larger ones
        for a in args.archs:
            specs = [c for c in todo if c["world"] == w and c["arch_name"] == a
                     and (args.all_worlds or not fits_smaller(c))]
            if not specs:
                continue
            for result in run_cells(specs, w):
                if "arch" not in result:
                    result["arch"] = result.pop("arch_name")
                    result["gradient_checkpointing"] = result.pop("checkpointing")
                cells[cell_key(result)] = result
                done += 1
                write_json(args.json, out)
                print(f"[{done}] {cell_key(result)}: "
                      f"{result.get('planned_peak_gb', result.get('error'))} "
                      f"({result.get('seconds')})", flush=True)
    print(table(out))
    return out


def table(out) -> str:
    """Markdown: per architecture and setup, the planned GB at each world size (batch 1 and 4,
    checkpointing on / off) and the smallest GPU count that fits in 80 GB."""
    cells = out.get("cells", {})
    rows = ["| model | setup | batch | ckpt | GB/GPU at 1 | at 2 | at 8 | fits 80 GB from |",
            "|---|---|---|---|---|---|---|---|"]
    for a in ARCHS:
        for s in SETUPS:
            for b in BATCHES:
                for ck in ("ckpt", "nockpt"):
                    got = [cells.get(f"{a}/{s}/w{w}/b{b}/{ck}") for w in WORLDS]
                    if not any(got):
                        continue
                    gbs = [("" if g is None else "err" if "error" in g else
                            f"{g['planned_peak_gb']:.1f}") for g in got]
                    fits = next((("<= " if any(not x or "error" in x for x in got[:i]) else "")
                                 + f"{w} GPU{'s' if w > 1 else ''}"
                                 for i, (w, g) in enumerate(zip(WORLDS, got))
                                 if g and g.get("fits_80gb")),
                                "no (> 8)" if got[-1] and "error" not in got[-1] else
                                "still to plan")
                    rows.append(f"| {a} | {s} | {b} | {'on' if ck == 'ckpt' else 'off'} | "
                                + " | ".join(gbs) + f" | {fits} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
