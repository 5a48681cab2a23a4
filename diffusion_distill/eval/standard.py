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

import csv
import glob
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image
from torch import nn

from .evaluate import SampleFn, _check_images, _progress

ENV_INCEPTION = "DDISTILL_INCEPTION"
ENV_CLIP = "DDISTILL_CLIP"
METRICS = ("fid", "clip_score")
FID_BACKENDS = ("torchmetrics", "cleanfid")
INCEPTION_SIZE = 299
INCEPTION_FILE = "inception-2015-12-05.pt"  # the file name clean-fid's InceptionV3W opens
PROMPTS_FILE = "prompts.jsonl"
# clean-fid's image extensions (cleanfid/utils.py EXTENSIONS; its raw .npy arrays left out).
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
PROMPT_FORMATS = ("a COCO captions .json ({'annotations': [{'image_id', 'caption'}, ...]}), a "
                  ".txt (one prompt per line), a .jsonl (objects with 'caption' or 'prompt') "
                  "or a .csv/.tsv with a 'caption' or 'prompt' column")
_OWN_FILE = re.compile(r"(\d{6,}\.png|" + re.escape(PROMPTS_FILE) + r")(\.\d+\.tmp)?")


# -- prompts -------------------------------------------------------------------------------
def load_prompts(path, n: int | None = None) -> list[str]:
    """The first ``n`` prompts (all when None) of a COCO-style prompt file.

    A COCO captions JSON gives one caption per image: the first listed for each ``image_id``,
    images in ascending id order, so the set is the same whatever order the file uses.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} does not exist; expected {PROMPT_FORMATS}")
    ext = os.path.splitext(path)[1].lower()
    readers = {".json": _coco_captions, ".txt": _text_lines, ".jsonl": _json_lines,
               ".csv": _table, ".tsv": _table}
    if ext not in readers:
        raise ValueError(f"prompt file {path!r} has an unknown format {ext or '(no suffix)'!r}; "
                         f"expected {PROMPT_FORMATS}")
    with open(path, encoding="utf-8", newline="") as f:
        prompts = [str(p).strip() for p in readers[ext](f, path)]
    if not prompts:
        raise ValueError(f"prompt file {path!r} holds no prompts; expected {PROMPT_FORMATS}")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"number of prompts must be a positive integer, got {n!r}")
        if n > len(prompts):
            raise ValueError(f"asked for {n} prompts but {path!r} holds only {len(prompts)}; "
                             "lower num_samples or give a larger prompt file")
        prompts = prompts[:n]
    return prompts


def _coco_captions(f, path):
    data = json.load(f)
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        got = sorted(data)[:8] if isinstance(data, dict) else type(data).__name__
        # A malformed file, not a wrong argument type: ValueError, as for the other formats.
        raise ValueError(  # noqa: TRY004
            f"{path!r} is not a COCO captions file: expected {{'annotations': "
            f"[{{'image_id': ..., 'caption': ...}}, ...]}}, got {got}")
    first = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ValueError(f"{path!r}: annotation {i} needs 'image_id' and 'caption', got "
                             f"{str(ann)[:100]}")
        first.setdefault(ann["image_id"], ann["caption"])
    return [first[k] for k in sorted(first, key=lambda k: (isinstance(k, str), k))]


def _text_lines(f, path):
    return [line for line in f if line.strip()]


def _field(row, where):
    for key in ("caption", "prompt"):
        if isinstance(row, dict) and row.get(key) is not None:
            return row[key]
    raise ValueError(f"{where} has no 'caption' or 'prompt' field: {str(row)[:100]}")


def _json_lines(f, path):
    return [_field(json.loads(line), f"{path!r} line {i}")
            for i, line in enumerate(f, 1) if line.strip()]


def _table(f, path):
    reader = csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
    if not {"caption", "prompt"} & set(reader.fieldnames or []):
        raise ValueError(f"{path!r} has no 'caption' or 'prompt' column; its header is "
                         f"{reader.fieldnames}")
    return [_field(row, f"{path!r} row {i}") for i, row in enumerate(reader, 1)]


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


# -- Inception features, clean-fid's way, without torchvision ------------------------------
def clean_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's "clean" resize of one (H, W, 3) uint8 image: (3, size, size) float32.

    As ``cleanfid.resize.make_resizer("PIL", False, "bicubic", (299, 299))``: each channel as a
    float32 PIL image (mode "F") resized with bicubic (antialiased when downscaling), clipped to
    [0, 255], not quantized again.
    """
    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
                           .resize((size, size), Image.BICUBIC)) for c in range(3)]
    return np.stack(channels).clip(0, 255)


