"""Nothing lost, every bad value named: output folders, resume, locks, value checks, CLI errors."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import tiny_recipe

from diffusion_distill.checkpoint import (
    CheckpointError,
    OutputFolderError,
    atomic_dir,
    list_checkpoints,
    load_checkpoint,
    load_latest_good,
    save_checkpoint,
)
from diffusion_distill.cli import main
from diffusion_distill.recipe import RecipeError, load_recipe
from diffusion_distill.run_folder import RunLockedError, prepare_run_dir, run_lock
from diffusion_distill.train import train


def _tree(folder):
    """Every file under ``folder`` with its bytes: to prove nothing was touched."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture(scope="module")
def trained_run(tiny_sd_path, tmp_path_factory):
    """A finished tiny run (checkpoints at steps 2 and 4, an export); copy it before changing."""
    root = tmp_path_factory.mktemp("reliability")
    recipe = tiny_recipe(tiny_sd_path, root / "run", steps=4, checkpoint_every=2)
    run_dir = train(recipe, progress=False)
    return run_dir, recipe


@pytest.fixture
def run_copy(trained_run, tmp_path):
    run_dir, recipe = trained_run
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    recipe = {**recipe, "output": {"dir": str(dst)}}
    with open(dst / "recipe.yaml", "w") as f:  # the copy's own output.dir
        yaml.safe_dump(load_recipe(recipe), f, sort_keys=False)
    return str(dst), recipe


# -- 3. every value checked where it enters ---------------------------------------------------

@pytest.mark.parametrize("override,match", [
    ("train.steps=0", r"'train.steps' is 0.*\[1, 100000000\]"),
    ("train.batch_size=-2", r"'train.batch_size' is -2"),
    ("train.grad_accum=0", r"'train.grad_accum'"),
    ("train.log_every=0", r"'train.log_every'"),
    ("train.checkpoint_every=0", r"'train.checkpoint_every'"),
    ("train.lr=0", r"'train.lr' is 0.0.*finite number > 0"),
    ("train.lr=-1e-4", r"'train.lr' is -0.0001"),
    ("train.lr=.nan", r"'train.lr' is nan"),
    ("train.lr_critic=.inf", r"'train.lr_critic' is inf"),
    ("train.ema_decay=1.0", r"'train.ema_decay' is 1.0.*\[0, 1\)"),
    ("train.ema_decay=-0.1", r"'train.ema_decay'"),
    ("student.rank=0", r"'student.rank' is 0.*>= 1"),
    ("student.timesteps=[0.5,1.0]", r"'student.timesteps'.*strictly descending"),
    ("student.timesteps=[1.0,0.0]", r"'student.timesteps'.*\(0, 1\]"),
    ("student.timesteps=[1.5]", r"'student.timesteps'"),
    ("output.export_role=''", r"'output.export_role'"),
    ("train.device=tpu", r"'train.device' is 'tpu'.*auto, cpu, cuda"),
    ("train.lr=fast", r"'train.lr' expects float.*got str"),
    ("train.stpes=3", r"unknown recipe key 'train.stpes'"),
    ("teacher.guidance=-1", r"'teacher.guidance' is -1"),
])
def test_bad_recipe_value_is_named(override, match):
    with pytest.raises(RecipeError, match=match) as e:
        load_recipe({}, [override])
    key = override.split("=")[0]
    assert key in str(e.value) and "\n" not in str(e.value)


def test_yaml_numbers_are_numbers_and_syntax_errors_name_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 1e-4\n  lr_critic: 2E-5\n  steps: 10\n")
    r = load_recipe(str(path), ["train.weight_decay=1e-2"])
    assert r["train"]["lr"] == 1e-4 and r["train"]["lr_critic"] == 2e-5
    assert r["train"]["weight_decay"] == 0.01
    path.write_text("train:\n  steps: 3\n lr: [1\n")
    with pytest.raises(RecipeError, match=rf"{path}:3:2: YAML syntax error") as e:
        load_recipe(str(path))
    assert "\n" not in str(e.value)


