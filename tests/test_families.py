"""Every teacher family behind the one denoiser interface agrees with its own diffusers code.

For each family (and each SD prediction type) on a tiny random pipeline built in code:

* one sampling step through the adapter (x0 from the Denoiser, then ``ddim_step``) equals the
  family's diffusers scheduler stepping the same model output;
* the Denoiser's guided x0 equals the pipeline-style combination computed by hand from raw
  backbone calls (written out here as the pipelines call their backbones);
* ``Teacher.sample`` runs and each distinct prompt goes through the text encoders once;
* ``load_teacher`` on a saved folder round-trips; bad folders give clear errors.
"""
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from diffusion_distill import tiny
from diffusion_distill.denoiser import Cond, ddim_step
from diffusion_distill.teachers import FAMILIES, load_teacher, teacher_from_pipeline
from diffusion_distill.teachers.flux import pack, unpack


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # On a shared 2-core machine, multi-threaded kernels on these tiny tensors spend their
    # time waiting for each other (a tiny UNet call: 0.02 s on 1 thread, ~4 s on 2 under load).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# name -> (builder, from_pipeline kwargs)
CASES = {
    "sd-epsilon": (lambda: tiny.tiny_sd("epsilon"), {}),
    "sd-v": (lambda: tiny.tiny_sd("v_prediction"), {}),
    "sd-sample": (lambda: tiny.tiny_sd("sample"), {}),
    "sd3": (tiny.tiny_sd3, {}),
    "sdxl": (tiny.tiny_sdxl, {}),
    "flux": (tiny.tiny_flux, {"height": 16, "width": 16, "max_sequence_length": 16}),
    "flux-schnell": (lambda: tiny.tiny_flux(guidance_embeds=False),
                     {"height": 16, "width": 16, "max_sequence_length": 16}),
    "pixart": (tiny.tiny_pixart, {}),
    "pixart-alpha": (lambda: tiny.tiny_pixart(alpha=True), {}),
    "sana": (tiny.tiny_sana, {"height": 32, "width": 32}),
}
VP = {"sd-epsilon", "sd-v", "sd-sample", "sdxl", "pixart", "pixart-alpha"}
PROMPTS = ["a red circle", "two blue squares"]
_built = {}


def build(name):
    if name not in _built:
        builder, kwargs = CASES[name]
        pipe = builder()
        pipe.set_progress_bar_config(disable=True)
        _built[name] = (pipe, load_teacher(pipe, **kwargs))
    return _built[name]


def _noise(teacher, b=2, seed=0):
    return torch.randn((b,) + teacher.latent_shape, generator=torch.Generator().manual_seed(seed))


# -- one sampling step equals the family's scheduler -----------------------------------------
def _scheduler_steps(name, pipe, teacher):
    """(scheduler, [(scheduler timestep, t, s)]) for a mid-trajectory step, fresh scheduler."""
    if name in VP:
        sched = DDIMScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(4)
        T = sched.config.num_train_timesteps
        k = int(sched.timesteps[1])
        prev = k - T // 4  # DDIM's previous timestep
        return sched, (k, k / (T - 1), prev / (T - 1))
    if name == "sana":
        # Sana's own scheduler: DPM-Solver++ on flow sigmas; its first step is first order.
        sched = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        sched.set_timesteps(4)
        return sched, (sched.timesteps[0], sched.sigmas[0], sched.sigmas[1])
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    kwargs = {}
    if sched.config.use_dynamic_shifting:  # Flux: mu from the image token count
        kwargs["mu"] = float(np.log(teacher.time_shift))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), **kwargs)
    sched.set_begin_index(1)
    return sched, (sched.timesteps[1], sched.sigmas[1], sched.sigmas[2])


