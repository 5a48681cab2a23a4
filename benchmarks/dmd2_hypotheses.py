"""Why the 1-step DMD2 student loses shape and diversity: one controlled run per hypothesis.

For one embedded teacher: the DMD2 recipe (``recipes/dmd2_<teacher>.yaml``) is trained once as
it is and once per hypothesis with exactly one change, at the same budget (training steps,
batch, seed), with the in-training evaluation on (``train.eval_every``, ``train.eval_num``
samples, the student's own 1-step sampler). Each run's curve holds FD to the data, FD to the
teacher's own samples (FID-T of the few-step literature), whole-prompt alignment, recall and the
worst class's share of the samples, against training step; the teacher (50 steps, CFG 5) is
scored on the same protocol. A hypothesis is supported when its one change moves the final
numbers well past the baseline's (compare with the baseline's own step-to-step noise, in the
curve).

    python benchmarks/dmd2_hypotheses.py --teacher sd3 --steps 600
    python benchmarks/dmd2_hypotheses.py --teacher sd --only baseline critic_lr

Round two (issue 27): ``lora_student_full_critic``, ``regression_0.25``, ``lora_all_layers``,
``warm_tcd`` (needs ``--tcd-export``), and ``full_lora_16`` / ``full_lora_64``, which are no training run: the
finished ``full`` run's student exported with ``--lora-rank`` and scored through plain
diffusers. ``--teacher-few-steps 4`` adds the teacher's own 4-step FD to its 50-step samples.

Since 2026-12-05 ``recipes/dmd2_sd3.yaml`` itself sets ``lora_all_layers``' two keys, so on sd3
a new ``baseline`` run is that row; the sd3 results in the JSON were made with the recipe before
(LoRA on the attention and feed-forward projections, no biases).

Writes ``benchmarks/results/dmd2_hypotheses_<teacher>.json`` and a plot beside it. Distances
are in EfficientNet-Lite0 ImageNet feature space (128 px): NOT Inception FIDs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading

from harness import (
    ROOT,
    add_run_arguments,
    check_run_arguments,
    eval_rows,
    provenance,
    train_and_evaluate,
    write_json,
)

# name -> (the hypothesis the change tests, the one recipe override)
HYPOTHESES = {
    "baseline": ("the shipped recipe", []),
    "rank_64": ("the LoRA student lacks capacity (r 16 -> 64)", ["student.rank=64"]),
    "full": ("the LoRA student lacks capacity (control: full fine-tune of student and critic)",
             ["student.mode=full"]),
    # The UNet default targets its resnets' time_emb_proj (the time-conditioned scale and
    # shift); the transformer default left out its analogue, AdaLN's modulation linears.
    "adaln_targets": ("the LoRA misses the time modulation (transformer: + AdaLN linears)",
                      [("student.target_modules=[to_q, to_k, to_v, to_out.0, add_q_proj, "
                       "add_k_proj, add_v_proj, to_add_out, ff.net.0.proj, ff.net.2, "
                       "ff_context.net.0.proj, ff_context.net.2, proj_out, norm1.linear, "
                       "norm1_context.linear, norm_out.linear]")]),
    "student_lr": ("the LoRA student moves too slowly (student lr 3e-4 -> 1e-3)",
                   ["train.lr=1.0e-3", "train.lr_critic=3.0e-4"]),
    "critic_lr": ("the critic lags the student (critic lr 3e-4 -> 1e-3)",
                  ["train.lr_critic=1.0e-3"]),
    "guidance_3": ("the real score over-sharpens at CFG 5 (CFG 3)", ["teacher.guidance=3.0"]),
    "gan": ("the DM gradient alone cannot keep the data's detail (DMD2's GAN term, 0.01)",
            ["method.gan_weight=0.01"]),
    # round two (issue 27): the full run's gain on sd3 split into its two roles
    "lora_student_full_critic": (
        "the critic, not the student, lacks capacity (LoRA student, full critic)",
        ["critic.mode=full"]),
    "regression_0.25": (
        ("the DM gradient alone loses the teacher's noise-to-image map (DMD's regression on "
         "256 cached teacher pairs, weight 0.25, latent MSE)"),
        ["method.regression_weight=0.25"]),
    # the full student's gain fits a rank-16 LoRA taken from it (every linear layer, biases),
    # but not a LoRA on the attention/feed-forward targets: is it the layers and biases?
    "lora_all_layers": (
        ("the LoRA leaves out layers and biases that the full student changes (every linear "
         "and convolution layer, and a trained bias per layer, rank 16; the critic too)"),
        ["student.target_modules=all", "student.lora_bias=true"]),
    "warm_tcd": (
        ("a 1-step student must first find the teacher's map from scratch (warm start from "
         "the 2-step TCD LoRA export of the same teacher, --tcd-export)"),
        ["student.init={tcd_export}"]),
}
# name -> (the trained run, LoRA rank): that run's full student exported as a rank-R LoRA
# (`ddistill export RUN --lora-rank R`: truncated SVD per layer) and scored through plain
# diffusers on the same protocol: how much of the full student's quality a LoRA keeps
FROM_FULL = {"full_lora_16": ("full", 16), "full_lora_64": ("full", 64)}
TEACHER_STEPS, TEACHER_GUIDANCE = 50, 5.0


def main(argv=None):
    from diffusion_distill.eval.protocol import Protocol, evaluate_loaded, load_model
    from diffusion_distill.recipe import load_recipe

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="sd3", choices=["sd", "sd3"])
    p.add_argument("--only", nargs="+", choices=[*HYPOTHESES, *FROM_FULL],
                   default=[*HYPOTHESES, *FROM_FULL])
    p.add_argument("--tcd-export", default=os.path.join(ROOT, "runs", "tcd_{teacher}", "export"),
                   help="the TCD LoRA export warm_tcd starts from ({teacher}: sd or sd3); "
                        "made by `ddistill train recipes/tcd_{teacher}.yaml train.steps=300 "
                        "output.dir=runs/tcd_{teacher}`")
    p.add_argument("--teacher-few-steps", type=int, default=None, metavar="N",
                   help="also score the teacher's own N-step sampler (CFG 5) against its 50-step "
                        "samples on this protocol: the bar 'closer to the teacher than its own "
                        "N-step sampler'")
    add_run_arguments(p, "dmd2_hypotheses", steps=600, eval_every=150)
    a = p.parse_args(argv)
    check_run_arguments(p, a)

    protocol = Protocol(num=a.eval_num, prompts_kind="single")
    teacher_row, _ = evaluate_loaded(load_model(f"embedded:{a.teacher}"), protocol,
                                     steps=TEACHER_STEPS, guidance=TEACHER_GUIDANCE,
                                     progress=False)
    print(f"[hypotheses] teacher {a.teacher}: FD {teacher_row['fd']:.1f}, alignment "
          f"{teacher_row['alignment']['whole_prompt']:.3f}, recall {teacher_row['recall']:.2f}",
          flush=True)
    out = os.path.join(a.out, f"dmd2_hypotheses_{a.teacher}.json")
    result = {
        "what": "one controlled DMD2 run per hypothesis, same budget",
        **provenance("dmd2_hypotheses.py", argv),
        "feature_space": teacher_row.get("feature_space"), "num_samples": a.eval_num,
        "recipe": f"recipes/dmd2_{a.teacher}.yaml", "steps": a.steps,
        "teacher": {"name": a.teacher, "steps": TEACHER_STEPS, "guidance": TEACHER_GUIDANCE,
                    "fd": teacher_row["fd"], "recall": teacher_row["recall"],
                    "alignment": teacher_row["alignment"]["whole_prompt"],
                    "attributes": _attributes(teacher_row)},
        "runs": {}}
    if a.teacher_few_steps:
        result["teacher"][f"fd_teacher_at_{a.teacher_few_steps}_steps"] = _teacher_few_steps(
            a, protocol)
    result["runs"] = _earlier_runs(out, a)  # runs of other hypotheses from an earlier call stay
    for name in a.only:
        if name in FROM_FULL:
            result["runs"][name] = _from_full(a, name, protocol, teacher_row)
            result["runs"] = {**_earlier_runs(out, a), name: result["runs"][name]}
            write_json(out, result)
            continue
        hypothesis, overrides = HYPOTHESES[name]
        run_dir = os.path.join(a.runs, a.teacher, name)
        tcd_export = os.path.abspath(a.tcd_export.format(teacher=a.teacher))
        overrides = [o.format(tcd_export=tcd_export) for o in overrides]
        recipe = load_recipe(os.path.join(ROOT, "recipes", f"dmd2_{a.teacher}.yaml"), [
            *overrides, f"train.steps={a.steps}", f"train.eval_every={a.eval_every}",
            f"train.eval_num={a.eval_num}", "output.export=false", f"output.dir={run_dir}"])
        def entry(rows, hypothesis=hypothesis, overrides=overrides):
            curve = [{"step": r["step"], "train_seconds": r.get("train_seconds"), "fd": r["fd"],
                      "fd_ratio": r["fd"] / teacher_row["fd"], "fd_teacher": r.get("fd_teacher"),
                      "alignment": r["alignment"]["whole_prompt"], "recall": r["recall"],
                      "worst_share": r["alignment"].get("worst_share"),
                      "attributes": _attributes(r)} for r in rows]
            last = curve[-1]
            return {"hypothesis": hypothesis, "overrides": overrides,
                    "final": {k: v for k, v in last.items() if k != "attributes"},
                    "final_attributes": last["attributes"], "curve": curve,
                    "load_average": os.getloadavg()}  # the shared machine's, at the last point

        def partial(rows, name=name, entry=entry):  # a long run's curve so far, on disk
            write_json(out, {**result, "runs": {**_earlier_runs(out, a), name: {
                **entry(rows), "partial": f"training to step {a.steps}"}}})

        with _as_it_goes(run_dir, partial):
            rows = train_and_evaluate(recipe)
        result["runs"][name] = entry(rows)
        last = result["runs"][name]["final"]
        print(f"[hypotheses] {name}: FD {last['fd']:.1f} ({last['fd_ratio']:.2f}x), FD-T "
              f"{last['fd_teacher']:.1f}, alignment {last['alignment']:.3f}, recall "
              f"{last['recall']:.2f}, worst share {last['worst_share']}", flush=True)
        # after every run, over what is on disk now (a sweep of other hypotheses may run
        # beside this one): an interrupted sweep keeps what it has
        result["runs"] = {**_earlier_runs(out, a), name: result["runs"][name]}
        write_json(out, result)
    _plot(result, out[:-len(".json")] + ".png")
    print(f"[hypotheses] -> {out}")
    return 0


@contextlib.contextmanager
def _as_it_goes(run_dir, write, every: float = 30.0):
    """While the block trains into ``run_dir``, ``write(rows)`` each time its evaluation curve
    (``eval.jsonl``) has grown: an hour-long run's results are on disk as it goes."""
    stop = threading.Event()

    def watch():
        seen = 0
        while not stop.wait(every):
            rows = eval_rows(run_dir)
            if len(rows) > seen:
                seen = len(rows)
                write(rows)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def _teacher_few_steps(a, protocol) -> float:
    """FD between the teacher's own N-step samples and its 50-step ones (same prompts, seeds)."""
    from diffusion_distill.build import build_teacher
    from diffusion_distill.eval.evaluate import fd_to
    from diffusion_distill.eval.in_training import InTrainingEval
    from diffusion_distill.eval.protocol import evaluate_loaded, load_model
    from diffusion_distill.recipe import load_recipe

    recipe = load_recipe(os.path.join(ROOT, "recipes", f"dmd2_{a.teacher}.yaml"))
    row, _ = evaluate_loaded(load_model(f"embedded:{a.teacher}"), protocol,
                             steps=a.teacher_few_steps, guidance=TEACHER_GUIDANCE,
                             progress=False, return_features=True)
    reference = InTrainingEval(build_teacher(recipe), recipe, protocol).teacher_features()
    fd = fd_to(reference, row.pop("features"))
    print(f"[hypotheses] teacher {a.teacher} at {a.teacher_few_steps} steps: FD to its 50-step "
          f"samples {fd:.1f}", flush=True)
    return fd


