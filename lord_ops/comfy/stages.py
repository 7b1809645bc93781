"""Stage-1 / Stage-2 training on ComfyUI models (run by the trainer nodes and ``training/train.py``).

The engine (losses, schedule, checkpoints, DDP) is ``lord_ops.trainer``; the pieces this module puts
together are the training data (``data``), the Stage-1 perturbations (``perturb``), the training clone
(``trainable``), the gate evaluation (``heldout``) and the LoRD / LoRA hooked into the UNet's target
layers (``patch.target_modules``).
"""
from __future__ import annotations

import dataclasses
import datetime
from typing import Callable, Optional

import torch

from .. import trainer as T
from ..datasets import DEFAULT_CACHE_MAX_BYTES
from ..diffusion import denoising_loss
from ..format import LoRDFile
from ..keys import CONTEXT_FED, select_targets
from ..train_config import TrainConfig
from . import grad
from .data import TrainingData, dataset_digest, encode_images
from .heldout import NO_HELDOUT, HeldOut, gate_separation, heldout_separation, prepare_heldout
from .memory import check_training_memory
from .patch import (init_lord_for_model, lord_fingerprint, lord_injections, model_family, prediction_type,
                    target_modules, target_shapes, unet_names, weights_fingerprint)
from .perturb import online_perturber, stage1_perturbations
from .preview import check_every, step_callback
from .trainable import autocast_for, effective_dtype, dtype_label, trainable_model


@dataclasses.dataclass
class StageResult:
    result: T.TrainResult
    lord: Optional[LoRDFile] = None  # Stage-1
    lora: Optional[dict] = None  # Stage-2: {kohya name: (down, up, alpha)}
    report: dict = dataclasses.field(default_factory=dict)


def _identity(loaded_clone, vae, data: "TrainingData", with_lord: bool) -> dict[str, str]:
    """What a checkpoint must have been trained on to be resumed (see ``trainer.train``); taken from
    the loaded training clone so the in-place weight patches are exactly this MODEL's."""
    ident = {"dataset": dataset_digest(data), "model": weights_fingerprint(loaded_clone, vae),
             "dtype": dtype_label(effective_dtype(loaded_clone))}
    if with_lord:
        ident["LoRD"] = lord_fingerprint(loaded_clone)
    return ident


def _provenance(config: TrainConfig, data: TrainingData, result: T.TrainResult, extra: dict) -> dict:
    from .. import tool_version

    attack = None
    if config.needs_perturbations:
        attacks = config.stage1_attacks()

        def described(a, surrogate) -> dict:
            return {**dataclasses.asdict(a), **({"surrogate": dataclasses.asdict(surrogate),
                                                 "stored_as": "8-bit levels (protected in sets, as published)"}
                                                if surrogate is not None else {})}

        attack = {"stored_as": "float32 (not rounded to 8 bits)", **described(*attacks[0]),
                  "preset": config.attack_preset}
        if len(attacks) > 1:
            attack["attacks"] = [described(*a) for a in attacks]  # image i: attack i mod k
    return {"stage": config.stage, "tool": f"ComfyUI-LoRD {tool_version()}",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": config.to_dict(), "attack": attack,
            "dataset": {"images": len(data), "given_as": "latents" if data.latents else "images", "size_hw": list(data.image_hw), "digest": dataset_digest(data),
                        "class_images": len(data.class_images)},
            "steps_trained": len(result.history),
            "final_loss": result.history[-1]["loss"] if result.history else None, **extra}


def _memory(enabled: bool, *args, **kwargs) -> dict:
    """The memory check (``memory.check_training_memory``), or why it did not run."""
    return check_training_memory(*args, **kwargs) if enabled else {"skipped": "memory_check=False"}


