"""What every teacher adapter provides, and the few pieces they share.

A :class:`Teacher` is the frozen model the student learns from: a :class:`Denoiser` over its
backbone, a cached prompt encoder, and (for latent models) the VAE to go between images and
latents. Family files (``sd.py``, ``sd3.py``, ...) each build one from a diffusers pipeline;
``custom.py`` builds one from any callable.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from ..denoiser import Cond, Denoiser, ddim_step
from ..parameterization import from_x0
from ..schedules import student_timesteps


def flow_time_shift(scheduler, seq_len: int | None = None) -> float:
    """The shift a flow-matching scheduler samples with, as one SD3-style ``shift`` value.

    SD3 uses a fixed ``shift``; Flux (``use_dynamic_shifting``) uses
    ``exp(mu) / (exp(mu) + 1/t - 1)`` with ``mu`` linear in the image token count, which is
    the same map as ``shift_time(t, exp(mu))``.
    """
    cfg = scheduler.config
    if not cfg.get("use_dynamic_shifting", False):
        return float(cfg.get("shift", cfg.get("flow_shift", 1.0)) or 1.0)
    if seq_len is None:
        raise ValueError("a dynamically shifted flow scheduler needs the image token count")
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    mu = base_shift + (max_shift - base_shift) * (seq_len - base_len) / (max_len - base_len)
    return math.exp(mu)


class PromptCache:
    """Encodes each distinct prompt once; text encoders never sit on the training path."""

    def __init__(self, encode: Callable[[list[str]], Cond], device="cpu"):
        self._encode = encode
        self._cache: dict[str, Cond] = {}
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Cond:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            encoded = self._encode(missing)
            for i, p in enumerate(missing):
                # clone() so a cached entry does not keep the whole encoded batch alive
                self._cache[p] = Cond({k: v[i : i + 1].detach().clone()
                                       for k, v in encoded.tensors.items()}, batch=1)
        return Cond.cat([self._cache[p] for p in prompts]).to(self.device)

    def __len__(self):
        return len(self._cache)


class Teacher:
    """A frozen teacher seen through the one denoiser interface.

    Attributes:
        family: "sd", "sdxl", "sd3", "flux", "pixart", "sana" or "custom".
        denoiser: ``x0 = denoiser(x_t, t, cond, guidance=w)`` on the frozen backbone.
        latent_shape: (C, H, W) of one sample in the space the denoiser works in.
        pipe: the diffusers pipeline (None for a custom teacher).
        default_steps / default_guidance: the teacher's own default sampler.
    """

    def __init__(
        self,
        family: str,
        denoiser: Denoiser,
        latent_shape: tuple[int, ...],
        encode_prompts: Callable[[list[str]], Cond] | None = None,
        pipe=None,
        vae: nn.Module | None = None,
        default_steps: int = 50,
        default_guidance: float | None = None,
        path: str | None = None,
        prepare_latents: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.family = family
        self.denoiser = denoiser
        self.latent_shape = tuple(latent_shape)
        self.pipe = pipe
        self.vae = vae
        self.default_steps = default_steps
        self.default_guidance = default_guidance
        self.path = path
        # Flow teachers sample on shifted times (SD3's ``shift``, Flux's resolution-dependent
        # ``exp(mu)``); the family file sets it so that ``sample`` visits the pipeline's times.
        self.time_shift: float | None = None
        # (steps, scheduler) -> extra set_timesteps arguments the family's pipeline passes
        self.extra_timestep_kwargs: Callable | None = None
        # the side of the latent patch one image token covers (for the dynamic shift's count)
        self.token_patch = 2
        # a module name in the backbone for discriminator features (set per family; a custom
        # teacher's user names it with method.gan_feature_module)
        self.feature_module: str | None = None
        # A teacher without text conditioning still needs batch sizes: empty Conds carry them.
        self.prompts = PromptCache(encode_prompts or (lambda ps: Cond({}, batch=len(ps))))
        for p in denoiser.backbone.parameters():
            p.requires_grad_(False)

    @property
    def backbone(self) -> nn.Module:
        return self.denoiser.backbone

    @property
    def device(self) -> torch.device:
        for tensor in list(self.backbone.parameters()) + list(self.backbone.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def schedule(self):
        return self.denoiser.schedule

    def to(self, device):
        self.denoiser.to(device)
        if self.vae is not None:
            self.vae.to(device)
        self.prompts.device = device
        if self.denoiser.uncond is not None:
            self.denoiser.uncond = self.denoiser.uncond.to(device)
        return self

    # -- images <-> latents -------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> the denoiser's space."""
        if self.vae is None:
            return images
        cfg = self.vae.config
        encoded = self.vae.encode(images.to(self.vae.dtype))
        # AutoencoderKL returns a distribution (take its mode); Sana's AutoencoderDC a tensor.
        latents = (encoded.latent_dist.mode() if hasattr(encoded, "latent_dist")
                   else encoded.latent)
        return (latents - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's space -> images in [-1, 1]."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        cfg = self.vae.config
        latents = latents / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float().clamp(-1, 1)

    # -- sampling -----------------------------------------------------------------------
    def timestep_kwargs(self, steps: int, latent_shape: tuple[int, ...], scheduler) -> dict:
        """What the family's pipeline passes to ``scheduler.set_timesteps`` besides ``steps``.

        Dynamically shifted flow schedulers (Flux, SD3.5 with ``use_dynamic_shifting``) take
        ``mu`` from the latent's token count (2x2 patches) of *this* call, so a teacher loaded
        at one resolution samples another with the shift the pipeline would use there.
        Families whose pipeline passes more (Flux: explicit sigmas) override via
        ``extra_timestep_kwargs``.
        """
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            h, w = latent_shape[-2:]
            p = self.token_patch
            kwargs["mu"] = math.log(flow_time_shift(scheduler, (h // p) * (w // p)))
        if self.extra_timestep_kwargs is not None:
            kwargs.update(self.extra_timestep_kwargs(steps, scheduler))
        return kwargs

    def scheduler(self, steps: int | None = None, latent_shape: tuple[int, ...] | None = None,
                  scheduler=None):
        """A fresh copy of the teacher's own scheduler (or of ``scheduler``: an instance or a
        diffusers scheduler class, configured from the pipeline's config) with its timesteps
        set for ``steps`` exactly as the family's pipeline sets them."""
        if self.pipe is None and scheduler is None:
            raise ValueError(f"a {self.family} teacher has no diffusers scheduler; pass "
                             "scheduler=... or use sample(times=...).")
        base = self.pipe.scheduler if scheduler is None else scheduler
        config = self.pipe.scheduler.config if isinstance(base, type) else base.config
        cls = base if isinstance(base, type) else type(base)
        sched = cls.from_config(config)
        steps = steps or self.default_steps
        kwargs = self.timestep_kwargs(steps, tuple(latent_shape or self.latent_shape), sched)
        # as the pipelines' retrieve_timesteps: only what this scheduler accepts
        accepted = inspect.signature(sched.set_timesteps).parameters
        sched.set_timesteps(steps, device=self.device,
                            **{k: v for k, v in kwargs.items() if k in accepted})
        return sched

    def sample_times(self, steps: int, latent_shape: tuple[int, ...] | None = None) -> list[float]:
        """The continuous times the teacher's own scheduler visits in ``steps`` steps, from
        pure noise down (e.g. SD1.5's leading grid 751, 501, 251, 1 -> 751/999, ...)."""
        if self.pipe is None:
            return student_timesteps(steps, self.schedule)  # even spacing, as a student's
        sched = self.scheduler(steps, latent_shape)
        return [float(self.schedule.t_from_model_time(ts.float().cpu())) for ts in sched.timesteps]

    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int | None = None, guidance: float | None = None,
               noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
               times: list[float] | None = None, scheduler=None) -> torch.Tensor:
        """The teacher's own sampler: its pipeline's scheduler, grid and step rule.

        Equals the pipeline's ``__call__`` (``output_type="latent"``) for the same prompts,
        noise (or generator), steps and guidance: the noise is scaled by the scheduler's
        ``init_noise_sigma``, the backbone sees ``scale_model_input``'s input, and the guided
        x0 is handed to ``scheduler.step`` in the backbone's own parameterisation (CFG on x0
        equals the pipelines' CFG on the raw output: both are linear at fixed ``x_t``).
        ``scheduler`` names another diffusers scheduler (instance or class). A custom teacher
        without a pipeline, or explicit continuous ``times``, samples with DDIM on the
        continuous axis.
        """
        steps = steps or self.default_steps
        guidance = self.default_guidance if guidance is None else guidance
        cond = self.prompts(prompts)
        if noise is None:
            noise = torch.randn((len(prompts),) + self.latent_shape, generator=generator)
        x = noise.to(self.device)
        if times is not None or (self.pipe is None and scheduler is None):
            return self._sample_continuous(x, cond, guidance, times or self.sample_times(steps))
        sched = self.scheduler(steps, tuple(x.shape[1:]), scheduler)
        step_args = inspect.signature(sched.step).parameters
        extra = {"generator": generator} if "generator" in step_args else {}
        # flow schedulers have neither (their pipelines skip both)
        x = x * getattr(sched, "init_noise_sigma", 1.0)
        scale_input = getattr(sched, "scale_model_input", lambda x, timestep: x)
        for timestep in sched.timesteps:
            x_in = scale_input(x, timestep)
            t = self.schedule.t_from_model_time(timestep.float().cpu()).to(x.device)
            x0 = self.denoiser(x_in, t, cond, guidance=guidance)
            alpha, sigma = self.schedule.alpha_sigma(t.expand(x.shape[0]))
            out = from_x0(x0, x_in, alpha, sigma, self.denoiser.prediction_type)
            x = sched.step(out, timestep, x, **extra, return_dict=False)[0]
        return x

    def _sample_continuous(self, x, cond, guidance, times: list[float]) -> torch.Tensor:
        for i, t in enumerate(times):
            x0 = self.denoiser(x, t, cond, guidance=guidance)
            s = times[i + 1] if i + 1 < len(times) else 0.0
            x = x0 if s == 0.0 else ddim_step(self.schedule, x0, x, t, s)
        return x