class InceptionFeatures(nn.Module):
    """clean-fid's FID Inception (a TorchScript file) as a torchmetrics feature extractor.

    ``forward(images)``: uint8 (N, 3, H, W) in [0, 255] (torchmetrics' input convention with
    ``normalize=False``) -> (N, D) float64 features, D = 2048 for the real weights (read from
    the network, not assumed). Each image gets :func:`clean_resize`, then the network is fed as
    clean-fid's ``InceptionV3W`` does in "clean" mode: ``layers((x - 128) / 128)`` when the
    file has ``layers`` (StyleGAN's export does); otherwise ``net(x, return_features=True)``,
    which normalizes the same way after a bilinear resample that is the identity at 299 px.
    float64 out, so torchmetrics' FID returns float64 (it casts to the features' dtype).
    """

    def __init__(self, weights, device=None):
        super().__init__()
        self.device = torch.device(device or "cpu")
        if isinstance(weights, nn.Module):
            net = weights
        else:
            path = os.fspath(weights)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Inception weights {path!r} do not exist; expected "
                                        f"clean-fid's {INCEPTION_FILE} (TorchScript)")
            try:  # TorchScript is the format clean-fid and StyleGAN ship this network in
                net = torch.jit.load(path, map_location=self.device)
            except (RuntimeError, ValueError) as e:
                raise ValueError(f"{path!r} is not a TorchScript file ({e}); expected "
                                 f"clean-fid's {INCEPTION_FILE}") from e
        self.net = net.eval().to(self.device)
        probe = self._features(torch.full((1, 3, INCEPTION_SIZE, INCEPTION_SIZE), 128.0))
        self.num_features = int(probe.shape[1])  # torchmetrics reads this instead of probing

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        out = (self.net.layers((x - 128) / 128) if hasattr(self.net, "layers")
               else self.net(x, return_features=True))
        return out.reshape(len(x), -1).double().cpu()

    def features(self, images: list[np.ndarray]) -> torch.Tensor:
        """Features of (H, W, 3) uint8 arrays; sizes may differ (each is resized alone)."""
        return self._features(torch.from_numpy(np.stack([clean_resize(a) for a in images])))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
            got = (f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images)
                   else type(images).__name__)
            raise ValueError(f"InceptionFeatures takes uint8 images (N, 3, H, W) in [0, 255], "
                             f"as saved PNGs hold them; got {got}. Quantize first "
                             "(to_uint8).")
        return self.features([im.permute(1, 2, 0).cpu().numpy() for im in images])


def image_files(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, sorted), as clean-fid's folder reader finds."""
    return sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                  if os.path.splitext(p)[1].lower()[1:] in IMAGE_EXTENSIONS)


def folder_features(folder: str, extractor: InceptionFeatures, batch_size: int = 32,
                    progress: bool = False) -> torch.Tensor:
    files = image_files(folder)
    if len(files) < 2:
        raise ValueError(f"reference folder {folder!r} holds {len(files)} image(s); FID needs "
                         f"at least 2 (extensions read: {', '.join(IMAGE_EXTENSIONS)})")
    feats, bar = [], _progress(len(files), progress, desc="reference features (inception)")
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        # convert("RGB") as clean-fid's ResizeDataset does (grey or RGBA files become RGB).
        feats.append(extractor.features([np.asarray(Image.open(p).convert("RGB"))
                                         for p in chunk]))
        bar.update(len(chunk))
    bar.close()
    return torch.cat(feats)


