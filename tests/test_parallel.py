"""Several processes: a real 2-process launch (torchrun, gloo on CPU) equals one process with
the same global batch, in its weights and in its logged values; a launch that asks for two
processes and starts one is refused with the command that works."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_recipe
from safetensors.torch import load_file

from diffusion_distill.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from diffusion_distill.parallel import _launcher_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(launcher, recipe, tmp_path, name, env=None):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = launcher + ["-m", "diffusion_distill.cli", "train", str(path), "--no-progress"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env or ENV,
                          timeout=600, check=False)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k != "seconds_per_step"} for r in rows]


def _torchrun(n, port=None):
    import socket

    with socket.socket() as sock:  # a free port (fixed ones collide with other runs)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_port", str(port)]


def _weights(run_dir):
    """The latest checkpoint's weights as whole tensors (a several-process one is sharded)."""
    weights, _, _ = load_checkpoint(latest_checkpoint(run_dir))
    return {f"{role}/{k}": v for role, sd in weights.items() for k, v in sd.items()}


def _export(run_dir):
    return load_file(os.path.join(run_dir, "export", "pytorch_lora_weights.safetensors"))


def _exported(run_dir):
    """Every tensor of every safetensors file the export wrote (a LoRA, or a full UNet)."""
    found = {}
    for folder, _, files in os.walk(os.path.join(run_dir, "export")):
        for name in files:
            if name.endswith(".safetensors"):
                rel = os.path.relpath(os.path.join(folder, name), run_dir)
                found.update({f"{rel}:{k}": v
                              for k, v in load_file(os.path.join(folder, name)).items()})
    return found


