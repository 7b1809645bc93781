"""Differentiable access to ComfyUI models (attacks now, training later).

ComfyUI creates weights under ``torch.inference_mode()`` (the server runs every prompt in it);
autograd cannot save such tensors, so :func:`make_differentiable` swaps every inference-mode
parameter and buffer for a normal clone (values unchanged, ``requires_grad=False``) once after a
load -- measured faster and leaner than identity weight wrappers. Pixels are encoded with
``vae.first_stage_model.encode`` directly (``VAE.encode()`` may take a tiled path that drops
gradients).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def make_differentiable(module: torch.nn.Module) -> int:
    """Replace inference-mode parameters/buffers of ``module`` by normal clones; returns how many."""
    swapped = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                    swapped += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    swapped += 1
    return swapped


def load_for_gradients(model_patcher=None, vae=None) -> None:
    """Load the MODEL (with its patches/LoRD) and the VAE on their devices, ready for backward."""
    import comfy.model_management as mm

    patchers = [m for m in (model_patcher, vae.patcher if vae is not None else None) if m is not None]
    mm.load_models_gpu(patchers)
    if model_patcher is not None:
        model_patcher.model.diffusion_model.requires_grad_(False)
        make_differentiable(model_patcher.model.diffusion_model)
    if vae is not None:
        vae.first_stage_model.requires_grad_(False)
        make_differentiable(vae.first_stage_model)


def latent_encoder(vae, model_patcher=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode(x)``: ``[B, 3, H, W]`` in [0, 1] -> scaled latents (``latent_format.process_in``),
    differentiable, through ``vae.first_stage_model.encode`` on [-1, 1] input."""
    fmt = model_patcher.model.latent_format if model_patcher is not None else None

    def encode(x: torch.Tensor) -> torch.Tensor:
        z = vae.first_stage_model.encode((x * 2 - 1).to(vae.device, vae.vae_dtype)).float()
        return fmt.process_in(z) if fmt is not None else z

    return encode


def alphas_cumprod(model_patcher) -> torch.Tensor:
    """The discrete DDPM schedule of the MODEL: ``1 / (1 + sigma_t^2)``, ``[T]``."""
    sigmas = model_patcher.get_model_object("model_sampling").sigmas.float().cpu()
    return 1.0 / (1.0 + sigmas ** 2)


def noise_predictor(model_patcher, conditioning, image_hw: tuple[int, int]) -> Callable:
    """``predict_noise(z_t, t)`` for DDPM-noised latents ``z_t`` and integer timesteps ``t``.

    Works in ComfyUI's sigma space: ``x = z_t sqrt(1 + s^2)``, ``s = sigma_t``, the model's
    denoised output ``D`` gives ``eps = (x - D) / s`` -- valid for eps- and v-prediction models.
    ``conditioning`` is a ComfyUI CONDITIONING (its first entry is used for every image).
    """
    model = model_patcher.model
    sampling = model_patcher.get_model_object("model_sampling")
    cross_attn, extras = conditioning[0][0], dict(conditioning[0][1])
    device = model_patcher.load_device
    h, w = image_hw

    def predict_noise(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = sampling.sigmas.to(device)[t.to(device)].float()
        s = sigma.reshape(-1, 1, 1, 1)
        x = z_t.to(device).float() * (1 + s ** 2).sqrt()
        conds = model.extra_conds(cross_attn=cross_attn.to(device), noise=x, device=device, width=w, height=h,
                                  **{k: v for k, v in extras.items() if k not in ("cross_attn", "noise", "device")})
        kwargs = {k: c.process_cond(batch_size=x.shape[0], device=device, area=None).cond for k, c in conds.items()}
        kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        denoised = model.apply_model(x, sigma, **kwargs).float()
        return (x - denoised) / s

    return predict_noise


def encode_target(vae, model_patcher, target: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Latent of an ACE/PhotoGuard target image ``[1|B, 3, h, w]`` in [0, 1], resized to ``like``'s
    pixel size; the pack's high-contrast pattern when ``target`` is None."""
    from ..attacks import high_contrast_target, resize_target

    h, w = like.shape[-2:]
    img = high_contrast_target(h, w) if target is None else resize_target(target, h, w)
    with torch.no_grad():
        z = latent_encoder(vae, model_patcher)(img.float())
    return z.expand(like.shape[0], -1, -1, -1) if z.shape[0] == 1 else z