def _moments(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Unbiased covariance (n - 1), as np.cov in clean-fid and torchmetrics' compute() use.
    return feats.mean(0), torch.cov(feats.T.double())


def load_reference_stats(path: str) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(mu, sigma, count or None) from an .npz with ``mu`` and ``sigma`` (clean-fid's,
    pytorch-fid's or :func:`write_reference_stats`'s; only the last records the count)."""
    try:
        with np.load(path) as z:  # allow_pickle stays False: loading cannot run code
            keys = list(z.keys())
            if not {"mu", "sigma"} <= set(keys):
                raise ValueError(f"reference statistics {path!r} have keys {keys}; expected "
                                 "'mu' and 'sigma' (as clean-fid and pytorch-fid write them)")
            mu, sigma = (torch.from_numpy(np.asarray(z[k], dtype=np.float64)) for k in
                         ("mu", "sigma"))
            count = int(z["num_samples"]) if "num_samples" in keys else None
    except (OSError, EOFError) as e:  # zipfile.BadZipFile is an OSError
        raise ValueError(f"reference {path!r} is not an .npz file ({e}); expected Inception "
                         "statistics with mu and sigma, or a folder of images") from e
    if mu.dim() != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"reference statistics {path!r}: mu has shape {tuple(mu.shape)} and "
                         f"sigma {tuple(sigma.shape)}; expected (D,) and (D, D)")
    return mu, sigma, count


def write_reference_stats(image_folder: str, inception, out_npz: str, *, batch_size: int = 32,
                          device=None, progress: bool = True) -> dict:
    """Inception statistics of a folder of real images, saved once as ``mu``/``sigma`` .npz.

    ``inception`` is the weights path or an :class:`InceptionFeatures`. The file also records
    ``num_samples``; clean-fid and pytorch-fid read only ``mu`` and ``sigma``, so it is usable
    there too (same clean preprocessing, so the same statistics up to float rounding).
    """
    extractor = inception if isinstance(inception, InceptionFeatures) else \
        InceptionFeatures(inception, device)
    feats = folder_features(image_folder, extractor, batch_size, progress)
    mu, sigma = _moments(feats)
    os.makedirs(os.path.dirname(os.path.abspath(out_npz)), exist_ok=True)
    tmp = f"{out_npz}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, mu=mu.numpy(), sigma=sigma.numpy(), num_samples=np.int64(len(feats)))
    os.replace(tmp, out_npz)
    return {"path": os.path.abspath(out_npz), "num_images": len(feats),
            "feature_dim": int(mu.numel())}


def set_reference_stats(metric, mu: torch.Tensor, sigma: torch.Tensor,
                        count: int | None = None) -> None:
    """Give a torchmetrics ``FrechetInceptionDistance`` precomputed real statistics.

    It keeps sums, not moments: mean = sum / n and cov = (cov_sum - n mean mean^T) / (n - 1).
    Setting sum = n mu and cov_sum = (n - 1) sigma + n mu mu^T makes its compute() see exactly
    mu and sigma for any n >= 2, so statistics files without a count work (n = 2 then).
    """
    n = max(int(count or 2), 2)
    mu, sigma = mu.double(), sigma.double()
    metric.real_features_sum = n * mu
    metric.real_features_cov_sum = (n - 1) * sigma + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long)


# -- CLIP score ----------------------------------------------------------------------------
class _ProjectedCLIP(nn.Module):
    """A CLIPModel whose ``get_text/image_features`` return the projected embeddings as tensors.

    transformers 5 returns a ``BaseModelOutputWithPooling`` (the projection in its
    ``pooler_output``), which torchmetrics 1.9's CLIPScore cannot use (it calls ``.norm`` on
    the result); transformers 4 returned the tensor, which passes through unchanged.
    """

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config  # torchmetrics reads config.text_config

    def get_text_features(self, *args, **kwargs):
        return _embedding(self.model.get_text_features(*args, **kwargs))

    def get_image_features(self, *args, **kwargs):
        return _embedding(self.model.get_image_features(*args, **kwargs))


def _embedding(out):
    return out if torch.is_tensor(out) else out.pooler_output


def clip_score_metric(folder: str):
    """torchmetrics' ``CLIPScore`` on a local CLIP folder (no hub access).

    torchmetrics 1.9 accepts a name or path only if it contains "openai", "jinaai" or
    "zer0int" and rejects other local folders; a callable returning (model, processor) is its
    supported way to give any model. The score's math stays torchmetrics'.
    """
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        return _ProjectedCLIP(model), CLIPProcessor.from_pretrained(folder, local_files_only=True)

    return CLIPScore(model_name_or_path=load)


# -- the sample folder ---------------------------------------------------------------------
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8, as a saved PNG holds them, from [-1, 1] floats (or uint8 as given)."""
    if torch.is_tensor(images) and images.dtype == torch.uint8:
        u8 = images.cpu()
        if u8.dim() != 4 or u8.shape[1] not in (1, 3):
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(u8.shape)}")
    else:
        from ..imaging import to_uint8

        u8 = to_uint8(_check_images(images, len(images)))
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8


