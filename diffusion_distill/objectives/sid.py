"""Score identity distillation: SiD, SiD-LSG guidance, few-step SiD, SiDA.

Notation: the student G maps noise to ``x`` (its x0); ``x_t = alpha_t x + sigma_t eps`` with
t ~ U[t_min, t_max] (see "The re-noising range" below); the teacher ("real score") predicts
``y_r = f_phi(x_t)`` and the critic ("fake score", a LoRA adapter trained on the student's own
samples) predicts ``y_f``.

* SiD (Zhou et al., ICML 2024; mingyuanzhou/SiD, SiD-LSG ``sid_training_loop.py``): one
  iteration first updates the critic with its denoising loss on detached student samples, then
  the student minimises, per element,

      (y_r - y_f) * ((y_r - x) - alpha * (y_r - y_f)) / sg(mean|x - y_r|)

  (= (1 - alpha)||y_r - y_f||^2 + (y_r - y_f)^T (y_f - x), SiD eq. 9; the normaliser is a
  per-sample mean, clamped at 1e-5). Gradients reach the student through x and through x_t
  (both networks are differentiated with respect to their input, never their weights). With
  y_r, y_f held fixed the gradient with respect to x is -(y_r - y_f) / normaliser: descent
  moves x toward the teacher's x0 and away from the critic's, the same direction as DMD.
  alpha = 1.2 in the EDM checkpoints, 1.0 in the text-to-image scripts (our default).
* SiD-LSG (Zhou et al., ICLR 2025): separate CFG scales for the critic's own training
  (kappa1; 10 % of its prompts dropped to the empty prompt whenever a critic scale is not 1),
  the critic inside the generator loss (kappa2 for the scale, kappa3 = kappa2 in the
  released code: both are the critic's single guided x0 here), and the teacher (kappa4).
  Presets (``guidance``): ``lsg`` every kappa = the guidance scale (SiD-LSG's
  kappa1 = kappa2 = kappa3 = kappa4, e.g. 1.5 or 4.5); ``zero_cfg`` (few-step SiD):
  the teacher unguided, the critic without text (kappa1..3 = 0, kappa4 = 1); ``anti_cfg``:
  negative CFG in the critic inside the generator loss (kappa2 = kappa3 = -1; that value is
  ours, the paper's abstract gives none), teacher and critic training unguided; ``teacher_cfg``:
  DMD's choice, only the teacher guided; ``none``: no guidance anywhere (plain SiD). Explicit
  ``kappa1..kappa4`` override a preset. The student's generation time is fixed
  (``t_init``, SiD-LSG: step 625 of 1000 for SD), not the usual 999.
* Few-step SiD (Zhou, Gu, Wang 2025): one generator for K steps, matched as the uniform
  mixture of the outputs of all its generation steps: a step index k is drawn per batch, the
  sampler is rolled out to step k without gradients, and step k's x0 is the sample both the
  critic and the generator loss see. The rollout re-noises with fresh noise between steps
  (SiD-LSG's sampler and the exported LCMScheduler alike). Every step's output is a component
  of the matched mixture, so one K-step student also samples with k < K steps: the first k
  of its times, stopping at step k's x0 (the export lists 1..K).
* SiDA (Zhou et al., ICLR 2025): a GAN term on the critic's features against real data; the
  discriminator head (``common.GANHead``) trains with the critic, the student adds
  ``gan_weight * softplus(-logit)`` at its re-noised samples.

The re-noising range. SiD-LSG draws t in DDPM steps 20..980 of SD1.5's scaled-linear
schedule: noise levels sigma/alpha 0.138..13.0. Unset, ``t_min`` / ``t_max`` are the times at
which the teacher's own schedule reaches those two noise levels (SD1.5 and its kin: 0.02 and
0.98; rectified flow: 0.121 and 0.928; DDPM's linear betas: 0.038 and 0.711); a number is a
time on the schedule's own [0, 1] axis, as given. The same fractions on another schedule
reach other noise: on flow t = 0.02 is sigma/alpha 0.02, 7x below SiD-LSG's floor, where the
per-sample normaliser ``mean|x - y_r|`` (about sigma there) divides a critic error that need
not shrink with the noise (a network without EDM / eps / velocity preconditioning), and on
DDPM's linear betas t = 0.98 is 130, pure noise for 29% of the draws, where a guided
teacher's x0 is ``w`` times the label's mean (docs/sid.md, issue 28).

Two departures from the public code, both so that an exported LoRA samples in plain diffusers
exactly as in training: the student's first input is unit noise evaluated at ``t_init`` (what
the pipeline and LCMScheduler do), where SiD-LSG feeds ``sigma(t_init) * z``; and the critic
and the student are updated in alternate loop steps (``critic_steps`` critic-only steps, then
one student-only step), because the loop steps all optimizers after the objective has run,
so only alternation puts each student update after the critic update it follows in SiD.

Non-finite samples (SiD's code filters them by a NaN mask and applies ``nan_to_num`` to the
gradients) are masked per sample here, counted (``nonfinite`` in the logs), and the grads of
a batch that had any are passed through ``nan_to_num``; a batch with no finite sample yields no
loss, and ``max_nonfinite_steps`` such batches in a row raise :class:`NonFiniteBatchError`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..denoiser import Cond
from ..parameterization import from_x0
from ..samplers import StudentSampler
from ..schedules import VPSchedule, student_timesteps
from ..step import NonFiniteLossError
from . import Objective, Option, integer, number, table, text, time_range_problems
from .common import (
    GANHead,
    bcast,
    mean_per_sample,
    renoise,
    student_output_at_step,
    time_of_edm_sigma,
    uniform_t,
)

GUIDANCE_PRESETS = ("lsg", "zero_cfg", "anti_cfg", "teacher_cfg", "none")


def _sid_lsg_noise() -> tuple[float, float]:
    """sigma/alpha at SiD-LSG's re-noising ends, DDPM steps 20 and 980 (t = 0.02, 0.98 on the
    toolkit's axis) of SD1.5's scaled-linear schedule (betas 0.00085..0.012, 1000 steps), from
    the same float32 table diffusers builds, so that on SD1.5 the range is 0.02, 0.98 exactly."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    sd15 = VPSchedule(torch.cumprod(1 - betas, 0))
    t = torch.tensor([0.02, 0.98], dtype=torch.float64)
    alpha, sigma = sd15.alpha_sigma(t)
    return tuple((sigma / alpha).tolist())


