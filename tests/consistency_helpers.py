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