def test_cuda_without_gpu_and_bad_export_role_refused_before_training(tiny_sd_path, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'train.device' is 'cuda' but no CUDA GPU"):
        train(tiny_recipe(tiny_sd_path, tmp_path / "a", device="cuda"), progress=False)
    assert not os.path.exists(tmp_path / "a")
    recipe = tiny_recipe(tiny_sd_path, tmp_path / "b")
    recipe["output"]["export_role"] = "nobody"
    with pytest.raises(ValueError, match="'output.export_role' is 'nobody'"):
        train(recipe, progress=False)
    assert not list_checkpoints(tmp_path / "b")


@pytest.mark.parametrize("argv,match", [
    (["eval", "embedded:sd", "--steps", "0"], "--steps is 0"),
    (["eval", "embedded:sd", "--num", "-3"], "--num is -3"),
    (["sample", "embedded:sd", "--prompt", "a", "--guidance", "-1"], "--guidance is -1.0"),
    (["sample", "embedded:sd", "--prompt", "a", "--guidance", "nan"], "--guidance is nan"),
    (["eval", "embedded:sd", "--batch-size", "0"], "--batch-size is 0"),
    (["eval", "embedded:sd", "--out", "{dir}"], "is a folder, but `ddistill eval` writes a file"),
    (["sample", "embedded:sd", "--prompt", "a", "--out", "{dir}"], "is a folder"),
    (["export", "{dir}", "--out", "{file}"], "is a file, but `ddistill export` writes a folder"),
    (["eval", "embedded:sd", "--out", "{file}"], "is not a .json file"),
    (["sample", "embedded:sd", "--prompt", "a", "--out", "{file}"], "will not overwrite"),
    (["train", "{file}"], "YAML syntax error"),
    (["train", "{dir}/nothing.yaml"], "not found"),
    (["train", "{good}", "train.steps=0"], "'train.steps' is 0"),
    (["train", "{good}", "train.lr=1e-4", "train.ema_decay=2"], "'train.ema_decay' is 2"),
])
def test_cli_user_errors_are_one_line_exit_2(argv, match, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1\n")
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  lr: 1e-4\n")
    argv = [a.format(dir=tmp_path, file=bad, good=good) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_internal_errors_are_bugs_exit_1(monkeypatch, capsys):
    from diffusion_distill import export

    def broken(args):
        raise KeyError("oops")

    monkeypatch.setattr(export, "_cli", broken)
    assert main(["export", "r", "--out", "o"]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "--debug" in err and "Traceback" not in err
    assert main(["export", "r", "--out", "o", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


# -- 1. nothing lost ---------------------------------------------------------------------------

def _foreign(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "thesis.tex"), "w") as f:
        f.write("years of work")
    return _tree(folder)


@pytest.mark.parametrize("markers", [("distill_config.json",), ("model_index.json",),
                                     ("state.json",), ()])
def test_atomic_dir_refuses_foreign_folder_and_file(tmp_path, markers):
    target = tmp_path / "target"
    before = _foreign(target)
    with (pytest.raises(OutputFolderError, match="holds other files.*choose a new folder"),
          atomic_dir(str(target), markers) as tmp):
        _write(os.path.join(tmp, "x"), "")
    assert _tree(target) == before
    a_file = tmp_path / "f.txt"
    a_file.write_text("keep")
    with pytest.raises(OutputFolderError, match="is a file"), atomic_dir(str(a_file), markers):
        pass
    assert a_file.read_text() == "keep"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")] == []


def test_atomic_dir_refuses_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "distill_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    for target in (".", str(tmp_path), str(tmp_path.parent)):
        with (pytest.raises(OutputFolderError, match="current folder"),
              atomic_dir(target, ("distill_config.json",))):
            pass
    assert os.listdir(tmp_path) == ["distill_config.json"]


def test_atomic_dir_replaces_own_output_only_when_complete(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "distill_config.json").write_text('{"old": 1}')
    with pytest.raises(RuntimeError), atomic_dir(str(target), ("distill_config.json",)) as tmp:
        _write(os.path.join(tmp, "distill_config.json"), '{"new": 1}')
        raise RuntimeError("killed mid-write")
    assert json.loads((target / "distill_config.json").read_text()) == {"old": 1}
    with atomic_dir(str(target), ("distill_config.json",)) as tmp:
        _write(os.path.join(tmp, "distill_config.json"), '{"new": 1}')
    assert json.loads((target / "distill_config.json").read_text()) == {"new": 1}
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temp or old folders left


@pytest.mark.parametrize("out", ["RUN", ".", "PARENT", "RUN/checkpoints", "FOREIGN"])
def test_cli_export_never_deletes(out, run_copy, tmp_path, monkeypatch, capsys):
    run_dir, _ = run_copy
    foreign = tmp_path / "foreign"
    _foreign(foreign)
    monkeypatch.chdir(run_dir)
    before_run, before_foreign = _tree(run_dir), _tree(foreign)
    target = {"RUN": run_dir, ".": ".", "PARENT": str(tmp_path),
              "RUN/checkpoints": os.path.join(run_dir, "checkpoints"),
              "FOREIGN": str(foreign)}[out]
    assert main(["export", run_dir, "--out", target]) == 2
    err = capsys.readouterr().err
    assert "choose a new folder" in err.lower() or "Choose a new folder" in err
    assert _tree(run_dir) == before_run and _tree(foreign) == before_foreign


def test_cli_export_replaces_an_earlier_export(run_copy, tmp_path):
    run_dir, _ = run_copy
    out = str(tmp_path / "exp")
    assert main(["export", run_dir, "--out", out]) == 0
    assert main(["export", run_dir, "--out", out]) == 0  # a previous export: replaced
    assert os.path.isfile(os.path.join(out, "distill_config.json"))


def test_train_refuses_foreign_output_dir(tiny_sd_path, tmp_path):
    foreign = tmp_path / "mine"
    before = _foreign(foreign)
    with pytest.raises(ValueError, match="no recipe.yaml, so it is not a run folder"):
        train(tiny_recipe(tiny_sd_path, foreign), progress=False)
    assert _tree(foreign) == before


def test_save_pipeline_refuses_foreign_folder(tmp_path):
    from diffusion_distill.teacher_training import save_pipeline
    from diffusion_distill.tiny import tiny_sd

    pipe = tiny_sd()
    before = _foreign(tmp_path / "p")
    with pytest.raises(OutputFolderError, match="model_index.json"):
        save_pipeline(pipe, pipe.unet.state_dict(), str(tmp_path / "p"))
    assert _tree(tmp_path / "p") == before
    save_pipeline(pipe, pipe.unet.state_dict(), str(tmp_path / "q"))
    save_pipeline(pipe, pipe.unet.state_dict(), str(tmp_path / "q"))  # its own: replaced
    assert os.path.isfile(tmp_path / "q" / "model_index.json")


# -- 2. resume that can be trusted -------------------------------------------------------------

def _truncate(path, n=100):
    with open(path, "r+b") as f:
        f.truncate(n)


CORRUPTIONS = {
    "truncated weights": lambda c: _truncate(os.path.join(c, "weights.safetensors")),
    "bad state.json": lambda c: _write(os.path.join(c, "state.json"), "{bad"),
    "state.json without step": lambda c: _write(os.path.join(c, "state.json"), "{}"),
    "bad optimizer json": lambda c: _write(os.path.join(c, "optimizers.json"), "[1"),
    "truncated optimizer tensors": lambda c: _truncate(os.path.join(c, "optimizers.safetensors")),
    "missing weights": lambda c: os.remove(os.path.join(c, "weights.safetensors")),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back(kind, run_copy, capsys):
    run_dir, _ = run_copy
    (_, previous), (_, latest) = list_checkpoints(run_dir)
    CORRUPTIONS[kind](latest)
    path, _, _, state = load_latest_good(run_dir)
    assert path == previous and state["step"] == 2
    err = capsys.readouterr().err
    assert latest in err and "falling back" in err
    # with nothing readable: a clear error naming the file
    CORRUPTIONS[kind](previous)
    with pytest.raises(CheckpointError, match=r"no readable checkpoint.*step_0000002.*--new-run"):
        load_latest_good(run_dir, set_aside=True)
    assert len(list_checkpoints(run_dir)) == 2  # nothing moved when nothing is good


def test_training_resumes_from_previous_good_checkpoint(run_copy, capsys):
    run_dir, recipe = run_copy
    latest = list_checkpoints(run_dir)[-1][1]
    _truncate(os.path.join(latest, "weights.safetensors"))
    train(recipe, progress=False)
    out = capsys.readouterr()
    assert "falling back" in out.err and "resuming" in out.out and "from step 2" in out.out
    steps = [s for s, _ in list_checkpoints(run_dir)]
    assert steps == [2, 4]
    load_checkpoint(list_checkpoints(run_dir)[-1][1])  # written again, readable
    aside = [n for n in os.listdir(os.path.join(run_dir, "checkpoints"))
             if n.startswith("corrupt_")]
    assert len(aside) == 1  # kept for inspection, not deleted


def test_optimizer_state_without_pickle_round_trips(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(str(tmp_path), 1, {"student": net.state_dict()}, {"student": opt},
                           {"name": "x"})
    assert sorted(os.listdir(path)) == ["optimizers.json", "optimizers.safetensors",
                                        "state.json", "weights.safetensors"]
    _, optim, state = load_checkpoint(path)
    ref = opt.state_dict()
    assert optim["student"]["param_groups"] == ref["param_groups"] and state["step"] == 1
    for i, s in ref["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(optim["student"]["state"][i][k], v)
    fresh = torch.optim.AdamW(net.parameters(), lr=1e-3)
    fresh.load_state_dict(optim["student"])
    # an old-format checkpoint (pickle): a clear error, not an unpickling
    old = tmp_path / "checkpoints" / "step_0000002"
    shutil.copytree(path, old)
    os.remove(old / "optimizers.json")
    (old / "optimizers.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="old format.*--new-run"):
        load_latest_good(str(tmp_path))


@pytest.mark.parametrize("change,key", [
    (lambda r: r["student"].update(rank=8), "student.rank"),
    (lambda r: r.update(method={"name": "dmd2", "critic_steps": 3}), "method.critic_steps: 2 -> 3"),
    (lambda r: r.update(method={"name": "phased_dmd", "critic_steps": 2}),
     "method.name: 'dmd2' -> 'phased_dmd'"),
    (lambda r: r["train"].update(ema_decay=None), "train.ema_decay"),
    (lambda r: r["teacher"].update(path="embedded:sd3"), "teacher.path"),
    (lambda r: r["train"].update(steps=3), "train.steps: 3 is below"),
])
def test_rerun_with_another_recipe_is_refused(change, key, run_copy):
    run_dir, recipe = run_copy
    recipe = json.loads(json.dumps(recipe))
    change(recipe)
    before = _tree(run_dir)
    with pytest.raises(ValueError, match=rf"differs in: .*{key}.*--new-run"):
        prepare_run_dir(load_recipe(recipe))
    assert _tree(run_dir) == before  # recipe.yaml and checkpoints untouched
    # --new-run: starts over, the old run moved aside, never deleted
    prepare_run_dir(load_recipe(recipe), new_run=True, log=lambda s: None)
    names = os.listdir(run_dir)
    assert any(n.startswith("checkpoints.previous-") for n in names)
    assert any(n.startswith("recipe.previous-") for n in names)
    assert list_checkpoints(run_dir) == []


def test_same_recipe_longer_run_resumes(run_copy):
    run_dir, recipe = run_copy
    recipe = json.loads(json.dumps(recipe))
    recipe["train"]["steps"] = 6  # extending a run is allowed; the old recipe is kept
    prepare_run_dir(load_recipe(recipe), log=lambda s: None)
    assert any(n.startswith("recipe.previous-") for n in os.listdir(run_dir))
    assert load_recipe(os.path.join(run_dir, "recipe.yaml"))["train"]["steps"] == 6


def test_run_lock(tmp_path, capsys):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".lock"
        lock.write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename}))
        with (pytest.raises(RunLockedError, match=rf"in use: process {live.pid}"),
              run_lock(str(tmp_path))):
            pass
        assert json.loads(lock.read_text())["pid"] == live.pid  # the owner's lock stays
    finally:
        live.kill()
        live.wait()
    # the owner is gone: a stale lock, taken over with a note and removed at the end
    with run_lock(str(tmp_path)) as path, open(path) as f:
        assert json.load(f)["pid"] == os.getpid()
    assert "stale lock" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / ".lock")


def test_second_training_into_same_folder_refused(run_copy):
    run_dir, recipe = run_copy
    with run_lock(run_dir), pytest.raises(RunLockedError, match="is in use"):
        train(recipe, progress=False)


def test_sample_folder_of_numbered_user_images_is_not_emptied(tmp_path):
    from diffusion_distill.eval import standard as st

    folder = tmp_path / "coco"
    folder.mkdir()
    (folder / "000001.png").write_bytes(b"a user's image")
    with pytest.raises(ValueError, match="holds other images.*nothing was removed"):
        st.prepare_sample_dir(str(folder))
    assert (folder / "000001.png").read_bytes() == b"a user's image"