SID_LSG_NOISE = _sid_lsg_noise()  # (0.138, 13.0)


class NonFiniteBatchError(NonFiniteLossError):
    """Every sample of a batch was non-finite for ``max_nonfinite_steps`` steps in a row."""


def guidance_scales(preset: str, w: float, anti: float = -1.0) -> dict[str, float]:
    """kappa1 (critic training), kappa2 = kappa3 (critic in the generator loss), kappa4
    (teacher) of a named guidance strategy, with ``w`` the guidance scale."""
    if preset == "lsg":
        return {"kappa1": w, "kappa2": w, "kappa3": w, "kappa4": w}
    if preset == "zero_cfg":
        return {"kappa1": 0.0, "kappa2": 0.0, "kappa3": 0.0, "kappa4": 1.0}
    if preset == "anti_cfg":
        return {"kappa1": 1.0, "kappa2": anti, "kappa3": anti, "kappa4": 1.0}
    if preset == "teacher_cfg":
        return {"kappa1": 1.0, "kappa2": 1.0, "kappa3": 1.0, "kappa4": w}
    if preset == "none":
        return {"kappa1": 1.0, "kappa2": 1.0, "kappa3": 1.0, "kappa4": 1.0}
    raise ValueError(f"method.guidance {preset!r} is not a guidance strategy; pick one of "
                     f"{', '.join(GUIDANCE_PRESETS)} (and set kappa1..kappa4 to override any "
                     "scale).")


