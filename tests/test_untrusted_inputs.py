"""Every input is untrusted: method options, exports, teacher folders, paths and resources are
checked before any work, with one line that names the key or file (issue 30)."""
from __future__ import annotations

import inspect

import pytest

from diffusion_distill.objectives import CONTEXT, short_names
from diffusion_distill.recipe import RecipeError, load_recipe, packaged_recipes

# -- method options -------------------------------------------------------------------------


@pytest.mark.parametrize("recipe,overrides,key", [
    ("pcm_sd", ["method.phases=0"], "method.phases"),
    ("pcm_sd", ["method.phases=3", "student.num_steps=4"], "method.phases"),
    ("pcm_sd", ["method.phases=64", "student.num_steps=64"], "method.phases"),
    ("ect_sd", ["method.stage_every=-1"], "method.stage_every"),
    ("ect_sd", ["method.sigma_data=0"], "method.sigma_data"),
    ("ect_sd", ["method.q=1"], "method.q"),
    ("scm_sd", ["method.warmup_steps=-5"], "method.warmup_steps"),
    ("scm_sd", ["method.tangent=jacobian"], "method.tangent"),
    ("sid_sd", ["method.guidance=-2"], "method.guidance"),
    ("sid_sd", ["method.kappa4=-1"], "method.kappa4"),
    ("sid_sd", ["method.kappa2=1.0", "method.kappa3=2.0"], "method.kappa3"),
    ("dmd2_sd", ["method.guidance=-3"], "method.guidance"),
    ("dmd2_sd", ["method.critic_steps=1.5"], "method.critic_steps"),
    ("dmd2_sd", ["method.t_min=0.9", "method.t_max=0.5"], "method.t_max"),
    ("dmd2_sd", ["method.backward_simulation=maybe"], "method.backward_simulation"),
    ("dmd2_sd", ["method.crtic_steps=3"], "method.crtic_steps"),
    ("decoupled_dmd_sd", ["method.ca_weight=-1"], "method.ca_weight"),
    ("lcm_sd", ["method.sample_steps=[3,100]"], "method.sample_steps"),
    ("lcm_sd", ["method.w_min=5", "method.w_max=2"], "method.w_max"),
    ("tcd_sd", ["student.num_steps=1001"], "student.num_steps"),
    ("tcd_sd", ["method.gamma=1.5"], "method.gamma"),
    ("phased_dmd_sd", ["train.steps=3"], "train.steps"),
    ("sida_sd", ["method.gan_weight=-0.1"], "method.gan_weight"),
])
def test_bad_method_option_is_refused_when_the_recipe_loads(recipe, overrides, key):
    # Catches: an option without a rule (accepted, or refused only after training), a relation
    # left unchecked (pcm phases vs num_steps, lcm sample_steps beyond the solver grid,
    # phased_dmd experts that no step trains), and a message that does not name the key.
    with pytest.raises(RecipeError, match=rf"recipe key '{key}' is .* but must be"):
        load_recipe(recipe, overrides)


def test_every_option_of_every_objective_has_a_rule_its_default_passes():
    # Catches: an option added to an objective's constructor without an entry in its table
    # (it would go unchecked), and a rule so strict that the default itself is refused.
    for name, cls in short_names().items():
        params = inspect.signature(cls.__init__).parameters
        settable = [p for p in params if p not in ("self", *CONTEXT)]
        assert sorted(cls.options) == sorted(settable), name
        for p in settable:
            default = params[p].default
            assert cls.options[p].test(default), (name, p, default)


def test_every_shipped_recipe_still_loads():
    # Catches: a rule or relation that refuses a configuration the toolkit ships.
    for name in packaged_recipes():
        load_recipe(name)


def test_an_unknown_method_is_named_at_load():
    with pytest.raises(RecipeError, match="method.name.*unknown method 'nope'"):
        load_recipe("dmd2_sd", ["method.name=nope"])


def test_tcd_gamma_a_flow_sampler_cannot_serve_is_refused_before_training(tiny_sd3_path,
                                                                          tmp_path):
    # Catches: the old behaviour, refusing gamma 0.3 on a flow teacher only at the export,
    # after the whole training run.
    import os

    from conftest import tiny_recipe

    from diffusion_distill.train import train

    recipe = tiny_recipe(tiny_sd3_path, tmp_path / "run",
                         method={"name": "tcd", "gamma": 0.3, "w_min": 1.0, "w_max": 2.0})
    recipe["data"] = {"source": "world", "resolution": 16}
    with pytest.raises(ValueError, match="method.gamma.*0 .*or 1"):
        train(recipe, progress=False)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


