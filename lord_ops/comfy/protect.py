"""Run the attack engine on ComfyUI models (shared by the Protect node and the batch CLI)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ..attacks import AlternatingConfig, AttackConfig, AttackResult, check_8bit_budget, quantize_uint8, run_attack
from . import grad


def gradient_precision(model_patcher):
    """The MODEL to attack through: a clone computing in float32 when the MODEL computes in fp16 (an
    fp16 checkpoint on a GPU), else the MODEL itself. fp16 backward without loss scaling underflows
    small pixel gradients to 0, and ``sign(0)`` does not move the pixel; weights stay fp16 in memory
    and are cast per layer (``set_model_compute_dtype``, as training does). bf16 and fp32 are kept."""
    from .trainable import effective_dtype

    if effective_dtype(model_patcher)["compute"] != "fp16":
        return model_patcher
    clone = model_patcher.clone()
    clone.set_model_compute_dtype(torch.float32)
    return clone


def protect_images(model_patcher, vae, conditioning, images_bhwc: torch.Tensor, config: AttackConfig,
                   target_bhwc: Optional[torch.Tensor] = None,
                   on_step: Optional[Callable[[int, int, float, torch.Tensor], None]] = None,
                   gate_penalty=None) -> tuple[torch.Tensor, list]:
    """Perturb ComfyUI IMAGEs ``[B, H, W, C]`` in [0, 1] one image at a time.

    Sizes that are not a multiple of 8 are replicate-padded for the attack and cropped back; the
    result is quantised to 8 bits within ``floor(epsilon)`` levels of the input. Image ``i`` uses
    seed ``config.seed + i``. ``on_step(image_index, step, loss, current [1, 3, H, W])``.
    ``gate_penalty``: a ``lord_ops.comfy.evasion.GatePenalty`` recording this MODEL's LoRD gates (the
    gate-evasion attacker; the MODEL must be its clone from ``evasion.evading_gates``).
    Returns ``(perturbed [B, H, W, 3] in [0, 1], per-image loss traces)``.
    """
    if config.method != "photoguard":
        model_patcher = gradient_precision(model_patcher)
    grad.load_for_gradients(model_patcher if config.method != "photoguard" else None, vae)
    encode = grad.latent_encoder(vae, model_patcher)
    acp = grad.alphas_cumprod(model_patcher) if config.method != "photoguard" else None
    target = None if target_bhwc is None else target_bhwc[..., :3].movedim(-1, 1).float()
    outs, traces = [], []
    for i in range(images_bhwc.shape[0]):
        with torch.inference_mode(False):
            img = images_bhwc[i:i + 1, ..., :3].movedim(-1, 1).float().clone()
            padded, (h, w) = grad.pad_to_multiple(img)
            tgt_img = None if target is None else target[min(i, target.shape[0] - 1):][:1]
            target_latent = None
            if config.method != "pgd":
                target_latent = (grad.encode_target(vae, model_patcher, tgt_img, padded)
                                 if config.method != "photoguard" or tgt_img is not None else None)
            predict = (grad.noise_predictor(model_patcher, conditioning, tuple(padded.shape[-2:]))
                       if config.method != "photoguard" else None)
            if gate_penalty is not None and predict is not None:
                predict = gate_penalty.arm(predict)
            cfg_i = AttackConfig(**{**config.__dict__, "seed": config.seed + i})
            step_cb = (lambda s, loss, cur, i=i: on_step(i, s, loss, cur[..., :h, :w])) if on_step else None
            result: AttackResult = run_attack(padded, cfg_i, encode, predict, acp, target_latent, step_cb,
                                              penalty=gate_penalty)
            adv = result.images[..., :h, :w]
            q = quantize_uint8(adv, img, config.epsilon).float() / 255.0
        outs.append(q.movedim(1, -1))
        traces.append(result.loss_trace)
    return torch.cat(outs, dim=0), traces


@dataclasses.dataclass
class Protection:
    """What :func:`protect` does: the attack (budgets in pixel levels 0..255), optionally the published
    surrogate schedule around it, an ACE / PhotoGuard target IMAGE ``[1|B, H, W, C]`` in [0, 1] (default:
    the pack's pattern / the zero latent), and class images (IMAGEs ``[1, H, W, C]``) with their
    CONDITIONING for the surrogate's prior preservation (surrogate presets only)."""

    attack: AttackConfig
    surrogate: Optional[AlternatingConfig] = None
    target: Optional[torch.Tensor] = None
    class_images: Optional[list] = None
    class_conditioning: Optional[object] = None
    # the gate-evasion term (lord_ops.comfy.evasion.GatePenalty of the attacked MODEL, a LoRD-carrying clone)
    gate_penalty: Optional[object] = None


def protect(model_patcher, vae, conditioning, images_bhwc: torch.Tensor, protection: Protection,
            on_progress: Optional[Callable[[int, int, float, Optional[torch.Tensor]], None]] = None
            ) -> tuple[torch.Tensor, dict]:
    """8-bit protected IMAGEs ``[B, H, W, 3]`` in [0, 1] and a report (the Protect node and the CLI).

    Without ``protection.surrogate``: a fixed-model attack, image by image (:func:`protect_images`);
    with one: the published surrogate loop (``surrogate.protect_with_surrogate``) over the whole batch
    (``images_bhwc`` may then be a list of ``[1, H_i, W_i, C]``), with optional class images for prior
    preservation in its fine-tuning steps. ``on_progress(done, total, loss, preview [1, 3, H, W] or
    None)`` after every step (raise to cancel). A budget below one pixel level is refused (the 8-bit
    output would equal the input). The report has ``loss_traces``: per image, the PGD objective before
    each of its steps.
    """
    attack, surrogate, target_bhwc = protection.attack, protection.surrogate, protection.target
    class_images, class_conditioning = protection.class_images, protection.class_conditioning
    check_8bit_budget(attack.epsilon, "strength (epsilon)")
    if protection.gate_penalty is not None and attack.method == "photoguard":
        raise ValueError("gate_evasion needs an attack that runs the diffusion model (pgd, ace, ace_plus or a "
                         "surrogate preset); photoguard only attacks the VAE encoder, so no LoRD gate is read. "
                         "Set gate_evasion to 0 or pick another method.")
    if surrogate is not None:
        from .surrogate import protect_with_surrogate

        out, report = protect_with_surrogate(model_patcher, vae, conditioning, images_bhwc, attack, surrogate,
                                             target_bhwc, on_progress, class_images, class_conditioning,
                                             gate_penalty=protection.gate_penalty)
        count = len(images_bhwc) if isinstance(images_bhwc, (list, tuple)) else images_bhwc.shape[0]
        report["loss_traces"] = [[v for rnd in report["rounds"] for v in rnd["pgd_losses"][i]] for i in range(count)]
        return out, report
    if class_images is not None:
        raise ValueError("class images (prior preservation) are used by the surrogate presets only (mist_v2, "
                         "anti_dreambooth_aspl, anti_dreambooth_fsmg); a fixed-model attack has no fine-tuning step")
    steps, total = attack.steps, attack.steps * images_bhwc.shape[0]

    def on_step(index, step, loss, current):
        if on_progress is not None:
            last = step == steps - 1 or step % 10 == 0
            on_progress(index * steps + step + 1, total, loss, current if last else None)

    out, traces = protect_images(model_patcher, vae, conditioning, images_bhwc, attack, target_bhwc, on_step,
                                 gate_penalty=protection.gate_penalty)
    return out, {"attack": dict(attack.__dict__), "loss_traces": traces}


def perturbation_view(original_bhwc: torch.Tensor, perturbed_bhwc: torch.Tensor, epsilon_levels: float) -> torch.Tensor:
    """Signed perturbation as an IMAGE: mid-grey = unchanged, +/-epsilon -> white/black."""
    delta = perturbed_bhwc[..., :3].float() - original_bhwc[..., :3].float()
    return (0.5 + 0.5 * delta / (epsilon_levels / 255.0)).clamp(0, 1)
