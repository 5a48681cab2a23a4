"""``fid_backend: cleanfid``: clean-fid itself scores the sample folder (mode "clean"). It is
the reference implementation, but it needs torchvision (GPU machines only: it cannot be
installed beside the CPU torch build), so it is imported only when asked for."""
from __future__ import annotations

import os
import tempfile

import numpy as np

from .inception import INCEPTION_FILE, load_reference_stats


def import_cleanfid():
    try:
        from cleanfid import fid
    except ImportError as e:
        raise ImportError(f"fid_backend: cleanfid needs clean-fid ({e}). Install it with "
                          "pip install 'diffusion_distill[cleanfid]' (it needs torchvision, "
                          "which works beside CUDA torch on GPU machines), or use "
                          "fid_backend: torchmetrics.") from e
    return fid


def cleanfid_model(inception: str, device):
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


def cleanfid_fid(cfid, model, sample_dir: str, reference: str, batch_size: int, device,
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
