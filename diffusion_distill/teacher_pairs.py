"""Pairs of noise and the teacher's deterministic many-step sample from it, cached per run.

DMD (Yin et al. 2024, sec. 3.3) pulls the one-step generator's output G(z) toward the
teacher's ODE solution y(z) from the same noise z: a regression target that keeps the
generator on the teacher's noise-to-image map (modes, layout) while the distribution-matching
gradient refines it. The pairs are made once per run, before the first training step, with
deterministic DDIM (eta 0: the first-order probability-flow ODE solver; on a flow teacher it
is the Euler step) on the teacher's own 50-step time grid, with the run's CFG scale.

The cache is ``<run folder>/teacher_pairs.safetensors``: tensors ``z``, ``y`` and the pairs'
prompts and settings in its metadata. It is rewritten (atomically) after every chunk, so an
interrupted generation continues where it stopped; a cache made by another teacher (base
weights fingerprint) or under other settings is refused with what to do, never overwritten.
"""
from __future__ import annotations

import json
import os

import torch

FILE_NAME = "teacher_pairs.safetensors"
CHUNK = 16  # pairs per teacher call (and per rewrite of the cache)
PAIR_SEED_OFFSET = 1_000_000_007


class TeacherPairs:
    """``num`` pairs ``(z, y, prompt)``; :meth:`batch` draws some for a training step.

    Args:
        z, y: (num, *latent_shape) noise and the teacher's sample from it.
        prompts: the prompt of each pair.
    """

    def __init__(self, z: torch.Tensor, y: torch.Tensor, prompts: list[str]):
        self.z, self.y, self.prompts = z, y, list(prompts)

    def __len__(self):
        return len(self.prompts)

    def batch(self, rng, n: int):
        """``n`` pairs drawn from the step's randomness (so a resumed run draws the same)."""
        index = rng.randint(len(self), n).cpu()
        return (self.z[index].to(rng.device), self.y[index].to(rng.device),
                [self.prompts[i] for i in index.tolist()])


def describe(teacher, fingerprint: str, num: int, steps: int, guidance: float,
             seed: int) -> dict:
    """What a cache was made with; all but ``teacher`` (the folder it was loaded from, kept
    for the reader) must match for it to be reused: the base weights' fingerprint says which
    teacher, so a moved checkout or a copied run folder keeps its pairs."""
    return {"teacher": str(teacher.path), "base_fingerprint": fingerprint,
            "latent_shape": list(teacher.latent_shape), "num": int(num), "steps": int(steps),
            "guidance": float(guidance), "seed": int(seed), "sampler": "ddim eta 0"}


def load_or_make(run_dir: str, teacher, fingerprint: str, prompts_fn, num: int,
                 steps: int = 50, guidance: float = 1.0, seed: int = 0,
                 log=print) -> TeacherPairs:
    """The run's pairs: read from the cache, continued where an earlier call stopped, or made.

    Args:
        fingerprint: the teacher's base weights' fingerprint (``export.base_fingerprint``).
        prompts_fn: ``prompts_fn(num, seed) -> list[str]``, the run's prompt source.
        guidance: the teacher's CFG scale in the pairs (the run's real score scale).
    Raises:
        ValueError: the cache was made by another teacher or with other settings.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .checkpoint import atomic_path

    path = os.path.join(run_dir, FILE_NAME)
    want = describe(teacher, fingerprint, num, steps, guidance, seed)
    done_z, done_y = [], []
    prompts = None
    if os.path.isfile(path):
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            have = json.loads(meta.get("settings", "{}"))
            diff = [f"{k}: {have.get(k)!r} (cache) vs {v!r} (this run)" for k, v in want.items()
                    if k != "teacher" and have.get(k) != v]
            if diff:
                what = ("another teacher" if "base_fingerprint" in " ".join(diff)
                        else "other settings")
                raise ValueError(
                    f"the teacher pairs cached in {path} were made by {what}: "
                    f"{'; '.join(diff)}. Delete that file to make new pairs for this run, or "
                    "give this run its own output.dir")
            prompts = json.loads(meta["prompts"])
            done_z, done_y = [f.get_tensor("z")], [f.get_tensor("y")]
    if prompts is None:
        prompts = list(prompts_fn(num, seed))
    # far from the evaluation's seeds (small integers, one generator per sample), so no pair
    # starts from the very noise an evaluation sample does
    gen = torch.Generator().manual_seed(PAIR_SEED_OFFSET + seed)
    z_all = torch.randn((num, *teacher.latent_shape), generator=gen)
    done = done_z[0].shape[0] if done_z else 0
    if done < num:
        log(f"teacher pairs: {num - done} of {num} to make ({steps} steps, CFG {guidance:g}) "
            f"-> {path}")
    times = teacher.sample_times(steps)
    while done < num:
        hi = min(num, done + CHUNK)
        with torch.no_grad():
            y = teacher.sample(prompts[done:hi], guidance=guidance, noise=z_all[done:hi],
                               times=times).float().cpu()
        done_z.append(z_all[done:hi])
        done_y.append(y)
        done = hi
        tensors = {"z": torch.cat(done_z).contiguous(), "y": torch.cat(done_y).contiguous()}
        done_z, done_y = [tensors["z"]], [tensors["y"]]
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"settings": json.dumps(want),
                                               "prompts": json.dumps(prompts)})
    return TeacherPairs(done_z[0], done_y[0], prompts)
