"""`ddistill eval` end to end on a tiny random pipeline, and its errors for bad input."""
import json
import os


def test_eval_cli_end_to_end_on_a_tiny_pipeline(tiny_sd_path, tmp_path, capsys):
    """A pipeline folder saved with save_pretrained (the session's tiny SD) as the teacher."""
    from diffusion_distill.cli import main

    out = tmp_path / "results.json"
    code = main(["eval", tiny_sd_path, "--num", "8", "--steps", "2",
                 "--feature-size", "32", "--batch-size", "8", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--grid", str(tmp_path / "g.png"),
                 "--no-progress"])
    assert code == 0
    r = json.loads(out.read_text())
    for key in ("fd", "kid", "precision", "recall", "alignment", "nfe", "seconds_per_image",
                "feature_space", "num_samples", "complete", "failures", "steps", "guidance"):
        assert key in r, key
    assert r["complete"] and r["num_samples"] == 8
    assert r["nfe"] == 4  # 2 steps x 2 (CFG at the pipeline's default guidance 7.5)
    assert r["feature_space"] == "efficientnet-lite0-imagenet@32px"
    assert set(r["kid"]) == {"mean", "std"} and r["fd"] >= 0
    # The world's shipped classifier scores what each prompt asked (16 px samples -> 32 px).
    assert 0.0 <= r["alignment"]["whole_prompt"] <= 1.0
    assert {"shape", "color", "size", "position"} <= set(r["alignment"]["per_attribute"])
    assert os.path.isfile(tmp_path / "g.png")
    assert "not Inception" in capsys.readouterr().out


def test_eval_cli_bad_paths_give_clear_errors(tmp_path, capsys):
    from diffusion_distill.cli import main

    assert main(["eval", str(tmp_path / "nowhere"), "--num", "8"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    assert main(["eval", str(tmp_path / "junk"), "--num", "8"]) == 2
    err = capsys.readouterr().err
    assert "neither a diffusers pipeline" in err and "notes.txt" in err
    assert main(["eval", str(tmp_path / "junk"), "--num", "2"]) == 2
    assert "too few samples" in capsys.readouterr().err


def test_world_alignment_wrapper_passes_model_resizes_and_drops_per_sample(monkeypatch):
    """The world classifier is called once-loaded, at the world's 32 px, aggregates only."""
    import sys
    import types

    import torch

    from diffusion_distill.eval.protocol import world_alignment

    seen = {}
    fake = types.ModuleType("diffusion_distill.world.classifier")
    fake.load_classifier = lambda: "the-model"

    def score_alignment(images, labels, model=None):
        seen["shape"], seen["model"] = tuple(images.shape), model
        return {"per_attribute": {"shape": 0.5}, "whole_prompt": 0.25,
                "per_sample": [True, False], "n": 2}

    fake.score_alignment = score_alignment
    monkeypatch.setitem(sys.modules, "diffusion_distill.world.classifier", fake)
    from diffusion_distill import world
    monkeypatch.setattr(world, "classifier", fake, raising=False)
    fn, why_not = world_alignment()
    assert why_not is None
    out = fn(torch.zeros(2, 3, 16, 16), [{}, {}])
    assert seen == {"shape": (2, 3, 32, 32), "model": "the-model"}
    assert out == {"per_attribute": {"shape": 0.5}, "whole_prompt": 0.25, "n": 2}


def test_eval_cli_on_a_student_export(tiny_sd_path, tmp_path):
    """An export folder is detected, loaded with plain diffusers, sampled at its own steps."""
    from conftest import tiny_recipe

    from diffusion_distill.cli import main
    from diffusion_distill.train import train

    run_dir = train(tiny_recipe(tiny_sd_path, tmp_path / "run", steps=1), progress=False)
    out = tmp_path / "student.json"
    code = main(["eval", os.path.join(run_dir, "export"), "--num", "8", "--feature-size", "32",
                 "--batch-size", "8", "--out", str(out), "--cache-dir", str(tmp_path / "c"),
                 "--no-progress"])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["model_kind"] == "student" and r["steps"] == 1 and r["guidance"] == 1.0
    assert r["nfe"] == 1  # one step, no CFG: the export's own sampler
    assert r["complete"] and r["fd"] is not None