# -- YAML and the command line ----------------------------------------------------------------

def test_a_duplicate_yaml_key_is_refused_naming_key_and_line(tmp_path):
    # Catches: PyYAML's default, keeping the last of two keys without a word (a recipe whose
    # second `lr:` silently wins), in recipes and bench specs alike.
    from diffusion_distill.bench.spec import load_spec

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 1.0e-4\n  steps: 3\n  lr: 1.0e-2\n")
    with pytest.raises(RecipeError, match=r"r.yaml:4: key 'lr' is given twice.*line 2"):
        load_recipe(str(recipe))
    spec = tmp_path / "s.yaml"
    spec.write_text("teacher: embedded:sd\nnum_samples: 8\nnum_samples: 16\n")
    with pytest.raises(RecipeError, match=r"s.yaml:3: key 'num_samples' is given twice"):
        load_spec(str(spec))
    # a YAML merge key may be overridden key by key: not a duplicate
    ok = tmp_path / "ok.yaml"
    ok.write_text("train: &t {steps: 3, lr: 1.0e-4}\n")
    assert load_recipe(str(ok))["train"]["steps"] == 3


def test_overrides_after_a_flag_are_read(capsys):
    # Catches: argparse ending the overrides at the first flag (`train R --no-progress k=v`
    # failed with "unrecognized arguments"); the override must reach the recipe (here it is
    # refused by name, so nothing trains).
    from diffusion_distill.cli import main

    assert main(["train", "dmd2_sd", "--no-progress", "train.steps=0"]) == 2
    assert "recipe key 'train.steps' is 0" in capsys.readouterr().err


# -- exports ----------------------------------------------------------------------------------

GOOD_CONFIG = {
    "format": 2,
    "teacher": {"path": "embedded:sd", "pretrained": "x", "pipeline_class":
                "StableDiffusionPipeline", "base_fingerprint": "abc123"},
    "scheduler": {"class": "LCMScheduler", "config": {}},
    "call": {"num_inference_steps": 1, "guidance_scale": 1.0},
    "steps": {"1": {"call": {"num_inference_steps": 1}, "adapters": None},
              "2": {"call": {"num_inference_steps": 2}, "adapters": None}},
    "adapters": [], "adapter_per_step": [],
}


