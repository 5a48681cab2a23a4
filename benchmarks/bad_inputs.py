"""Bad inputs and faults against the CLI: is every one refused clearly, and is nothing lost?

    python benchmarks/bad_inputs.py            # writes benchmarks/results/bad_inputs.json

Each case runs ``ddistill ...`` in a subprocess, in a temporary folder, on a tiny pipeline
(``diffusion_distill.tiny``) and a tiny recipe, and is classed as

* ``clear error``: refused (exit code != 0) with one line on stderr that names what was wrong
  (the case's keyword: the key, the flag, the file), no traceback;
* ``recovered``: a fault the command is meant to survive (a corrupt latest checkpoint, a stale
  lock): exit 0 and a warning line saying what was done;
* ``unclear``: refused, but with a traceback, an "internal error", or without naming it;
* ``silent``: a bad input that ran as if it were fine (or, for an input that must be handled,
  a wrong result without a word);
* ``data lost``: a file that existed before the command was changed or removed.

Inputs that must be *handled* (overrides after a flag, a restart's log, writing through a
symbolic link) count as ``recovered`` when the command succeeds and the result checks out.
The classes of untrusted input (issue 30): recipe values and method options, CLI flags, data
loss, resume faults, exports (``distill_config.json``, LoRA files, served step counts, bench
entries), teacher folders, paths and the environment (full disk, read-only filesystem, links),
and resources. Cases that need a filesystem mount (tmpfs) are skipped where mounting is not
allowed.

The JSON holds, per case, the input (temporary paths shown as ``TMP/``), the exit code, the
first line of output that is not library noise, the class, and the counts per class.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from harness import ROOT, provenance, write_json

OUT = os.path.join(ROOT, "benchmarks", "results", "bad_inputs.json")
NOISE = ("[transformers]", "Loading", "Writing", "warnings.warn", "UserWarning", "it/s]",
         "s/it]")


def cli(args, cwd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT}
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "diffusion_distill.cli", *args], cwd=cwd,
                           capture_output=True, text=True, env=env, timeout=timeout,
                           check=False)
    except subprocess.TimeoutExpired as e:  # still running: it took the input as fine
        text = (lambda b: b.decode(errors="replace") if isinstance(b, bytes) else b or "")
        return None, text(e.stdout), text(e.stderr) + f"\n(timed out after {timeout}s)", \
            time.time() - t0
    return p.returncode, p.stdout, p.stderr, time.time() - t0


def snapshot(paths) -> dict:
    out = {}
    for top in paths:
        for root, _, files in os.walk(top):
            for f in files:
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    out[p] = hashlib.sha256(fh.read()).hexdigest()
        if os.path.isfile(top):
            with open(top, "rb") as fh:
                out[top] = hashlib.sha256(fh.read()).hexdigest()
    return out


def relevant_lines(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.strip() and not any(n in line for n in NOISE)]


def setup_base(tmp: str) -> dict:
    """A tiny teacher folder, a tiny recipe and one finished run (checkpoints 2 and 4)."""
    import yaml
    from conftest import tiny_recipe

    from diffusion_distill.tiny import tiny_sd, tiny_sd3

    teacher = os.path.join(tmp, "tiny_sd")
    tiny_sd().save_pretrained(teacher)
    teacher_sd3 = os.path.join(tmp, "tiny_sd3")
    tiny_sd3().save_pretrained(teacher_sd3)
    recipe = tiny_recipe(teacher, os.path.join(tmp, "run"), steps=4, checkpoint_every=2)
    path = os.path.join(tmp, "recipe.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    code, _, err, _ = cli(["train", path, "--no-progress"], tmp)
    if code:
        raise SystemExit(f"setting up the base run failed:\n{err[-3000:]}")
    foreign = os.path.join(tmp, "my_files")
    os.makedirs(foreign)
    with open(os.path.join(foreign, "thesis.tex"), "w") as f:
        f.write("years of work\n")
    spec = os.path.join(tmp, "spec.yaml")
    with open(spec, "w") as f:
        yaml.safe_dump({"teacher": teacher, "teacher_steps": [1], "num_samples": 8,
                        "latency": False, "real_baseline": False}, f)
    with open(os.path.join(tmp, "broken.yaml"), "w") as f:
        f.write("train:\n  steps: 3\n lr: [1\n")
    with open(os.path.join(tmp, "broken_spec.yaml"), "w") as f:
        f.write("teacher: x\nnum_samples: [8\n")
    return {"teacher": teacher, "teacher_sd3": teacher_sd3, "recipe": path,
            "run": os.path.join(tmp, "run"), "foreign": foreign, "spec": spec}


def copy_run(base, tmp, name) -> str:
    dst = os.path.join(tmp, name)
    shutil.copytree(base["run"], dst)
    return dst


def corrupt(kind):
    def do(run):
        ckpt = os.path.join(run, "checkpoints", "step_0000004")
        if kind == "weights":
            with open(os.path.join(ckpt, "weights.safetensors"), "r+b") as f:
                f.truncate(100)
        elif kind == "state":
            with open(os.path.join(ckpt, "state.json"), "w") as f:
                f.write("{not json")
        elif kind == "optimizer":
            with open(os.path.join(ckpt, "optimizers.json"), "w") as f:
                f.write("[1, 2")
        elif kind == "all":
            for step in ("step_0000002", "step_0000004"):
                with open(os.path.join(run, "checkpoints", step, "weights.safetensors"),
                          "r+b") as f:
                    f.truncate(100)
    return do


def cases(base, tmp):
    """(name, category, argv builder, expect, keyword, protected paths, setup)."""
    r = base["recipe"]

    def train(*overrides, out=None):
        def argv(c):
            return ["train", r, f"output.dir={out or os.path.join(tmp, 'fresh_' + c)}",
                    *overrides, "--no-progress"]
        return argv

    out = []
    # -- recipe values (via overrides and files) --
    for override, key in [
        ("train.steps=0", "train.steps"), ("train.batch_size=0", "train.batch_size"),
        ("train.grad_accum=-1", "train.grad_accum"), ("train.log_every=0", "train.log_every"),
        ("train.checkpoint_every=0", "train.checkpoint_every"), ("train.lr=0", "train.lr"),
        ("train.lr=-1e-4", "train.lr"), ("train.lr=.nan", "train.lr"),
        ("train.lr=fast", "train.lr"), ("train.lr_critic=.inf", "train.lr_critic"),
        ("train.ema_decay=1.0", "train.ema_decay"), ("train.ema_decay=-0.5", "train.ema_decay"),
        ("student.rank=0", "student.rank"), ("student.timesteps=[0.5,1.0]", "student.timesteps"),
        ("student.timesteps=[1.0,0.0]", "student.timesteps"),
        ("output.export_role=''", "output.export_role"),
        ("output.export_role=nobody", "output.export_role"),
        ("train.device=tpu", "train.device"), ("teacher.guidance=-2", "teacher.guidance"),
        ("train.stpes=3", "train.stpes"), ("train.steps", "not key=value"),
    ]:
        out.append((override, "recipe value", train(override), "refuse", key, [], None))
    try:
        import torch

        if not torch.cuda.is_available():
            out.append(("train.device=cuda (no GPU)", "recipe value", train("train.device=cuda"),
                        "refuse", "train.device", [], None))
    except ImportError:
        pass
    out.append(("YAML syntax error", "recipe value",
                lambda c: ["train", os.path.join(tmp, "broken.yaml")], "refuse",
                "broken.yaml:3:2", [], None))
    out.append(("bench spec YAML syntax error", "recipe value",
                lambda c: ["bench", os.path.join(tmp, "broken_spec.yaml")], "refuse",
                "broken_spec.yaml:3:1", [], None))
    out.append(("recipe file missing", "recipe value",
                lambda c: ["train", os.path.join(tmp, "nope.yaml")], "refuse", "nope.yaml", [],
                None))
    # -- CLI flags --
    t = base["teacher"]
    for name, argv, key in [
        ("eval --steps 0", ["eval", t, "--steps", "0"], "--steps"),
        ("eval --num -3", ["eval", t, "--num", "-3"], "--num"),
        ("eval --batch-size 0", ["eval", t, "--batch-size", "0"], "--batch-size"),
        ("sample --guidance -1", ["sample", t, "--prompt", "a", "--guidance", "-1"],
         "--guidance"),
        ("sample --steps 0", ["sample", t, "--prompt", "a", "--steps", "0"], "--steps"),
        ("eval --out FOLDER (a file is written)", ["eval", t, "--out", tmp], "--out"),
        ("sample --out FOLDER", ["sample", t, "--prompt", "a", "--out", tmp], "--out"),
        ("eval --grid FOLDER", ["eval", t, "--grid", tmp], "--grid"),
        ("export --out FILE (a folder is written)", ["export", base["run"], "--out", r],
         "--out"),
        ("stats --out FOLDER", ["stats", tmp, "--out", tmp], "--out"),
        ("eval missing path", ["eval", os.path.join(tmp, "nowhere"), "--num", "8"], "nowhere"),
        ("export missing run", ["export", os.path.join(tmp, "nowhere"), "--out",
                                os.path.join(tmp, "x")], "nowhere"),
    ]:
        out.append((name, "cli flag", lambda c, a=argv: a, "refuse", key, [], None))
    # -- data loss: commands that write folders --
    # Each on its own copy of the run and of the foreign folder (RUN, FOREIGN below), so one
    # case that deletes something cannot spoil the next.
    run, foreign = "{RUN}", "{FOREIGN}"
    for name, argv, key in [
        ("export RUN --out RUN", ["export", run, "--out", run], "run folder"),
        ("export RUN --out . (cwd = RUN)", ["export", run, "--out", "."], "run folder"),
        ("export RUN --out PARENT", ["export", run, "--out", "{PARENT}"], "run folder"),
        ("export RUN --out RUN/checkpoints", ["export", run, "--out", run + "/checkpoints"],
         "checkpoints"),
        ("export RUN --out FOREIGN", ["export", run, "--out", foreign], "my_files"),
        ("train output.dir=FOREIGN", ["train", r, f"output.dir={foreign}", "--no-progress"],
         "my_files"),
        ("train output.dir=FILE", ["train", r, f"output.dir={foreign}/thesis.tex",
                                   "--no-progress"], "is a file"),
        ("bench --out FOREIGN", ["bench", base["spec"], "--out", foreign], "my_files"),
        ("bench --out . (cwd = FOREIGN)", ["bench", base["spec"], "--out", "."],
         "current folder"),
        ("demo --out FOREIGN", ["demo", "--out", foreign], "my_files"),
        ("eval --out FOREIGN/thesis.tex", ["eval", base["teacher"], "--num", "8", "--out",
                                           foreign + "/thesis.tex"], "thesis.tex"),
        ("sample --out FOREIGN/thesis.tex", ["sample", base["teacher"], "--prompt", "a",
                                             "--out", foreign + "/thesis.tex"], "thesis.tex"),
    ]:
        cwd = run if "cwd = RUN" in name else foreign if "cwd = FOREIGN" in name else None
        out.append((name, "data loss", lambda c, a=argv: a, "refuse", key, ["{PARENT}"],
                    ("cwd", cwd) if cwd else None))
    # -- resume faults --
    for kind, expect, key in [("weights", "recover", "falling back"),
                              ("state", "recover", "falling back"),
                              ("optimizer", "recover", "falling back"),
                              ("all", "refuse", "weights.safetensors")]:
        out.append((f"corrupt checkpoint: {kind}", "resume", "RUNCOPY", expect, key, [],
                    ("copy", corrupt(kind))))
    for name, override, key in [("rerun with student.rank=8", "student.rank=8", "student.rank"),
                                ("rerun with another method option", "method.critic_steps=5",
                                 "method"),
                                ("rerun with another teacher", "teacher.path=embedded:sd3",
                                 "teacher.path"),
                                ("rerun with fewer steps", "train.steps=2", "train.steps")]:
        out.append((name, "resume", ("RUNCOPY", override), "refuse", key, ["RUNCOPY"],
                    ("copy", None)))
    out.append(("second training while the run is locked", "resume", "RUNCOPY", "refuse",
                "in use", ["RUNCOPY"], ("lock", "live")))
    out.append(("stale lock (owner gone)", "resume", "RUNCOPY", "recover", "stale lock", [],
                ("lock", "stale")))
    return out


# -- issue 30: every input is untrusted ------------------------------------------------------
# Each case a dict: argv(ctx), and optionally prepare(ctx) (ctx["dir"] is the case's own
# folder), protect(ctx) (paths that must not change), check(ctx) (for "handle" cases),
# needs ("mount": skipped where tmpfs cannot be mounted), cleanup(ctx).

def _json_edit(fn):
    def prepare(ctx):
        path = os.path.join(_export_copy(ctx), "distill_config.json")
        with open(path) as f:
            config = json.load(f)
        fn(config)
        with open(path, "w") as f:
            json.dump(config, f)
    return prepare


def _export_copy(ctx) -> str:
    dst = os.path.join(ctx["dir"], "export")
    if not os.path.isdir(dst):
        shutil.copytree(os.path.join(ctx["run"], "export"), dst)
    ctx["export"] = dst
    return dst


def _teacher_copy(ctx) -> str:
    dst = os.path.join(ctx["dir"], "teacher")
    if not os.path.isdir(dst):
        shutil.copytree(ctx["teacher"], dst)
    ctx["teacher_copy"] = dst
    return dst


def _unet_weights(ctx) -> str:
    folder = os.path.join(_teacher_copy(ctx), "unet")
    return os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".safetensors")))


def _truncate(path_of):
    def prepare(ctx):
        path = path_of(ctx)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    return prepare


def _write(path_of, text):
    def prepare(ctx):
        with open(path_of(ctx), "w") as f:
            f.write(text)
    return prepare


def _nan_weights(ctx):
    from safetensors.torch import load_file, save_file

    path = _unet_weights(ctx)
    state = load_file(path)
    name = min(state)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, path)


def _pickled(ctx):
    path = _unet_weights(ctx)
    os.remove(path)
    with open(os.path.join(os.path.dirname(path), "diffusion_pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04pickled")


def _lora_elsewhere(ctx, fraction=1.0):
    """The export's LoRA with (a fraction of) its layers renamed to modules the base lacks."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(_export_copy(ctx), "pytorch_lora_weights.safetensors")
    state = load_file(path)
    layers = sorted({k.split(".lora_")[0] for k in state})
    moved = set(layers[: max(1, int(len(layers) * fraction))])
    save_file({(k.replace("unet.", "unet.elsewhere_", 1) if k.split(".lora_")[0] in moved
                else k): v for k, v in state.items()}, path)


