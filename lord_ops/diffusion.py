"""The latent-diffusion training objective, in one place (attacks, Stage-1, Stage-2 and the benchmark).

Latents ``z`` are the model's scaled latents (``latent_format.process_in``), ``[B, C, h, w]``;
``t`` are integer DDPM timesteps ``[B]``; ``alphas_cumprod`` is the model's discrete schedule ``[T]``.
"""
from __future__ import annotations

from typing import Callable

import torch


def add_noise(z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``z_t = sqrt(a_t) z + sqrt(1 - a_t) eps`` (DDPM forward process)."""
    a = alphas_cumprod.to(z.device, torch.float32)[t.to(z.device)].reshape(-1, *([1] * (z.dim() - 1)))
    return a.sqrt() * z.float() + (1 - a).sqrt() * noise.float()


def denoising_loss(predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||eps - eps_theta(z_t, t)||^2`` averaged over latent elements: ``[B]`` float32."""
    pred = predict_noise(add_noise(z, noise, t, alphas_cumprod).to(z.dtype), t).float()
    return (pred - noise.float().to(pred.device)).square().mean(dim=tuple(range(1, pred.dim())))