def _write_config(folder, config=None, text=None):
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "distill_config.json").write_text(text if text is not None else json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("change,key", [
    (lambda c: c.pop("scheduler"), "'scheduler' is missing"),
    (lambda c: c.pop("teacher"), "'teacher' is missing"),
    (lambda c: c.pop("call"), "'call' is missing"),
    (lambda c: c["scheduler"].update({"class": "LCMSchedulerX"}), "'scheduler.class'"),
    (lambda c: c["scheduler"].update({"class": "os.system"}), "'scheduler.class'"),
    (lambda c: c["scheduler"].update({"class": "StableDiffusionPipeline"}), "'scheduler.class'"),
    (lambda c: c["scheduler"].update({"class": "schedulers"}), "'scheduler.class'"),
    (lambda c: c["call"].update({"num_inference_steps": "one"}), "'call.num_inference_steps'"),
    (lambda c: c["steps"]["2"]["call"].update({"num_inference_steps": 0}),
     "'steps.2.call.num_inference_steps'"),
    (lambda c: c.update({"adapters": ["../../etc"]}), "'adapters'"),
    (lambda c: c.update({"adapter_per_step": ["expert_9"]}), "'adapter_per_step'"),
    (lambda c: c["teacher"].update({"base_fingerprint": 3}), "'teacher.base_fingerprint'"),
])
def test_a_broken_export_config_is_one_line_naming_file_and_key(change, key, tmp_path):
    # Catches: a config read without a validator (a KeyError "internal error", a diffusers
    # traceback, or getattr(diffusers, anything) as the scheduler class).
    import copy

    from diffusion_distill.export_config import ExportError, read_export_config

    config = copy.deepcopy(GOOD_CONFIG)
    change(config)
    folder = _write_config(tmp_path / "export", config)
    with pytest.raises(ExportError, match=rf"distill_config.json: key {key}"):
        read_export_config(folder)


def test_a_good_export_config_passes_and_a_truncated_one_is_named(tmp_path):
    import json

    from diffusion_distill.export_config import ExportError, read_export_config, served_steps

    config = read_export_config(_write_config(tmp_path / "good", GOOD_CONFIG))
    assert served_steps(config) == [1, 2]
    text = json.dumps(GOOD_CONFIG)
    with pytest.raises(ExportError, match=r"bad/distill_config.json is not valid JSON"):
        read_export_config(_write_config(tmp_path / "bad", text=text[: len(text) // 2]))


def test_lora_files_missing_truncated_or_empty_are_named(tmp_path):
    # Catches: an adapter named in the config but absent on disk, or a LoRA file cut short by
    # a full disk, reaching diffusers (which raises its own traceback, or loads nothing).
    import torch
    from safetensors.torch import save_file

    from diffusion_distill.export_config import ExportError, lora_files, lora_layer_count

    config = {**GOOD_CONFIG, "adapters": ["expert_0", "expert_1"]}
    files = lora_files(str(tmp_path), config)
    assert [n for n, _ in files] == ["expert_0", "expert_1"]
    with pytest.raises(ExportError, match=r"expert_0/pytorch_lora_weights.safetensors is missing"):
        lora_layer_count(files[0][1])
    (tmp_path / "expert_0").mkdir()
    save_file({"unet.a.to_q.lora_A.weight": torch.zeros(2, 4),
               "unet.a.to_q.lora_B.weight": torch.zeros(4, 2),
               "unet.a.to_k.lora_A.weight": torch.zeros(2, 4),
               "unet.a.to_k.lora_B.weight": torch.zeros(4, 2)}, files[0][1])
    assert lora_layer_count(files[0][1]) == 2
    data = (tmp_path / "expert_0" / "pytorch_lora_weights.safetensors").read_bytes()
    with open(files[0][1], "wb") as f:
        f.write(data[: len(data) - 20])
    with pytest.raises(ExportError, match=r"expert_0/pytorch_lora_weights.safetensors is "
                                          r"truncated or corrupt"):
        lora_layer_count(files[0][1])
    save_file({"unet.a.weight": torch.zeros(2)}, files[0][1])
    with pytest.raises(ExportError, match="holds no LoRA layers"):
        lora_layer_count(files[0][1])


def test_eval_steps_the_export_does_not_serve_is_refused_before_sampling():
    # Catches: every batch failing one by one and a JSON of 0 samples (the old behaviour).
    from types import SimpleNamespace

    from diffusion_distill.eval.protocol import model_head

    loaded = SimpleNamespace(call=SimpleNamespace(servable_steps=[1, 2, 4, 8]), pipe=None,
                             kind="student", defaults={"steps": 1, "guidance": 1.0})
    with pytest.raises(ValueError, match=r"--steps 3: this export samples with \[1, 2, 4, 8\]"):
        model_head(loaded, steps=3)


def test_bench_checks_every_export_and_entry_before_the_first_cell(tmp_path):
    # Catches: a typo in an entry (`step: 4`) ignored, and a broken export found only when
    # its cell comes up after hours of other cells.
    import json

    from diffusion_distill.bench.run import run_bench

    good = _write_config(tmp_path / "good", GOOD_CONFIG)
    broken = _write_config(tmp_path / "broken", text=json.dumps(GOOD_CONFIG)[:40])
    base = {"teacher_steps": [1], "num_samples": 8, "latency": False, "real_baseline": False}
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['step'\] in exports\[0\]"):
        run_bench({**base, "exports": [{"path": good, "step": 4}]}, str(out))
    with pytest.raises(ValueError, match=r"broken/distill_config.json is not valid JSON"):
        run_bench({**base, "exports": [good, broken]}, str(out))
    with pytest.raises(ValueError, match=r"steps 3 is not a count it serves.*\[1, 2\]"):
        run_bench({**base, "exports": [{"path": good, "steps": [1, 3]}]}, str(out))
    assert not out.exists()  # refused before anything was written or sampled


def test_bench_table_names_why_a_cell_failed():
    from diffusion_distill.bench.report import failure_reason

    assert failure_reason({"complete": False, "failures": [{"error": "ValueError: boom"}]}) \
        == "ValueError: boom"


@pytest.fixture(scope="module")
def tiny_export(tiny_sd_path, tmp_path_factory):
    """A 2-step dmd2 export of the tiny SD teacher (one LoRA file)."""
    import os

    from conftest import tiny_recipe

    from diffusion_distill.train import train

    tmp = tmp_path_factory.mktemp("export")
    run_dir = train(tiny_recipe(tiny_sd_path, tmp / "run", steps=2), progress=False)
    return os.path.join(run_dir, "export")


def test_lora_weights_that_do_not_all_land_are_refused(tiny_export, tmp_path):
    # Catches: diffusers skipping LoRA keys that match no module (with only a log warning),
    # so that the "student" samples as the bare teacher.
    import shutil

    from safetensors.torch import load_file, save_file

    from diffusion_distill.export_config import ExportError
    from diffusion_distill.student_pipeline import load_student

    folder = tmp_path / "edited"
    shutil.copytree(tiny_export, folder)
    file = folder / "pytorch_lora_weights.safetensors"
    state = load_file(str(file))
    layers = sorted({k.split(".lora_")[0] for k in state})
    moved = set(layers[: len(layers) // 2])  # half the layers renamed to modules that do not exist
    save_file({(k.replace("unet.", "unet.nowhere_", 1) if k.split(".lora_")[0] in moved else k): v
               for k, v in state.items()}, str(file))
    with pytest.raises(ExportError, match=rf"edited/pytorch_lora_weights.safetensors: only "
                                          rf"{len(layers) - len(moved)} of its {len(layers)} LoRA "
                                          "layers landed"):
        load_student(str(folder))
    assert load_student(tiny_export).servable_steps == [1]  # the untouched export loads


# -- teacher folders --------------------------------------------------------------------------

def _teacher_copy(tiny_sd_path, tmp_path):
    import shutil

    folder = tmp_path / "teacher"
    shutil.copytree(tiny_sd_path, folder)
    return folder


def test_a_broken_teacher_folder_is_the_teachers_fault_with_the_file_named(tiny_sd_path,
                                                                          tmp_path):
    # Catches: a broken model_index.json or truncated weights reaching diffusers (an
    # "internal error" traceback), and a pickled .bin loaded (unpickling runs code).
    from diffusion_distill.teachers import TeacherFolderError, load_pipeline

    folder = _teacher_copy(tiny_sd_path, tmp_path)
    index = folder / "model_index.json"
    good = index.read_text()
    index.write_text(good[: len(good) // 2])
    with pytest.raises(TeacherFolderError, match=r"teacher's .*model_index.json is not valid"):
        load_pipeline(str(folder))
    index.write_text(good)
    weights = next((folder / "unet").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherFolderError, match=rf"{weights.name} is truncated or corrupt"):
        load_pipeline(str(folder))
    weights.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(TeacherFolderError, match=r"diffusion_pytorch_model.bin is a pickled.*"
                                                 r"only safetensors.*save_pretrained"):
        load_pipeline(str(folder))


def test_non_finite_teacher_weights_are_named(tiny_sd_path, tmp_path):
    # Catches: a NaN in the teacher reported much later as "lower train.lr".
    from safetensors.torch import load_file, save_file

    from diffusion_distill.teachers import TeacherFolderError, load_pipeline

    folder = _teacher_copy(tiny_sd_path, tmp_path)
    weights = next((folder / "unet").glob("*.safetensors"))
    state = load_file(str(weights))
    name = sorted(state)[len(state) // 2]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(TeacherFolderError, match=rf"unet weights hold non-finite .*{name}"):
        load_pipeline(str(folder))


def test_teacher_path_null_says_what_to_give():
    from diffusion_distill.build import build_teacher

    with pytest.raises(ValueError, match=r"'teacher.path' is None, but must name the teacher"):
        build_teacher(load_recipe("dmd2_sd", ["teacher.path=null"]))


def test_resuming_onto_changed_teacher_weights_is_refused(tiny_sd_path, tmp_path):
    # Catches: checkpoints trained on one teacher silently resumed on another's weights.
    from conftest import tiny_recipe
    from safetensors.torch import load_file, save_file

    from diffusion_distill.train import train

    folder = _teacher_copy(tiny_sd_path, tmp_path)
    recipe = tiny_recipe(str(folder), tmp_path / "run", steps=2)
    train(recipe, progress=False)
    weights = next((folder / "unet").glob("*.safetensors"))
    save_file({k: v * 1.01 for k, v in load_file(str(weights)).items()}, str(weights))
    recipe["train"]["steps"] = 4
    with pytest.raises(ValueError, match=r"weights changed since.*--teacher-changed"):
        train(recipe, progress=False)
    assert train(recipe, progress=False, teacher_changed=True)  # asked for: it continues


# -- runs: the log after a restart, sizes -----------------------------------------------------

def test_metrics_hold_each_step_once_after_a_restart(tiny_sd_path, tmp_path):
    # Catches: rows of steps past the last checkpoint (trained again after a kill) appended a
    # second time to metrics.jsonl.
    import json

    from conftest import tiny_recipe

    from diffusion_distill.train import train

    recipe = tiny_recipe(tiny_sd_path, tmp_path / "run", steps=4, checkpoint_every=2,
                         log_every=1)
    train(recipe, progress=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    # as if killed after logging step 3 but before step 4's checkpoint
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join(rows[:3]) + "\n")
    checkpoints = tmp_path / "run" / "checkpoints"
    import shutil

    shutil.rmtree(checkpoints / "step_0000004")
    train(recipe, progress=False)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_an_absurd_batch_fails_fast_before_any_model_is_built(tmp_path):
    # Catches: a billion-sample batch found by the OS (16 GB resident, swapping) instead of by
    # a check; the teacher path does not exist, so reaching the teacher would say so instead.
    from diffusion_distill.train import train

    with pytest.raises(ValueError, match=r"'train.batch_size' is 1000000000, but one step's "
                                         r"batch needs at least .* GiB"):
        train(load_recipe("dmd2_sd", ["train.batch_size=1000000000", "teacher.path=/nowhere",
                                      f"output.dir={tmp_path / 'run'}", "train.device=cpu"]),
              progress=False)
    with pytest.raises(RecipeError, match=r"'train.steps' is 1000000000000"):
        load_recipe("dmd2_sd", ["train.steps=1000000000000"])


# -- paths and the environment ------------------------------------------------------------------

def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    # Catches: a sample grid sampled and then lost to "unknown file extension", a loop of
    # links or a path through a file found only at the first write.
    import os

    from diffusion_distill.cli import main

    assert main(["sample", "embedded:sd", "--prompt", "a", "--out",
                 str(tmp_path / "grid.txt")]) == 2
    assert "'.txt', which names no image format" in capsys.readouterr().err
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    assert main(["eval", "embedded:sd", "--out", str(tmp_path / "a" / "r.json")]) == 2
    assert "loop of symbolic links" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["train", "dmd2_sd", f"output.dir={tmp_path / 'file' / 'run'}"]) == 2
    assert "passes through" in capsys.readouterr().err


def test_writing_onto_a_symlink_keeps_the_link(tmp_path):
    # Catches: os.replace onto the link itself (the user's link becomes a plain file).
    import os

    from diffusion_distill.eval.protocol import write_json

    target = tmp_path / "results" / "r.json"
    target.parent.mkdir()
    target.write_text("{}")
    link = tmp_path / "latest.json"
    os.symlink(target, link)
    write_json(str(link), {"a": 1})
    assert os.path.islink(link) and '"a": 1' in target.read_text()


@pytest.mark.parametrize("message", [
    ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
    'left on device" })'),
    "Error while serializing: I/O error: No space left on device (os error 28)"])
def test_a_full_disk_names_the_path_and_keeps_the_last_good_checkpoint(message, tmp_path,
                                                                        monkeypatch, capsys):
    # Catches: safetensors' own "IoError(Os { code: 28 ..." shown as an internal error, and a
    # half-written checkpoint replacing the last good one.
    import errno

    import torch

    from diffusion_distill import checkpoint as ck
    from diffusion_distill.cli import main

    weights = {"student": {"w": torch.ones(2)}}
    ck.save_checkpoint(str(tmp_path), 2, weights, {}, {})

    def full(*a, **k):  # safetensors' own error type, in either version's wording
        raise RuntimeError(message)

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(ck.OutputWriteError, match=r"step_0000004.*Errno 28.*No space left"):
        ck.save_checkpoint(str(tmp_path), 4, weights, {}, {})
    assert [s for s, _ in ck.list_checkpoints(str(tmp_path))] == [2]
    import os

    assert not [p for p in os.listdir(tmp_path / "checkpoints") if p.startswith(".tmp")]

    def read_only(args):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x.json"))

    monkeypatch.setattr("diffusion_distill.eval.cli.run_cli", read_only)
    assert main(["eval", "embedded:sd"]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "x.json" in err and "internal error" not in err


def test_a_missing_data_path_is_refused_before_the_teacher_loads(tmp_path):
    # Catches: the folder found missing only after the teacher had loaded (the teacher path
    # here does not exist either: reaching it would name the teacher instead).
    from diffusion_distill.train import train

    for source in ("folder", "prompts"):
        with pytest.raises(ValueError, match=r"'data.path' is '/nowhere', but must be an "
                                             r"existing"):
            train(load_recipe("dmd2_sd", [f"data.source={source}", "data.path=/nowhere",
                                          "teacher.path=/no_teacher",
                                          f"output.dir={tmp_path / 'run'}"]), progress=False)


def test_bench_refuses_a_missing_teacher_before_any_cell(tmp_path):
    # Catches: the real-data cell sampled first and the teacher cell failing after it.
    from diffusion_distill.bench.run import run_bench

    with pytest.raises(FileNotFoundError, match=r"teacher '/nowhere' in the spec does not exist"):
        run_bench({"teacher": "/nowhere", "num_samples": 8, "latency": False},
                  str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