def _from_full(a, name, protocol, teacher_row) -> dict:
    """A finished full run's student as a rank-R LoRA export, scored like the runs' last
    points (same prompts, seeds, samples and feature space; FD to the same teacher samples)."""
    from diffusion_distill.build import restore_run
    from diffusion_distill.checkpoint import list_checkpoints
    from diffusion_distill.eval.evaluate import fd_to
    from diffusion_distill.eval.in_training import InTrainingEval
    from diffusion_distill.eval.protocol import evaluate_loaded, load_model
    from diffusion_distill.export import export_nets

    source, rank = FROM_FULL[name]
    run_dir = os.path.join(a.runs, a.teacher, source)
    found = list_checkpoints(run_dir)
    if not found or found[-1][0] != a.steps:
        raise SystemExit(f"{run_dir} has no checkpoint of step {a.steps} (--steps) yet; run "
                         f"--only {source} to the end first")
    run = restore_run(run_dir)
    export = export_nets(run.nets, run.teacher, run.recipe,
                         os.path.join(a.runs, a.teacher, name, "export"), lora_rank=rank,
                         objective=run.objective)
    with open(os.path.join(export, "distill_config.json")) as f:
        report = json.load(f)["lora"]["from_full"]
    row, _ = evaluate_loaded(load_model(export), protocol, progress=False, return_features=True)
    fd_teacher = fd_to(InTrainingEval(run.teacher, run.recipe, protocol).teacher_features(),
                       row.pop("features"))
    seconds = eval_rows(run_dir)[-1].get("train_seconds")
    last = {"step": a.steps, "train_seconds": seconds, "fd": row["fd"],
            "fd_ratio": row["fd"] / teacher_row["fd"], "fd_teacher": fd_teacher,
            "alignment": row["alignment"]["whole_prompt"], "recall": row["recall"],
            "worst_share": row["alignment"].get("worst_share")}
    print(f"[hypotheses] {name}: FD {last['fd']:.1f} ({last['fd_ratio']:.2f}x), FD-T "
          f"{fd_teacher:.1f}, alignment {last['alignment']:.3f}, recall {last['recall']:.2f}, "
          f"energy kept {report['energy_kept']:.3f}", flush=True)
    return {"hypothesis": f"the {source} run's student as a rank-{rank} LoRA (truncated SVD per "
                          "layer, scored through plain diffusers)",
            "overrides": [f"ddistill export {source} --lora-rank {rank}"],
            "lora": {k: v for k, v in report.items() if k != "not_represented"},
            "not_represented": len(report["not_represented"]),
            "final": last, "final_attributes": _attributes(row), "curve": [
                {**last, "attributes": _attributes(row)}]}