class SiD(Objective):
    """Score identity distillation (data-free), with SiD-LSG guidance and few-step students.

    Args:
        alpha: the SiD loss's alpha (1.0 text-to-image, 1.2 EDM).
        t_min, t_max: re-noising times for both losses, on the schedule's own [0, 1] axis
            (None: where the teacher's schedule reaches SiD-LSG's noise levels, DDPM steps
            20 and 980 of SD1.5; see the module docstring).
        t_init: the student's (first) generation time in (0, 1], e.g. 0.6256 (= DDPM step
            625 of 0..999, SiD-LSG's SD setting). K-step students then generate at
            ``t_init * (1 - i / K)`` (SiD-LSG's sampler). None: the recipe's student times.
        guidance: a strategy name (see the module docstring) or a number (``lsg`` at that
            scale).
        guidance_scale: the scale of ``lsg`` / ``teacher_cfg`` (None: teacher.guidance).
        kappa1, kappa2, kappa3, kappa4: explicit scales overriding the preset (kappa3 must
            equal kappa2: the critic's guided x0 is computed once).
        anti_scale: the critic's scale (kappa2 = kappa3) under ``anti_cfg``.
        prompt_drop: fraction of critic-training prompts set to the empty prompt (None: 0.1
            whenever a critic scale is not 1, as SiD-LSG; 0 otherwise).
        critic_steps: critic-only loop steps before each student-only step (SiD: 1).
        max_nonfinite_steps: consecutive all-non-finite batches that stop the run.
        student_steps, student_times: the student's step count and the recipe's explicit
            times (None: ``default_times``).
    """

    name = "sid"
    roles = ("student", "critic")
    options = table(
        alpha=number(0), t_min=number(0, 1, none=True), t_max=number(0, 1, none=True),
        t_init=number(0, 1, lo_open=True, none=True),
        guidance=Option(lambda v: v in GUIDANCE_PRESETS if isinstance(v, str) else
                        number(0).test(v),
                        f"a strategy ({', '.join(GUIDANCE_PRESETS)}) or a CFG scale >= 0"),
        guidance_scale=number(0, none=True),
        # kappa2 = kappa3 is the critic's scale inside the generator loss: negative is
        # anti-CFG there (the anti_cfg preset); the teacher's and the critic's own training
        # scales are CFG scales, never negative
        kappa1=number(0, none=True), kappa2=number(none=True),
        kappa3=number(none=True), kappa4=number(0, none=True),
        anti_scale=number(hi=0), prompt_drop=number(0, 1, hi_open=True, none=True),
        critic_steps=integer(1), max_nonfinite_steps=integer(1),
    )

    @classmethod
    def plan(cls, o, recipe):
        if o["t_min"] is not None and o["t_max"] is not None:
            yield from time_range_problems(o)
        given = recipe["student"].get("timesteps")
        if given and o["t_init"] is not None:
            # t_init spaces the student's times below it: two answers to one question
            yield ("student.timesteps", given,
                   (f"null when method.t_init is set ({o['t_init']}): t_init places the "
                    f"{len(given)} times evenly below it; drop one of the two"))
        if o["kappa2"] is not None and o["kappa3"] is not None and o["kappa2"] != o["kappa3"]:
            yield ("kappa3", o["kappa3"], (f"equal to method.kappa2 ({o['kappa2']}): the "
                   "critic's guided x0 in the generator loss is computed once"))

    def __init__(self, alpha: float = 1.0, t_min: float | None = None,
                 t_max: float | None = None, t_init: float | None = None,
                 guidance: str | float = "lsg", guidance_scale: float | None = None,
                 kappa1: float | None = None, kappa2: float | None = None,
                 kappa3: float | None = None, kappa4: float | None = None,
                 anti_scale: float = -1.0,
                 prompt_drop: float | None = None, critic_steps: int = 1,
                 max_nonfinite_steps: int = 3, student_times: list[float] | None = None,
                 total_steps: int | None = None, student_steps: int = 1):
        for name, v in (("t_min", t_min), ("t_max", t_max)):
            if v is not None and not 0 <= v <= 1:
                raise ValueError(f"{name} must lie in [0, 1] (a time on the schedule's axis), "
                                 f"got {v}; or None for SiD-LSG's noise level")
        if t_min is not None and t_max is not None and not t_min < t_max:
            raise ValueError(f"need t_min < t_max, got {t_min}, {t_max}")
        if critic_steps < 1:
            raise ValueError(f"critic_steps must be >= 1, got {critic_steps}")
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        if t_init is not None and not 0 < t_init <= 1:
            raise ValueError(f"t_init must lie in (0, 1] (1 = pure noise; SiD-LSG's SD setting "
                             f"is 0.6256, DDPM step 625), got {t_init}")
        if isinstance(guidance, (int, float)) and not isinstance(guidance, bool):
            guidance_scale, guidance = float(guidance), "lsg"
        guidance_scales(guidance, 1.0)  # a bad name fails at build time
        if kappa2 is not None and kappa3 is not None and kappa2 != kappa3:
            raise ValueError(f"kappa3 ({kappa3}) must equal kappa2 ({kappa2}): the critic's "
                             "guided x0 inside the generator loss is computed once (as in "
                             "SiD-LSG's code, where both are cfg_eval_fake)")
        if prompt_drop is not None and not 0 <= prompt_drop < 1:
            raise ValueError(f"prompt_drop must lie in [0, 1), got {prompt_drop}")
        self.alpha = alpha
        self.t_min, self.t_max = t_min, t_max
        self.t_range: tuple[float, float] | None = None  # resolved on the teacher's schedule
        self.t_init = t_init
        self.guidance, self.guidance_scale = guidance, guidance_scale
        self.anti_scale = anti_scale
        self.overrides = {k: v for k, v in {"kappa1": kappa1, "kappa2": kappa2,
                                            "kappa3": kappa3 if kappa3 is not None else kappa2,
                                            "kappa4": kappa4}.items() if v is not None}
        if "kappa3" in self.overrides and "kappa2" not in self.overrides:
            self.overrides["kappa2"] = self.overrides["kappa3"]
        self.prompt_drop = prompt_drop
        self.critic_steps = critic_steps
        self.max_nonfinite_steps = max_nonfinite_steps
        if student_times and t_init is not None:  # as plan says at recipe load
            raise ValueError(f"student_times {student_times} and t_init {t_init} both set: "
                             f"t_init places the {len(student_times)} times evenly below it; "
                             "drop one of the two")
        self.student_times = self.own_times(student_times, student_steps)
        self._bad_streak = {"student": 0, "critic": 0}

    # -- pieces -------------------------------------------------------------------------
    def default_times(self, num_steps):
        # SiD-LSG's sampler: evenly spaced below t_init (explicit times are refused with it)
        return student_timesteps(num_steps, t_max=1.0 if self.t_init is None else self.t_init)

    def scales(self, nets) -> dict[str, float]:
        """The four guidance scales of this run (the preset, then explicit overrides)."""
        w = nets.guidance if self.guidance_scale is None else self.guidance_scale
        w = 1.0 if w is None else float(w)
        kappas = guidance_scales(self.guidance, w, self.anti_scale)
        kappas.update(self.overrides)
        return kappas

    def student_step(self, ctx) -> bool:
        return ctx.step % (self.critic_steps + 1) == self.critic_steps

    def servable_steps(self) -> list[int]:
        """1..K: stopping after step k yields step k's output, a component of the mixture the
        student was trained on (few-step SiD), so one K-step student serves every k <= K."""
        return list(range(1, len(self.student_times) + 1))

    def sampler(self, num_steps=None):
        self._check_steps(num_steps)
        times = self.student_times
        return StudentSampler(times[:num_steps or len(times)])

    def resolve_t_range(self, schedule) -> tuple[float, float]:
        """``(t_min, t_max)`` on ``schedule``: the given times, and for each unset one the time
        at which the schedule reaches SiD-LSG's noise level (module docstring)."""
        # rounded: the bisection's last bits are not a time anyone chose (SD1.5: 0.02, 0.98)
        ends = [v if v is not None else round(float(time_of_edm_sigma(
                    schedule, torch.tensor(level, dtype=torch.float64), iters=60)), 9)
                for v, level in zip((self.t_min, self.t_max), SID_LSG_NOISE)]
        if not ends[0] < ends[1]:
            raise ValueError(f"method.t_min {ends[0]:.4f} is not below method.t_max "
                             f"{ends[1]:.4f} on this teacher's schedule (an unset end is where "
                             "the schedule reaches SiD-LSG's noise level); set both, t_min < "
                             "t_max")
        return ends[0], ends[1]

    def setup(self, nets):
        super().setup(nets)
        self.t_range = self.resolve_t_range(nets.schedule)

    def sample_t(self, ctx, n):
        if self.t_range is None:
            raise RuntimeError("SiD.sample_t before setup(nets): the re-noising range is "
                               "resolved on the teacher's schedule there")
        return uniform_t(ctx, n, *self.t_range)

    def generate(self, nets, cond, ctx, grad: bool):
        """A sample of the uniform mixture of the student's step outputs (few-step SiD).

        Step k is drawn per batch; steps before it run without gradients, re-noising each
        x0 with fresh noise as the exported sampler does."""
        times = self.student_times
        return student_output_at_step(
            nets, cond, times, ctx, grad,
            lambda: ctx.rng.choice(len(times)) if len(times) > 1 else 0)

    def guided_x0(self, nets, role, x_t, t, cond, kappa):
        """``role``'s x0 at CFG scale ``kappa`` (0: the unconditional pass alone)."""
        uncond = nets.teacher_model.denoiser.uncond
        if kappa == 0 and uncond is not None:
            return nets.x0(role, x_t, t, uncond.expand(x_t.shape[0]), guidance=1.0)
        if role == "teacher":
            return nets.teacher(x_t, t, cond, guidance=kappa)
        return nets.x0(role, x_t, t, cond, guidance=kappa)

    def drop_prompts(self, nets, cond, ctx, kappas):
        """SiD-LSG: the critic sees the empty prompt for a fraction of its training samples
        whenever it is guided, so that its unconditional branch learns the student too."""
        p = self.prompt_drop
        if p is None:
            p = 0.1 if (kappas["kappa1"] != 1 or kappas["kappa2"] != 1) else 0.0
        if p == 0 or kappas["kappa1"] == 0 or not cond.tensors:
            return cond
        drop = ctx.rng.rand(len(cond)) < p
        uncond = nets.teacher_model.denoiser.uncond
        if uncond is None:
            raise ValueError("prompt dropout for a guided critic needs the teacher's empty "
                             "prompt; this teacher has none. Set method.prompt_drop=0 or "
                             "method.guidance=none.")
        out = {}
        for key, v in cond.tensors.items():
            u = uncond.tensors[key].to(v.device, v.dtype)
            if u.shape[1:] != v.shape[1:]:
                raise ValueError(f"cannot drop prompts: the empty prompt's {key!r} has shape "
                                 f"{tuple(u.shape[1:])}, the batch's {tuple(v.shape[1:])}; set "
                                 "method.prompt_drop=0")
            out[key] = torch.where(bcast(drop.to(v.device), v), u.expand_as(v), v)
        return Cond(out)

    def critic_loss_per_sample(self, nets, x0, t, x_t, pred):
        """The critic's denoising error per sample, in the backbone's own output space
        (eps for SD1.5, velocity for flow models); v-prediction models use eps, which is
        SiD-LSG's v-loss weighted by snr / (snr + 1)."""
        alpha, sigma = nets.schedule.alpha_sigma(t)
        kind = nets.teacher_model.denoiser.prediction_type
        kind = "epsilon" if kind == "v_prediction" else kind
        err = from_x0(pred, x_t, alpha, sigma, kind) - from_x0(x0, x_t, alpha, sigma, kind)
        return mean_per_sample(err ** 2)

    def sid_loss_per_sample(self, x, y_r, y_f):
        """SiD's generator loss per sample (see the module docstring), mean over elements."""
        with torch.no_grad():
            norm = mean_per_sample((x - y_r).abs()).clamp_min(1e-5)
        diff = y_r - y_f
        loss = diff * ((y_r - x) - self.alpha * diff)
        return mean_per_sample(loss) / norm

    def _masked_mean(self, per_sample, ctx, what):
        """(mean over the finite samples or None if there are none, number of the others);
        logs that number and counts batches with no finite sample in a row."""
        finite = torch.isfinite(per_sample)
        bad = int((~finite).sum())
        ctx.log(**{"nonfinite" if what == "student" else f"nonfinite_{what}": bad})
        good = int(finite.sum())
        if good == 0:
            self._bad_streak[what] += 1
            if self._bad_streak[what] >= self.max_nonfinite_steps:
                raise NonFiniteBatchError(
                    f"step {ctx.step}: every sample of the {what} loss was non-finite (NaN or "
                    f"inf) for {self._bad_streak[what]} batches in a row; stopped. Lower "
                    "train.lr, check the teacher in fp32, or raise method.max_nonfinite_steps.")
            return None, 0
        self._bad_streak[what] = 0
        # torch.where, not multiplication: 0 * NaN would still be NaN
        total = torch.where(finite, per_sample, torch.zeros_like(per_sample)).sum()
        return total / good, bad

    @staticmethod
    def _sanitize_grads(nets, role):
        # SiD's own code does this to every gradient: a masked sample whose forward pass
        # went non-finite inside a network can still leave 0 * NaN in a weight's gradient.
        for p in nets.params(role):
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)

    @staticmethod
    def _finite_rows(*tensors):
        ok = None
        for x in tensors:
            f = torch.isfinite(x).flatten(1).all(1)
            ok = f if ok is None else ok & f
        return ok

    # GAN hooks (SiDA); plain SiD has none
    def critic_gan(self, nets, batch, fake, cond, ctx):
        return None

    def student_gan(self, nets, x0, cond, ctx):
        return None

    # -- the step -----------------------------------------------------------------------
    def __call__(self, nets, batch, ctx):
        cond = batch["cond"]
        kappas = self.scales(nets)
        n = len(cond)
        if not self.student_step(ctx):
            with torch.no_grad():
                fake, _ = self.generate(nets, cond, ctx, grad=False)
                fake_ok = self._finite_rows(fake)
                fake = torch.where(bcast(fake_ok, fake), fake, torch.zeros_like(fake))
            t = self.sample_t(ctx, n)
            x_t = renoise(nets.schedule, fake, t, ctx)
            critic_cond = self.drop_prompts(nets, cond, ctx, kappas)
            pred = self.guided_x0(nets, "critic", x_t, t, critic_cond, kappas["kappa1"])
            per_sample = self.critic_loss_per_sample(nets, fake, t, x_t, pred)
            ok = fake_ok & self._finite_rows(pred)
            if ok.any():
                ctx.log(critic_denoise=per_sample[ok].mean())
            gan = self.critic_gan(nets, batch, fake, cond, ctx)
            if gan is not None:
                per_sample = per_sample + gan
            per_sample = torch.where(ok, per_sample, torch.full_like(per_sample, float("nan")))
            loss, bad = self._masked_mean(per_sample, ctx, "critic")
            if loss is not None:
                yield "critic", loss
                if bad:
                    self._sanitize_grads(nets, "critic")
            return

        x0, k = self.generate(nets, cond, ctx, grad=True)
        zero = torch.zeros_like(x0)
        # a non-finite student sample is zeroed before it meets the teacher and the critic,
        # so no NaN runs back through their graphs into the student's gradients
        x0_ok = self._finite_rows(x0)
        x0 = torch.where(bcast(x0_ok, x0), x0, zero)
        t = self.sample_t(ctx, n)
        x_t = renoise(nets.schedule, x0, t, ctx)  # the graph runs through x0 into x_t
        y_r = self.guided_x0(nets, "teacher", x_t, t, cond, kappas["kappa4"])
        y_f = self.guided_x0(nets, "critic", x_t, t, cond, kappas["kappa2"])
        ok = x0_ok & self._finite_rows(y_r, y_f)
        # zero the bad rows before the arithmetic so no NaN enters the loss's graph
        rows = bcast(ok, x0)
        x_s, y_rs, y_fs = (torch.where(rows, v, zero) for v in (x0, y_r, y_f))
        per_sample = self.sid_loss_per_sample(x_s, y_rs, y_fs)
        sid_part = per_sample.detach()
        gan = self.student_gan(nets, x_s, cond, ctx)
        if gan is not None:
            per_sample = per_sample + gan
        per_sample = torch.where(ok, per_sample, torch.full_like(per_sample, float("nan")))
        loss, bad = self._masked_mean(per_sample, ctx, "student")
        if loss is None:
            return
        with torch.no_grad():
            good = ok.nonzero().flatten()
            ctx.log(sid=sid_part[good].mean(), student_step=k,
                    score_gap=mean_per_sample((y_r - y_f)[good].abs()).mean())
        yield "student", loss
        if bad:
            self._sanitize_grads(nets, "student")


