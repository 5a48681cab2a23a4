"""x0 <-> model output conversions: round trips, agreement with the definitions, errors."""
import pytest
import torch

from diffusion_distill.parameterization import (
    PREDICTION_TYPES,
    add_noise,
    check_prediction_type,
    eps_from_x0,
    from_x0,
    to_x0,
)
from diffusion_distill.schedules import FlowSchedule, VPSchedule


def _vp():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return VPSchedule(torch.cumprod(1 - betas, 0))


def _sample(schedule, b=5):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(b, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.02, 0.25, 0.5, 0.75, 0.98], dtype=torch.float64)[:b]
    alpha, sigma = schedule.alpha_sigma(t)
    return x0, eps, add_noise(x0, eps, alpha, sigma), alpha, sigma


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_round_trip(prediction_type):
    x0, _, x_t, alpha, sigma = _sample(_vp())
    out = from_x0(x0, x_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(to_x0(out, x_t, alpha, sigma, prediction_type), x0)
    # and the other way: any output maps to an x0 that maps back to it
    out2 = torch.randn_like(x0)
    x0_2 = to_x0(out2, x_t, alpha, sigma, prediction_type)
    torch.testing.assert_close(from_x0(x0_2, x_t, alpha, sigma, prediction_type), out2)


def test_flow_round_trip():
    x0, eps, x_t, alpha, sigma = _sample(FlowSchedule())
    out = from_x0(x0, x_t, alpha, sigma, "flow")
    torch.testing.assert_close(out, eps - x0)  # the rectified-flow velocity
    torch.testing.assert_close(to_x0(out, x_t, alpha, sigma, "flow"), x0)


def test_outputs_match_their_definitions():
    x0, eps, x_t, alpha, sigma = _sample(_vp())
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(from_x0(x0, x_t, alpha, sigma, "epsilon"), eps)
    torch.testing.assert_close(from_x0(x0, x_t, alpha, sigma, "v_prediction"), a * eps - s * x0)
    torch.testing.assert_close(from_x0(x0, x_t, alpha, sigma, "sample"), x0)
    torch.testing.assert_close(eps_from_x0(x0, x_t, alpha, sigma), eps)


def test_scalar_alpha_sigma_broadcast():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_t = add_noise(x0, eps, torch.tensor(0.6), torch.tensor(0.8))
    torch.testing.assert_close(to_x0(eps, x_t, torch.tensor(0.6), torch.tensor(0.8), "epsilon"),
                               x0)


def test_aliases():
    assert check_prediction_type("v") == "v_prediction"
    assert check_prediction_type("flow_prediction") == "flow"
    assert check_prediction_type("eps") == "epsilon"
    for name in PREDICTION_TYPES:
        assert check_prediction_type(name) == name


@pytest.mark.parametrize("fn", [to_x0, from_x0])
def test_unsupported_type_lists_supported(fn):
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError) as err:
        fn(x, x, torch.ones(1), torch.ones(1), "edm_precond")
    message = str(err.value)
    assert "edm_precond" in message
    for name in PREDICTION_TYPES:
        assert name in message
    with pytest.raises(ValueError, match="supported: epsilon, v_prediction, sample, flow"):
        check_prediction_type("score")
