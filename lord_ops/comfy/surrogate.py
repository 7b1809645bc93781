"""The published surrogate attacks (mist-v2, Anti-DreamBooth ASPL / FSMG) on ComfyUI models.

The loop itself is plain torch (``lord_ops.attacks.run_alternating_attack``); this module supplies
its callables on a ComfyUI MODEL: a surrogate LoRA (``trainer.TrainableLoRA``, hooked into the
UNet with ``trainer.AdapterHooks``) on a loaded, differentiable **clone** of the MODEL (Stage-2's
``trainable_model``), fine-tuned with the denoising loss on the current images while the PGD rounds
run against base + that LoRA. The MODEL given by the user is never patched: the hooks live only
for the call and its weights are not changed (tested bit for bit).

Units: IMAGEs ``[B, H, W, C]`` in [0, 1]; budgets and steps in pixel levels 0..255.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import torch

from .. import trainer as T
from ..attacks import (AlternatingConfig, AttackConfig, SURROGATE_TARGETS, quantize_uint8, run_alternating_attack,
                       run_attack, train_surrogate_steps)
from ..diffusion import denoising_loss
from ..train_config import TrainConfig
from . import grad
from .patch import layer_shape, target_modules, unet_names
from .trainable import trainable_model


def surrogate_targets(model_patcher, targets: str) -> list[str]:
    """Kohya names of the MODEL's layers the surrogate LoRA adapts (``AlternatingConfig.targets``)."""
    pattern = re.compile(SURROGATE_TARGETS[targets])
    names = sorted(n for n in unet_names(model_patcher) if pattern.search(n))
    if not names:
        raise ValueError(f"the MODEL has no layers matching surrogate targets {targets!r} (UNet transformer "
                         f"attention layers): the surrogate attacks support SD1.x/SD2.x/SDXL-style UNets")
    return names


def _round_seed(seed: int, round_index: int, image_index: int, phase: int) -> int:
    """A seed per (run seed, round, image, phase): every random draw of the loop is reproducible."""
    return ((seed * 1_000_003 + round_index) * 1_009 + image_index) * 7 + phase


