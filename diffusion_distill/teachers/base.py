"""What every teacher adapter provides, and the few pieces they share.

A :class:`Teacher` is the frozen model the student learns from: a :class:`Denoiser` over its
backbone, a cached prompt encoder, and (for latent models) the VAE to go between images and
latents. Family files (``sd.py``, ``sd3.py``, ...) each build one from a diffusers pipeline;
``custom.py`` builds one from any callable.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..denoiser import Cond, Denoiser, ddim_step
from ..schedules import shift_time


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
    def sample_times(self, steps: int) -> list[float]:
        """The teacher's own ``steps`` sampling times, from pure noise down (0 excluded)."""
        times = [1 - i / steps for i in range(steps)]
        if self.time_shift and self.time_shift != 1.0:
            times = [float(shift_time(t, self.time_shift)) for t in times]
        return times

    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int | None = None, guidance: float | None = None,
               noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
               times: list[float] | None = None) -> torch.Tensor:
        """DDIM on the continuous axis (the same update as diffusers' DDIM / flow Euler)."""
        steps = steps or self.default_steps
        guidance = self.default_guidance if guidance is None else guidance
        cond = self.prompts(prompts)
        if noise is None:
            noise = torch.randn((len(prompts),) + self.latent_shape, generator=generator)
        x = noise.to(self.device)
        times = times or self.sample_times(steps)
        for i, t in enumerate(times):
            x0 = self.denoiser(x, t, cond, guidance=guidance)
            s = times[i + 1] if i + 1 < len(times) else 0.0
            x = x0 if s == 0.0 else ddim_step(self.schedule, x0, x, t, s)
        return x