def _lora_half_elsewhere(ctx):
    _lora_elsewhere(ctx, 0.5)


def _mount(path, size="64k", ro=False) -> bool:
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path],
                          capture_output=True, check=False).returncode == 0


def _umount(ctx):
    for m in ctx.get("mounts", []):
        subprocess.run(["umount", m], capture_output=True, check=False)


def _full_disk(ctx):
    mnt = os.path.join(ctx["dir"], "full")
    if not _mount(mnt, "256k"):
        raise SkipCase("cannot mount a tmpfs here")
    ctx.setdefault("mounts", []).append(mnt)
    with open(os.path.join(mnt, "r.json"), "w") as f:
        f.write('{"earlier": "result"}')
    with contextlib.suppress(OSError), open(os.path.join(mnt, "filler"), "wb") as f:
        f.write(b"\0" * (1 << 20))  # fill it up
    ctx["out"] = os.path.join(mnt, "r.json")


def _read_only(ctx):
    mnt = os.path.join(ctx["dir"], "ro")
    if not _mount(mnt, "64k", ro=True):
        raise SkipCase("cannot mount a read-only tmpfs here")
    ctx.setdefault("mounts", []).append(mnt)
    ctx["out"] = os.path.join(mnt, "r.json")


class SkipCase(Exception):
    pass


