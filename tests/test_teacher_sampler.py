"""``Teacher.sample`` is the pipeline's own sampler: for the scheduler configurations real
checkpoints ship (SD1.5's leading DDIM with steps_offset 1 and set_alpha_to_one False, SD2's
v-prediction trailing zero-terminal-SNR DDIM, SDXL's Euler, SD3's shift 3, Flux-dev's dynamic
shift, PixArt-Sigma's DPM-Solver++, Sana's flow DPM-Solver) it gives the latents of the
pipeline's ``__call__`` for the same prompts, generator, steps and guidance."""
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from diffusion_distill import tiny
from diffusion_distill.teachers import load_teacher
from diffusion_distill.teachers.flux import unpack


def _sd15():
    pipe = tiny.tiny_sd("epsilon")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading",
                                               steps_offset=1, set_alpha_to_one=False,
                                               clip_sample=False)
    return pipe, {}


def _sd2_v():
    pipe = tiny.tiny_sd("v_prediction")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                               rescale_betas_zero_snr=True, clip_sample=False)
    return pipe, {}


def _sdxl():
    pipe = tiny.tiny_sdxl()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                        timestep_spacing="leading", steps_offset=1)
    return pipe, {}


def _sd3():
    pipe = tiny.tiny_sd3()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return pipe, {}


def _flux():
    return tiny.tiny_flux(), {"height": 16, "width": 16, "max_sequence_length": 16}


def _pixart():
    pipe = tiny.tiny_pixart()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                             algorithm_type="dpmsolver++")
    return pipe, {}


def _sana():
    return tiny.tiny_sana(), {"height": 32, "width": 32}


CASES = {"sd15-ddim-leading": _sd15, "sd2-v-trailing-zsnr": _sd2_v, "sdxl-euler": _sdxl,
         "sd3-shift3": _sd3, "flux-dev-dynamic": _flux, "pixart-dpmpp": _pixart,
         "sana-flow-dpm": _sana}
PROMPTS = ["a red circle", "two blue squares"]


def _pipeline_latents(pipe, teacher, steps, guidance, seed, **size):
    _, h, w = teacher.latent_shape
    factor = pipe.vae_scale_factor
    kwargs = {"prompt": PROMPTS, "num_inference_steps": steps, "guidance_scale": guidance,
              "generator": torch.Generator().manual_seed(seed), "output_type": "latent",
              "height": h * factor, "width": w * factor}
    if teacher.family == "flux":
        kwargs["max_sequence_length"] = 16
    if teacher.family in ("pixart", "sana"):
        kwargs["use_resolution_binning"] = False  # tiny sizes are not in the aspect bins
    out = pipe(**kwargs).images
    return unpack(out, h, w) if teacher.family == "flux" else out


@pytest.mark.parametrize("name", list(CASES))
def test_sample_equals_the_pipelines_call(name):
    pipe, kwargs = CASES[name]()
    pipe.set_progress_bar_config(disable=True)
    teacher = load_teacher(pipe, **kwargs)
    guidance = 3.0
    ours = teacher.sample(PROMPTS, steps=4, guidance=guidance,
                          generator=torch.Generator().manual_seed(0))
    theirs = _pipeline_latents(pipe, teacher, 4, guidance, 0)
    assert ours.shape == theirs.shape
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 1e-4 * scale, float((ours - theirs).abs().max() / scale)


def test_sample_times_are_the_schedulers_grid():
    pipe, _ = _sd15()
    teacher = load_teacher(pipe)
    assert [round(t * 999) for t in teacher.sample_times(4)] == [751, 501, 251, 1]
    pipe, _ = _sd2_v()
    teacher = load_teacher(pipe)
    assert [round(t * 999) for t in teacher.sample_times(4)] == [999, 749, 499, 249]


def test_flux_shift_follows_the_latent_size_of_each_call():
    pipe = tiny.tiny_flux()
    teacher = load_teacher(pipe, height=16, width=16, max_sequence_length=16)
    small = teacher.sample_times(4)
    large = teacher.sample_times(4, latent_shape=(teacher.latent_shape[0], 128, 128))
    # more image tokens -> a larger shift -> more time at high noise
    assert small[0] == pytest.approx(1.0) and large[0] == pytest.approx(1.0)
    assert large[1] > small[1] + 1e-3