def _earlier_runs(out, a) -> dict:
    """The runs already in the results file, if made at this budget and sample count."""
    if not os.path.isfile(out):
        return {}
    with open(out) as f:
        earlier = json.load(f)
    if earlier.get("steps") == a.steps and earlier.get("num_samples") == a.eval_num:
        return earlier.get("runs", {})
    return {}


def _attributes(row) -> dict:
    """Per-attribute accuracy (shape, colour, count, ...) where the evaluation gives it."""
    return dict(row["alignment"].get("per_attribute") or {})


def _plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("fd_ratio", "FD / teacher FD"), ("fd_teacher", "FD to the teacher"),
            ("alignment", "alignment (whole prompt)"), ("recall", "recall")]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for name, run in result["runs"].items():
        steps = [c["step"] for c in run["curve"]]
        for axis, (key, _) in zip(axes, keys):
            axis.plot(steps, [c[key] for c in run["curve"]], marker="o", label=name)
    teacher = result["teacher"]
    axes[0].axhline(1.0, color="black", lw=1, label="teacher")
    axes[2].axhline(teacher["alignment"], color="black", lw=1, label="teacher")
    axes[3].axhline(teacher["recall"], color="black", lw=1, label="teacher")
    for axis, (_, label) in zip(axes, keys):
        axis.set_xlabel("training step")
        axis.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"DMD2 1-step on embedded {teacher['name']}: one change per run "
                 f"({result['num_samples']} samples per point)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
