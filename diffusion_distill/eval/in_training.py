"""The evaluation the training loop runs every ``train.eval_every`` steps (``eval.jsonl``).

The same protocol as ``ddistill eval`` (world prompts and seeds, cached reference features,
EfficientNet-Lite0 feature space, alignment), on ``train.eval_num`` samples drawn with the
toolkit's own few-step sampler, so curves of FD against training step need no extra sampling
afterwards. Needs the world (data.source: world).
"""
from __future__ import annotations

import torch


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

    def __call__(self, nets, objective) -> dict:
        """A cheap evaluation of the current student, as one ``eval.jsonl`` row."""
        from ..student import generate
        from .evaluate import evaluate, fd_to

        protocol, teacher = self.protocol, self.teacher
        sampler = objective.sampler()

        def sample_fn(prompts, seeds):
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
            latents = generate(nets, list(prompts), sampler, gens)
            return teacher.decode(latents)

        result = evaluate(sample_fn, protocol.prompts, protocol.seeds,
                          reference_features=protocol.reference, labels=protocol.labels,
                          alignment_fn=protocol.alignment_fn, extractor=protocol.extractor,
                          nfe=float(sampler.num_steps), progress=False, keep_images=0,
                          return_features=True)
        result.pop("images", None)
        result["fd_teacher"] = fd_to(self.teacher_features(), result.pop("features"))
        return {k: v for k, v in result.items() if isinstance(v, (int, float, str, dict))}

    def teacher_features(self) -> torch.Tensor:
        """Features of the teacher's own samples (its pipeline's sampler, default steps, the
        recipe's CFG scale) on the protocol's prompts and seeds: what FD-to-teacher compares
        the student with."""
        if self._teacher_features is None:
            self._teacher_features = self._sample_teacher_features()
        return self._teacher_features

    def _sample_teacher_features(self) -> torch.Tensor:
        from .evaluate import cached_features
        from .protocol import model_fingerprint

        teacher, protocol = self.teacher, self.protocol
        path = self.recipe["teacher"].get("path")
        weights = model_fingerprint(path) if isinstance(path, str) else None
        guidance = self.recipe["teacher"].get("guidance")
        key = {"what": "teacher samples", "teacher": path, "weights": weights,
               "steps": teacher.default_steps, "guidance": guidance, **protocol.describe()}

        def make_images():
            images = []
            for i in range(0, len(protocol.prompts), 16):
                seeds = protocol.seeds[i:i + 16]
                noise = torch.stack([torch.randn(teacher.latent_shape,
                                                 generator=torch.Generator().manual_seed(s))
                                     for s in seeds])
                with torch.no_grad():
                    latents = teacher.sample(protocol.prompts[i:i + 16], guidance=guidance,
                                             noise=noise)
                    images.append(teacher.decode(latents).float().cpu())
            return torch.cat(images)

        if weights is None:  # without weights on disk there is nothing to key a file on
            return protocol.extractor.extract(make_images())
        return cached_features(key, make_images, protocol.extractor)