def write_samples(images: torch.Tensor, prompts: list[str], seeds: list[int], folder: str,
                  start: int = 0) -> list[str]:
    """Write ``folder/{start:06d}.png``, ... (uint8 RGB) and their lines in ``prompts.jsonl``.

    A flat folder that clean-fid's folder reader globs directly. Each PNG is written under a
    temporary name (ending ``.tmp``, which no image reader picks up) and renamed, so a crash
    never leaves a truncated image under a final name. ``prompts.jsonl`` (index, file, seed,
    prompt; one line per image, sorted by index) is merged by index and replaced the same way,
    so writing a batch again, e.g. after a restart, replaces its lines instead of adding more.
    """
    u8 = to_uint8(images)
    if not len(u8) == len(prompts) == len(seeds):
        raise ValueError(f"got {len(u8)} images, {len(prompts)} prompts and {len(seeds)} seeds; "
                         "give one prompt and one seed per image")
    os.makedirs(folder, exist_ok=True)
    paths, lines = [], {}
    for k, image in enumerate(u8):
        name = f"{start + k:06d}.png"
        paths.append(os.path.join(folder, name))
        tmp = f"{paths[-1]}.{os.getpid()}.tmp"
        Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGB").save(tmp, format="PNG")
        os.replace(tmp, paths[-1])
        lines[start + k] = {"index": start + k, "file": name, "seed": int(seeds[k]),
                            "prompt": prompts[k]}
    manifest = os.path.join(folder, PROMPTS_FILE)
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            old = (json.loads(line) for line in f if line.strip())
            lines = {**{e["index"]: e for e in old}, **lines}
    tmp = f"{manifest}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(lines[i], ensure_ascii=False) + "\n" for i in sorted(lines))
    os.replace(tmp, manifest)
    return paths


def _prepare_sample_dir(folder: str):
    """Empty ``folder`` of an earlier run's samples; refuse one holding other images.

    clean-fid scores every image it finds in the folder, so stale or foreign images would
    silently change the FID.
    """
    os.makedirs(folder, exist_ok=True)
    # Checked before anything is removed: foreign images are never deleted, only refused.
    own = [n for n in os.listdir(folder) if _OWN_FILE.fullmatch(n)]
    others = [p for p in image_files(folder)
              if not (os.path.dirname(p) == folder.rstrip(os.sep)
                      and _OWN_FILE.fullmatch(os.path.basename(p)))]
    if own and not os.path.isfile(os.path.join(folder, PROMPTS_FILE)):
        others = sorted(os.path.join(folder, n) for n in own) + others  # no manifest: not ours
    if others:
        raise ValueError(f"sample folder {folder!r} holds other images ({others[:3]}, "
                         f"{len(others)} in all) that clean-fid would score with the samples; "
                         "give an empty folder or one written by write_samples (with its "
                         f"{PROMPTS_FILE}); nothing was removed")
    for name in own:
        os.remove(os.path.join(folder, name))


# -- clean-fid -----------------------------------------------------------------------------
def _import_cleanfid():
    try:
        from cleanfid import fid
    except ImportError as e:
        raise ImportError(f"fid_backend: cleanfid needs clean-fid ({e}). Install it with "
                          "pip install 'diffusion_distill[cleanfid]' (it needs torchvision, "
                          "which works beside CUDA torch on GPU machines), or use "
                          "fid_backend: torchmetrics.") from e
    return fid


def _cleanfid_model(inception: str, device):
    """clean-fid's own Inception wrapper, on the local weights file instead of its download.

    ``InceptionV3W`` opens ``<folder>/inception-2015-12-05.pt`` (and would download it to /tmp
    if missing), so a file of another name is linked under that name for the load.
    """
    from cleanfid.inception_torchscript import InceptionV3W

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.dirname(inception)
        if os.path.basename(inception) != INCEPTION_FILE:
            folder = tmp
            os.symlink(inception, os.path.join(tmp, INCEPTION_FILE))
        return InceptionV3W(folder, download=False, resize_inside=False).to(device).eval()


def _cleanfid_fid(cfid, model, sample_dir: str, reference: str, batch_size: int, device,
                  progress: bool) -> float:
    """clean-fid's FID of the sample folder, mode "clean".

    For .npz statistics this is what its ``fid_folder`` does with its downloadable statistics,
    with the user's instead (its ``make_custom_stats`` would copy them into its package folder).
    """
    kwargs = {"mode": "clean", "batch_size": batch_size, "device": device, "verbose": progress,
              "num_workers": min(8, os.cpu_count() or 1)}
    if os.path.isdir(reference):
        return float(cfid.compute_fid(sample_dir, reference, custom_feat_extractor=model,
                                      **kwargs))
    mu, sigma, _ = load_reference_stats(reference)
    feats = cfid.get_folder_features(sample_dir, model, **kwargs)
    return float(cfid.frechet_distance(np.mean(feats, axis=0), np.cov(feats, rowvar=False),
                                       mu.numpy(), sigma.numpy()))


