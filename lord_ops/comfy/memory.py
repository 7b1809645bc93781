"""The memory check before training (issue 22): a measured probe of the real training model and the
refusal when the run will not fit (the arithmetic is ``lord_ops.memory``).

The probe loads the training clone exactly as the run will (``trainable.trainable_model``: compute
dtype, gradient checkpointing, the MODEL's own patches and LoRD), hooks a fresh copy of the run's
adapters into its target layers and runs one batch-1 forward + backward of the denoising loss on a
random latent of the run's size, measuring its allocation peak (``memory.AllocationPeak``). With
Stage 1's online perturbations it also runs one attack iteration on a random image the way the
online perturber does. The random draws are forked, so the run's own random state is unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from .. import trainer as T
from ..diffusion import denoising_loss
from ..memory import AllocationPeak, NotEnoughMemory, SKIP_ENV, TrainingMemory, available_memory, skipped_by_env
from ..train_config import TrainConfig
from . import grad
from .patch import prediction_type, target_modules
from .trainable import autocast_for, trainable_model

PROBE_TIMESTEP = 500  # the memory of a pass does not depend on t


def _bytes(tensors, device: torch.device) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device != device:
            continue
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def resident_bytes(clone, vae, device: torch.device) -> int:
    """Bytes of the MODEL's (and the VAE's) weights and buffers that sit on ``device``."""
    modules = [clone.model] + ([vae.first_stage_model] if vae is not None else [])
    return _bytes((t for m in modules for t in (*m.parameters(), *m.buffers())), device)


def latent_shape(model_patcher, vae, data) -> tuple[int, int, int]:
    """``(C, h, w)`` of the run's latents."""
    if data.latents:
        return tuple(data.latents[0].shape[-3:])
    down = grad.vae_downscale(vae) if vae is not None else 8
    h, w = data.image_hw
    return model_patcher.model.latent_format.latent_channels, h // down, w // down


def probe_training_memory(model_patcher, vae, data, config: TrainConfig, make_adapter: Callable[[], torch.nn.Module],
                          names: Sequence[str], *, passes: int = 1, latent_copies: int = 1,
                          online_attack: bool = False, stage: str = "", probe_batch: int = 1) -> TrainingMemory:
    """Measure and estimate (see the module doc). ``make_adapter()`` builds the run's trainable adapters
    (on the CPU), hooked into the targets ``names``; ``passes``: UNet passes per sample (their graphs
    are alive at once only under DDP); ``latent_copies``: latents per training item kept on the device
    (Stage 1: clean + perturbed). ``probe_batch``: the probe's batch (the per-sample figure is its peak /
    ``probe_batch``; 1 for the check, more to test the estimate's linear scaling)."""
    c, h, w = latent_shape(model_patcher, vae, data)
    world = T.distributed_context()[1]
    items = len(data) * latent_copies + len(data.class_images)
    with trainable_model(model_patcher, vae, config) as clone:
        device = grad.compute_device(clone)
        adapter = make_adapter().to(device)
        adapter_bytes = sum(p.numel() * p.element_size() for p in adapter.parameters())
        trainable_bytes = sum(p.numel() * p.element_size() for p in adapter.parameters() if p.requires_grad)
        predict = grad.batched_noise_predictor(clone, data.conds, data.image_hw)
        acp = grad.alphas_cumprod(clone)
        autocast = autocast_for(config, device)
        prediction = prediction_type(clone)
        attack_bytes = 0
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), T.AdapterHooks(target_modules(clone, list(names)), adapter) as hooks:
            g = torch.Generator().manual_seed(0)
            z = torch.randn(probe_batch, c, h, w, generator=g).to(device)
            noise = torch.randn(probe_batch, c, h, w, generator=g).to(device)
            t = torch.full((probe_batch,), PROBE_TIMESTEP)
            with AllocationPeak(device) as peak:
                with autocast():
                    loss = denoising_loss(lambda zt, tt: predict(zt, tt, [0] * probe_batch), z, t, noise, acp,
                                          prediction).float()
                hooks.take()
                loss.mean().backward()
                hooks.take()
                del loss
            adapter.zero_grad(set_to_none=True)
            if online_attack and peak.peak_bytes is not None:
                from .perturb import attack_image

                attack = dataclasses.replace(config.attack_configs()[0], steps=1, seed=0)
                img = torch.rand(1, 3, *data.image_hw, generator=g).to(device)
                with AllocationPeak(device) as apeak:
                    attack_image(clone, vae, data.conds[0], img, attack, predict=lambda zt, tt: predict(zt, tt, [0]),
                                 acp=acp)
                    hooks.take()
                attack_bytes = apeak.peak_bytes or 0
        resident = resident_bytes(clone, vae, device)
        del adapter
    available, source = available_memory(device)
    return TrainingMemory(
        device=str(device), stage=stage or config.stage, batch=config.batch_size, resident_bytes=resident,
        adapter_bytes=adapter_bytes, trainable_bytes=trainable_bytes,
        activation_bytes=None if peak.peak_bytes is None else -(-peak.peak_bytes // probe_batch),
        passes_alive=passes if world > 1 else 1,
        data_bytes=items * c * h * w * 4, attack_bytes=attack_bytes, available_bytes=available,
        available_from=source, method=peak.method, gradient_checkpointing=config.gradient_checkpointing,
        online_perturbations=online_attack, dtype=config.dtype)


def check_training_memory(model_patcher, vae, data, config: TrainConfig, make_adapter: Callable[[], torch.nn.Module],
                          names: Sequence[str], *, passes: int = 1, latent_copies: int = 1, online_attack: bool = False,
                          stage: str = "", available: Optional[int] = None) -> dict:
    """Probe, estimate and refuse: raises :class:`lord_ops.memory.NotEnoughMemory` (a ValueError whose
    message names the estimate, what the device has and the fixes) when the run will not fit;
    otherwise returns the estimate for the run report (``TrainingMemory.to_dict``). ``available``
    replaces what the device reports (bytes). With ``LORD_SKIP_MEMORY_CHECK=1`` nothing is probed and
    the report says so."""
    if skipped_by_env():
        return {"skipped": f"{SKIP_ENV} is set"}
    estimate = probe_training_memory(model_patcher, vae, data, config, make_adapter, names, passes=passes,
                                     latent_copies=latent_copies, online_attack=online_attack, stage=stage)
    if available is not None:
        estimate = dataclasses.replace(estimate, available_bytes=int(available), available_from="given")
    if not estimate.fits():
        raise NotEnoughMemory(estimate)
    return estimate.to_dict()
