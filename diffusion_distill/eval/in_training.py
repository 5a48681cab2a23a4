"""The evaluation the training loop runs every ``train.eval_every`` steps (``eval.jsonl``).

The same protocol as ``ddistill eval`` (world prompts and seeds, cached reference features,
EfficientNet-Lite0 feature space, alignment), on ``train.eval_num`` samples drawn with the
toolkit's own few-step sampler, so curves of FD against training step need no extra sampling
afterwards. Needs the world (data.source: world).

Under several processes the evaluation is shared out (:func:`sample_shared`): the prompts are
cut into the batches one process would sample (``train.eval_batch_size``), batch ``i`` is
sampled by process ``i mod N``, the samples are gathered on process 0, and process 0 alone
extracts features, computes the metrics and logs the row. The batches being the same, the row
equals the one-process row (a flow sampler's re-noising is seeded per batch:
:func:`~diffusion_distill.samplers.seeded_global_rng`). The teacher's reference samples are
shared out the same way.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


def _world() -> tuple[int, int]:
    """(rank, processes) of the run's process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def sample_shared(sample_fn, prompts: list, seeds: list, batch_size: int):
    """``sample_fn(prompts, seeds)`` over ``batch_size`` prompts at a time, the batches shared
    out among the processes (batch ``i`` on process ``i mod N``) and gathered on process 0.

    Every process calls ``sample_fn`` equally often (a sharded network's forward is a
    collective): a process with a batch fewer samples one extra prompt and drops it. A batch
    that fails is kept as its error, which :func:`replay` raises where one process would have
    seen it. Returns ``(batches, counts)``: on process 0 every batch's images (CPU) keyed by
    its first prompt's index, and the number of prompts each process sampled (kept); on the
    others ``(None, None)``.
    """
    rank, world = _world()
    starts = list(range(0, len(prompts), batch_size))
    mine = starts[rank::world]
    done = {}
    for i in range(-(-len(starts) // world)):
        if i >= len(mine):  # this process's share of the collective, sampled and dropped
            try:
                sample_fn(prompts[:1], seeds[:1])
            except Exception:  # noqa: BLE001, S110  (a failure there belongs to no batch)
                pass
            continue
        s = mine[i]
        try:
            done[s] = sample_fn(prompts[s:s + batch_size], seeds[s:s + batch_size]).cpu()
        # the evaluation's failure policy (eval/sampling.py): one bad batch is recorded
        except Exception as e:  # noqa: BLE001
            done[s] = RuntimeError(f"{type(e).__name__}: {e}")
    count = sum(min(batch_size, len(prompts) - s) for s in mine)
    gathered = [None] * world if rank == 0 else None
    dist.gather_object((done, count), gathered, dst=0)
    if rank != 0:
        return None, None
    batches = {}
    for part, _ in gathered:
        batches.update(part)
    return batches, [c for _, c in gathered]


def replay(batches: dict, batch_size: int):
    """A ``sample_fn`` that hands back :func:`sample_shared`'s batches (or raises their
    errors), for :func:`~diffusion_distill.eval.evaluate.evaluate` called with the same
    ``batch_size``."""

    def sample_fn(prompts, seeds):
        del seeds
        start = sample_fn.next
        sample_fn.next += batch_size
        got = batches[start]
        if isinstance(got, Exception):
            raise got
        return got

    sample_fn.next = 0
    return sample_fn


class InTrainingEval:
    """One run's evaluator: its protocol and the teacher's features it compares against.

    The teacher's samples are drawn once per evaluator (and cached on disk by the teacher's
    weights, so another run on the same teacher reuses them; a custom teacher without a
    folder is sampled once per evaluator).
    """

    def __init__(self, teacher, recipe: dict, protocol=None):
        from .protocol import Protocol

        self.teacher, self.recipe = teacher, recipe
        self.protocol = protocol or Protocol(num=recipe["train"]["eval_num"],
                                             prompts_kind="single")
        self._teacher_features: torch.Tensor | None = None
        self._teacher_sampled = False

    def __call__(self, nets, objective) -> dict | None:
        """A cheap evaluation of the current student, as one ``eval.jsonl`` row (None on a
        process other than 0 of several: it only samples its share)."""
        from ..student import generate
        from .evaluate import evaluate, fd_to

        protocol, teacher = self.protocol, self.teacher
        sampler = objective.sampler()
        batch = self.recipe["train"]["eval_batch_size"]

        def sample_fn(prompts, seeds):
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
            latents = generate(nets, list(prompts), sampler, gens)
            return teacher.decode(latents)

        rank, world = _world()
        counts, t0 = [len(protocol.prompts)], time.perf_counter()
        if world > 1:
            batches, counts = sample_shared(sample_fn, protocol.prompts, protocol.seeds, batch)
            sample_seconds = time.perf_counter() - t0
            sample_fn = replay(batches, batch) if rank == 0 else None
        teacher_features = self.teacher_features()  # shared out too: every process calls it
        if rank != 0:
            return None
        result = evaluate(sample_fn, protocol.prompts, protocol.seeds,
                          reference_features=protocol.reference, labels=protocol.labels,
                          alignment_fn=protocol.alignment_fn, extractor=protocol.extractor,
                          nfe=float(sampler.num_steps), progress=False, keep_images=0,
                          return_features=True, batch_size=batch)
        if world > 1:  # the samples' wall time over all processes, not the replay's
            result["seconds_per_image"] = sample_seconds / max(result["num_samples"], 1)
        result.pop("images", None)
        result["fd_teacher"] = fd_to(teacher_features, result.pop("features"))
        row = {k: v for k, v in result.items() if isinstance(v, (int, float, str, dict))}
        row["samples_per_process"] = counts  # prompts each process sampled
        return row

    def teacher_features(self) -> torch.Tensor | None:
        """Features of the teacher's own samples (its pipeline's sampler, default steps, the
        recipe's CFG scale) on the protocol's prompts and seeds: what FD-to-teacher compares
        the student with. Under several processes every process calls it (they share the
        sampling) and process 0 alone gets the features (None elsewhere)."""
        if not self._teacher_sampled:  # once per evaluator on every process (None off 0)
            self._teacher_features = self._sample_teacher_features()
            self._teacher_sampled = True
        return self._teacher_features

    def _sample_teacher_features(self) -> torch.Tensor | None:
        from .evaluate import cached_features, read_cached_features
        from .protocol import model_fingerprint

        teacher, protocol = self.teacher, self.protocol
        path = self.recipe["teacher"].get("path")
        weights = model_fingerprint(path) if isinstance(path, str) else None
        guidance = self.recipe["teacher"].get("guidance")
        key = {"what": "teacher samples", "teacher": path, "weights": weights,
               "steps": teacher.default_steps, "guidance": guidance, **protocol.describe()}
        batch = 16

        def sample_fn(prompts, seeds):
            noise = torch.stack([torch.randn(teacher.latent_shape,
                                             generator=torch.Generator().manual_seed(s))
                                 for s in seeds])
            with torch.no_grad():
                latents = teacher.sample(list(prompts), guidance=guidance, noise=noise)
                return teacher.decode(latents).float().cpu()

        def make_images():
            return torch.cat([sample_fn(protocol.prompts[i:i + batch],
                                        protocol.seeds[i:i + batch])
                              for i in range(0, len(protocol.prompts), batch)])

        rank, world = _world()
        if world > 1:  # process 0 reads the cache; on a miss every process samples its share
            found = (read_cached_features(key, protocol.extractor)
                     if rank == 0 and weights is not None else None)
            missing = [found is None]
            dist.broadcast_object_list(missing, src=0)
            if not missing[0]:
                return found
            batches, _ = sample_shared(sample_fn, protocol.prompts, protocol.seeds, batch)
            if rank != 0:
                return None
            failed = {s: e for s, e in batches.items() if isinstance(e, Exception)}
            if failed:
                raise RuntimeError("the teacher's samples for FD-to-teacher failed: "
                                   f"{failed}") from next(iter(failed.values()))
            gathered = torch.cat([batches[s] for s in sorted(batches)])
            make_images = lambda: gathered  # what was sampled and gathered

        if weights is None:  # without weights on disk there is nothing to key a file on
            return protocol.extractor.extract(make_images())
        return cached_features(key, make_images, protocol.extractor)