# -- the entry point -----------------------------------------------------------------------
def evaluate_standard(sample_fn: SampleFn, config: StandardConfig, sample_dir: str, *,
                      seed: int = 0, batch_size: int = 16, progress: bool = True,
                      nfe: float | None = None, device=None) -> dict:
    """Sample the prompt file's first ``num_samples`` prompts and score them.

    ``sample_fn(prompts, seeds) -> images`` (N, 3, H, W) in [-1, 1], as ``make_sample_fn`` in
    :mod:`.cli` builds; sample i uses seed ``seed + i``. Samples are written to ``sample_dir``
    (see :func:`write_samples`; earlier samples there are replaced) and scored as written, in
    uint8. Unlike :func:`.evaluate.evaluate`, a failing batch stops the evaluation: a
    benchmark number over a partial sample set would not be comparable. Weights, reference
    and packages are loaded before sampling starts, so a bad path fails in seconds.
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
            mu, sigma, reference_count = *_moments(feats), len(feats)
        else:
            mu, sigma, reference_count = load_reference_stats(config.reference)
        if len(mu) != extractor.num_features:
            raise ValueError(f"reference {config.reference!r} has {len(mu)}-d statistics but "
                             f"the Inception gives {extractor.num_features}-d features; make "
                             "them with the same network (write_reference_stats)")
        set_reference_stats(fid_metric, mu, sigma, reference_count)
        space = f"inception-v3-{extractor.num_features}@{INCEPTION_SIZE} clean resize (torchmetrics)"
    elif want_fid:
        cfid = _import_cleanfid()
        cfid_model = _cleanfid_model(config.inception, device)
        space = f"inception-v3-2048@{INCEPTION_SIZE} clean resize (clean-fid)"
    clip_metric = clip_score_metric(config.clip).to(device) if "clip_score" in config.metrics \
        else None

    _prepare_sample_dir(sample_dir)
    sample_seconds = 0.0
    bar = _progress(n, progress, desc="sampling (standard protocol)")
    with torch.no_grad():
        for start in range(0, n, batch_size):
            bp, bs = prompts[start:start + batch_size], seeds[start:start + batch_size]
            t0 = time.perf_counter()
            images = sample_fn(bp, bs)
            sample_seconds += time.perf_counter() - t0
            u8 = to_uint8(_check_images(images, len(bp)))
            write_samples(u8, bp, bs, sample_dir, start=start)
            if fid_metric is not None:
                fid_metric.update(u8, real=False)
            if clip_metric is not None:
                clip_metric.update(u8.to(device), list(bp))
            bar.update(len(bp))
    bar.close()

    t0 = time.perf_counter()
    fid = None
    if fid_metric is not None:
        # Tiny negative values come from rounding when both sets are the same distribution.
        fid = max(float(fid_metric.compute()), 0.0)
    elif cfid is not None:
        fid = _cleanfid_fid(cfid, cfid_model, sample_dir, config.reference, batch_size, device,
                            progress)
    return {
        "protocol": config.describe(seed),
        "fid": fid,
        "clip_score": float(clip_metric.compute()) if clip_metric is not None else None,
        "num_samples": n,
        "prompts_file": config.prompts,
        "feature_space": space,
        "reference": {"path": config.reference, "kind": config.reference_kind,
                      "num_images": reference_count} if want_fid else None,
        "clip_model": config.clip if clip_metric is not None else None,
        "nfe": nfe,
        "seconds_per_image": sample_seconds / n,
        "metric_seconds": time.perf_counter() - t0,
        "total_seconds": time.perf_counter() - t_start,
        "sample_dir": os.path.abspath(sample_dir),
    }


# -- `ddistill stats` -------------------------------------------------------------------------
def add_parser(sub):
    p = sub.add_parser("stats", help="Inception reference statistics (.npz) of an image folder, "
                                     "for the standard protocol's FID")
    p.add_argument("folder", help="a folder of reference images (e.g. COCO val2014)")
    p.add_argument("--out", required=True, help="the .npz to write (mu, sigma, num_samples)")
    p.add_argument("--inception", default=None,
                   help=f"clean-fid's TorchScript Inception ({INCEPTION_FILE}); default "
                        f"${ENV_INCEPTION}")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_stats_cli)


def _stats_cli(args) -> int:
    inception = args.inception or os.environ.get(ENV_INCEPTION)
    if not inception:
        raise ValueError(f"no Inception weights: give --inception PATH or set ${ENV_INCEPTION} "
                         f"(clean-fid's {INCEPTION_FILE}; nothing is downloaded)")
    info = write_reference_stats(args.folder, inception, args.out, batch_size=args.batch_size)
    print(f"wrote {info['path']}: {info['num_images']} images, {info['feature_dim']}-d")
    return 0
