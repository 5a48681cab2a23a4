"""The world's VAE: a tiny diffusers AutoencoderKL, 32x32x3 images <-> 16x16x4 latents.

Both embedded teachers share it. It is trained here on the procedural shapes (reconstruction
MSE plus a very small KL term, as SD's VAE: the KL only keeps the latent space smooth and
bounded, it is not meant to make the posterior match the prior), and its ``scaling_factor``
is set afterwards so that the scaled latents have unit standard deviation, which is what the
teachers' noise schedules assume.

    python -m diffusion_distill.world.vae --out runs/world_vae --minutes 5
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from .data import ShapesWorld, save_grid

# 2 blocks -> downsampling factor 2. No mid-block attention: it is the only non-local layer,
# and without it the VAE is fully convolutional, so it can be trained on crops (4x cheaper)
# and still be exact on whole images.
VAE_CONFIG = {"latent_channels": 4, "block_out": (16, 32), "mid_block_add_attention": False,
              "sample_size": 32}


def build_vae(seed: int = 0):
    from ..tiny import tiny_vae

    return tiny_vae(seed=seed, **VAE_CONFIG)


@torch.no_grad()
def latent_stats(vae, n: int = 512, seed: int = 99) -> tuple[float, float]:
    """Mean and std of the unscaled latent means over ``n`` fresh world images."""
    images, _, _ = ShapesWorld(seed).batch(n, 0)
    z = vae.encode(images).latent_dist.mode()
    return z.mean().item(), z.std().item()


@torch.no_grad()
def reconstruction_mse(vae, n: int = 256, seed: int = 77) -> float:
    images, _, _ = ShapesWorld(seed).batch(n, 0)
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    return torch.mean((recon - images) ** 2).item()


def train_vae(out: str | None = None, steps: int = 100_000, minutes: float | None = 5.0,
              batch_size: int = 32, lr: float = 2e-3, kl_weight: float = 1e-6, seed: int = 0,
              crop: int | None = 16, log_every: int = 25, init: str | None = None, log=print):
    """Train the world VAE; returns it with ``scaling_factor`` set. Stops at ``steps`` or
    ``minutes``, whichever comes first (the CPU budget is what usually binds)."""
    vae = build_vae(seed)
    if init:  # continue from a saved VAE (training is time-boxed; this extends it)
        from diffusers import AutoencoderKL

        vae.load_state_dict(AutoencoderKL.from_pretrained(init, local_files_only=True).state_dict())
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    world = ShapesWorld(seed)
    start = time.time()
    step = 0
    for step in range(1, steps + 1):
        images, _, _ = world.batch(batch_size, step)
        if crop:
            # Random crops at even offsets, so the latent grid stays aligned with the pixels.
            g = torch.Generator().manual_seed(step)
            i, j = (2 * torch.randint(0, (images.shape[-1] - crop) // 2 + 1, (2,), generator=g))
            images = images[..., i:i + crop, j:j + crop]
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.mean((recon - images) ** 2)
        kl = posterior.kl().mean() / images[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0:
            log(f"vae step {step} mse {mse.item():.5f} kl {kl.item():.3f} "
                f"{time.time() - start:.0f}s")
        if minutes is not None and time.time() - start > minutes * 60:
            break
    vae.eval()
    mean, std = latent_stats(vae)
    # Unit-std latents for the teachers; SD's 0.18215 was chosen the same way.
    vae.register_to_config(scaling_factor=float(1.0 / std))
    info = {"steps": step, "seconds": round(time.time() - start, 1), "latent_mean": mean,
            "latent_std": std, "scaling_factor": 1.0 / std, "recon_mse": reconstruction_mse(vae)}
    log(f"vae done: {info}")
    if out:
        os.makedirs(out, exist_ok=True)
        vae.save_pretrained(out, safe_serialization=True)
        with open(os.path.join(out, "train_info.json"), "w") as f:
            json.dump(info, f, indent=2)
        images, _, _ = ShapesWorld(123).batch(32, 0)
        with torch.no_grad():
            recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
        save_grid(torch.cat([images[:16], recon[:16], images[16:], recon[16:]]),
                  os.path.join(out, "recon.png"), nrow=16)
    return vae, info


def main(argv=None):
    p = argparse.ArgumentParser(description="train the embedded world's VAE")
    p.add_argument("--out", default="runs/world_vae")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--init", default=None, help="continue training this saved VAE")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--crop", type=int, default=16, help="train on random crops (0: whole images)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    train_vae(a.out, steps=a.steps, minutes=a.minutes, batch_size=a.batch_size,
              crop=a.crop or None, init=a.init, lr=a.lr, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