@pytest.mark.parametrize("name", list(CASES))
def test_step_matches_diffusers_scheduler(name):
    pipe, teacher = build(name)
    sched, (timestep, t, s) = _scheduler_steps(name, pipe, teacher)
    den = teacher.denoiser
    x = _noise(teacher)
    cond = teacher.prompts(PROMPTS)
    if den.embedded_guidance:  # Flux-dev: the guidance value is an input of every call
        cond = Cond({**cond.tensors, "guidance": torch.full((2,), 1.0)})
    t = torch.as_tensor(t, dtype=torch.float32)
    with torch.no_grad():
        out = den.raw(x, t, cond)  # the backbone's own output, fed to both
        x0 = den(x, t, cond, guidance=1.0)
    x_s = ddim_step(den.schedule, x0, x, t, torch.as_tensor(s, dtype=torch.float32))
    if name.startswith("flux"):  # the scheduler works on packed latents
        ref = sched.step(pack(out), timestep, pack(x)).prev_sample
        ref = unpack(ref, *x.shape[2:])
    else:
        ref = sched.step(out, timestep, x).prev_sample
    torch.testing.assert_close(x_s, ref, rtol=1e-4, atol=1e-5)


def test_flow_sigma_of_first_flux_step_is_one():
    # Flux samples from sigma = 1 exactly; the adapter's first time must be that too.
    _, teacher = build("flux")
    assert teacher.sample_times(4)[0] == pytest.approx(1.0)


# -- guidance equals the pipeline-style combination of two raw backbone calls ------------------
def _hand_guided_x0(name, pipe, teacher, x, t, w):
    """x0 as the pipeline computes it: encode with its own encode_prompt, call the backbone
    as its __call__ does, combine uncond + w (cond - uncond) in output space, convert."""
    b, dev = x.shape[0], x.device
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in teacher.schedule.alpha_sigma(t.expand(b)))
    two = torch.cat([x, x])
    if name in VP:
        k = torch.full((2 * b,), round(float(t) * 999), dtype=torch.long)
    if name.startswith("sd-"):
        pe, npe = pipe.encode_prompt(PROMPTS, dev, 1, True)
        out = pipe.unet(two, k, encoder_hidden_states=torch.cat([npe, pe])).sample
    elif name == "sdxl":
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, device=dev,
                                                      do_classifier_free_guidance=True)
        ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), pe.dtype,
                                     pipe.text_encoder_2.config.projection_dim)
        added = {"text_embeds": torch.cat([npooled, pooled]), "time_ids": ids.repeat(2 * b, 1)}
        out = pipe.unet(two, k, encoder_hidden_states=torch.cat([npe, pe]),
                        added_cond_kwargs=added).sample
    elif name.startswith("pixart"):
        alpha_pipe = name == "pixart-alpha"
        pe, pm, npe, npm = pipe.encode_prompt(PROMPTS, True, negative_prompt="", device=dev,
                                              clean_caption=False,
                                              max_sequence_length=120 if alpha_pipe else 300)
        added = {"resolution": None, "aspect_ratio": None}
        if alpha_pipe:  # PixArtAlphaPipeline's micro-conditions at 16x16 px
            added = {"resolution": torch.tensor([[16.0, 16.0]]).repeat(2 * b, 1),
                     "aspect_ratio": torch.tensor([[1.0]]).repeat(2 * b, 1)}
        out = pipe.transformer(two, encoder_hidden_states=torch.cat([npe, pe]),
                               encoder_attention_mask=torch.cat([npm, pm]), timestep=k,
                               added_cond_kwargs=added, return_dict=False)[0]
        out = out.chunk(2, dim=1)[0]  # learned sigma: keep the eps half
    elif name == "sd3":
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, device=dev,
                                                      do_classifier_free_guidance=True)
        out = pipe.transformer(hidden_states=two, timestep=(t * 1000).expand(2 * b),
                               encoder_hidden_states=torch.cat([npe, pe]),
                               pooled_projections=torch.cat([npooled, pooled])).sample
    elif name == "sana":
        import inspect

        chi = inspect.signature(type(pipe).__call__).parameters[
            "complex_human_instruction"].default
        pe, pm, npe, npm = pipe.encode_prompt(PROMPTS, True, negative_prompt="", device=dev,
                                              clean_caption=False, max_sequence_length=300,
                                              complex_human_instruction=chi)
        out = pipe.transformer(two, encoder_hidden_states=torch.cat([npe, pe]),
                               encoder_attention_mask=torch.cat([npm, pm]),
                               timestep=(t * 1000).expand(2 * b), return_dict=False)[0]
    elif name.startswith("flux"):
        h, wd = x.shape[2:]
        f = pipe.vae_scale_factor
        pe, pooled, text_ids = pipe.encode_prompt(PROMPTS, PROMPTS, device=dev,
                                                  max_sequence_length=16)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, wd // 2, dev, x.dtype)

        def flux(embeds, pooled_):
            g = torch.full([1], w, dtype=torch.float32).expand(b) if name == "flux" else None
            o = pipe.transformer(hidden_states=pack(x), timestep=(t * 1000).expand(b) / 1000,
                                 guidance=g, pooled_projections=pooled_, txt_ids=text_ids,
                                 encoder_hidden_states=embeds, img_ids=img_ids,
                                 return_dict=False)[0]
            return pipe._unpack_latents(o, h * f, wd * f, f)

        if name == "flux":  # guidance-distilled: one call with the guidance embedded
            return x - sigma * flux(pe, pooled)
        npe, npooled, _ = pipe.encode_prompt([""] * b, [""] * b, device=dev,
                                             max_sequence_length=16)
        # FluxPipeline's true CFG (true_cfg_scale with a negative prompt)
        out = torch.cat([flux(npe, npooled), flux(pe, pooled)])
    uncond, cond = out.chunk(2)
    guided = uncond + w * (cond - uncond)
    pred = teacher.denoiser.prediction_type
    if pred == "epsilon":
        return (x - sigma * guided) / alpha
    if pred == "v_prediction":
        return alpha * x - sigma * guided
    if pred == "sample":
        return guided
    return x - sigma * guided  # flow: velocity eps - x0