class SiDA(SiD):
    """SiD with a diffusion-GAN term on the critic's features against real data (SiDA).

    Args (beyond :class:`SiD`'s):
        gan_weight: weight of the student's GAN term ``softplus(-D(x_t))`` (0: plain SiD, no
            real data needed).
        gan_critic_weight: weight of the discriminator loss in the critic's loss.
        gan_feature_module: the backbone module whose output the head reads (default: the
            teacher family's, e.g. the UNet's ``mid_block``).
    """

    name = "sida"
    options = table(SiD.options, gan_weight=number(0), gan_critic_weight=number(0),
                    gan_feature_module=text())

    def __init__(self, gan_weight: float = 0.01, gan_critic_weight: float = 0.01,
                 gan_feature_module: str | None = None, alpha: float = 1.0,
                 t_min: float | None = None, t_max: float | None = None,
                 t_init: float | None = None,
                 guidance: str | float = "lsg", guidance_scale: float | None = None,
                 kappa1: float | None = None, kappa2: float | None = None,
                 kappa3: float | None = None, kappa4: float | None = None,
                 anti_scale: float = -1.0, prompt_drop: float | None = None,
                 critic_steps: int = 1, max_nonfinite_steps: int = 3,
                 student_times: list[float] | None = None, total_steps: int | None = None,
                 student_steps: int = 1):
        super().__init__(alpha=alpha, t_min=t_min, t_max=t_max, t_init=t_init,
                         guidance=guidance, guidance_scale=guidance_scale, kappa1=kappa1,
                         kappa2=kappa2, kappa3=kappa3, kappa4=kappa4, anti_scale=anti_scale,
                         prompt_drop=prompt_drop, critic_steps=critic_steps,
                         max_nonfinite_steps=max_nonfinite_steps, student_times=student_times,
                         total_steps=total_steps, student_steps=student_steps)
        if gan_weight < 0 or gan_critic_weight < 0:
            raise ValueError(f"gan weights must be >= 0, got {gan_weight}, {gan_critic_weight}")
        self.gan_weight = gan_weight
        self.gan_critic_weight = gan_critic_weight
        self.gan_feature_module = gan_feature_module
        self.needs_data = gan_weight > 0

    def data_advice(self) -> str:
        return (f"SiDA's GAN term (method.gan_weight={self.gan_weight} > 0) trains on real "
                "images; set method.gan_weight=0 to train from prompts alone")

    def setup(self, nets):
        super().setup(nets)
        if self.gan_weight > 0:
            # as DMD2: the critic adapter is the trunk, the head trains with the critic role
            self.head = GANHead.attach(nets, self.gan_feature_module)
            nets.add_extra("critic", "gan_head", self.head)

    def critic_gan(self, nets, batch, fake, cond, ctx):
        if self.gan_weight <= 0:
            return None
        t = self.sample_t(ctx, fake.shape[0])
        real_logits = self.head.logits(nets, renoise(nets.schedule, batch["x0"], t, ctx), t, cond)
        fake_logits = self.head.logits(nets, renoise(nets.schedule, fake, t, ctx), t, cond)
        d_loss = F.softplus(-real_logits) + F.softplus(fake_logits)
        ctx.log(gan_d=d_loss.mean())
        return self.gan_critic_weight * d_loss

    def student_gan(self, nets, x0, cond, ctx):
        if self.gan_weight <= 0:
            return None
        t = self.sample_t(ctx, x0.shape[0])
        g_loss = F.softplus(-self.head.logits(nets, renoise(nets.schedule, x0, t, ctx), t, cond))
        ctx.log(gan_g=g_loss.mean())
        return self.gan_weight * g_loss