def protect_with_surrogate(model_patcher, vae, conditioning, images_bhwc, attack: AttackConfig,
                           surrogate: AlternatingConfig, target_bhwc: Optional[torch.Tensor] = None,
                           on_progress: Optional[Callable[[int, int, float, Optional[torch.Tensor]], None]] = None,
                           class_images=None, class_conditioning=None, gate_penalty=None) -> tuple[object, dict]:
    """Perturb a set of IMAGEs ``[B, H, W, C]`` in [0, 1] (or a list of ``[1, H_i, W_i, C]`` of
    different sizes) with a surrogate loop.

    The set is what the surrogate trains on (mist-v2 and ASPL fine-tune on all images of one
    subject); each PGD round runs ``attack.steps`` steps per image, image ``i`` of round ``r``
    seeded from ``(attack.seed, r, i)``. Sizes that are not a multiple of 8 are replicate-padded and
    cropped back; the result is quantised to 8 bits within ``floor(attack.epsilon)`` levels.
    ``on_progress(done, total, loss, preview [1, 3, H, W] or None)`` after every PGD and surrogate
    step (raise from it to cancel). Returns ``(perturbed, report)``, perturbed in the input's form
    (``[B, H, W, 3]``, or a list of ``[1, H_i, W_i, 3]``).

    ``class_images`` (same forms, optional) turn on DreamBooth prior preservation in the surrogate
    steps (weight ``surrogate.prior_weight``), with ``class_conditioning`` (default: ``conditioning``).
    ``gate_penalty`` (``lord_ops.comfy.evasion``): the gate-evasion term in every PGD step (not in the
    surrogate's training steps).
    """
    attack = attack.validate()
    surrogate = surrogate.validate()
    if attack.method == "photoguard":
        raise ValueError("photoguard attacks the VAE encoder only: a UNet surrogate does not apply; use it without "
                         "a surrogate schedule")
    as_list = isinstance(images_bhwc, (list, tuple))
    with torch.inference_mode(False):
        items = list(images_bhwc) if as_list else [images_bhwc[i:i + 1] for i in range(images_bhwc.shape[0])]
        clean = [im[..., :3].movedim(-1, 1).float().clone() for im in items]
        padded, sizes = zip(*(grad.pad_to_multiple(c) for c in clean)) if clean else ((), ())
    n = len(padded)
    if n == 0:
        raise ValueError("no images to protect")
    with torch.inference_mode(False):
        if class_images is None:
            class_items = []
        elif isinstance(class_images, (list, tuple)):
            class_items = list(class_images)
        else:
            class_items = [class_images[i:i + 1] for i in range(class_images.shape[0])]
        class_padded = [grad.pad_to_multiple(im[..., :3].movedim(-1, 1).float().clone())[0] for im in class_items]
    class_conditioning = conditioning if class_conditioning is None else class_conditioning
    total = attack.steps * n * surrogate.rounds + surrogate.surrogate_steps()
    done = 0

    def progress(loss: float, preview=None):
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, total, loss, preview)

    train_config = TrainConfig(stage="stage2", mode="plain", rank=surrogate.rank, alpha=surrogate.alpha,
                               learning_rate=surrogate.learning_rate, seed=attack.seed)
    names = surrogate_targets(model_patcher, surrogate.targets)
    with trainable_model(model_patcher, vae, train_config) as clone:
        device = clone.load_device
        modules = target_modules(clone, names)
        shapes = {name: layer_shape(m) for name, m in modules.items()}
        with torch.inference_mode(False):
            lora = T.TrainableLoRA.create(shapes, surrogate.rank, surrogate.alpha, attack.seed).to(device)
        params = [p for p in lora.parameters() if p.requires_grad]
        compute = getattr(clone.model, "manual_cast_dtype", None) or clone.model.get_dtype()
        # fp16 activations: scale the loss so that small LoRA gradients survive (as mist-v2 does in fp16)
        scaler = torch.amp.GradScaler(device.type) if (compute == torch.float16 and device.type == "cuda") else None
        encode = grad.latent_encoder(vae, clone)
        predictors: dict = {}

        def predict(z, t, which, cond_index: int = 0):  # one predictor per latent size and prompt
            key = (8 * z.shape[-2], 8 * z.shape[-1], cond_index)
            if key not in predictors:
                predictors[key] = grad.batched_noise_predictor(clone, [(conditioning, class_conditioning)[cond_index]],
                                                               key[:2])
            return predictors[key](z, t, which)

        with torch.inference_mode(False), torch.no_grad():
            class_latents = [encode(im.to(device)).float() for im in class_padded]

        acp = grad.alphas_cumprod(clone)
        t_hi = min(attack.t_max, len(acp) - 1)
        targets = {}
        for i, p in enumerate(padded):
            size = tuple(p.shape[-2:])
            if attack.method in ("ace", "ace_plus") and size not in targets:
                tgt = None if target_bhwc is None else target_bhwc[:1, ..., :3].movedim(-1, 1).float()
                with torch.inference_mode(False):
                    targets[size] = grad.encode_target(vae, clone, tgt, p)

        def pgd_round(current: list, r: int):
            out, losses = [], []
            for i in range(n):
                h, w = sizes[i]
                cfg = dataclasses.replace(attack, seed=_round_seed(attack.seed, r, i, 0) % (2 ** 62))
                step_cb = lambda s, loss, cur, h=h, w=w: progress(loss, cur[..., :h, :w] if s == attack.steps - 1 else None)  # noqa: E731
                predict_i = lambda z, t: predict(z, t, [0] * z.shape[0])  # noqa: E731
                res = run_attack(padded[i], cfg, encode,
                                 predict_i if gate_penalty is None else gate_penalty.arm(predict_i), acp,
                                 targets.get(tuple(padded[i].shape[-2:])), step_cb, start=current[i],
                                 penalty=gate_penalty)
                out.append(res.images.detach())
                losses.append(res.loss_trace)
            return out, losses

        def surrogate_train(images: list, steps: int, r: int, phase: str) -> list[float]:
            with torch.inference_mode(False), torch.no_grad():
                latents = [encode(im.to(device)).float() for im in images]

            def loss_on(zs, cond_index):
                def loss_of(i, t, noise):
                    z = zs[i]
                    return denoising_loss(lambda zz, tt: predict(zz, tt, [0], cond_index), z, t.to(device),
                                          noise[..., :z.shape[-2], :z.shape[-1]].to(device), acp).mean()
                return loss_of

            seed = _round_seed(attack.seed, r, 0, 1 if phase == "clean" else 2)
            every = latents + class_latents
            largest = (every[0].shape[1], max(z.shape[-2] for z in every), max(z.shape[-1] for z in every))
            return train_surrogate_steps(params, loss_on(latents, 0), n, steps, surrogate, seed, attack.t_min, t_hi,
                                         largest, lambda s, loss: progress(loss),
                                         loss_on(class_latents, 1) if class_latents else None, len(class_latents),
                                         scaler)

        def snapshot():
            with torch.inference_mode(False):
                return {k: v.detach().clone() for k, v in lora.state_dict().items()}

        def restore(state):
            with torch.inference_mode(False), torch.no_grad():
                lora.load_state_dict(state)

        with T.AdapterHooks(modules, lora):
            result = run_alternating_attack(list(padded), surrogate, pgd_round, surrogate_train, snapshot, restore)
        with torch.inference_mode(False):
            outs = []
            for adv, c, (h, w) in zip(result.images, clean, sizes):
                q = quantize_uint8(adv[..., :h, :w].cpu(), c, attack.epsilon).float() / 255.0
                outs.append(q.movedim(1, -1))
    report = {"attack": dataclasses.asdict(attack), "surrogate": dataclasses.asdict(surrogate),
              "surrogate_layers": len(names), "class_images": len(class_padded),
              "compute_dtype": str(compute).replace("torch.", ""), "grad_scaler": scaler is not None,
              "rounds": result.rounds}
    return (outs if as_list else torch.cat(outs)), report
