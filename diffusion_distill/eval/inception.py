"""Inception features the way clean-fid computes them, without torchvision; reference
statistics (.npz with ``mu`` and ``sigma``) and ``ddistill stats``, which writes them.

The network is the Inception-v3 clean-fid itself uses, StyleGAN's TorchScript export
``inception-2015-12-05.pt`` (2048-d pool features), fed samples quantized to uint8 as a saved
PNG holds them and resized to 299 px with clean-fid's "clean" resize.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..checkpoint import atomic_file
from .sample_folder import IMAGE_EXTENSIONS, image_files
from .sampling import progress_bar

ENV_INCEPTION = "DDISTILL_INCEPTION"
INCEPTION_SIZE = 299
INCEPTION_FILE = "inception-2015-12-05.pt"  # the file name clean-fid's InceptionV3W opens


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


def folder_features(folder: str, extractor: InceptionFeatures, batch_size: int = 32,
                    progress: bool = False) -> torch.Tensor:
    files = image_files(folder)
    if len(files) < 2:
        raise ValueError(f"reference folder {folder!r} holds {len(files)} image(s); FID needs "
                         f"at least 2 (extensions read: {', '.join(IMAGE_EXTENSIONS)})")
    feats, bar = [], progress_bar(len(files), progress, desc="reference features (inception)")
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        # convert("RGB") as clean-fid's ResizeDataset does (grey or RGBA files become RGB).
        feats.append(extractor.features([np.asarray(Image.open(p).convert("RGB"))
                                         for p in chunk]))
        bar.update(len(chunk))
    bar.close()
    return torch.cat(feats)


def moments(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    mu, sigma = moments(feats)
    with atomic_file(out_npz, "wb") as f:  # a file object: np.savez would append ".npz"
        np.savez(f, mu=mu.numpy(), sigma=sigma.numpy(), num_samples=np.int64(len(feats)))
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


# -- `ddistill stats` --------------------------------------------------------------------
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
