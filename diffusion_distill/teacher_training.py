"""Train the embedded teachers from their recipes.

    ddistill train recipes/teachers/sd_unet.yaml     # (or: ddistill train teachers/sd_unet)
    ddistill train recipes/teachers/sd3_flow.yaml
    python -m diffusion_distill.teacher_training sd --pool 8192 --init FOLDER   # all options

A recipe whose ``teacher.build`` names a builder of a fresh pipeline is a teacher recipe;
``ddistill train`` hands it here. The same pieces as a distillation run: the recipe format, the
:class:`~diffusion_distill.objectives.denoising.Denoising` objective, the roles/``Nets`` of
``student.py`` (full fine-tuning of the fresh denoiser as role "student", an EMA copy as role
"ema"), the one loop, ``step.run_steps`` (``train.train`` runs it too), and the same run
folder: its lock, ``recipe.yaml`` identity check, resumable atomic checkpoints
(``checkpoint.save_checkpoint``, every ``checkpoint_every`` steps) and resume from the latest
good one, so a killed teacher training continues where it stopped. What differs from a
distillation run is only what a teacher needs, given to that loop: the data are world latents
(encoded once, since the VAE is frozen; :class:`~diffusion_distill.batches.LatentPool`), the
step has a learning-rate warm-up and an EMA warm-up, and besides each checkpoint the whole
diffusers pipeline with the EMA weights is written, so an interrupted run still leaves a
usable teacher.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

RECIPES = {"sd": "teachers/sd_unet", "sd3": "teachers/sd3_flow"}


def recipe_path(name: str) -> str:
    """A teacher's recipe file: ``sd`` / ``sd3``, a shipped recipe name, or a file path."""
    from .recipe import find_recipe

    return find_recipe(RECIPES.get(name, name))