def _link_loop(ctx):
    os.symlink(os.path.join(ctx["dir"], "b"), os.path.join(ctx["dir"], "a"))
    os.symlink(os.path.join(ctx["dir"], "a"), os.path.join(ctx["dir"], "b"))


def _result_link(ctx):
    os.makedirs(os.path.join(ctx["dir"], "results"))
    ctx["target"] = os.path.join(ctx["dir"], "results", "r.json")
    with open(ctx["target"], "w") as f:
        f.write("{}")
    os.symlink(ctx["target"], os.path.join(ctx["dir"], "latest.json"))


def _link_kept(ctx):
    link = os.path.join(ctx["dir"], "latest.json")
    with open(ctx["target"]) as f:
        return os.path.islink(link) and "num_samples" in f.read()


def _restart_run(ctx):
    """A run copy as if killed after logging step 3 but before checkpoint 4 was written."""
    run = os.path.join(ctx["dir"], "run")
    shutil.copytree(ctx["run"], run)
    shutil.rmtree(os.path.join(run, "checkpoints", "step_0000004"))
    shutil.rmtree(os.path.join(run, "export"), ignore_errors=True)
    path = os.path.join(run, "metrics.jsonl")
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    with open(path, "w") as f:
        f.writelines(rows[:3])
    ctx["run_copy"] = run


