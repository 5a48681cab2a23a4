"""Distribution metrics on synthetic feature sets: the properties that make them trustworthy."""
import pytest
import torch

from diffusion_distill.eval.metrics import (
    all_metrics,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)

DIM = 32


def gaussian(n, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g) * scale + shift


def test_fd_zero_on_itself_and_grows_with_shift():
    a, b = gaussian(400, 0), gaussian(400, 1)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    fds = [frechet_distance(a, b + s) for s in (0.0, 0.25, 0.5, 1.0)]
    assert fds == sorted(fds) and fds[-1] > 10 * fds[0]
    # a mean shift of s in every one of DIM dimensions adds DIM * s^2
    assert fds[-1] - fds[0] == pytest.approx(DIM * 1.0, rel=0.2)


def test_fd_joint_span_shortcut_is_exact():
    """Fewer samples than dimensions: the projected computation equals the full one."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from diffusion_distill.eval.metrics import _Precomputed

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(20, 100, generator=g), torch.randn(30, 100, generator=g) * 1.5 + 0.3
    full = FrechetInceptionDistance(feature=_Precomputed(100))
    full.set_dtype(torch.float64)
    full.update(a.double(), real=True)
    full.update(b.double(), real=False)
    assert frechet_distance(a, b) == pytest.approx(float(full.compute()), rel=1e-6)


def test_kid_near_zero_on_itself_and_grows_with_shift():
    a, b = gaussian(300, 0), gaussian(300, 1)
    same, _ = kernel_inception_distance(a, a)
    kids = [kernel_inception_distance(a, b + s)[0] for s in (0.0, 0.5, 1.0)]
    assert abs(same) < 0.05 * kids[-1]
    assert kids == sorted(kids) and kids[-1] > 0.1
    # deterministic: the subsets come from a fixed seed
    assert kernel_inception_distance(a, b) == kernel_inception_distance(a, b)


def test_precision_recall_identical_and_mode_collapse():
    real = gaussian(300, 0)
    assert precision_recall(real, real) == (1.0, 1.0)
    fresh = gaussian(300, 1)
    p, r = precision_recall(real, fresh)
    assert p > 0.5 and r > 0.5
    # Collapse onto 5 modes (tiny jitter around 5 real samples): samples stay realistic
    # (precision high) but cover almost none of the data (recall near 0).
    g = torch.Generator().manual_seed(2)
    collapsed = fresh[:5].repeat(60, 1) + 0.01 * torch.randn(300, DIM, generator=g)
    p_c, r_c = precision_recall(real, collapsed)
    assert r_c < 0.1 < r
    assert p_c > 0.5


def test_precision_drops_when_samples_leave_the_data():
    real = gaussian(300, 0)
    p, r = precision_recall(real, gaussian(300, 1, shift=3.0))
    assert p < 0.1 and r < 0.1


def test_bad_inputs_are_refused():
    a = gaussian(50, 0)
    with pytest.raises(ValueError, match="same feature space"):
        frechet_distance(a, torch.randn(50, DIM + 1))
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(a, torch.randn(50))
    with pytest.raises(ValueError, match="at least"):
        precision_recall(a, a[:3], k=3)


def test_all_metrics_keys():
    out = all_metrics(gaussian(60, 0), gaussian(60, 1), kid_subsets=10)
    assert set(out) == {"fd", "kid_mean", "kid_std", "precision", "recall"}
    assert all(isinstance(v, float) for v in out.values())