@torch.no_grad()
def world_latents(vae, n: int, seed: int, chunk: int = 128, kinds=None, cache: str | None = None):
    """``n`` world samples as unscaled VAE latent means + captions (cached on disk: both
    teachers share the VAE, so they share the latents)."""
    from safetensors.torch import load_file, save_file

    from .world.data import ShapesWorld

    # safetensors + JSON, no pickle: a cache file is data, never code
    if cache and os.path.isfile(cache) and os.path.isfile(cache + ".json"):
        with open(cache + ".json") as f:
            captions = json.load(f)
        if len(captions) >= n:
            return load_file(cache)["latents"][:n], captions[:n]
    world = ShapesWorld(seed, kinds=kinds)
    latents, captions = [], []
    for i in range(0, n, chunk):
        images, caps, _ = world.batch(min(chunk, n - i), i // chunk)
        latents.append(vae.encode(images).latent_dist.mode())
        captions += caps
    latents = torch.cat(latents)
    if cache:
        from .checkpoint import atomic_file, atomic_path

        # captions first: a cache counts only once both files are in place
        with atomic_file(cache + ".json") as f:
            json.dump(captions, f)
        with atomic_path(cache) as tmp:
            save_file({"latents": latents.contiguous()}, tmp)
    return latents, captions


def scale_latents(vae, latents):
    """The same map as ``Teacher.encode_images`` applies after the encoder."""
    cfg = vae.config
    return (latents - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor


def save_pipeline(pipe, backbone_state, out):
    """Write the pipeline with the given denoiser weights (safetensors); ``out`` may only be
    new, empty, or an earlier saved pipeline (anything else is refused, never deleted)."""
    from .teachers import pipeline_backbone

    net = pipeline_backbone(pipe)
    net.load_state_dict(backbone_state)
    from .checkpoint import atomic_dir

    # Replaces only an earlier saved pipeline (a folder with model_index.json), atomically.
    with atomic_dir(out, markers=("model_index.json",), what="pipeline folder") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)


def _load_denoiser(pipe, folder: str):
    from safetensors.torch import load_file

    from .teachers import backbone_name

    sub = backbone_name(pipe)
    file = os.path.join(folder, sub, "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"--init {folder!r}: no {sub} weights at {file}; expected a "
                                "pipeline folder written by this script")
    getattr(pipe, sub).load_state_dict(load_file(file))


# train keys this loop does not apply, with the only value it runs (every other train key,
# train.attention, gradient_checkpointing and compile among them, is applied)
NOT_APPLIED = {"mixed_precision": "no", "base_dtype": "float32", "grad_accum": 1}


def check_train_keys(cfg: dict) -> None:
    """Refuse, before any work, a train key that teacher training would otherwise ignore."""
    for key, value in NOT_APPLIED.items():
        if cfg[key] != value:
            raise ValueError(f"recipe key 'train.{key}' is {cfg[key]!r}, but teacher training "
                             f"runs only {value!r} (it would be ignored); remove it or set "
                             f"train.{key}={value}")
    if cfg["device"] == "cuda":
        raise ValueError("recipe key 'train.device' is 'cuda', but teacher training runs on "
                         "the CPU; set train.device=cpu (or auto)")


def train_teacher(name: str, overrides=(), out: str | None = None, vae_path: str | None = None,
                  pool: int | None = None, threads: int | None = None,
                  minutes: float | None = None, cache_dir: str | None = "runs",
                  init: str | None = None, log=print, new_run: bool = False) -> str:
    """Train one embedded teacher; returns the folder of the saved pipeline.

    ``init``: a pipeline folder written by an earlier run; its denoiser weights start this
    run (student and EMA), i.e. a second training stage on top of the first. The run folder
    (the pipeline's parent) is locked and resumed as :func:`~diffusion_distill.train.train`
    does; ``new_run``: start over there (old checkpoints moved aside).
    """
    from .acceleration import REPLACE_PROCESSORS
    from .build import setup_run
    from .recipe import load_recipe
    from .teachers import teacher_from_pipeline
    from .world import teachers as world_teachers

    for flag, value, ok in (("--pool", pool, pool is None or pool >= 1),
                            ("--threads", threads, threads is None or threads >= 1),
                            ("--minutes", minutes, minutes is None or minutes > 0)):
        if not ok:
            raise ValueError(f"{flag} is {value!r}, but must be > 0 (or left out)")
    if threads:
        torch.set_num_threads(threads)
    recipe = load_recipe(name if isinstance(name, dict) else recipe_path(name), list(overrides))
    name = recipe["name"] if isinstance(name, dict) else name
    cfg = recipe["train"]
    check_train_keys(cfg)
    module, fn = recipe["teacher"]["build"].split(":")
    if module != world_teachers.__name__:
        raise ValueError(f"teacher.build must be a builder in {world_teachers.__name__}, got "
                         f"{recipe['teacher']['build']!r}")
    pipe = getattr(world_teachers, fn)(vae_path)
    if init:
        _load_denoiser(pipe, init)
    kwargs = {}
    if recipe["teacher"]["guidance"] is not None:
        kwargs["guidance_scale"] = recipe["teacher"]["guidance"]
    teacher = teacher_from_pipeline(pipe, **kwargs)
    if teacher.family == "sd3" and cfg["attention"] in REPLACE_PROCESSORS:
        raise ValueError(
            f"train.attention={cfg['attention']} replaces the attention processors, but the "
            "SD3 teacher trains through its own (world.teachers.RepeatedTokenJointAttention); "
            "use native or one of torch's kernels (math, efficient, flash, cudnn)")
    torch.manual_seed(cfg["seed"])
    # as every run is set up (student.mode: full, so the roles are whole copies of the fresh
    # denoiser), with train.attention, gradient_checkpointing and compile applied
    teacher, objective, nets = setup_run(recipe, "cpu", teacher)
    collapse = None
    if teacher.family == "sd3":
        # Same function, ~5x cheaper: see world.teachers.RepeatedTokenJointAttention.
        student_denoiser = nets.denoiser("student")
        student_denoiser.uncond, collapse = world_teachers.collapse_repeated_context(
            student_denoiser.uncond)
        nets.network("student").set_attn_processor(
            world_teachers.RepeatedTokenJointAttention(collapse))
    from .step import build_optimizers

    optimizers = build_optimizers(objective, nets, cfg)  # as every run builds them
    # 200 warm-up steps for any real run, tiny test runs warm up over their first tenth; then
    # constant, or a cosine to train.lr_final. (train.stop_after / --minutes stop a run early
    # on the schedule of train.steps, which is how a staged recipe pins its stage lengths.)
    # Short runs also warm the EMA up (its decay grows to the set value) so early checkpoints
    # are not dominated by the random initialisation.
    step_cfg = {**cfg, "grad_accum": 1,
                "warmup_steps": 200 if cfg["steps"] >= 1000 else cfg["steps"] // 10 + 1,
                "ema_warmup": True}

    out = out or os.path.join(recipe["output"]["dir"], "pipeline")
    from .checkpoint import check_output_dir, check_writable
    from .run_folder import check_run_folder, prepare_run_dir, run_lock

    check_output_dir(out, ("model_index.json",), "pipeline folder")  # before any training
    run_dir = os.path.dirname(out) or "."
    recipe["output"]["dir"] = run_dir  # the pipeline's folder is the run folder
    check_writable(run_dir, "output.dir")
    check_run_folder(run_dir)  # before a lock file lands in someone else's folder
    os.makedirs(run_dir, exist_ok=True)
    with run_lock(run_dir):  # one training per run folder, as train.train
        prepare_run_dir(recipe, new_run=new_run, log=log)  # same identity rules to resume
        return _train_locked(recipe, name, pipe, teacher, objective, nets, optimizers,
                             step_cfg, out, pool, cache_dir, collapse, minutes, log)


def _train_locked(recipe, name, pipe, teacher, objective, nets, optimizers, step_cfg, out,
                  pool, cache_dir, collapse, minutes, log):
    from .batches import LatentPool
    from .checkpoint import load_latest_good, restorer, run_roles, save_checkpoint
    from .world import teachers as world_teachers

    cfg = recipe["train"]
    run_dir = recipe["output"]["dir"]
    params = nets.params("student")
    pool = pool or max(2048, min(16384, cfg["steps"] * cfg["batch_size"] // 4))
    t0 = time.time()
    # The cache is keyed by the VAE's weights, so a retrained VAE never reuses stale latents.
    vae_key = f"{sum(float(p.detach().double().sum()) for p in pipe.vae.encoder.parameters()):.6e}"
    cache = (os.path.join(cache_dir, f"world_latents_seed{cfg['seed']}_{pool}_{vae_key}.safetensors")
             if cache_dir else None)
    latents, captions = world_latents(pipe.vae, pool, seed=cfg["seed"], cache=cache)
    x0_pool = scale_latents(pipe.vae, latents)
    log(f"{name}: {len(captions)} latents ready in {time.time() - t0:.0f}s; latent std "
        f"{x0_pool.std():.3f}; denoiser {sum(p.numel() for p in params) / 1e6:.2f}M params")

    def encode(caps):
        cond = teacher.prompts(caps)
        if collapse:
            cond, _ = world_teachers.collapse_repeated_context(cond)
        return cond

    batches = LatentPool(x0_pool, captions, encode)
    final_role = "ema" if nets.roles.ema_of else "student"
    weight_roles = run_roles(objective, nets)
    start = 0
    found = load_latest_good(run_dir, restorer(nets, optimizers, weight_roles, run_dir),
                             set_aside=True)
    if found:
        start = found[3]["step"]
        log(f"{name}: resuming {run_dir} from step {start} ({found[0]})")
    from .run_folder import trim_eval_log

    # rows of steps after the checkpoint are logged again as they are retrained
    trim_eval_log(os.path.join(run_dir, "metrics.jsonl"), start)

    def checkpoint(done):
        save_checkpoint(run_dir, done, {r: nets.state_dict(r) for r in weight_roles},
                        optimizers, {"name": recipe["name"]}, keep=cfg["keep_checkpoints"])
        # the whole pipeline too: an interrupted run leaves a usable teacher
        save_pipeline(pipe, nets.roles.state_dict(final_role), out)
        log(f"{name}: saved {out} and a checkpoint at step {done}")

    from .run_log import RunLog
    from .step import STOP, run_steps

    t_start = time.time()
    run_log = RunLog(run_dir)

    def after_step(done, logged, seconds):
        if logged is not None:
            logged["seconds"] = round(time.time() - t_start, 1)
            run_log.metrics(logged, done)
            log(f"{name} step {done}: " + " ".join(f"{k} {v:.4g}" for k, v in logged.items()
                                                  if k != "step"))
        out_of_time = (minutes is not None and time.time() - t_start > minutes * 60) or (
            cfg["stop_after"] is not None and done >= cfg["stop_after"])
        if done % cfg["checkpoint_every"] == 0 or done == cfg["steps"] or out_of_time:
            checkpoint(done)
        if out_of_time:
            log(f"{name}: stopped at step {done} ({time.time() - t_start:.0f} s)")
            return STOP
        return None

    try:
        run_steps(objective, nets, optimizers, batches, step_cfg, cfg["batch_size"], start,
                  cfg["steps"], after_step)
    finally:
        run_log.close()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="train an embedded teacher from its recipe")
    p.add_argument("name", help="sd or sd3 (or a recipe path)")
    p.add_argument("overrides", nargs="*", help="key.path=value, e.g. train.steps=200")
    p.add_argument("--out", default=None, help="pipeline folder (default <run dir>/pipeline)")
    p.add_argument("--vae", default=None, help="trained VAE folder (default the shipped one)")
    p.add_argument("--pool", type=int, default=None, help="number of world latents to use")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a busy machine: no spin-waiting)")
    p.add_argument("--minutes", type=float, default=None, help="stop (and save) after this long")
    p.add_argument("--init", default=None,
                   help="start from this saved pipeline's denoiser (a second training stage)")
    a = p.parse_args(argv)
    print(train_teacher(a.name, a.overrides, out=a.out, vae_path=a.vae, pool=a.pool,
                        threads=a.threads, minutes=a.minutes, init=a.init,
                        log=lambda s: print(s, flush=True)))


if __name__ == "__main__":
    main()
