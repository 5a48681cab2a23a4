"""The standard protocol: Inception FID with clean resizing and CLIP score, from local weights.

For users who have the weights on disk; nothing is downloaded at run time (ENVIRONMENT.md: the
toolkit's defaults must never fetch from a hub).

- FID: the Inception-v3 that clean-fid itself uses, StyleGAN's TorchScript export
  ``inception-2015-12-05.pt`` (2048-d pool features), on samples quantized to uint8 as a saved
  PNG holds them and resized to 299 px with clean-fid's "clean" resize (PIL bicubic on each
  float32 channel). ``fid_backend: cleanfid`` runs clean-fid itself on the sample folder: it is
  the reference implementation, but it needs torchvision (GPU machines only). The default,
  ``torchmetrics``, reproduces clean-fid's preprocessing here and uses torchmetrics' FID math;
  it exists because clean-fid cannot be installed beside the CPU torch build.
- CLIP score: torchmetrics' ``CLIPScore`` (100 x cosine, mean over samples) on a local Hugging
  Face CLIP folder.
- Prompts: COCO-style caption files (:func:`load_prompts`).
- Reference: Inception statistics (an .npz with ``mu`` and ``sigma``, as clean-fid and
  pytorch-fid write them) or a folder of reference images; :func:`write_reference_stats` turns
  a folder into an .npz once.
- Samples: ``000000.png``, ``000001.png``, ... and ``prompts.jsonl`` in one flat folder, which
  clean-fid reads directly (``cleanfid.fid.compute_fid(sample_dir, ...)``).

One module per concern: :mod:`.prompts` (prompt files), :mod:`.inception` (features,
reference statistics, ``ddistill stats``), :mod:`.clip_score`, :mod:`.sample_folder`,
:mod:`.cleanfid_backend`, and the one sampling loop with its failure policy
(:mod:`.sampling`, shared with the world's protocol). This module holds the spec section
(:class:`StandardConfig`) and the entry point (:func:`evaluate_standard`).

A bench spec's ``standard:`` section maps onto :class:`StandardConfig`::

    standard:
      prompts: data/captions_val2014.json          # COCO captions JSON, .txt, .jsonl, .csv, .tsv
      num_samples: 30000                           # default: every prompt in the file
      inception: /models/inception-2015-12-05.pt   # default: $DDISTILL_INCEPTION
      clip: /models/clip-vit-large-patch14         # default: $DDISTILL_CLIP
      reference: data/coco_val2014_clean.npz       # or a folder of reference images
      fid_backend: torchmetrics                    # or cleanfid
      metrics: [fid, clip_score]
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, fields

import torch

from .cleanfid_backend import cleanfid_fid, cleanfid_model, import_cleanfid
from .clip_score import ENV_CLIP, clip_score_metric
from .inception import (  # noqa: F401  (the protocol's public pieces, importable from here)
    ENV_INCEPTION,
    INCEPTION_FILE,
    INCEPTION_SIZE,
    InceptionFeatures,
    clean_resize,
    folder_features,
    load_reference_stats,
    moments,
    set_reference_stats,
    write_reference_stats,
)
from .prompts import PROMPT_FORMATS, load_prompts
from .sample_folder import (  # noqa: F401
    PROMPTS_FILE,
    image_files,
    prepare_sample_dir,
    to_uint8,
    write_samples,
)
from .sampling import SampleFn, sample_all

METRICS = ("fid", "clip_score")
FID_BACKENDS = ("torchmetrics", "cleanfid")


# -- the spec section ----------------------------------------------------------------------
@dataclass
class StandardConfig:
    """The ``standard:`` section of a spec; paths left out come from $DDISTILL_INCEPTION and
    $DDISTILL_CLIP. Weights a requested metric needs are checked here, before any sampling."""

    prompts: str
    num_samples: int | None = None
    inception: str | None = None
    clip: str | None = None
    reference: str | None = None
    fid_backend: str = "torchmetrics"
    metrics: tuple[str, ...] = METRICS

    @classmethod
    def from_dict(cls, spec: dict, base_dir: str | None = None) -> StandardConfig:
        """From the spec's dict; relative paths in it are taken from ``base_dir`` (the spec's
        folder) when given."""
        allowed = [f.name for f in fields(cls)]
        if not isinstance(spec, dict):
            raise TypeError(f"the standard: section must be a mapping with keys {allowed}, "
                            f"got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(allowed))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in the standard: section; allowed keys "
                             f"are {allowed}")
        if not spec.get("prompts"):
            raise ValueError("the standard: section needs 'prompts', a prompt file: "
                             f"{PROMPT_FORMATS}")
        spec = dict(spec)
        for key in ("prompts", "inception", "clip", "reference"):
            if spec.get(key) and base_dir and not os.path.isabs(os.path.expanduser(spec[key])):
                spec[key] = os.path.join(base_dir, spec[key])
        return cls(**spec)

    def __post_init__(self):
        self.metrics = (self.metrics,) if isinstance(self.metrics, str) else tuple(self.metrics)
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise ValueError(f"standard.metrics must be a non-empty subset of {list(METRICS)}, "
                             f"got {list(self.metrics)}")
        if self.fid_backend not in FID_BACKENDS:
            raise ValueError(f"standard.fid_backend must be one of {list(FID_BACKENDS)}, got "
                             f"{self.fid_backend!r}")
        n, least = self.num_samples, 2 if "fid" in self.metrics else 1
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < least):
            raise ValueError(f"standard.num_samples must be an integer >= {least} (FID needs 2 "
                             f"samples at least; 30000 is usual for COCO), got {n!r}")
        self.prompts = _path(self.prompts)
        if not self.prompts or not os.path.isfile(self.prompts):
            raise FileNotFoundError(f"standard.prompts = {self.prompts!r} does not exist; "
                                    f"expected {PROMPT_FORMATS}")
        self.inception = self._weights(
            "inception", ENV_INCEPTION, "fid", os.path.isfile,
            f"a file: clean-fid's Inception weights ({INCEPTION_FILE}, a TorchScript file)")
        self.clip = self._weights(
            "clip", ENV_CLIP, "clip_score", lambda p: os.path.isfile(os.path.join(p, "config.json")),
            "a local Hugging Face CLIP folder (with config.json, model weights and the "
            "processor files, as CLIPModel/CLIPProcessor.save_pretrained write them)")
        self.reference = _path(self.reference)
        if "fid" in self.metrics:
            if not self.reference:
                raise ValueError("standard.reference is not set: FID needs Inception statistics "
                                 "of real images (an .npz with mu and sigma, see "
                                 "write_reference_stats) or a folder of reference images. Set "
                                 "it, or leave fid out of standard.metrics.")
            if not os.path.exists(self.reference):
                raise FileNotFoundError(f"standard.reference = {self.reference!r} does not "
                                        "exist; expected an .npz with mu and sigma or a folder "
                                        "of reference images")

    def _weights(self, key, env, metric, ok, expected) -> str | None:
        given = getattr(self, key)
        path = _path(given or os.environ.get(env))
        if metric not in self.metrics:
            return path
        source = f"standard.{key}" if given else f"${env}"
        if not path:
            raise ValueError(f"standard.{key} is not set and ${env} is empty: {metric} needs "
                             f"{expected}. Set one of them, or leave {metric} out of "
                             "standard.metrics.")
        if not ok(path):
            raise FileNotFoundError(f"{source} = {path!r} is not {expected}; fix the path or "
                                    f"leave {metric} out of standard.metrics")
        return path

    @property
    def reference_kind(self) -> str | None:
        if not self.reference:
            return None
        return "image folder" if os.path.isdir(self.reference) else \
            "inception statistics (.npz, mu/sigma)"

    def describe(self, seed: int = 0) -> dict:
        """What the numbers depend on, for caching results: equal dicts, comparable numbers."""
        with open(self.prompts, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        fid, clip = "fid" in self.metrics, "clip_score" in self.metrics
        return {"protocol": "standard", "prompts": self.prompts, "prompts_sha256": digest,
                "num_samples": self.num_samples, "seed": seed, "metrics": list(self.metrics),
                "fid_backend": self.fid_backend if fid else None,
                "reference": self.reference if fid else None,
                "inception": self.inception if fid else None, "clip": self.clip if clip else None}


def _path(p) -> str | None:
    return os.path.abspath(os.path.expanduser(os.fspath(p))) if p else None


# -- the entry point -----------------------------------------------------------------------
def evaluate_standard(sample_fn: SampleFn, config: StandardConfig, sample_dir: str, *,
                      seed: int = 0, batch_size: int = 16, progress: bool = True,
                      nfe: float | None = None, backbone=None, device=None) -> dict:
    """Sample the prompt file's first ``num_samples`` prompts and score them.

    ``sample_fn(prompts, seeds) -> images`` (N, 3, H, W) in [-1, 1], as ``make_sample_fn`` in
    :mod:`.protocol` builds; sample i uses seed ``seed + i``. Samples are written to
    ``sample_dir`` (see :func:`write_samples`; earlier samples there are replaced) and scored
    as written, in uint8. A failing batch is handled as in every evaluation
    (:mod:`.sampling`): recorded and skipped, the result ``complete: False`` with its
    ``failures``, ``num_samples`` counting what was scored. ``backbone``: measure NFE by
    hooking it. Weights, reference and packages are loaded before sampling starts, so a bad
    path fails in seconds.
    """
    t_start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.reference and os.path.isdir(config.reference) and os.path.commonpath(
            [config.reference, os.path.abspath(sample_dir)]) in (config.reference,
                                                                 os.path.abspath(sample_dir)):
        raise ValueError(f"sample_dir {sample_dir!r} and the reference folder "
                         f"{config.reference!r} overlap: the samples would be scored as "
                         "references (or earlier samples deleted from the reference); give "
                         "separate folders")
    prompts = load_prompts(config.prompts, config.num_samples)
    n, seeds = len(prompts), [seed + i for i in range(len(prompts))]
    want_fid = "fid" in config.metrics
    fid_metric = cfid = cfid_model = reference_count = None
    space = None
    if want_fid and config.fid_backend == "torchmetrics":
        from torchmetrics.image.fid import FrechetInceptionDistance

        extractor = InceptionFeatures(config.inception, device)
        fid_metric = FrechetInceptionDistance(feature=extractor)
        if os.path.isdir(config.reference):
            feats = folder_features(config.reference, extractor, batch_size, progress)
            mu, sigma, reference_count = *moments(feats), len(feats)
        else:
            mu, sigma, reference_count = load_reference_stats(config.reference)
        if len(mu) != extractor.num_features:
            raise ValueError(f"reference {config.reference!r} has {len(mu)}-d statistics but "
                             f"the Inception gives {extractor.num_features}-d features; make "
                             "them with the same network (write_reference_stats)")
        set_reference_stats(fid_metric, mu, sigma, reference_count)
        space = f"inception-v3-{extractor.num_features}@{INCEPTION_SIZE} clean resize (torchmetrics)"
    elif want_fid:
        cfid = import_cleanfid()
        cfid_model = cleanfid_model(config.inception, device)
        space = f"inception-v3-2048@{INCEPTION_SIZE} clean resize (clean-fid)"
    clip_metric = clip_score_metric(config.clip).to(device) if "clip_score" in config.metrics \
        else None

    prepare_sample_dir(sample_dir)

    def consume(start, bp, bs, images):
        u8 = to_uint8(images)
        # Written first: the folder is what clean-fid scores, so a batch counts once on disk.
        write_samples(u8, bp, bs, sample_dir, start=start)
        if fid_metric is not None:
            fid_metric.update(u8, real=False)
        if clip_metric is not None:
            clip_metric.update(u8.to(device), list(bp))

    report = sample_all(sample_fn, prompts, seeds, consume, batch_size=batch_size,
                        backbone=backbone, progress=progress,
                        desc="sampling (standard protocol)")
    n_ok = report.num_ok

    t0 = time.perf_counter()
    fid = clip = None
    if n_ok >= 2:  # a covariance needs two samples
        if fid_metric is not None:
            # Tiny negative values come from rounding when both sets are the same distribution.
            fid = max(float(fid_metric.compute()), 0.0)
        elif cfid is not None:
            fid = cleanfid_fid(cfid, cfid_model, sample_dir, config.reference, batch_size,
                               device, progress)
        clip = float(clip_metric.compute()) if clip_metric is not None else None
    return {
        "protocol": config.describe(seed),
        "fid": fid,
        "clip_score": clip,
        "num_samples": n_ok,
        "num_requested": n,
        "complete": not report.failures,
        "failures": report.failures,
        "prompts_file": config.prompts,
        "feature_space": space,
        "reference": {"path": config.reference, "kind": config.reference_kind,
                      "num_images": reference_count} if want_fid else None,
        "clip_model": config.clip if clip_metric is not None else None,
        "nfe": report.nfe if backbone is not None else nfe,
        "seconds_per_image": report.per_image(report.sample_seconds),
        "metric_seconds": time.perf_counter() - t0,
        "total_seconds": time.perf_counter() - t_start,
        "sample_dir": os.path.abspath(sample_dir),
    }
