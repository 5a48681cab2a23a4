"""Bad inputs and faults against the CLI: is every one refused clearly, and is nothing lost?

    python benchmarks/bad_inputs.py            # writes benchmarks/results/bad_inputs.json

Each case runs ``ddistill ...`` in a subprocess, in a temporary folder, on a tiny pipeline
(``diffusion_distill.tiny``) and a tiny recipe, and is classed as

* ``clear error``: refused (exit code != 0) with one line on stderr that names what was wrong
  (the case's keyword: the key, the flag, the file), no traceback;
* ``recovered``: a fault the command is meant to survive (a corrupt latest checkpoint, a stale
  lock): exit 0 and a warning line saying what was done;
* ``unclear``: refused, but with a traceback, an "internal error", or without naming it;
* ``accepted``: a bad input that ran as if it were fine;
* ``data lost``: a file that existed before the command was changed or removed.

The JSON holds, per case, the input (temporary paths shown as ``TMP/``), the exit code, the
first line of output that is not library noise, the class, and the counts per class.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import tiny_recipe

    from diffusion_distill.tiny import tiny_sd

    teacher = os.path.join(tmp, "tiny_sd")
    tiny_sd().save_pretrained(teacher)
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
    return {"teacher": teacher, "recipe": path, "run": os.path.join(tmp, "run"),
            "foreign": foreign, "spec": spec}


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


def classify(expect, code, err, keyword, lost) -> str:
    if lost:
        return "data lost"
    lines = relevant_lines(err)
    if expect == "recover":
        return "recovered" if code == 0 and any(keyword in line for line in lines) else (
            "accepted" if code == 0 else "unclear")
    if code == 0 or code is None:  # None: still running at the timeout
        return "accepted"
    if "Traceback" in err or "internal error" in err:
        return "unclear"
    errors = [line for line in lines if line.startswith("ddistill") and "error" in line]
    if len(errors) == 1 and keyword in errors[0]:
        return "clear error"
    return "unclear"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=OUT)
    p.add_argument("--only", default=None, help="run only cases whose name contains this")
    p.add_argument("--timeout", type=float, default=600, help="seconds per case")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bad_inputs_") as tmp:
        tmp = os.path.realpath(tmp)
        t0 = time.time()
        base = setup_base(tmp)
        print(f"base run ready in {time.time() - t0:.0f}s", flush=True)
        for i, (name, category, build, expect, keyword, protect, setup) in enumerate(
                cases(base, tmp)):
            if a.only and a.only not in name:
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
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["class"]] = counts.get(row["class"], 0) + 1
    by_category: dict[str, dict] = {}
    for row in rows:
        c = by_category.setdefault(row["category"], {})
        c[row["class"]] = c.get(row["class"], 0) + 1
    result = {"cases": len(rows), "counts": counts, "by_category": by_category, "rows": rows,
              "python": sys.version.split()[0], "seconds": round(time.time() - t0, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"cases": len(rows), "counts": counts}, indent=1))
    print(f"wrote {a.out}")
    return 0 if set(counts) <= {"clear error", "recovered"} else 1


if __name__ == "__main__":
    sys.exit(main())
