"""Distribution matching distillation: DMD, DMD2, Decoupled DMD, Phased DMD.

Notation: the student G maps noise to ``x0``; it is re-noised to ``x_t = alpha_t x0 +
sigma_t eps``; the teacher ("real score") and the critic ("fake score", trained on the
student's own samples) both predict x0 there. With scores s(x_t) = (alpha_t x0_hat - x_t) /
sigma_t^2, the gradient of KL(p_fake || p_real) with respect to x0 points along

    x0_fake - x0_real                                                   (DMD, eq. 7)

scaled per sample by 1 / mean|x0 - x0_real| (DMD's normaliser, which makes the step size
independent of t and of the image scale). The generator loss is the usual surrogate
``0.5 * ||x0 - sg(x0 - grad)||^2`` whose gradient with respect to x0 is exactly ``grad``.

* DMD (Yin et al. 2024): the above, guided teacher, unguided critic, one critic step per
  student step.
* DMD2 (Yin et al. 2024b): two time-scale update rule (``critic_steps`` critic updates per
  student update), an optional GAN head on the critic's bottleneck features trained against
  real data, and backward simulation for multi-step students: the student's input at step k is
  produced by running the student itself for k steps, as at inference.
* Decoupled DMD (Liu et al. 2025): with a guided teacher the DMD direction splits as
  ``(x0_fake - x0_cond) - (w - 1)(x0_cond - x0_uncond)``: distribution matching (DM) plus
  "CFG augmentation" (CA). Each term gets its own weight and its own re-noising times; by
  default the CA term is re-noised only above the time the student generated from, the DM
  term anywhere.
* Phased DMD (Fan et al. 2025): the time axis is split into phases [t_{k+1}, t_k]; a LoRA expert
  per phase maps x_{t_k} to a sample at t_{k+1}; phases are trained one after another, and
  the critic learns the score of the noisy intermediate distribution by score matching within
  the subinterval (its x0 target is derived from x_{t_{k+1}}, not from an unknown x0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..denoiser import ddim_step
from ..samplers import StudentSampler
from . import (
    Objective,
    RoleSettings,
    flag,
    integer,
    number,
    recipe_student_steps,
    table,
    text,
    time_range_problems,
)
from .common import (
    GANHead,
    bcast,
    critic_denoising_loss,
    dm_direction,
    mean_per_sample,
    native_mse,
    renoise,
    student_output_at_step,
    surrogate_loss,
    uniform_t,
)


class DMD2(Objective):
    """DMD2 (and, with ``critic_steps=1, gan_weight=0``, the original DMD without regression).

    Args:
        critic_steps: critic updates per student update (TTUR; DMD2 uses 5).
        t_min, t_max: range of the re-noising time for both losses (DMD2: 0.02-0.98).
        guidance: the teacher's CFG scale in the real score (None: the recipe's teacher.guidance).
        gan_weight: weight of the generator's GAN term (0 disables the GAN head and real data).
        gan_critic_weight: weight of the discriminator loss in the critic's loss.
        student_steps, student_times: the student's step count and the recipe's explicit
            times (None: evenly spaced, ``default_times``).
        backward_simulation: for multi-step students, make the student's input by running the
            student itself (DMD2 sec. 4.5) rather than noising real data.
        regression_weight: weight of DMD's regression loss (DMD sec. 3.3; the paper uses
            0.25): the 1-step student's output from noise z pulled toward the teacher's
            deterministic ``regression_steps``-step sample from the same z (CFG: the real
            score's scale), made once per run and cached in the run folder
            (:mod:`~diffusion_distill.teacher_pairs`). 0 (default) leaves DMD2 as it was.
            The distance is the mean squared error in the teacher's latent space: no
            perceptual network ships here (LPIPS weights cannot be fetched), and the world's
            EfficientNet features are the evaluation's own feature space, which a loss must
            not optimise directly, or FD would flatter the student.
        regression_pairs: how many pairs to make (each student step draws a batch of them).
    """

    name = "dmd2"

    roles = ("student", "critic")
    options = table(
        critic_steps=integer(1), t_min=number(0, 1), t_max=number(0, 1),
        # the teacher's CFG scale: as teacher.guidance, never negative
        guidance=number(0, none=True), gan_weight=number(0),
        gan_critic_weight=number(0), gan_feature_module=text(),
        backward_simulation=flag(), regression_weight=number(0), regression_pairs=integer(1),
        regression_steps=integer(1),
    )

    @classmethod
    def plan(cls, o, recipe):
        yield from time_range_problems(o)
        steps = recipe_student_steps(recipe)
        if o.get("regression_weight", 0) > 0 and steps != 1:
            why = (f"0 with a {steps}-step student (the regression pulls a 1-step student's "
                   "output toward the teacher's; set student.num_steps=1 or regression_weight=0)")
            yield "regression_weight", o["regression_weight"], why

    def __init__(self, critic_steps: int = 5, t_min: float = 0.02, t_max: float = 0.98,
                 guidance: float | None = None, gan_weight: float = 0.0,
                 gan_critic_weight: float = 0.01, gan_feature_module: str | None = None,
                 student_times: list[float] | None = None, backward_simulation: bool = True,
                 regression_weight: float = 0.0, regression_pairs: int = 256,
                 regression_steps: int = 50, total_steps: int | None = None,
                 student_steps: int = 1):
        if critic_steps < 1:
            raise ValueError(f"critic_steps must be >= 1, got {critic_steps}")
        if not regression_weight >= 0:
            raise ValueError(f"regression_weight must be >= 0 (0: off), got {regression_weight}")
        times = self.own_times(student_times, student_steps)
        if regression_weight > 0 and len(times) != 1:
            raise ValueError(
                f"regression_weight={regression_weight} pulls a 1-step student's output toward "
                f"the teacher's, but this student takes {len(times)} steps; set "
                "method.regression_weight=0 or student.num_steps=1")
        if regression_pairs < 1 or regression_steps < 1:
            raise ValueError(f"regression_pairs and regression_steps must be >= 1, got "
                             f"{regression_pairs}, {regression_steps}")
        if not 0 <= t_min < t_max <= 1:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        self.critic_steps = critic_steps
        self.t_min, self.t_max = t_min, t_max
        self.guidance = guidance
        self.gan_weight = gan_weight
        self.gan_critic_weight = gan_critic_weight
        self.gan_feature_module = gan_feature_module
        self.student_times = times
        self.backward_simulation = backward_simulation
        self.needs_data = gan_weight > 0
        self._features = None
        self.regression_weight = regression_weight
        self.regression_pairs, self.regression_steps = regression_pairs, regression_steps
        self.pairs = None

    # -- pieces -------------------------------------------------------------------------
    def setup(self, nets):
        if self.gan_weight > 0:
            self.head = GANHead.attach(nets, self.gan_feature_module)
            nets.add_extra("critic", "gan_head", self.head)

    def data_advice(self) -> str:
        return (f"{type(self).__name__}'s GAN term (method.gan_weight={self.gan_weight} > 0) "
                "trains on real images; set method.gan_weight=0 to train from prompts alone")

    def nonfinite_advice(self, role: str) -> str:
        advice = "lower train.lr (or train.lr_critic) or check the data"
        return advice + (", or lower method.gan_weight" if self.gan_weight > 0 else "")

    def prepare(self, nets, run):
        if self.regression_weight > 0:
            from ..teacher_pairs import load_or_make

            guidance = nets.guidance if self.guidance is None else self.guidance
            self.pairs = load_or_make(run.run_dir, nets.teacher_model, run.teacher_fingerprint,
                                      run.prompts, self.regression_pairs, self.regression_steps,
                                      guidance, run.seed)

    def regression_loss(self, nets, ctx, n: int) -> torch.Tensor:
        """DMD's regression term on ``n`` cached pairs: MSE between the student's 1-step
        output from z and the teacher's sample from z (see the class docstring)."""
        if self.pairs is None:
            raise RuntimeError("regression_weight > 0 but no teacher pairs: the training loop "
                               "calls objective.prepare(nets, run) before the first step")
        z, y, prompts = self.pairs.batch(ctx.rng, n)
        x0 = nets.student(z, self.student_times[0], nets.teacher_model.prompts(prompts))
        return F.mse_loss(x0, y)

    def student_step(self, ctx) -> bool:
        return ctx.step % self.critic_steps == 0

    def sample_t(self, ctx, n, lo=None, hi=None):
        return uniform_t(ctx, n, self.t_min if lo is None else lo,
                         self.t_max if hi is None else hi)

    def generate(self, nets, cond, ctx, grad: bool):
        """The student's sample x0 and the time it was generated from.

        A step index k is drawn per batch; the input at t_k comes from running the student
        for k steps from noise, re-noising its x0 with fresh noise between steps (the
        multi-step sampler the export uses).
        """
        times = self.student_times
        x0, k = student_output_at_step(
            nets, cond, times, ctx, grad,
            lambda: ctx.rng.choice(len(times)) if self.backward_simulation else 0)
        return x0, torch.full((len(cond),), times[k], device=x0.device)

    def noise(self, nets, x0, t, ctx):
        return renoise(nets.schedule, x0, t, ctx)

    # -- the step -----------------------------------------------------------------------
    def __call__(self, nets, batch, ctx):
        cond = batch["cond"]
        if self.student_step(ctx):
            x0, _ = self.generate(nets, cond, ctx, grad=True)
            grad = dm_direction(nets, x0, cond, self.sample_t(ctx, len(cond)), ctx,
                                guidance=self.guidance)
            loss = surrogate_loss(x0, grad)
            ctx.log(dm=loss)
            if self.gan_weight > 0:
                t = self.sample_t(ctx, x0.shape[0])
                g_loss = F.softplus(-self.head.logits(nets, self.noise(nets, x0, t, ctx), t,
                                                      cond)).mean()
                ctx.log(gan_g=g_loss)
                loss = loss + self.gan_weight * g_loss
            if self.regression_weight > 0:
                reg = self.regression_loss(nets, ctx, x0.shape[0])
                ctx.log(regression=reg)
                loss = loss + self.regression_weight * reg
            yield "student", loss
            fake = x0.detach()
        else:
            fake = self.generate(nets, cond, ctx, grad=False)[0]
        loss = critic_denoising_loss(nets, fake, cond, self.sample_t(ctx, len(cond)), ctx)
        ctx.log(critic_denoise=loss)
        if self.gan_weight > 0:
            t = self.sample_t(ctx, fake.shape[0])
            real_logits = self.head.logits(nets, self.noise(nets, batch["x0"], t, ctx), t, cond)
            fake_logits = self.head.logits(nets, self.noise(nets, fake, t, ctx), t, cond)
            d_loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
            ctx.log(gan_d=d_loss)
            loss = loss + self.gan_critic_weight * d_loss
        yield "critic", loss


class DMD(DMD2):
    """The original DMD: one critic step per student step; its regression loss on cached
    teacher pairs with ``regression_weight`` (the paper's 0.25; default 0: off)."""

    name = "dmd"
    options = table({k: DMD2.options[k] for k in ("t_min", "t_max", "guidance",
                                                   "regression_weight", "regression_pairs",
                                                   "regression_steps")})

    def __init__(self, t_min: float = 0.02, t_max: float = 0.98, guidance: float | None = None,
                 student_times: list[float] | None = None, regression_weight: float = 0.0,
                 regression_pairs: int = 256, regression_steps: int = 50,
                 total_steps: int | None = None, student_steps: int = 1):
        super().__init__(critic_steps=1, t_min=t_min, t_max=t_max, guidance=guidance,
                         student_times=student_times, student_steps=student_steps,
                         backward_simulation=False,
                         regression_weight=regression_weight, regression_pairs=regression_pairs,
                         regression_steps=regression_steps)


class DecoupledDMD(DMD2):
    """DMD with the CFG-augmentation (CA) and distribution-matching (DM) terms separated.

    Args:
        ca_weight, dm_weight: weights of the two terms (plain DMD is 1, 1 with ca scaled by w-1).
        ca_above_student_t: re-noise the CA term only at times above the student's generation
            time (the paper's decoupled schedule); the DM term uses [t_min, t_max].
    """

    name = "decoupled_dmd"
    options = table({k: v for k, v in DMD2.options.items()
                     if not k.startswith(("gan_", "regression_"))},
                    ca_weight=number(0), dm_weight=number(0), ca_above_student_t=flag())

    def __init__(self, ca_weight: float = 1.0, dm_weight: float = 1.0,
                 ca_above_student_t: bool = True, critic_steps: int = 5, t_min: float = 0.02,
                 t_max: float = 0.98, guidance: float | None = None,
                 student_times: list[float] | None = None, backward_simulation: bool = True,
                 total_steps: int | None = None, student_steps: int = 1):
        super().__init__(critic_steps=critic_steps, t_min=t_min, t_max=t_max, guidance=guidance,
                         student_times=student_times, student_steps=student_steps,
                         backward_simulation=backward_simulation)
        self.ca_weight, self.dm_weight = ca_weight, dm_weight
        self.ca_above_student_t = ca_above_student_t

    def direction(self, nets, x0, at_dm, at_ca, cond, w):
        """The student's update direction ``(grad, dm, ca)`` for its sample ``x0``: the DM term
        at ``at_dm = (x_t, t)``, the CA term at ``at_ca``, each normalised by its own mean
        distance to ``x0`` and weighted."""
        (x_dm, t_dm), (x_ca, t_ca) = at_dm, at_ca
        cond_dm = nets.teacher(x_dm, t_dm, cond, guidance=1.0)
        fake_dm = nets.critic(x_dm, t_dm, cond)
        guided = nets.teacher(x_ca, t_ca, cond, guidance=w)
        cond_ca = nets.teacher(x_ca, t_ca, cond, guidance=1.0)
        # guided - cond = (w - 1)(cond - uncond): the CA direction, already scaled by w - 1
        dm = fake_dm - cond_dm
        ca = -(guided - cond_ca)
        norm_dm = 1.0 / mean_per_sample((x0 - cond_dm).abs()).clamp_min(1e-6)
        norm_ca = 1.0 / mean_per_sample((x0 - guided).abs()).clamp_min(1e-6)
        grad = torch.nan_to_num(self.dm_weight * dm * bcast(norm_dm, x0)
                                + self.ca_weight * ca * bcast(norm_ca, x0))
        return grad, dm, ca

    def __call__(self, nets, batch, ctx):
        cond = batch["cond"]
        if not self.student_step(ctx):
            fake = self.generate(nets, cond, ctx, grad=False)[0]
            yield "critic", critic_denoising_loss(nets, fake, cond, self.sample_t(ctx, len(cond)),
                                                  ctx)
            return
        x0, t_gen = self.generate(nets, cond, ctx, grad=True)
        n = x0.shape[0]
        w = nets.guidance if self.guidance is None else self.guidance
        # DM term: conditional teacher vs critic, anywhere in [t_min, t_max].
        t_dm = self.sample_t(ctx, n)
        # CA term: its own times; above the generation time, where guidance shapes layout.
        # A student step from t_gen >= t_max (every 1-step student: t_gen = 1) has no time
        # above it in range; clamping there would put every CA evaluation at pure noise, where
        # the guided and conditional x0 differ by a constant push outward. Such samples use the
        # whole [t_min, t_max] instead.
        t_min = torch.full_like(t_gen, self.t_min)
        lo = torch.where(t_gen < self.t_max, torch.maximum(t_gen, t_min), t_min) \
            if self.ca_above_student_t else t_min
        t_ca = lo + (self.t_max - lo).clamp_min(0) * ctx.rng.rand(n)
        with torch.no_grad():
            x_dm = self.noise(nets, x0.detach(), t_dm, ctx)
            x_ca = self.noise(nets, x0.detach(), t_ca, ctx)
            grad, dm, ca = self.direction(nets, x0.detach(), (x_dm, t_dm), (x_ca, t_ca), cond, w)
        loss = surrogate_loss(x0, grad)
        ctx.log(dm_norm=mean_per_sample(dm.abs()).mean(), ca_norm=mean_per_sample(ca.abs()).mean())
        yield "student", loss
        yield "critic", critic_denoising_loss(nets, x0.detach(), cond,
                                              self.sample_t(ctx, n), ctx)


class PhasedDMD(DMD2):
    """Phased DMD: one LoRA expert per phase of the time axis, trained progressively.

    Phase k covers [b_{k+1}, b_k] of the boundaries ``b_0 = 1 > ... > b_K = 0`` (the student's
    sampling times plus 0). Expert k turns x_{b_k} into a sample at b_{k+1}: it predicts x0 and
    the result is re-noised to b_{k+1} with fresh noise. Training visits the phases in order,
    ``total_steps / K`` steps each; earlier experts only supply inputs to later ones.
    Within phase k the generated sample is noisy (level s = b_{k+1}), so both the DMD direction
    and the critic work at times tau in (s, t_max]: the critic fits the score of the diffused
    intermediate distribution with target

        x0* = (x_tau - sigma_tau^2 (x_tau - a x_s) / (sigma_tau^2 - a^2 sigma_s^2)) / alpha_tau,
        a = alpha_tau / alpha_s,

    i.e. denoising score matching from x_s, the subinterval form of the critic's loss.
    """

    name = "phased_dmd"
    options = table({k: DMD2.options[k] for k in ("critic_steps", "t_min", "t_max", "guidance")})

    @classmethod
    def plan(cls, o, recipe):
        yield from time_range_problems(o)
        phases, steps = recipe_student_steps(recipe), recipe["train"]["steps"]
        need = phases * o["critic_steps"]
        if steps < need:
            # phase k trains over steps/K steps, its expert on every critic_steps-th: fewer
            # than critic_steps steps in a phase can leave an expert never trained
            yield ("train.steps", steps,
                   (f"at least {need}: phased_dmd trains its {phases} experts one after another, "
                   f"train.steps / {phases} steps each, and an expert learns only on every "
                   f"method.critic_steps-th ({o['critic_steps']}) step, so each phase needs "
                   f"{o['critic_steps']} steps or more (far more to learn anything)"))

    def __init__(self, student_times: list[float] | None = None, critic_steps: int = 5,
                 t_min: float = 0.02, t_max: float = 0.98, guidance: float | None = None,
                 total_steps: int | None = None, student_steps: int = 1):
        super().__init__(critic_steps=critic_steps, t_min=t_min, t_max=t_max, guidance=guidance,
                         student_times=student_times, student_steps=student_steps,
                         backward_simulation=False)
        self.num_phases = len(self.student_times)
        self.total_steps = total_steps or 1
        self.roles = tuple(f"student_{k}" for k in range(self.num_phases)) + ("critic",)

    def role_settings(self, role):
        # Every expert is a student: the student learning rate; no EMA (one per run at most,
        # and an expert trains for only its phase).
        if role.startswith("student_"):
            return RoleSettings(lr="lr", ema=False)
        return super().role_settings(role)

    def sampler(self, num_steps=None):
        self._check_steps(num_steps)
        experts = [f"student_{k}" for k in range(self.num_phases)]
        return StudentSampler(self.student_times, adapters=experts,
                              export_names={e: f"expert_{k}" for k, e in enumerate(experts)})

    @property
    def boundaries(self) -> list[float]:
        # read from the times build_objective put on the teacher's grid
        return self.student_times + [0.0]

    def phase(self, step: int) -> int:
        return min(step * self.num_phases // self.total_steps, self.num_phases - 1)

    def generate_phase(self, nets, cond, ctx, k: int, grad: bool):
        """(x_s sample at the end of phase k with graph through expert k, x0 of expert k, s)."""
        shape = nets.teacher_model.latent_shape
        n = len(cond)
        b = self.boundaries
        x = ctx.rng.randn(n, *shape)
        with torch.no_grad():
            for i in range(k):
                x0 = nets.student(x, b[i], cond, role=f"student_{i}")
                x = ddim_step(nets.schedule, x0, x, b[i], b[i + 1], noise=ctx.rng.randn(n, *shape))
        with torch.set_grad_enabled(grad):
            x0 = nets.student(x, b[k], cond, role=f"student_{k}")
            s = b[k + 1]
            x_s = x0 if s == 0 else ddim_step(nets.schedule, x0, x, b[k], s,
                                              noise=ctx.rng.randn(n, *shape))
        return x_s, s

    def __call__(self, nets, batch, ctx):
        cond = batch["cond"]
        k = self.phase(ctx.step)
        ctx.log(phase=k)
        n = len(cond)
        sched = nets.schedule
        if self.student_step(ctx):
            x_s, s = self.generate_phase(nets, cond, ctx, k, grad=True)
            tau = self.sample_t(ctx, n, lo=max(s, self.t_min))
            grad = self._direction_from(nets, x_s, s, tau, cond, ctx)
            yield f"student_{k}", surrogate_loss(x_s, grad)
            x_s = x_s.detach()
        else:
            with torch.no_grad():
                x_s, s = self.generate_phase(nets, cond, ctx, k, grad=False)
        tau = self.sample_t(ctx, n, lo=max(s, self.t_min))
        x_tau, target = self._subinterval_pair(sched, x_s, s, tau, ctx)
        yield "critic", native_mse(nets, nets.critic(x_tau, tau, cond), target, x_tau, tau)

    def _subinterval_pair(self, sched, x_s, s, tau, ctx):
        """x_tau diffused from x_s, and the critic's x0 target for it (see class docstring)."""
        s_t = torch.full_like(tau, s)
        alpha_s, sigma_s = sched.alpha_sigma(s_t)
        alpha_t, sigma_t = sched.alpha_sigma(tau)
        a = alpha_t / alpha_s
        var = (sigma_t ** 2 - a ** 2 * sigma_s ** 2).clamp_min(1e-8)
        x_tau = bcast(a, x_s) * x_s + bcast(var.sqrt(), x_s) * ctx.rng.randn(*x_s.shape)
        target = (x_tau - bcast(sigma_t ** 2 / var, x_s) * (x_tau - bcast(a, x_s) * x_s)) \
            / bcast(alpha_t, x_s)
        return x_tau, target

    def _direction_from(self, nets, x_s, s, tau, cond, ctx):
        with torch.no_grad():
            x_tau, _ = self._subinterval_pair(nets.schedule, x_s.detach(), s, tau, ctx)
            real = nets.teacher(x_tau, tau, cond, guidance=self.guidance)
            fake = nets.critic(x_tau, tau, cond)
            alpha_s, _ = nets.schedule.alpha_sigma(torch.full_like(tau, s))
            # Scores differ by alpha_tau (x0_fake - x0_real) / sigma^2; carried back to x_s
            # through d x_tau / d x_s = alpha_tau / alpha_s, normalised per sample as in DMD.
            diff = (fake - real) * bcast(alpha_s, x_s)
            weight = 1.0 / mean_per_sample((x_s.detach() - bcast(alpha_s, x_s) * real).abs()
                                            ).clamp_min(1e-6)
            return torch.nan_to_num(diff * bcast(weight, x_s))
