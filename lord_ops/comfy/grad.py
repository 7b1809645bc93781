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


def batched_noise_predictor(model_patcher, conditionings: list, image_hw: tuple[int, int]) -> Callable:
    """``predict_noise(z_t, t, which)``: DDPM-noised latents ``z_t`` ``[B, ...]``, integer timesteps
    ``t`` ``[B]``, and ``which[b]`` = index into ``conditionings`` (one ComfyUI CONDITIONING per
    caption; its first entry is used) for each batch item.

    Works in ComfyUI's sigma space: ``x = z_t sqrt(1 + s^2)``, ``s = sigma_t``, the model's
    denoised output ``D`` gives ``eps = (x - D) / s`` -- valid for eps- and v-prediction models.
    """
    model = model_patcher.model
    sampling = model_patcher.get_model_object("model_sampling")
    device = model_patcher.load_device
    h, w = image_hw
    per_item: dict[int, dict] = {}

    def item_kwargs(i: int, like: torch.Tensor) -> dict:
        if i not in per_item:
            cross_attn, extras = conditionings[i][0][0], dict(conditionings[i][0][1])
            conds = model.extra_conds(cross_attn=cross_attn.to(device), noise=like, device=device, width=w, height=h,
                                      **{k: v for k, v in extras.items() if k not in ("cross_attn", "noise", "device")})
            kw = {k: c.process_cond(batch_size=1, device=device, area=None).cond for k, c in conds.items()}
            per_item[i] = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        return per_item[i]

    def predict_noise(z_t: torch.Tensor, t: torch.Tensor, which) -> torch.Tensor:
        sigma = sampling.sigmas.to(device)[t.to(device)].float()
        s = sigma.reshape(-1, 1, 1, 1)
        x = z_t.to(device).float() * (1 + s ** 2).sqrt()
        items = [item_kwargs(int(i), x[:1]) for i in which]
        shapes = {k: {tuple(v.shape) for it in items for kk, v in it.items() if kk == k and isinstance(v, torch.Tensor)}
                  for k in items[0]}
        if all(len(v) <= 1 for v in shapes.values()):
            kwargs = {k: (torch.cat([it[k] for it in items]) if isinstance(items[0][k], torch.Tensor) else items[0][k])
                      for k in items[0]}
            denoised = model.apply_model(x, sigma, **kwargs).float()
        else:  # captions of different token lengths: one item at a time
            denoised = torch.cat([model.apply_model(x[b:b + 1], sigma[b:b + 1], **items[b]).float()
                                  for b in range(x.shape[0])])
        return (x - denoised) / s

    return predict_noise


def noise_predictor(model_patcher, conditioning, image_hw: tuple[int, int]) -> Callable:
    """``predict_noise(z_t, t)`` with one CONDITIONING for every batch item (see
    :func:`batched_noise_predictor`)."""
    predict = batched_noise_predictor(model_patcher, [conditioning], image_hw)
    return lambda z_t, t: predict(z_t, t, [0] * z_t.shape[0])


def encode_target(vae, model_patcher, target: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Latent of an ACE/PhotoGuard target image ``[1|B, 3, h, w]`` in [0, 1], resized to ``like``'s
    pixel size; the pack's high-contrast pattern when ``target`` is None."""
    from ..attacks import high_contrast_target, resize_target

    h, w = like.shape[-2:]
    img = high_contrast_target(h, w) if target is None else resize_target(target, h, w)
    with torch.no_grad():
        z = latent_encoder(vae, model_patcher)(img.float())
    return z.expand(like.shape[0], -1, -1, -1) if z.shape[0] == 1 else z