def train_stage1(model_patcher, vae, data: TrainingData, config: TrainConfig, cache_dir, checkpoint_path=None, *,
                 on_step=None, on_data: Optional[Callable[[int, bool], None]] = None,
                 evaluate: bool = True, heldout: Optional[HeldOut] = None,
                 check: Optional[Callable[[], None]] = None,
                 max_cache_bytes: Optional[int] = DEFAULT_CACHE_MAX_BYTES, preview_every: int = 0,
                 on_preview: Optional[Callable[[int, torch.Tensor], None]] = None,
                 memory_check: bool = True) -> StageResult:
    """Eq. 7-8: learn a LoRD (A, B, B', gate) on clean + perturbed copies of ``data`` (the Stage-1 data
    preset ``config.attack_preset``); base frozen.

    Pixels are encoded to latents before training; only the uint8 originals stay (for online
    perturbations). With ``evaluate`` the report holds the gate AUROC on the training pairs
    (``gate_separation_train``, in-sample) and, with ``heldout``, on held-out images protected with
    each of ``heldout.attacks`` vs their clean versions (``gate_separation_heldout``); without
    held-out images that entry says so. ``check()`` (Cancel) runs during data preparation, the
    evaluation loops and previews.

    ``preview_every`` N > 0: every N steps one image for the first caption is sampled with the LoRD
    being trained live and given to ``on_preview(step, u8 [H, W, 3])`` (``preview.TrainingPreview``;
    the trained weights do not change).

    ``memory_check``: before anything expensive (perturbations, encoding), estimate the run's peak
    memory on its device from a measured probe and raise ``lord_ops.memory.NotEnoughMemory`` (a
    ValueError naming the estimate and the fixes) when it will not fit (``lord_ops.comfy.memory``;
    skipped with ``LORD_SKIP_MEMORY_CHECK=1``); the estimate is ``report["memory"]``.
    """
    config = dataclasses.replace(config, stage="stage1", mode="lord").validate()
    check_every(preview_every)
    if not data.images:
        raise ValueError("Stage-1 perturbs pixels: give training images, not latents")
    if lord_injections(model_patcher):
        raise ValueError("the MODEL already has a LoRD applied: Stage-1 trains a new LoRD on the base model; "
                         "connect the checkpoint's MODEL directly")
    online = config.online_perturbations
    lord0 = init_lord_for_model(model_patcher, config.targets, config.rank, config.alpha, config.gate_hidden,
                                config.gate_activation, config.seed)
    memory = _memory(memory_check, model_patcher, vae, data, config,
                     lambda: T.TrainableLoRD(lord0, config.defense_branch), sorted(lord0.targets), passes=2,
                     latent_copies=1 if online else 2, online_attack=online, stage="Stage-1")
    adv_images = None if online else stage1_perturbations(model_patcher, vae, data, config, cache_dir, on_data,
                                                           max_cache_bytes, check)
    z_clean = encode_images(vae, model_patcher, data.images)
    z_adv = z_clean if online else encode_images(vae, model_patcher, adv_images)
    del adv_images  # float pixels are not kept once encoded
    heldout_latents = None
    if evaluate and heldout is not None:
        heldout_latents = prepare_heldout(model_patcher, vae, heldout, data.image_hw, cache_dir, check)
    # the one-branch control (defense_branch False) has no gate to supervise or evaluate
    gate_names = {n for n in lord0.targets if not CONTEXT_FED.search(n)} if config.defense_branch else set()
    with trainable_model(model_patcher, vae, config) as clone:
        device = grad.compute_device(clone)
        trainable = T.TrainableLoRD(lord0, config.defense_branch).to(device)
        predict = grad.batched_noise_predictor(clone, data.conds, data.image_hw)
        acp = grad.alphas_cumprod(clone)
        zc, za = z_clean.to(device), z_adv.to(device)
        autocast = autocast_for(config, device)
        with T.AdapterHooks(target_modules(clone, sorted(lord0.targets)), trainable) as hooks:
            perturb = online_perturber(clone, vae, data, config, predict, acp) if online else None

            loss_terms = T.PairedLoss(acp, config.lambda_adv, config.lambda_gate if gate_names else 0.0, gate_names,
                                      prediction_type(clone), autocast)

            def sample_losses(indices, draws, backward=None):
                t = torch.tensor([d.t for d in draws])
                noise = torch.stack([d.noise(zc.shape[1:]) for d in draws]).to(device)
                z_adv = perturb(indices, draws) if online else za[indices]
                return T.paired_losses(lambda z, tt: predict(z, tt, indices), hooks,
                                       T.PairedBatch(zc[indices], z_adv, t, noise), loss_terms, backward=backward)

            step_hook = step_callback(preview_every, on_step, clone=clone, vae=vae, positive=data.conds[0],
                                      latent_hw=zc.shape[-2:], seed=config.seed, on_image=on_preview,
                                      modules=[clone.model, trainable], hooks=hooks, check=check)
            result = T.train(config, trainable, sample_losses, len(data), checkpoint_path, step_hook, device,
                             identity=_identity(clone, vae, data, with_lord=False))
            report = {}
            if not config.defense_branch:
                report["one_branch"] = ("the one-branch control: gate forced to 0 and B' = 0 on every layer "
                                        "(a plain LoRA on the clean + perturbed copies); no gate to evaluate")
            elif evaluate:
                if online:  # perturbed copies against the final model
                    n = min(64, len(data.images))
                    za = perturb(list(range(n)), [T.Draw(0, T.mix_seed(config.seed, "eval-pgd", i)) for i in range(n)])
                train_sep = gate_separation(clone, hooks, predict, zc, za, acp, gate_names, config.seed, check=check)
                report["gate_separation_train"] = {**train_sep, "in_sample": True,
                                                   "note": "in-sample: the training images and their own perturbed copies"}
                report["gate_separation_heldout"] = (NO_HELDOUT if heldout is None else heldout_separation(
                    clone, hooks, heldout, heldout_latents, acp, gate_names, config.seed, check))
        lord = trainable.export(_provenance(config, data, result, {**report, "effective_dtype": effective_dtype(clone)}))
    lord.base_family = model_family(model_patcher)
    return StageResult(result, lord=lord, report={**report, "final": result.history[-1], "memory": memory})