@pytest.mark.parametrize("name", list(CASES))
def test_guided_x0_matches_pipeline_cfg(name):
    pipe, teacher = build(name)
    x = _noise(teacher, seed=1)
    t = torch.tensor(500 / 999 if name in VP else 0.6)
    w = 3.0
    with torch.no_grad():
        ours = teacher.denoiser(x, t, teacher.prompts(PROMPTS), guidance=w)
        ref = _hand_guided_x0(name, pipe, teacher, x, t, w)
        unguided = teacher.denoiser(x, t, teacher.prompts(PROMPTS), guidance=1.0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, unguided), "guidance had no effect"


def test_flux_guidance_is_embedded_not_cfg():
    _, teacher = build("flux")
    assert teacher.denoiser.embedded_guidance and teacher.denoiser.uncond is None
    calls = []
    hook = teacher.backbone.register_forward_hook(lambda m, a, k: calls.append(1))
    try:
        with torch.no_grad():
            teacher.denoiser(_noise(teacher), 0.5, teacher.prompts(PROMPTS), guidance=4.0)
    finally:
        hook.remove()
    assert len(calls) == 1  # one pass, no unconditional branch


# -- sampling and the prompt cache ----------------------------------------------------------
def _count_encoded(pipe):
    """Hooks that count how many prompts (rows) each text encoder encodes."""
    counts, hooks = {}, []
    for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        enc = getattr(pipe, attr, None)
        if enc is None:
            continue
        counts[attr] = 0

        def hook(module, args, kwargs, _attr=attr):
            ids = args[0] if args else kwargs.get("input_ids")
            counts[_attr] += ids.shape[0]

        hooks.append(enc.register_forward_pre_hook(hook, with_kwargs=True))
    return counts, hooks


