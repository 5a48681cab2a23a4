"""Conversions between what a backbone predicts and the clean sample ``x0``.

With ``x_t = alpha x0 + sigma eps``:

=============  ==========================================  ========================
prediction     x0 from the model output ``out``            ``out`` from x0
=============  ==========================================  ========================
epsilon        ``(x_t - sigma out) / alpha``               ``(x_t - alpha x0)/sigma``
v_prediction   ``alpha x_t - sigma out`` (needs VP)        ``alpha eps - sigma x0``
sample         ``out``                                     ``x0``
flow           ``x_t - t out`` (out = eps - x0)            ``eps - x0``
=============  ==========================================  ========================
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
# diffusers spells some of these differently in scheduler configs.
ALIASES = {"v": "v_prediction", "flow_prediction": "flow", "velocity": "flow", "eps": "epsilon"}


def check_prediction_type(prediction_type: str) -> str:
    name = ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        raise ValueError(
            f"unsupported prediction type {prediction_type!r}; supported: "
            f"{', '.join(PREDICTION_TYPES)}. Set it in the recipe as teacher.prediction_type."
        )
    return name


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim else v


def to_x0(out, x_t, alpha, sigma, prediction_type: str):
    alpha, sigma = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if prediction_type == "epsilon":
        return (x_t - sigma * out) / alpha
    if prediction_type == "v_prediction":
        # Valid because alpha^2 + sigma^2 = 1 on VP schedules.
        return alpha * x_t - sigma * out
    if prediction_type == "sample":
        return out
    if prediction_type == "flow":
        return x_t - sigma * out
    check_prediction_type(prediction_type)
    raise AssertionError(prediction_type)


def from_x0(x0, x_t, alpha, sigma, prediction_type: str):
    """The output a backbone of ``prediction_type`` would give for this ``x0``."""
    alpha, sigma = _bcast(alpha, x_t), _bcast(sigma, x_t)
    eps = (x_t - alpha * x0) / sigma
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return eps - x0
    check_prediction_type(prediction_type)
    raise AssertionError(prediction_type)


def eps_from_x0(x0, x_t, alpha, sigma):
    alpha, sigma = _bcast(alpha, x_t), _bcast(sigma, x_t)
    return (x_t - alpha * x0) / sigma


def add_noise(x0, eps, alpha, sigma):
    return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps
