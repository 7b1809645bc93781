"""The latent-diffusion training objective, in one place (attacks, Stage-1, Stage-2 and the benchmark).

Latents ``z`` are the model's scaled latents (``latent_format.process_in``), ``[B, C, h, w]``;
``t`` are integer DDPM timesteps ``[B]``; ``alphas_cumprod`` is the model's discrete schedule ``[T]``.

Every predictor here returns the noise estimate ``eps_hat`` (the glue converts any model's output
to it, see ``comfy.grad.batched_noise_predictor``). A model trained for another target has a
different *native* loss, which is the eps error times a per-timestep weight (``a = alphas_cumprod[t]``,
``z_t = sqrt(a) z + sqrt(1 - a) eps``):

* ``eps``: ``||eps_hat - eps||^2`` (weight 1);
* ``v`` (SD 2.x 768-v): ``v = sqrt(a) eps - sqrt(1 - a) z`` and ``v_hat - v = (eps_hat - eps) / sqrt(a)``,
  so ``||v_hat - v||^2 = ||eps_hat - eps||^2 / a`` (weight ``1/a = 1 + 1/SNR = (SNR + 1) / SNR``,
  ``SNR = a / (1 - a)``);
* ``x0``: ``x0_hat - z = -sqrt((1 - a) / a) (eps_hat - eps)`` (weight ``(1 - a)/a = 1/SNR``).

At each timestep all three have the same minimiser; the weight only changes how much each
timestep counts (for v, the noisiest steps count up to ``1/a_T`` ~ 200 times more). See
docs/design.md ("v-prediction").
"""
from __future__ import annotations

from typing import Callable

import torch

PREDICTIONS = ("eps", "v", "x0")


# the held-out loss's fixed grid over the DDPM schedule (1000 steps): the middle of each tenth
HELDOUT_TIMESTEPS = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950)


def add_noise(z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``z_t = sqrt(a_t) z + sqrt(1 - a_t) eps`` (DDPM forward process)."""
    a = alphas_cumprod.to(z.device, torch.float32)[t.to(z.device)].reshape(-1, *([1] * (z.dim() - 1)))
    return a.sqrt() * z.float() + (1 - a).sqrt() * noise.float()


def loss_weight(prediction: str, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Per-sample factor ``[B]`` (float32) that turns the eps squared error into the native loss of
    a ``prediction`` model (``"eps"``: 1, ``"v"``: ``1/a_t``, ``"x0"``: ``(1 - a_t)/a_t``)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    a = alphas_cumprod.detach().float().cpu()[t.detach().cpu().long()]
    if prediction == "eps":
        return torch.ones_like(a)
    return 1.0 / a if prediction == "v" else (1.0 - a) / a


def denoising_loss(predict_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                   prediction: str = "eps") -> torch.Tensor:
    """Per-sample native denoising loss ``[B]`` float32, averaged over latent elements.

    ``prediction`` is the model's training target (``"eps"``, ``"v"``, ``"x0"``; the glue reads it
    from the MODEL's ``model_sampling``, ``comfy.patch.prediction_type``): the loss is
    ``loss_weight(prediction, t) * ||eps - eps_theta(z_t, t)||^2``, i.e. ``||v - v_theta||^2`` for
    a v-model. ``"eps"`` (the default) is the plain eps loss.
    """
    pred = predict_noise(add_noise(z, noise, t, alphas_cumprod).to(z.dtype), t).float()
    loss = (pred - noise.float().to(pred.device)).square().mean(dim=tuple(range(1, pred.dim())))
    if prediction == "eps":
        return loss
    return loss * loss_weight(prediction, t, alphas_cumprod).to(loss.device)