def _eval_rows(run_dir):
    """eval.jsonl without what is timed or counted per process."""
    with open(os.path.join(run_dir, "eval.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in UNCOMPARED} for r in rows], \
        [r["samples_per_process"] for r in rows]


UNCOMPARED = {"seconds_per_image", "feature_seconds_per_image", "metric_seconds",
              "total_seconds", "train_seconds", "samples_per_process"}


def _close(a, b, what):
    """Equal to rtol 1e-4 / atol 1e-5 per element, not the issue's 1e-5 relative: the two
    runs sum a batch's gradients in another order (per process, then FSDP2's reduce), and
    AdamW's first steps move each weight by about lr * g / |g|, so a gradient that is only
    rounding noise (near zero) moves its weight by +-lr either way. Measured on the dmd2
    LoRA run after 4 steps (docs/DESIGN.md): the export's lora_B tensors (the trained
    updates; B starts at zero) differ by 3.6e-4 of their norm, max |diff| 6.9e-8 at
    |x| <= 3e-6; lora_A 6.2e-9; logged values agree to 1e-5 relative."""
    assert set(a) == set(b), what
    for k in a:
        diff = (a[k] - b[k]).abs().max().item()
        scale = a[k].abs().max().item()
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5,
                                   msg=f"{what}: {k}: max |diff| {diff:.3g}, max |x| {scale:.3g}")


STEPS = {"steps": 4, "checkpoint_every": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def one_process(tiny_sd_path, tmp_path_factory):
    """The reference: one process, 4 steps, global batch 4."""
    tmp = tmp_path_factory.mktemp("one")
    recipe = tiny_recipe(tiny_sd_path, tmp / "run", **STEPS)
    out = _launch(_torchrun(1), recipe, tmp, "one")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "processes, train.parallel" not in out.stdout
    run = recipe["output"]["dir"]
    return {"weights": _weights(run), "logs": _metrics(run), "export": _export(run)}


def test_two_processes_match_one(tiny_sd_path, tmp_path, one_process):
    """torchrun --nproc_per_node 2 (ddp: FSDP2 averaging the gradients) gives the 1-process
    result with the same global batch: weights, export, and every logged value (each the
    mean over both processes, not rank 0's half)."""
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", **STEPS)
    out = _launch(_torchrun(2), recipe, tmp_path, "two")
    assert out.returncode == 0, out.stderr[-3000:]
    # two processes really ran (a launcher can silently start one)
    assert "2 processes, train.parallel=ddp" in out.stdout, out.stdout[-2000:]
    run = recipe["output"]["dir"]
    _close(one_process["weights"], _weights(run), "checkpoint")
    _close(one_process["export"], _export(run), "export")
    # both runs trained: LoRA B starts at zero, so equal untrained runs would show zeros here
    for role in ("student", "critic", "ema"):
        assert any(k.startswith(role + "/") and "lora_B" in k and v.abs().max() > 0
                   for k, v in one_process["weights"].items()), f"the {role} weights never moved"
    logs = _metrics(run)
    assert [sorted(r) for r in logs] == [sorted(r) for r in one_process["logs"]]
    for one, two in zip(one_process["logs"], logs):
        for k in one:
            assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_fsdp_resumes_at_another_process_count(tiny_sd_path, tmp_path, one_process, first,
                                               second):
    """FSDP2 sharding (train.parallel=fsdp): 2 steps on `first` processes, then resumed on
    `second` to step 4, equal the uninterrupted 1-process run (checkpoint and export)."""
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", parallel="fsdp", **STEPS)
    recipe["train"]["stop_after"] = 2
    out = _launch(_torchrun(first), recipe, tmp_path, "first")
    assert out.returncode == 0, out.stderr[-3000:]
    files = os.listdir(latest_checkpoint(recipe["output"]["dir"]))
    # two processes: one shard file each (torch.distributed.checkpoint), nothing gathered
    assert (sum(f.startswith("shard-") for f in files) == 2) == (first == 2), files
    recipe["train"]["stop_after"] = None
    out = _launch(_torchrun(second), recipe, tmp_path, "second")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stdout and ("2 processes, train.parallel=fsdp" in out.stdout
                                         or second == 1)
    run = recipe["output"]["dir"]
    _close(one_process["weights"], _weights(run), "checkpoint")
    _close(one_process["export"], _export(run), "export")


def test_a_launch_that_starts_one_of_two_processes_is_refused(tiny_sd_path, tmp_path):
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", steps=2)
    launcher = [PY, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = _launch(launcher, recipe, tmp_path, "one")
    assert out.returncode != 0
    assert "asked for 2 processes but started only this one" in out.stderr, out.stderr[-2000:]
    assert "torchrun --nproc_per_node 2 -m diffusion_distill.cli train RECIPE" in out.stderr
    assert not os.path.exists(os.path.join(recipe["output"]["dir"], "checkpoints"))


def test_the_launchers_process_count_is_read_from_its_command_line(tmp_path):
    config = tmp_path / "8gpu.yaml"
    config.write_text("num_processes: 8\n")
    assert _launcher_processes(["python", "-m", "accelerate.commands.launch",
                                "--num_processes", "2", "-m", "x"]) == 2
    assert _launcher_processes(["python", "/venv/bin/accelerate", "launch",
                                "--num_processes=3", "x.py"]) == 3
    assert _launcher_processes(["python", "/venv/bin/accelerate", "launch", "--config_file",
                                str(config), "-m", "x"]) == 8
    assert _launcher_processes(["torchrun", "--nproc_per_node", "2", "-m", "x"]) is None
    assert _launcher_processes(["bash"]) is None


def test_a_killed_process_ends_the_run_with_an_error_and_the_rerun_resumes(tiny_sd_path,
                                                                           tmp_path):
    import signal
    import time

    import psutil

    """SIGKILL one rank mid-run: the other stops with the toolkit's message (its own rank,
    the rerun command, the checkpoint it resumes from) within the process group's timeout,
    and rerunning the same command resumes there. Catches: a survivor left hanging in a
    collective (no finite timeout, or the error swallowed), a bare traceback from inside the
    collective instead of the message, a half-written checkpoint (the .tmp_ folder of a save
    the kill cut short) taken as the latest, and under two processes a corrupt latest
    checkpoint not set aside (or loaded by some ranks and not others)."""
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", steps=40, checkpoint_every=2,
                         batch_size=4, dist_timeout=60)
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = _torchrun(2) + ["-m", "diffusion_distill.cli", "train", str(path), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    run = recipe["output"]["dir"]
    deadline = time.time() + 300
    while len(list_checkpoints(run)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert len(list_checkpoints(run)) == 2, "no two checkpoints were written"
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if p.environ().get("RANK") == "1"]
    assert workers, "no rank-1 worker found"
    workers[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)  # the other rank is stopped, never left hanging
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL)" in err or "exitcode  : -9" in err, err[-2000:]
    last = int(latest_checkpoint(run).rsplit("_", 1)[1])
    assert "error: process 0 of 2 stopped" in err, err[-3000:]
    assert f"Rerun the same command: it resumes from checkpoint {last} " in err, err[-3000:]
    # and that checkpoint is then found corrupt (a shard cut short): the rerun, still on two
    # processes, sets it aside and resumes from the one before
    latest = latest_checkpoint(run)
    shard = max(f for f in os.listdir(latest) if f.startswith("shard-"))
    with open(os.path.join(latest, shard), "r+b") as f:
        f.truncate(100)
    previous = list_checkpoints(run)[-2][0]
    recipe["train"]["steps"] = last + 2  # the rerun finishes two steps later
    out = _launch(_torchrun(2), recipe, tmp_path, "rerun")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"from step {previous}" in out.stdout and "falling back" in out.stderr
    assert [s for s, _ in list_checkpoints(run)][-1] == last + 2
    assert any(n.startswith(f"corrupt_step_{last:07d}") for n in os.listdir(os.path.dirname(latest)))


def test_a_full_critic_beside_a_lora_student_is_averaged_too(tiny_sd_path, tmp_path):
    """critic.mode=full next to LoRA roles: the whole critic network is under FSDP2 as well,
    so 2 processes give the 1-process weights. Catches: only the shared base sharded (the
    critic's gradients would stay each process's own half-batch mean)."""
    runs = {}
    for n in (1, 2):
        recipe = tiny_recipe(tiny_sd_path, tmp_path / f"run{n}", **STEPS)
        recipe["critic"] = {"mode": "full"}
        out = _launch(_torchrun(n), recipe, tmp_path, f"p{n}")
        assert out.returncode == 0, out.stderr[-3000:]
        runs[n] = _weights(recipe["output"]["dir"])
    assert any(k.startswith("critic/") and "lora_" not in k for k in runs[1])
    _close(runs[1], runs[2], "checkpoint")


@pytest.mark.parametrize("method,student", [("sid", {"mode": "full", "num_steps": 1})])
def test_fsdp_with_full_networks_on_a_flow_teacher_matches_one_process(tiny_sd3_path, tmp_path,
                                                                      method, student):
    """FSDP2 over whole networks (student.mode=full: student, critic and EMA copies beside the
    teacher, each sharded with its AdamW state) on an SD3-style teacher: 2 processes equal
    one (checkpoint and logged values)."""
    runs, logs = {}, {}
    for n in (1, 2):
        recipe = tiny_recipe(tiny_sd3_path, tmp_path / f"p{n}", method={"name": method},
                             parallel="fsdp", steps=2, checkpoint_every=2, batch_size=4)
        recipe["student"].update(student)
        recipe["output"]["export"] = False
        out = _launch(_torchrun(n), recipe, tmp_path, f"p{n}")
        assert out.returncode == 0, out.stderr[-3000:]
        runs[n] = _weights(recipe["output"]["dir"])
        logs[n] = _metrics(recipe["output"]["dir"])
    _close(runs[1], runs[2], "checkpoint")
    assert any(k.startswith("student/") for k in runs[1])
    for one, two in zip(logs[1], logs[2]):
        assert two == pytest.approx(one, rel=1e-5, abs=1e-7)


def test_a_lost_process_is_told_apart_from_other_errors(tmp_path):
    """In-process, no launch: a collective's failure (gloo's wording) becomes the toolkit's
    message with the checkpoint the rerun resumes from; any other error passes unchanged, and
    one process is left alone. Catches: a guard that renames every error (a user's mistake
    shown as a lost process), or that names no checkpoint."""
    from diffusion_distill.checkpoint import save_checkpoint
    from diffusion_distill.parallel import ProcessLostError, stop_when_a_process_is_lost

    save_checkpoint(str(tmp_path), 6, {"student": {"w": torch.ones(2)}}, {}, {})
    gloo = RuntimeError("[/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:7056. This is typically caused by a crash")
    with pytest.raises(ProcessLostError, match=r"^process 1 of 2 stopped \(Connection closed "
                       r"by peer \[127.0.0.1\]:7056\).*train.dist_timeout=30 s .*\. Rerun the same "
                       r"command: it resumes from checkpoint 6 \("), \
            stop_when_a_process_is_lost(1, 2, str(tmp_path), 30):
        raise gloo
    with pytest.raises(ValueError, match="a user's mistake"), \
            stop_when_a_process_is_lost(1, 2, str(tmp_path), 30):
        raise ValueError("a user's mistake")
    with pytest.raises(RuntimeError, match="Connection closed"), \
            stop_when_a_process_is_lost(0, 1, str(tmp_path), 30):  # one process: nothing lost
        raise gloo


# One 1-process reference per setup (module scope), each compared with 2 processes. The eval
# setup: a two-step student on the flow teacher, whose re-noising draws are seeded per
# sampling batch, so a process count that changed the batches would change the samples;
# 10 prompts in batches of 4 share out unevenly (process 0: 4 + 2, process 1: 4 + one dropped
# call, which FSDP2's collective forward needs).
EVAL = {"eval_every": 2, "eval_num": 10, "eval_batch_size": 4}
SETUPS = {
    "lcm-sd": ("tiny_sd_path", {"method": {"name": "lcm", "w_min": 1.0, "w_max": 3.0}},
               {}, {"source": "world", "resolution": 16}),
    "dmd2-full-sd": ("tiny_sd_path", {}, {"mode": "full"}, None),
    "dmd2-sd3-eval": ("tiny_sd3_path", EVAL, {"num_steps": 2}, None),
}


def _run_setup(request, name, processes, parallel, tmp):
    teacher, train, student, data = SETUPS[name]
    recipe = tiny_recipe(request.getfixturevalue(teacher), tmp / "run", parallel=parallel,
                         steps=2, checkpoint_every=2, batch_size=4, **train)
    recipe["student"].update(student)
    if data:
        recipe["data"] = data
    # an evaluation run gets a cache of its own: the teacher's reference samples are then
    # drawn (and, at 2 processes, shared out) in each run, not read from the other's file
    env = {**ENV, "DDISTILL_CACHE": str(tmp / "cache")} if "eval_every" in train else None
    out = _launch(_torchrun(processes), recipe, tmp, name, env)
    assert out.returncode == 0, out.stderr[-3000:]
    if processes > 1:
        assert f"2 processes, train.parallel={parallel}" in out.stdout, out.stdout[-2000:]
    run = recipe["output"]["dir"]
    got = {"weights": _weights(run), "logs": _metrics(run), "export": _exported(run)}
    if "eval_every" in train:
        got["eval"], got["sampled"] = _eval_rows(run)
    return got


@pytest.fixture(scope="module")
def reference(request, tmp_path_factory):
    """The 1-process run of a setup, made once for the module."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = _run_setup(request, name, 1, "auto", tmp_path_factory.mktemp(name))
        return made[name]

    return get


@pytest.mark.parametrize("setup,parallel", [("lcm-sd", "fsdp"), ("dmd2-full-sd", "fsdp"),
                                            ("dmd2-full-sd", "ddp"), ("dmd2-sd3-eval", "fsdp")])
def test_two_processes_equal_one_for_each_method(request, reference, tmp_path, setup,
                                                 parallel):
    """2 processes equal 1 with the same global batch: checkpoint, exported files, every
    logged loss, and (dmd2-sd3-eval) the in-training evaluation rows, each process having
    sampled only its share of the prompts."""
    one = reference(setup)
    two = _run_setup(request, setup, 2, parallel, tmp_path)
    _close(one["weights"], two["weights"], "checkpoint")
    assert one["export"], "nothing was exported"
    _close(one["export"], two["export"], "export")
    assert any("lora_" not in k for k in one["weights"]) == ("full" in setup)
    assert [sorted(r) for r in two["logs"]] == [sorted(r) for r in one["logs"]]
    for a, b in zip(one["logs"], two["logs"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)
    if "eval" in one:
        assert [r["step"] for r in two["eval"]] == [0, 2]
        assert one["sampled"] == [[10], [10]] and two["sampled"] == [[6, 4], [6, 4]]
        for a, b in zip(one["eval"], two["eval"]):
            a, b = _flat(a), _flat(b)
            assert sorted(a) == sorted(b)
            for k in a:
                assert b[k] == (pytest.approx(a[k], rel=1e-5, abs=1e-7)
                                if isinstance(a[k], float) else a[k]), k


def _flat(row, prefix=""):
    """A nested eval row as {"kid/mean": ..., "alignment/shares/color/red/got": ...}."""
    flat = {}
    for k, v in row.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}/"))
        else:
            flat[prefix + k] = v
    return flat
