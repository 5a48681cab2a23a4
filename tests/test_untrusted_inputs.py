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
