"""Pieces the consistency-family tests share (tests/test_consistency.py, tests/test_scm.py):
the toy's EDM-preconditioned MLP, a quick denoising fit to the exact teacher, and the check
that plain diffusers reproduces an export."""
import torch

from diffusion_distill.student import generate
from diffusion_distill.world.toy2d import MLPDenoiser


class EDMMLP(torch.nn.Module):
    """The toy MLP behind EDM's preconditioning, ``x0 = c_skip x_t + c_out F(c_in x_t, t)``
    written with alpha, sigma so it is finite at t = 0 and at flow's t = 1 (ECT's network:
    its error at small noise shrinks with the noise, which its 1/s^2 weighting assumes). With
    ``sigma_data`` the data's it is sCM's TrigFlow parameterisation ``f = cos(s) x - sin(s) sd F``
    (``x0 -> x_t / alpha`` as sigma -> 0: the boundary condition)."""

    def __init__(self, schedule, sigma_data=1.4, max_frequency=100.0):
        super().__init__()
        self.schedule, self.sd = schedule, sigma_data
        self.mlp = MLPDenoiser(max_frequency=max_frequency)

    def forward(self, x_t, t, cond=None):
        alpha, sigma = (v[:, None] for v in self.schedule.alpha_sigma(t))
        norm = sigma ** 2 + (alpha * self.sd) ** 2
        angles = t[:, None] * self.mlp.freqs[None]
        out = self.mlp.net(torch.cat([x_t / norm.sqrt(), angles.sin(), angles.cos()], 1))
        return self.sd ** 2 * alpha / norm * x_t + sigma * self.sd / norm.sqrt() * out


def fit_to_teacher(nets, teacher, steps):
    net = nets.roles.networks["student"]
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x0 = teacher.denoiser.backbone.fn.sample(256, generator=g)
        t = torch.rand(256, generator=g)
        alpha, sigma = teacher.schedule.alpha_sigma(t)
        x_t = alpha[:, None] * x0 + sigma[:, None] * torch.randn(256, 2, generator=g)
        with torch.no_grad():
            target = nets.teacher(x_t, t, teacher.prompts([""] * 256))
        loss = ((net(x_t, t) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def reproduces_through_diffusers(export, config, nets, objective, steps, flow):
    """The toolkit's own samples at each step count equal a fresh pipeline with the export's
    LoRA and scheduler, and load_student's; the teacher through the same sampler differs (the
    LoRA is really there). Returns the last plain pipeline."""
    from diffusion_distill.student_pipeline import load_student

    prompts, seeds = ["a red circle", "two green triangles"], (11, 12)
    student = load_student(export)
    for n in steps:
        sampler = objective.sampler(n)
        ours = generate(nets, prompts, sampler, [torch.Generator().manual_seed(s) for s in seeds])
        theirs, pipe = _plain_diffusers(export, config, n, prompts, seeds, flow)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
        loaded = student(prompts, num_inference_steps=n, output_type="latent",
                         generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        torch.testing.assert_close(loaded, ours, rtol=1e-4, atol=1e-4)
        base = generate(nets, prompts, sampler, [torch.Generator().manual_seed(s) for s in seeds],
                        role="teacher")
        assert not torch.allclose(base, ours, atol=1e-4)
    return pipe


def _plain_diffusers(export, config, n, prompts, seeds, flow):
    import diffusers

    from diffusion_distill.samplers import seeded_global_rng
    from diffusion_distill.teachers import load_pipeline

    # DiffusionPipeline.from_pretrained, passing the tiny SD3's absent T5 as None again
    pipe = load_pipeline(config["teacher"]["pretrained"])
    pipe.load_lora_weights(export)
    pipe.scheduler = getattr(diffusers, config["scheduler"]["class"]).from_config(
        config["scheduler"]["config"])
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with seeded_global_rng(gens if flow else None):
        return pipe(prompts, generator=gens, output_type="latent",
                    **config["steps"][str(n)]["call"]).images, pipe


def few_step_learning(teacher_path, out_dir, method, steps, lr, batch_size, num_steps, target,
                      n=128):
    """Train ``method`` on an embedded diffusers teacher (rank-4 LoRA, world images) and score
    the student's few-step latents before and after, as energy distances to ``target``: the
    VAE-encoded world images (``"data"``: what consistency training moves toward) or the
    teacher's own 50-step latents at the recipe's CFG 3 (``"teacher"``: what distillation
    moves toward), on ``n`` world prompts, fixed noise. Returns ``({steps: (before, after)},
    floor)``, ``floor`` the teacher's own 50-step latents' distance to the target (unguided,
    as ECT's student is sampled; 0 for ``"teacher"``): no student of this teacher gets below
    it, so "the way" is from the start to it."""
    from conftest import tiny_recipe

    from diffusion_distill.build import setup_run
    from diffusion_distill.recipe import load_recipe
    from diffusion_distill.train import train
    from diffusion_distill.world.data import ShapesWorld
    from diffusion_distill.world.toy2d import energy_distance

    recipe = tiny_recipe(teacher_path, out_dir, method=method, steps=steps, lr=lr,
                         checkpoint_every=steps, batch_size=batch_size)
    recipe["data"] = {"source": "world", "resolution": 32}
    recipe["student"]["num_steps"] = num_steps[0]
    recipe["output"]["export"] = False
    teacher, objective, initial = setup_run(load_recipe(recipe), "cpu")
    images, captions, _ = ShapesWorld(resolution=32).batch(n, seed=12345)
    prompts = list(captions)
    noise = torch.randn(n, *teacher.latent_shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        def teacher_latents(guidance):
            return torch.cat([teacher.sample(prompts[i:i + 32], guidance=guidance,
                                             noise=noise[i:i + 32])
                              for i in range(0, n, 32)]).flatten(1)

        if target == "data":
            reference = torch.cat([teacher.encode_images(images[i:i + 32])
                                   for i in range(0, n, 32)]).flatten(1)
            floor = float(energy_distance(teacher_latents(1.0), reference))
        else:
            reference, floor = teacher_latents(recipe["teacher"]["guidance"]), 0.0

    def distance(nets, k):
        x = generate(nets, prompts, objective.sampler(k), torch.Generator().manual_seed(3))
        return float(energy_distance(x.flatten(1), reference))

    before = {k: distance(initial, k) for k in num_steps}
    _, nets = train(load_recipe(recipe), progress=False, return_nets=True)
    return {k: (before[k], distance(nets, k)) for k in num_steps}, floor