@pytest.mark.parametrize("name", list(CASES))
def test_sample_runs_and_prompts_are_encoded_once(name):
    pipe, teacher = build(name)
    prompts = ["a green triangle", "one cat", "a green triangle"]
    counts, hooks = _count_encoded(pipe)
    try:
        x = teacher.sample(prompts, steps=2, generator=torch.Generator().manual_seed(0))
        assert x.shape == (3,) + teacher.latent_shape and torch.isfinite(x).all()
        assert all(n == 2 for n in counts.values()), counts  # two distinct prompts
        teacher.sample(prompts[:2], steps=2)
        assert all(n == 2 for n in counts.values()), counts  # nothing encoded again
    finally:
        for h in hooks:
            h.remove()
    images = teacher.decode(x[:1])
    assert images.shape[:2] == (1, 3) and images.abs().max() <= 1
    assert teacher.encode_images(images).shape == (1,) + teacher.latent_shape


def test_families_table_names_every_family():
    assert {"sd", "sdxl", "sd3", "flux", "pixart", "sana"} <= set(FAMILIES.values())
    for name in CASES:
        family = "pixart_alpha" if name == "pixart-alpha" else name.split("-")[0]
        assert build(name)[1].family == family


# -- loading from folders ---------------------------------------------------------------------
def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_teacher(str(tmp_path))
    msg = str(err.value)
    assert "model_index.json" in msg and "unet" in msg and "StableDiffusionPipeline" in msg


def test_folder_with_unsupported_pipeline(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    with pytest.raises(ValueError) as err:
        load_teacher(str(tmp_path))
    msg = str(err.value)
    assert "DiTPipeline" in msg
    for supported in ("StableDiffusionPipeline", "FluxPipeline", "SanaPipeline"):
        assert supported in msg


def test_unsupported_pipeline_object():
    class MyPipeline:
        pass

    with pytest.raises(ValueError, match="MyPipeline is not supported.*custom_teacher"):
        teacher_from_pipeline(MyPipeline())


def test_missing_path_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher("./no/such/teacher")


@pytest.mark.parametrize("name", ["sd-epsilon", "sd3", "sdxl", "flux", "pixart", "sana"])
def test_save_and_load_round_trip(name, tmp_path):
    pipe, teacher = build(name)
    pipe.save_pretrained(tmp_path)
    loaded = load_teacher(str(tmp_path), **CASES[name][1])
    assert loaded.family == teacher.family and loaded.path == str(tmp_path)
    assert loaded.latent_shape == teacher.latent_shape
    x = _noise(teacher, seed=2)
    with torch.no_grad():
        a = teacher.denoiser(x, 0.7, teacher.prompts(PROMPTS))
        b = loaded.denoiser(x, 0.7, loaded.prompts(PROMPTS))
    torch.testing.assert_close(a, b)


# -- a LoRA student trains on every family ----------------------------------------------------
@pytest.mark.parametrize("name", ["sd-epsilon", "sdxl", "sd3", "flux", "pixart", "sana"])
def test_lora_student_on_every_family(name):
    from diffusion_distill.student import Nets, SharedBaseRoles

    builder, kwargs = CASES[name]
    teacher = load_teacher(builder(), **kwargs)  # fresh: adapters change the backbone
    roles = SharedBaseRoles(teacher.backbone, roles=("student",), rank=2, ema=False)
    nets = Nets(teacher, roles)
    x, cond = _noise(teacher), teacher.prompts(PROMPTS)
    with torch.no_grad():
        x0_teacher = nets.teacher(x, 0.5, cond, guidance=1.0)
    x0_student = nets.student(x, 0.5, cond)
    # LoRA starts as a no-op, so the student starts as the (unguided) teacher
    torch.testing.assert_close(x0_student, x0_teacher, rtol=1e-4, atol=1e-5)
    x0_student.square().mean().backward(inputs=nets.params("student"))
    grads = [p.grad for p in nets.params("student") if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
