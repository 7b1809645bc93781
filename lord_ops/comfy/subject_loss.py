"""Held-out denoising loss: how well a fine-tuned MODEL predicts the noise on clean images of its
subject that it never trained on -- a low-noise measure of "the LoRA learned the subject" (lower is
better): no sampling, no classifier, the same timesteps and noise draws for every method.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .. import trainer as T
from ..diffusion import HELDOUT_TIMESTEPS, denoising_loss
from . import grad
from .data import encode_images
from .patch import prediction_type


def heldout_loss(model_patcher, vae, images: Sequence[torch.Tensor], conditioning,
                 timesteps: Sequence[int] = HELDOUT_TIMESTEPS, draws: int = 4, seed: int = 0, batch_size: int = 16,
                 check: Optional[Callable[[], None]] = None) -> dict:
    """The native denoising loss (``lord_ops.diffusion.denoising_loss``) of ``model_patcher`` (with
    whatever LoRA/LoRD is patched in) on ``images`` (``[3, H, W]`` float in [0, 1]) captioned with
    ``conditioning``, averaged over ``timesteps`` x ``draws`` noise draws per image.

    The noise of (image ``i``, timestep ``t``, draw ``d``) is seeded from ``(seed, i, t, d)`` only, so
    two models measured with the same arguments see identical noisy latents (paired comparisons).
    Returns ``{"mean", "per_image": [...], "per_timestep": {t: mean}, "timesteps", "draws", "images"}``.
    """
    if not images:
        raise ValueError("held-out loss: give at least one held-out image")
    if draws < 1:
        raise ValueError(f"held-out loss: draws must be >= 1, got {draws}")
    hw = tuple(images[0].shape[-2:])
    z = encode_images(vae, model_patcher, list(images))
    predict = grad.noise_predictor(model_patcher, conditioning, hw)
    acp = grad.alphas_cumprod(model_patcher)
    prediction = prediction_type(model_patcher)
    device = grad.compute_device(model_patcher)
    n = z.shape[0]
    total = torch.zeros(n, dtype=torch.float64)
    per_t = {}
    with torch.no_grad():
        for t in timesteps:
            t = min(int(t), len(acp) - 1)
            at_t = torch.zeros(n, dtype=torch.float64)
            for d in range(draws):
                noise = torch.stack([T.Draw(t, T.mix_seed(seed, "heldout", i, t, d)).noise(z.shape[1:])
                                     for i in range(n)])
                for b in range(0, n, batch_size):
                    if check is not None:
                        check()
                    zb = z[b:b + batch_size].to(device)
                    tt = torch.full((zb.shape[0],), t, dtype=torch.long)
                    loss = denoising_loss(predict, zb, tt, noise[b:b + batch_size].to(device), acp, prediction)
                    at_t[b:b + zb.shape[0]] += loss.double().cpu()
            per_t[t] = float(at_t.mean() / draws)
            total += at_t / draws
    per_image = total / len(per_t)
    return {"mean": float(per_image.mean()), "per_image": [round(float(x), 8) for x in per_image],
            "per_timestep": {str(t): round(v, 8) for t, v in per_t.items()}, "timesteps": list(per_t),
            "draws": draws, "images": n, "seed": seed}
