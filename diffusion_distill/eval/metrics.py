"""Distribution metrics as pure functions of two feature sets (rows = samples).

Fréchet distance and KID use torchmetrics' math (its FID matrix square root, its KID kernel and
MMD estimator), fed with features computed once by :mod:`.features`: a pass-through "feature
network" lets torchmetrics' FID accept precomputed features, so reference features can be
cached on disk and reused across evaluations. Precision and recall (Kynkäänniemi et al.,
"Improved Precision and Recall Metric for Assessing Generative Models", NeurIPS 2019) are not
in torchmetrics and are written out below.

The numbers are only as meaningful as the feature space; callers report it with every number.
In this project that is EfficientNet-Lite0, so a Fréchet distance here is NOT an Inception FID.
"""
from __future__ import annotations

import torch
from torch import nn


class _Precomputed(nn.Module):
    """Identity "feature extractor": the torchmetrics metrics receive features, not images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)  # torchmetrics reads this instead of probing

    def forward(self, x):
        return x


def _check(real: torch.Tensor, fake: torch.Tensor, minimum: int = 2):
    for name, f in (("reference", real), ("generated", fake)):
        if f.dim() != 2:
            raise ValueError(f"{name} features must be a 2-D (samples, dims) tensor, got shape "
                             f"{tuple(f.shape)}")
        if len(f) < minimum:
            raise ValueError(f"{name} set has {len(f)} samples; at least {minimum} are needed")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: reference {real.shape[1]}, generated "
                         f"{fake.shape[1]}; both sets must come from the same feature space")


def _joint_span(real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets in an orthonormal basis of the affine span of their union.

    The Fréchet distance depends only on the two means and covariances, and is unchanged by
    a common translation and rotation. Every centred sample, and the difference of the means,
    lies in the span of ``union - origin``, so the distance computed on coordinates in that
    span is exactly the full-dimensional one. When there are fewer samples than feature
    dimensions (small evaluations, tests) this shrinks the eigenproblem from 1280 to n.
    """
    both = torch.cat([real, fake]).double()
    origin = both.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(both - origin, full_matrices=False)
    basis = vh[s > s.max() * 1e-10].T  # drop numerically-null directions
    return (real.double() - origin) @ basis, (fake.double() - origin) @ basis


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the two feature sets (FID's formula).

    The math is torchmetrics' (``FrechetInceptionDistance`` with a pass-through feature
    network, float64). Cost: an eigendecomposition of a d x d matrix, about 30-45 s at d=1280
    on 2 CPU cores; with fewer than d samples in all it runs on the (exact) joint span instead.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check(real, fake)
    if len(real) + len(fake) < real.shape[1]:
        real, fake = _joint_span(real, fake)
    # float64 throughout: the trace-of-sqrt term is a difference of large numbers, and in
    # float32 it loses the digits that separate close models. No sync: under several
    # processes torchmetrics would otherwise gather every process's sets (a collective the
    # others are not in: process 0 alone scores a shared-out evaluation) and mix them.
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]),
                                      reset_real_features=True, sync_on_compute=False)
    metric.set_dtype(torch.float64)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    # Tiny negative values come from rounding when both sets are the same distribution.
    return max(float(metric.compute()), 0.0)


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100,
                              subset_size: int = 500, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD^2, cubic polynomial kernel; (mean, std).

    The kernel and the MMD estimator are torchmetrics' (``torchmetrics.image.kid``); the
    subsets are drawn the way its ``KernelInceptionDistance`` draws them. The difference: the
    three kernel matrices are computed once on the full sets and each subset indexes into
    them, instead of recomputing 3 x 100 kernel matrices (minutes at 1280-d on 2 cores).

    ``subset_size`` is clipped to half the smaller set, so that subsets differ and the std
    means something (with subset = whole set every subset is the same and the std is 0).
    Subsets come from a fixed seed: the same features always give the same number.
    """
    from torchmetrics.image.kid import maximum_mean_discrepancy, poly_kernel

    _check(real, fake, minimum=4)
    size = max(2, min(subset_size, len(real) // 2, len(fake) // 2))
    real, fake = real.double(), fake.double()
    k_rr, k_ff, k_rf = poly_kernel(real, real), poly_kernel(fake, fake), poly_kernel(real, fake)
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        r = torch.randperm(len(real), generator=gen)[:size]
        f = torch.randperm(len(fake), generator=gen)[:size]
        scores.append(maximum_mean_discrepancy(k_rr[r][:, r], k_rf[r][:, f], k_ff[f][:, f]))
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


def _kth_neighbour_radius(feats: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of each sample to its k-th nearest *other* sample in the same set."""
    radii = []
    for i in range(0, len(feats), chunk):
        d = torch.cdist(feats[i:i + chunk], feats)
        # k + 1 because each row contains the sample's zero distance to itself.
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _covered(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
             chunk: int) -> torch.Tensor:
    """For each query, is it inside at least one centre's k-NN ball?"""
    out = []
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i:i + chunk], centres)
        out.append((d <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3,
                     chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), k-NN manifold estimate.

    Each set's manifold is the union of balls around its samples, each ball reaching the
    sample's k-th nearest neighbour in the same set. Precision = share of generated samples
    inside the reference manifold (fidelity); recall = share of reference samples inside the
    generated manifold (coverage). A generator that collapses to a few modes keeps precision
    but loses recall: its repeated samples make tiny balls that cover little of the data.
    """
    _check(real, fake, minimum=k + 1)
    real, fake = real.double(), fake.double()
    real_radii = _kth_neighbour_radius(real, k, chunk)
    fake_radii = _kth_neighbour_radius(fake, k, chunk)
    precision = _covered(fake, real, real_radii, chunk).double().mean().item()
    recall = _covered(real, fake, fake_radii, chunk).double().mean().item()
    return precision, recall


def all_metrics(real: torch.Tensor, fake: torch.Tensor, k: int = 3, kid_subsets: int = 100,
                kid_subset_size: int = 500) -> dict:
    """fd, kid_mean, kid_std, precision, recall of ``fake`` against ``real``."""
    kid_mean, kid_std = kernel_inception_distance(real, fake, kid_subsets, kid_subset_size)
    precision, recall = precision_recall(real, fake, k)
    return {"fd": frechet_distance(real, fake), "kid_mean": kid_mean, "kid_std": kid_std,
            "precision": precision, "recall": recall}
