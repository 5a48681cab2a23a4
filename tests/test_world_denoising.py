"""The Denoising objective (teacher training): its targets are each family's own loss."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

from diffusion_distill.denoiser import Cond
from diffusion_distill.objectives import build_objective
from diffusion_distill.objectives.denoising import Denoising
from diffusion_distill.step import Randomness, StepContext
from diffusion_distill.teachers.custom import custom_denoiser


def _nets(denoiser):
    roles = SimpleNamespace(use=lambda role: contextlib.nullcontext())
    return SimpleNamespace(schedule=denoiser.schedule, roles=roles,
                           denoiser={"student": denoiser}.__getitem__)


@pytest.mark.parametrize("schedule,prediction", [("vp", "epsilon"), ("flow", "flow")])
def test_oracle_backbone_has_zero_loss(schedule, prediction):
    # All data at one point c: the exact eps / velocity is a function of x_t and t alone,
    # so a backbone computing it must get (numerically) zero loss -- for each family.
    c = torch.full((8, 4, 4, 4), 0.3)
    holder = {}

    def oracle(x_t, t, cond):
        alpha, sigma = holder["den"].schedule.alpha_sigma(t)
        alpha, sigma = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        eps = (x_t - alpha * c) / sigma
        return eps if prediction == "epsilon" else eps - c

    den = custom_denoiser(oracle, schedule=schedule, prediction_type=prediction)
    den.uncond = Cond({"cond": torch.zeros(1, 3)})
    holder["den"] = den
    objective = Denoising()
    ctx = StepContext(0, 0, Randomness(0, 0, 0), 1, 10)
    batch = {"x0": c, "cond": Cond({"cond": torch.ones(8, 3)})}
    (role, loss), = list(objective(_nets(den), batch, ctx))
    assert role == "student" and loss.item() < 1e-8
    # and a wrong backbone is penalised
    den2 = custom_denoiser(lambda x, t, cond: torch.zeros_like(x), schedule=schedule,
                           prediction_type=prediction)
    (_, bad), = list(objective(_nets(den2), batch, StepContext(0, 0, Randomness(0, 0, 0), 1, 10)))
    assert bad.item() > 0.1


def test_caption_dropout_and_time_sampling():
    obj = Denoising(p_uncond=0.5)
    rng = Randomness(1, 2, 0)
    cond = Cond({"prompt_embeds": torch.ones(64, 2, 3)})
    uncond = Cond({"prompt_embeds": torch.zeros(1, 2, 3)})
    dropped = obj.drop_captions(cond, uncond, rng).tensors["prompt_embeds"]
    frac = (dropped[:, 0, 0] == 0).float().mean().item()
    assert 0.3 < frac < 0.7
    t = Denoising(t_sampling="logit_normal").sample_t(4000, "vp", Randomness(0, 0, 0))
    assert 0.45 < t.mean() < 0.55 and t.std() < 0.25  # concentrated in the middle
    assert Denoising().sample_t(100, "vp", Randomness(0, 0, 0)).min() >= 1e-3


def test_recipe_options_are_checked():
    assert isinstance(build_objective({"name": "denoising", "p_uncond": 0.2}), Denoising)
    with pytest.raises(ValueError, match="t_sampling"):
        Denoising(t_sampling="cosine")
    with pytest.raises(ValueError, match="no option"):
        build_objective({"name": "denoising", "p_drop": 0.2})


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_v_loss_weight_turns_each_output_error_into_the_v_error(prediction):
    """loss_weight="v": the squared error in the network's own output space, weighted, equals
    the squared error of v = alpha eps - sigma x0 that the same prediction implies."""
    from diffusion_distill.objectives.denoising import v_weight
    from diffusion_distill.parameterization import add_noise, from_x0

    g = torch.Generator().manual_seed(0)
    x0, eps, x0_hat = (torch.randn(5, 4, 3, 3, generator=g) for _ in range(3))
    t = torch.rand(5, generator=g) * 0.98 + 0.01
    alpha = torch.cos(t * torch.pi / 2)
    sigma = torch.sin(t * torch.pi / 2)
    x_t = add_noise(x0, eps, alpha, sigma)
    out_err = (from_x0(x0_hat, x_t, alpha, sigma, prediction)
               - from_x0(x0, x_t, alpha, sigma, prediction)).square().flatten(1).mean(1)
    v_err = (from_x0(x0_hat, x_t, alpha, sigma, "v_prediction")
             - from_x0(x0, x_t, alpha, sigma, "v_prediction")).square().flatten(1).mean(1)
    torch.testing.assert_close(out_err * v_weight(prediction, alpha, sigma), v_err)
    with pytest.raises(ValueError, match="loss_weight must be one of"):
        Denoising(loss_weight="snr")
