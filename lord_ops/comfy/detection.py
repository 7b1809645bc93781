"""LoRD Detect on ComfyUI models: the gate of every LoRD applied to a MODEL, read at one timestep,
as a per-image adversarial score and per-pixel maps (the Detect node and the experiment runner).
"""
from __future__ import annotations

import dataclasses

import torch

from ..detect import adversarial_scores, gate_heatmap, gate_maps


def _single_evaluation(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A 'sampler' that evaluates the denoiser once at ``sigmas[0]`` (the gate hooks record)."""
    return model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))


@torch.no_grad()
def record_gates(model, latent: torch.Tensor, positive, timestep: int, seed: int):
    """Run one denoiser evaluation of ``model`` on ``latent`` noised to ``timestep`` (ComfyUI's own
    guider and noise, which load the model); returns ``(records, spatial_names)`` from every LoRD
    applied to the MODEL.

    Gradient-free whoever calls it (``no_grad``; an enclosing ``inference_mode`` stays on): the
    recorded gates never carry an autograd graph."""
    import comfy.sample
    import comfy.samplers

    from .patch import lord_injections, recording_gates

    with recording_gates(model) as (clone, records):
        spatial = set().union(*(inj.spatial for _, inj in lord_injections(clone)))
        sigma = clone.get_model_object("model_sampling").sigma(torch.tensor([float(timestep)]))
        sigmas = torch.cat([sigma.float().reshape(1), torch.zeros(1)])
        guider = comfy.samplers.CFGGuider(clone)
        guider.set_conds(positive, positive)
        guider.set_cfg(1.0)
        latent = comfy.sample.fix_empty_latent_channels(clone, latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        guider.sample(noise, latent, comfy.samplers.KSAMPLER(_single_evaluation), sigmas, seed=seed, disable_pbar=True)
    return records, spatial


@dataclasses.dataclass
class Detection:
    scores: torch.Tensor  # [B] mean gate per image, 0 (clean) .. 1 (adversarial)
    maps: dict  # layer name -> [B, h, w] gate map at latent resolution
    heat: torch.Tensor  # [B, H, W] mean gate per pixel at image resolution (0..1)


@torch.no_grad()
def detect(model, vae, images_bhwc: torch.Tensor, positive, timestep: int = 200, seed: int = 0) -> Detection:
    """Score IMAGEs ``[B, H, W, C]`` in [0, 1] with the gate of the LoRD(s) applied to ``model``.

    Images are cropped to whole VAE blocks for encoding (the heatmap keeps the full size); the
    latent is noised to ``timestep`` (0..999) with noise from ``seed``. Raises ``ValueError`` for an
    image smaller than one VAE block. Runs under ``torch.no_grad()`` (the VAE encode, the UNet pass and
    the aggregation), so no caller builds an autograd graph and no returned tensor requires grad."""
    pixels = images_bhwc[..., :3]
    h, w = pixels.shape[1], pixels.shape[2]
    f = vae.spacial_compression_encode()
    hc, wc = (h // f) * f, (w // f) * f
    if hc == 0 or wc == 0:
        raise ValueError(f"LoRD Detect: image {w}x{h} is smaller than the VAE's {f}-pixel block.")
    latent = vae.encode(pixels[:, :hc, :wc])
    records, spatial = record_gates(model, latent, positive, timestep, seed)
    maps = gate_maps(records, tuple(latent.shape[-2:]), spatial)
    return Detection(adversarial_scores(maps), maps, gate_heatmap(maps, (h, w)))