def _each_step_once(ctx):
    with open(os.path.join(ctx["run_copy"], "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    return steps == sorted(set(steps)) and steps[-1] == 4


def _changed_teacher_run(ctx):
    """A run copy whose recipe names a teacher copy, whose weights then change."""
    from safetensors.torch import load_file, save_file

    teacher = _teacher_copy(ctx)
    run = os.path.join(ctx["dir"], "run")
    shutil.copytree(ctx["run"], run)
    recipe = os.path.join(run, "recipe.yaml")
    with open(recipe) as f:
        text = f.read()
    with open(recipe, "w") as f:
        f.write(text.replace(ctx["teacher"], teacher))
    path = _unet_weights(ctx)
    save_file({k: v * 1.01 for k, v in load_file(path).items()}, path)
    ctx["run_copy"] = run


def untrusted_cases(base, tmp) -> list[dict]:
    r = base["recipe"]

    def train(*overrides, prepare=None, **kw):
        return {"argv": lambda c: ["train", r, f"output.dir={os.path.join(c['dir'], 'run')}",
                                   *[o(c) if callable(o) else o for o in overrides],
                                   "--no-progress"], "prepare": prepare, **kw}

    out = []

    def add(name, category, keyword, case, expect="refuse"):
        out.append({"name": name, "category": category, "keyword": keyword, "expect": expect,
                    **case})

    # -- method options: every objective's table and relations, at recipe load
    for option, key in [
        ("method={name: pcm, phases: 0}", "method.phases"),
        ("method={name: pcm, phases: 64}", "method.phases"),
        ("method={name: ect, stage_every: -1}", "method.stage_every"),
        ("method={name: ect, sigma_data: 0}", "method.sigma_data"),
        ("method={name: ect, q: 1.0}", "method.q"),
        ("method={name: scm, warmup_steps: -5}", "method.warmup_steps"),
        ("method={name: scm, tangent: jacobian}", "method.tangent"),
        ("method={name: sid, guidance: -2}", "method.guidance"),
        ("method={name: sid, kappa1: -1}", "method.kappa1"),
        ("method={name: sid, kappa2: 1.0, kappa3: 2.0}", "method.kappa3"),
        ("method.guidance=-3", "method.guidance"),
        ("method.t_min=low", "method.t_min"),
        ("method.critic_steps=0", "method.critic_steps"),
        ("method.critic_steps=2.5", "method.critic_steps"),
        ("method.crtic_steps=2", "method.crtic_steps"),
        ("method.backward_simulation=maybe", "method.backward_simulation"),
        ("method={name: dmd2, t_min: 0.9, t_max: 0.1}", "method.t_max"),
        ("method={name: decoupled_dmd, ca_weight: -1}", "method.ca_weight"),
        ("method={name: lcm, sample_steps: [3, 100]}", "method.sample_steps"),
        ("method={name: lcm, w_min: 5, w_max: 1}", "method.w_max"),
        ("method={name: lcm, loss: l1}", "method.loss"),
        ("method={name: sida, gan_weight: -1}", "method.gan_weight"),
        ("method={name: denoising, p_uncond: 1.5}", "method.p_uncond"),
        ("method.name=dmd3", "method.name"),
    ]:
        add(option, "method option", key, train(option))
    add("pcm phases=3 with student.num_steps=4", "method option", "method.phases",
        train("method={name: pcm, phases: 3}", "student.num_steps=4"))
    add("tcd student.num_steps=1001", "method option", "student.num_steps",
        train("method={name: tcd}", "student.num_steps=1001"))
    add("tcd gamma=0.3 on a flow teacher", "method option", "method.gamma",
        train("method={name: tcd, gamma: 0.3}", f"teacher.path={base['teacher_sd3']}",
              "data={source: world, resolution: 16}"))
    add("phased_dmd with too few train.steps", "method option", "train.steps",
        train("method={name: phased_dmd}", "student.num_steps=4"))

    # -- exports: sample / eval / bench / load_student
    def sample_export(prepare, *extra):
        return {"argv": lambda c: ["sample", c["export"], "--prompt", "a", "--out",
                                   os.path.join(c["dir"], "s.png"), *extra],
                "prepare": prepare}

    for name, fn, key in [
        ("export config without scheduler", lambda c: c.pop("scheduler"), "'scheduler'"),
        ("export config without teacher", lambda c: c.pop("teacher"), "'teacher'"),
        ("export config without call", lambda c: c.pop("call"), "'call'"),
        ("export scheduler class LCMSchedulerX",
         lambda c: c["scheduler"].update({"class": "LCMSchedulerX"}), "scheduler.class"),
        ("export scheduler class os.system",
         lambda c: c["scheduler"].update({"class": "os.system"}), "scheduler.class"),
        ("export scheduler class a pipeline",
         lambda c: c["scheduler"].update({"class": "StableDiffusionPipeline"}),
         "scheduler.class"),
        ("export scheduler class a module",
         lambda c: c["scheduler"].update({"class": "schedulers"}), "scheduler.class"),
        ("export num_inference_steps 'one'",
         lambda c: c["call"].update({"num_inference_steps": "one"}), "num_inference_steps"),
        ("export steps entry with a bad call",
         lambda c: c["steps"]["1"]["call"].update({"guidance_scale": "high"}),
         "steps.1.call.guidance_scale"),
        ("export adapters naming a path", lambda c: c.update({"adapters": ["../../x"]}),
         "'adapters'"),
        ("export adapter missing on disk", lambda c: c.update({"adapters": ["expert_0"],
                                                               "adapter_per_step": ["expert_0"]}),
         "expert_0/pytorch_lora_weights.safetensors"),
        ("export for another base", lambda c: c["teacher"].update({"base_fingerprint": "0" * 16}),
         "different base"),
    ]:
        add(name, "export", key, sample_export(_json_edit(fn)))
    add("export config truncated JSON", "export", "distill_config.json",
        sample_export(lambda c: _write(lambda c: os.path.join(_export_copy(c),
                                                              "distill_config.json"),
                                       '{"format": 2, "teacher": {')(c)))
    add("export LoRA file truncated", "export", "pytorch_lora_weights.safetensors",
        sample_export(_truncate(lambda c: os.path.join(_export_copy(c),
                                                       "pytorch_lora_weights.safetensors"))))
    add("export LoRA layers that fit no module", "export", "LoRA layers fit",
        sample_export(_lora_elsewhere))
    add("export LoRA with half its layers elsewhere", "export", "landed",
        sample_export(_lora_half_elsewhere))
    add("eval EXPORT --steps 3 (serves [1])", "export", "--steps 3",
        {"argv": lambda c: ["eval", c["export"], "--steps", "3", "--num", "8"],
         "prepare": _export_copy})

    def bench(entries, prepare=None):
        def argv(c):
            import yaml

            spec = os.path.join(c["dir"], "spec.yaml")
            with open(spec, "w") as f:
                yaml.safe_dump({"teacher": base["teacher"], "teacher_steps": [1],
                                "num_samples": 8, "latency": False, "real_baseline": False,
                                "exports": entries(c)}, f)
            return ["bench", spec, "--out", os.path.join(c["dir"], "bench")]
        return {"argv": argv, "prepare": prepare,
                "check_absent": lambda c: os.path.join(c["dir"], "bench")}

    add("bench entry key typo (step:)", "export", "['step']",
        bench(lambda c: [{"path": c["export"], "step": 1}], _export_copy))
    add("bench export with a broken config", "export", "distill_config.json",
        bench(lambda c: [c["export"]], _json_edit(lambda cfg: cfg.pop("call"))))
    add("bench export steps it does not serve", "export", "steps 3",
        bench(lambda c: [{"path": c["export"], "steps": [1, 3]}], _export_copy))
    add("bench exports not a list", "export", "exports",
        bench(lambda c: c["export"], _export_copy))
    add("bench teacher missing", "export", "does not exist",
        {"argv": lambda c: ["bench", os.path.join(c["dir"], "s.yaml"), "--out",
                            os.path.join(c["dir"], "bench")],
         "prepare": _write(lambda c: os.path.join(c["dir"], "s.yaml"),
                           "teacher: /nowhere\nnum_samples: 8\nlatency: false\n"),
         "check_absent": lambda c: os.path.join(c["dir"], "bench")})
    add("bench export path missing", "export", "nowhere",
        bench(lambda c: [os.path.join(c["dir"], "nowhere")]))

    # -- teacher folders
    def teacher_train(prepare, *extra):
        return train(lambda c: f"teacher.path={c['teacher_copy']}", *extra,
                     prepare=lambda c: (_teacher_copy(c), prepare(c)))

    index = (lambda c: os.path.join(_teacher_copy(c), "model_index.json"))
    add("teacher model_index.json truncated", "teacher folder", "model_index.json",
        teacher_train(_truncate(index)))
    add("teacher model_index.json without _class_name", "teacher folder", "_class_name",
        teacher_train(_write(index, '{"unet": ["diffusers", "UNet2DConditionModel"]}')))
    add("teacher weights truncated", "teacher folder", "diffusion_pytorch_model.safetensors",
        teacher_train(_truncate(_unet_weights)))
    add("teacher weights corrupt header", "teacher folder",
        "diffusion_pytorch_model.safetensors", teacher_train(_write(_unet_weights, "garbage")))
    add("teacher weights non-finite", "teacher folder", "non-finite", teacher_train(_nan_weights))
    add("teacher weights pickled .bin", "teacher folder", ".bin", teacher_train(_pickled))
    add("teacher component folder missing", "teacher folder", "vae",
        teacher_train(lambda c: shutil.rmtree(os.path.join(_teacher_copy(c), "vae"))))
    add("teacher unet config.json damaged", "teacher folder", "could not be loaded",
        teacher_train(_write(lambda c: os.path.join(_teacher_copy(c), "unet", "config.json"),
                             '{"_class_name": "UNet2DConditionModel", "sample_size": ')))
    add("teacher.path: null", "teacher folder", "teacher.path", train("teacher.path=null"))
    add("data.path folder missing", "resource", "data.path",
        train("data.source=folder", "data.path=/nowhere"))
    add("eval a teacher with truncated weights", "teacher folder",
        "diffusion_pytorch_model.safetensors",
        {"argv": lambda c: ["eval", c["teacher_copy"], "--num", "8"],
         "prepare": _truncate(_unet_weights)})
    add("resume after the teacher's weights changed", "teacher folder", "weights changed",
        {"argv": lambda c: ["train", os.path.join(c["run_copy"], "recipe.yaml"),
                            f"output.dir={c['run_copy']}", "--no-progress"],
         "prepare": _changed_teacher_run,
         "protect": lambda c: [os.path.join(c["run_copy"], "checkpoints")]})

    # -- paths and the environment
    add("sample --out without an image extension", "path", "names no image format",
        {"argv": lambda c: ["sample", base["teacher"], "--prompt", "a", "--out",
                            os.path.join(c["dir"], "grid")]})
    add("sample --out grid.txt", "path", "names no image format",
        {"argv": lambda c: ["sample", base["teacher"], "--prompt", "a", "--out",
                            os.path.join(c["dir"], "grid.txt")]})
    add("eval --out through a loop of links", "path", "loop of symbolic links",
        {"argv": lambda c: ["eval", base["teacher"], "--num", "8", "--out",
                            os.path.join(c["dir"], "a", "r.json")], "prepare": _link_loop})
    add("train output.dir through a file", "path", "passes through",
        train(lambda c: f"output.dir={os.path.join(base['foreign'], 'thesis.tex', 'run')}"))
    add("export --out through a file", "path", "passes through",
        {"argv": lambda c: ["export", base["run"], "--out",
                            os.path.join(base["foreign"], "thesis.tex", "x")]})
    add("eval --out on a read-only filesystem", "path", "read-only",
        {"argv": lambda c: ["eval", base["teacher"], "--num", "8", "--out", c["out"]],
         "prepare": _read_only, "cleanup": _umount})
    add("eval --out on a full disk", "path", "No space left on device",
        {"argv": lambda c: ["eval", base["teacher"], "--num", "8", "--out", c["out"]],
         "prepare": _full_disk, "cleanup": _umount, "protect": lambda c: [c["out"]]})
    add("export --out on a full disk", "path", "No space left on device",
        {"argv": lambda c: ["export", base["run"], "--out", os.path.join(
            os.path.dirname(c["out"]), "export")],
         "prepare": _full_disk, "cleanup": _umount, "protect": lambda c: [c["out"]]})
    add("eval --out onto a symbolic link keeps the link", "path", "",
        {"argv": lambda c: ["eval", base["teacher"], "--num", "8", "--out",
                            os.path.join(c["dir"], "latest.json")],
         "prepare": _result_link, "check": _link_kept}, expect="handle")

    # -- resources and the command line
    add("train.batch_size=1000000000", "resource", "train.batch_size",
        train("train.batch_size=1000000000"))
    add("data.resolution=100000", "resource", "train.batch_size",
        train("data.resolution=100000"))
    add("train.steps=1e12", "resource", "train.steps", train("train.steps=1e12"))
    add("train.steps=1000000000000", "resource", "train.steps",
        train("train.steps=1000000000000"))
    add("recipe with a duplicate key", "resource", "given twice",
        {"argv": lambda c: ["train", os.path.join(c["dir"], "dup.yaml")],
         "prepare": _write(lambda c: os.path.join(c["dir"], "dup.yaml"),
                           "train:\n  lr: 1.0e-4\n  steps: 3\n  lr: 1.0e-2\n")})
    add("bench spec with a duplicate key", "resource", "given twice",
        {"argv": lambda c: ["bench", os.path.join(c["dir"], "dup.yaml")],
         "prepare": _write(lambda c: os.path.join(c["dir"], "dup.yaml"),
                           "teacher: embedded:sd\nnum_samples: 8\nnum_samples: 16\n")})
    add("override after a flag (train R --no-progress k=v)", "resource", "train.steps",
        {"argv": lambda c: ["train", r, "--no-progress", "train.steps=0",
                            f"output.dir={os.path.join(c['dir'], 'run')}"]})
    add("metrics.jsonl after a kill and a resume", "resource", "",
        {"argv": lambda c: ["train", os.path.join(c["run_copy"], "recipe.yaml"),
                            f"output.dir={c['run_copy']}", "--no-progress"],
         "prepare": _restart_run,
         "check": _each_step_once}, expect="handle")
    return out


def run_untrusted(case, base, tmp, case_id, timeout):
    ctx = {**base, "tmp": tmp, "dir": os.path.join(tmp, f"case_{case_id}")}
    os.makedirs(ctx["dir"])
    try:
        if case.get("prepare"):
            case["prepare"](ctx)
        argv = case["argv"](ctx)
        protect = case["protect"](ctx) if case.get("protect") else []
        before = snapshot(protect)
        code, out, err, seconds = cli(argv, ctx["dir"], timeout)
        lost = sorted(k for k in before if snapshot(protect).get(k) != before[k])
        if case["expect"] == "handle":
            ok = code == 0 and case["check"](ctx)
            cls = "data lost" if lost else ("recovered" if ok else
                                            "silent" if code == 0 else "unclear")
        else:
            cls = classify("refuse", code, err, case["keyword"], lost)
            absent = case.get("check_absent")
            if cls == "clear error" and absent and os.path.exists(absent(ctx)):
                cls = "unclear"  # refused, but only after work began
        return argv, code, out, err, seconds, cls, lost
    finally:
        if case.get("cleanup"):
            case["cleanup"](ctx)


def classify(expect, code, err, keyword, lost) -> str:
    if lost:
        return "data lost"
    lines = relevant_lines(err)
    if expect == "recover":
        return "recovered" if code == 0 and any(keyword in line for line in lines) else (
            "silent" if code == 0 else "unclear")
    if code == 0 or code is None:  # None: still running at the timeout
        return "silent"
    if "Traceback" in err or "internal error" in err:
        return "unclear"
    errors = [line for line in lines if line.startswith("ddistill") and "error" in line]
    if len(errors) == 1 and keyword in errors[0]:
        return "clear error"
    return "unclear"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=OUT)
    p.add_argument("--only", default=None,
                   help="run only cases whose name contains this (comma-separated: any of them)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per case")
    a = p.parse_args(argv)
    rows, skipped = [], []

    def wanted(name):
        return not a.only or any(part in name for part in a.only.split(","))
    with tempfile.TemporaryDirectory(prefix="bad_inputs_") as tmp:
        tmp = os.path.realpath(tmp)
        t0 = time.time()
        base = setup_base(tmp)
        print(f"base run ready in {time.time() - t0:.0f}s", flush=True)
        for i, (name, category, build, expect, keyword, protect, setup) in enumerate(
                cases(base, tmp)):
            if not wanted(name):
                continue
            case_id = f"c{i}"
            cwd, live = tmp, None
            if build == "RUNCOPY" or isinstance(build, tuple):
                run = copy_run(base, tmp, f"run_{case_id}")
                override = build[1] if isinstance(build, tuple) else None
                argv = ["train", base["recipe"], f"output.dir={run}", "--no-progress"]
                if override:
                    argv.insert(3, override)
                protect = [run if x == "RUNCOPY" else x for x in protect]
                if setup and setup[0] == "copy" and setup[1]:
                    setup[1](run)
                if setup and setup[0] == "lock":
                    if setup[1] == "live":
                        live = subprocess.Popen([sys.executable, "-c",
                                                 "import time; time.sleep(600)"])
                        pid = live.pid
                    else:
                        pid = 2**22 + 12345  # above the default pid_max: never running
                    with open(os.path.join(run, ".lock"), "w") as f:
                        json.dump({"pid": pid, "host": os.uname().nodename}, f)
            else:
                argv = build(case_id)
                if setup and setup[0] == "cwd":
                    cwd = setup[1]
                if category == "data loss":  # a fresh copy of the run and of the foreign files
                    parent = os.path.join(tmp, f"case_{case_id}")
                    os.makedirs(parent)
                    places = {"{PARENT}": parent,
                              "{RUN}": copy_run(base, parent, "run"),
                              "{FOREIGN}": os.path.join(parent, "my_files")}
                    shutil.copytree(base["foreign"], places["{FOREIGN}"])

                    def fill(x, places=places):
                        for k, v in places.items():
                            x = x.replace(k, v)
                        return x

                    argv = [fill(x) for x in argv]
                    protect = [fill(x) for x in protect]
                    cwd = fill(cwd) if cwd != tmp else cwd
            before = snapshot(protect)
            try:
                code, out, err, seconds = cli(argv, cwd, a.timeout)
            finally:
                if live:
                    live.kill()
                    live.wait()
            after = snapshot(protect)
            if live:  # the live owner's lock file is its own: not a loss when it stays
                before.pop(os.path.join(run, ".lock"), None)
            lost = sorted(k for k in before if after.get(k) != before[k])
            cls = classify(expect, code, err, keyword, lost)
            lines = relevant_lines(err) or relevant_lines(out)
            first = next((line for line in lines if line.startswith(("ddistill", "warning"))),
                         lines[0] if lines else "")
            show = " ".join(argv).replace(tmp, "TMP")
            rows.append({"name": name, "category": category, "input": f"ddistill {show}",
                         "expect": expect, "exit_code": code,
                         "first_line": first.replace(tmp, "TMP")[:400], "class": cls,
                         "lost_files": [x.replace(tmp, "TMP") for x in lost],
                         "seconds": round(seconds, 1)})
            print(f"[{cls:11s}] {name}: exit {code}: {rows[-1]['first_line'][:150]}",
                  flush=True)
        for i, case in enumerate(untrusted_cases(base, tmp)):
            if not wanted(case["name"]):
                continue
            try:
                argv, code, out, err, seconds, cls, lost = run_untrusted(case, base, tmp,
                                                                         f"u{i}", a.timeout)
            except SkipCase as e:
                print(f"[skipped    ] {case['name']}: {e}", flush=True)
                skipped.append({"name": case["name"], "why": str(e)})
                continue
            lines = relevant_lines(err) or relevant_lines(out)
            first = next((line for line in lines if line.startswith(("ddistill", "warning"))),
                         lines[0] if lines else "")
            rows.append({"name": case["name"], "category": case["category"],
                         "input": "ddistill " + " ".join(argv).replace(tmp, "TMP"),
                         "expect": case["expect"], "exit_code": code,
                         "first_line": first.replace(tmp, "TMP")[:400], "class": cls,
                         "lost_files": [x.replace(tmp, "TMP") for x in lost],
                         "seconds": round(seconds, 1)})
            print(f"[{cls:11s}] {case['name']}: exit {code}: {rows[-1]['first_line'][:150]}",
                  flush=True)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["class"]] = counts.get(row["class"], 0) + 1
    by_category: dict[str, dict] = {}
    for row in rows:
        c = by_category.setdefault(row["category"], {})
        c[row["class"]] = c.get(row["class"], 0) + 1
    result = {**provenance("bad_inputs.py", argv),
              "user": "root" if os.geteuid() == 0 else "not root",
              "cases": len(rows), "counts": counts, "by_category": by_category,
              "skipped": skipped, "rows": rows,
              "python": sys.version.split()[0], "seconds": round(time.time() - t0, 1)}
    write_json(a.out, result)
    print(json.dumps({"cases": len(rows), "counts": counts}, indent=1))
    print(f"wrote {a.out}")
    return 0 if set(counts) <= {"clear error", "recovered"} else 1


if __name__ == "__main__":
    sys.exit(main())