def train_stage2(model_patcher, vae, data: TrainingData, config: TrainConfig, cache_dir=None, checkpoint_path=None, *,
                 on_step=None, on_data: Optional[Callable[[int, bool], None]] = None, preview_every: int = 0,
                 on_preview: Optional[Callable[[int, torch.Tensor], None]] = None,
                 check: Optional[Callable[[], None]] = None, memory_check: bool = True) -> StageResult:
    """Eq. 9: a new standard LoRA, DreamBooth-style (optional prior preservation).

    ``mode``: ``lord`` -- the MODEL must carry a LoRD (Load LoRD), which stays frozen and live;
    ``plain`` -- a plain LoRA on the given images (the attacked user's baseline);
    ``pgd2_defense`` -- a plain LoRA on the images plus PGD-2 perturbed copies (the paper's baseline).

    ``preview_every`` N > 0: every N steps one image for the instance prompt (the first conditioning)
    is sampled with the LoRA being trained (and the LoRD) live and given to
    ``on_preview(step, u8 [H, W, 3])``; ``check()`` (Cancel) runs at its sampler steps. The trained
    weights do not change (``preview.TrainingPreview``).

    ``memory_check``: as for :func:`train_stage1`, before the perturbations and the encoding.
    """
    config = dataclasses.replace(config, stage="stage2").validate()
    check_every(preview_every)
    has_lord = bool(lord_injections(model_patcher))
    if config.mode == "lord" and not has_lord:
        raise ValueError("Stage-2 mode 'lord' needs a MODEL with a LoRD applied (Load LoRD, or --lord); "
                         "use mode 'plain' to train without one")
    if config.mode != "lord" and has_lord:
        raise ValueError(f"Stage-2 mode {config.mode!r} is a baseline without LoRD, but the MODEL has a LoRD applied")
    if vae is None and (data.images or data.class_images):
        raise ValueError("training from images needs the VAE: connect it (or give latents)")
    if config.mode == "pgd2_defense" and not data.images:
        raise ValueError("mode pgd2_defense perturbs pixels: give images, not latents")
    names = select_targets(unet_names(model_patcher), config.targets)
    shapes = target_shapes(model_patcher, names)
    pairs = config.mode == "pgd2_defense"
    memory = _memory(memory_check, model_patcher, vae, data, config,
                     lambda: T.TrainableLoRA.create(shapes, config.rank, config.alpha, config.seed), names,
                     passes=1 + pairs + bool(data.class_images), latent_copies=1 + pairs, stage="Stage-2")
    adv_images = None
    if pairs:
        adv_images = stage1_perturbations(model_patcher, vae, data, config, cache_dir, on_data)
    if data.latents:
        with torch.inference_mode(False):
            z = model_patcher.model.process_latent_in(torch.stack([lat.float().cpu().clone() for lat in data.latents]))
    else:
        z = encode_images(vae, model_patcher, data.images)
    z_adv = encode_images(vae, model_patcher, adv_images) if adv_images is not None else None
    z_class = encode_images(vae, model_patcher, data.class_images) if data.class_images else None
    with trainable_model(model_patcher, vae, config) as clone:
        device = grad.compute_device(clone)
        trainable = T.TrainableLoRA.create(shapes, config.rank, config.alpha, config.seed).to(device)
        predict = grad.batched_noise_predictor(clone, data.conds, data.image_hw)
        predict_class = grad.batched_noise_predictor(clone, data.class_conds, data.image_hw) if z_class is not None else None
        acp = grad.alphas_cumprod(clone)
        zi = z.to(device)
        za = z_adv.to(device) if z_adv is not None else None
        zk = z_class.to(device) if z_class is not None else None
        autocast = autocast_for(config, device)
        with T.AdapterHooks(target_modules(clone, names), trainable) as hooks:
            def sample_losses(indices, draws, backward=None):
                t = torch.tensor([d.t for d in draws])
                noise = torch.stack([d.noise(zi.shape[1:]) for d in draws]).to(device)
                pred = lambda zt, tt: predict(zt, tt, indices)  # noqa: E731
                if za is not None:
                    total, parts = T.paired_losses(pred, None, T.PairedBatch(zi[indices], za[indices], t, noise),
                                                   T.PairedLoss(acp, config.lambda_adv, 0.0,
                                                                prediction=prediction_type(clone), autocast=autocast),
                                                   backward=backward)
                else:
                    with autocast():
                        total = denoising_loss(pred, zi[indices], t, noise, acp, prediction_type(clone)).float()
                    parts = {"instance": total.detach()}
                if zk is not None:
                    if backward is not None and total.requires_grad:  # free the instance pass before the prior pass
                        backward(total)
                        total = total.detach()
                    which = [d.noise_seed % zk.shape[0] for d in draws]
                    class_noise = torch.stack([T.Draw(d.t, d.noise_seed + 1).noise(zk.shape[1:]) for d in draws]).to(device)
                    with autocast():
                        prior = denoising_loss(lambda zt, tt: predict_class(zt, tt, which), zk[which], t, class_noise, acp,
                                               prediction_type(clone)).float()
                    total = total + config.prior_weight * prior
                    parts["prior"] = prior.detach()
                return total, parts

            step_hook = step_callback(preview_every, on_step, clone=clone, vae=vae, positive=data.conds[0],
                                      latent_hw=zi.shape[-2:], seed=config.seed, on_image=on_preview,
                                      modules=[clone.model, trainable], hooks=hooks, check=check)
            result = T.train(config, trainable, sample_losses, len(data), checkpoint_path, step_hook, device,
                             identity=_identity(clone, vae, data, with_lord=has_lord))
        eff = effective_dtype(clone)
    lora = trainable.export()
    report = {"mode": config.mode, "final": result.history[-1], "targets": len(lora), "memory": memory,
              "provenance": _provenance(config, data, result, {"lord_live": has_lord, "effective_dtype": eff})}
    return StageResult(result, lora=lora, report=report)
