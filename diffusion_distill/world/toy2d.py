"""A 2-D toy world: a Gaussian-mixture teacher whose denoiser is exact.

For a mixture of isotropic Gaussians the posterior mean E[x0 | x_t] has a closed form, so the
teacher is perfect and free: any gap between student and data is the method's doing. Used by
examples/toy_2d.py and by the tests that show an objective learns.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def ring_means(k: int = 8, radius: float = 2.0) -> torch.Tensor:
    angles = torch.arange(k) * (2 * math.pi / k)
    return torch.stack([radius * angles.cos(), radius * angles.sin()], 1)


class GaussianMixtureDenoiser(nn.Module):
    """x0 = E[x0 | x_t] for x0 ~ (1/K) sum_k N(mu_k, var I), x_t = alpha x0 + sigma eps."""

    def __init__(self, means: torch.Tensor, var: float, schedule):
        super().__init__()
        self.register_buffer("means", means)
        self.var = var
        self.schedule = schedule

    def forward(self, x_t, t, cond=None):
        alpha, sigma = self.schedule.alpha_sigma(t)
        alpha, sigma = alpha[:, None, None], sigma[:, None, None]        # (B, 1, 1)
        total = alpha ** 2 * self.var + sigma ** 2                       # marginal variance
        diff = x_t[:, None, :] - alpha * self.means[None]                # (B, K, 2)
        logits = -(diff ** 2).sum(-1) / (2 * total[..., 0])              # responsibilities
        r = logits.softmax(1)[..., None]
        x0_k = self.means[None] + (alpha * self.var / total) * diff
        return (r * x0_k).sum(1)

    def sample(self, n: int, generator=None) -> torch.Tensor:
        k = torch.randint(len(self.means), (n,), generator=generator)
        return self.means[k] + math.sqrt(self.var) * torch.randn(n, 2, generator=generator)


class MLPDenoiser(nn.Module):
    """A small time-conditioned MLP predicting x0: the toy student and critic.

    ``max_frequency``: the highest of its 8 sinusoidal time frequencies (on t in [0, 1], a
    factor 100 apart). 100, the default, is about EDM's Fourier scale 16 times 2 pi;
    continuous-time consistency (sCM) needs a low one (its paper's "stable time-conditioning":
    the tangent carries df/dt, which such features multiply by up to 100; see
    docs/consistency.md, the sCM diagnosis)."""

    def __init__(self, width: int = 128, dim: int = 2, max_frequency: float = 100.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 16, width), nn.SiLU(), nn.Linear(width, width),
                                 nn.SiLU(), nn.Linear(width, dim))
        # 8 frequencies spaced geometrically over a factor 100, the highest max_frequency
        freqs = torch.exp(torch.linspace(0, math.log(100), 8)) * (max_frequency / 100)
        self.register_buffer("freqs", freqs)

    def forward(self, x_t, t, cond=None):
        angles = t[:, None] * self.freqs[None]
        features = torch.cat([x_t, angles.sin(), angles.cos()], 1)
        # a skip from x_t keeps the untrained network close to the identity denoiser
        return x_t + self.net(features)


def toy_teacher(k: int = 8, var: float = 0.02, schedule: str = "flow"):
    """A custom teacher over the ring of ``k`` Gaussians (shape (2,), no conditioning)."""
    from ..teachers.custom import custom_teacher, make_schedule

    fn = GaussianMixtureDenoiser(ring_means(k), var, make_schedule(schedule))
    return custom_teacher(fn, shape=(2,), schedule=schedule, prediction_type="sample")


def mode_shares(x: torch.Tensor, k: int = 8) -> torch.Tensor:
    """The share of samples nearest each of the ring's ``k`` modes, times ``k``: 1 each for an
    even split, 0 for a lost mode (the worst one, ``.min()``, is the coverage the toy reports)."""
    nearest = torch.cdist(x, ring_means(k)).argmin(1)
    return torch.bincount(nearest, minlength=k).float() / len(x) * k


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """E|X-Y| - (E|X-X'| + E|Y-Y'|)/2: zero iff the two distributions agree."""
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).mean()
    yy = torch.cdist(y, y).mean()
    return float(xy - 0.5 * (xx + yy))
