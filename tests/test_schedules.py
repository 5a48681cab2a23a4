"""Schedules against diffusers' schedulers, on the one continuous time axis."""
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from diffusion_distill.schedules import (
    FlowSchedule,
    VPSchedule,
    schedule_from_scheduler,
    shift_time,
    student_timesteps,
)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_equals_alphas_cumprod_at_integer_steps(beta_schedule):
    scheduler = DDPMScheduler(beta_schedule=beta_schedule)
    schedule = schedule_from_scheduler(scheduler)
    assert isinstance(schedule, VPSchedule)
    T = scheduler.config.num_train_timesteps
    k = torch.arange(T)
    t = k.double() / (T - 1)
    alpha, sigma = schedule.alpha_sigma(t)
    acp = scheduler.alphas_cumprod.double()
    torch.testing.assert_close(alpha ** 2, acp)
    torch.testing.assert_close(sigma ** 2, 1 - acp)
    # the backbone's own time value is the integer step, and back
    torch.testing.assert_close(schedule.model_time(t), k.double())
    torch.testing.assert_close(schedule.t_from_model_time(k), k.float() / (T - 1))


def test_vp_interpolates_between_steps_and_clamps():
    schedule = VPSchedule(DDIMScheduler().alphas_cumprod)
    T = schedule.num_train_timesteps
    t_mid = torch.tensor([10.5 / (T - 1)], dtype=torch.float64)
    acp = schedule.alphas_cumprod
    torch.testing.assert_close(schedule.alpha_sigma(t_mid)[0] ** 2, ((acp[10] + acp[11]) / 2)[None])
    a_lo, _ = schedule.alpha_sigma(torch.tensor([-0.5]))
    a_hi, _ = schedule.alpha_sigma(torch.tensor([1.5]))
    torch.testing.assert_close(a_lo, acp[:1].sqrt().float())
    torch.testing.assert_close(a_hi, acp[-1:].sqrt().float())
    # snr decreases with t
    snr = schedule.snr(torch.linspace(0, 1, 50))
    assert (snr[1:] < snr[:-1]).all()


def test_schedule_from_other_vp_schedulers():
    for scheduler in (EulerDiscreteScheduler(), DDIMScheduler(), DPMSolverMultistepScheduler()):
        schedule = schedule_from_scheduler(scheduler)
        assert isinstance(schedule, VPSchedule), type(scheduler).__name__
        torch.testing.assert_close(schedule.alphas_cumprod,
                                   scheduler.alphas_cumprod.double())


def test_flow_schedule_matches_flow_match_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = schedule_from_scheduler(scheduler)
    assert isinstance(schedule, FlowSchedule)
    scheduler.set_timesteps(8)
    sigmas = scheduler.sigmas[:-1]
    alpha, sigma = schedule.alpha_sigma(sigmas)
    torch.testing.assert_close(sigma, sigmas)
    torch.testing.assert_close(alpha, 1 - sigmas)
    # the transformer sees sigma * 1000: exactly the scheduler's timesteps
    torch.testing.assert_close(schedule.model_time(sigmas), scheduler.timesteps)
    torch.testing.assert_close(schedule.t_from_model_time(scheduler.timesteps), sigmas)
    # SD3's shift is the map the scheduler applies to the sigmas it is given
    base = torch.linspace(1, 1 / 8, 8)
    scheduler.set_timesteps(sigmas=base.numpy())
    torch.testing.assert_close(shift_time(base, 3.0), scheduler.sigmas[:-1])


def test_flow_sigma_dpm_solver_is_flow():
    # Sana's scheduler: a DPM-Solver with flow sigmas. It has an alphas_cumprod table too,
    # which must not make it look like a VP scheduler.
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                            use_flow_sigmas=True, flow_shift=3.0)
    assert isinstance(schedule_from_scheduler(scheduler), FlowSchedule)


def test_flow_endpoints():
    schedule = FlowSchedule()
    alpha, sigma = schedule.alpha_sigma(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(alpha, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(sigma, torch.tensor([0.0, 1.0]))


def test_errors():
    with pytest.raises(ValueError, match="alphas_cumprod must be a 1-D table"):
        VPSchedule(torch.ones(2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        VPSchedule(torch.ones(1))

    class NotAScheduler:
        def __init__(self):
            self.config = {}

    with pytest.raises(ValueError) as err:
        schedule_from_scheduler(NotAScheduler())
    assert "NotAScheduler" in str(err.value) and "FlowMatchEulerDiscreteScheduler" in str(err.value)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        student_timesteps(0, FlowSchedule())
    assert student_timesteps(4, FlowSchedule()) == [1.0, 0.75, 0.5, 0.25]
