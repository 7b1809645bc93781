"""Adversarial perturbation engine: PGD/AdvDM, ACE, ACE+ and the PhotoGuard encoder attack.

Plain torch over model-agnostic callables, so the same code runs on ComfyUI models, diffusers
models or test stand-ins:

* ``encode(x)``: images ``[B, 3, H, W]`` in **[0, 1]** -> scaled latents ``z`` (``s_vae * E(2x-1)``),
* ``predict_noise(z_t, t)``: noisy latents and integer timesteps ``[B]`` -> predicted noise
  (conditioning bound inside the callable),
* ``alphas_cumprod``: the DDPM schedule ``[T]`` used to noise latents.

Units: images are in [0, 1]; **epsilon and step size are pixel levels 0..255** (L-inf). The
published codes work in [-1, 1]: a value there is ``value * 127.5`` levels
(:func:`published_to_levels`), e.g. Anti-DreamBooth's eps 0.05 = 6.375 levels and mist-v2's
8/255 = 4 levels. This module is the one place that converts.

Objectives (the sign says which way the step goes):

* ``pgd``   maximise ``||eps - eps_theta(z'_t, t)||^2`` (AdvDM / Anti-DreamBooth),
* ``ace``   minimise ``||eps_theta(z'_t, t) - z_T||^2`` (mist-v2 ``lunet``; ``z_T`` = target latent),
* ``ace_plus`` minimise ACE ``+ target_weight * ||z' - z_T||^2`` (reference ACE ``fused`` form),
* ``photoguard`` minimise ``||E(x') - z_target||^2`` (encoder attack; target zero or a latent).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .diffusion import add_noise, denoising_loss

METHODS = ("pgd", "ace", "ace_plus", "photoguard")
_MINIMISE = {"pgd": False, "ace": True, "ace_plus": True, "photoguard": True}
_NEEDS_UNET = {"pgd", "ace", "ace_plus"}


def published_to_levels(value: float) -> float:
    """A perturbation size in the [-1, 1] image scale of the published codes -> pixel levels."""
    return round(value * 127.5, 9)


def levels_to_unit(levels: float) -> float:
    """Pixel levels 0..255 -> the [0, 1] image scale."""
    return levels / 255.0


@dataclasses.dataclass
class AttackConfig:
    """One attack run. ``epsilon``/``step_size`` in pixel levels; timesteps sampled uniformly
    from ``[t_min, t_max]`` each step."""

    method: str = "pgd"
    epsilon: float = published_to_levels(0.05)
    step_size: float = published_to_levels(0.005)
    steps: int = 50
    seed: int = 0
    random_start: bool = False
    t_min: int = 0
    t_max: int = 999
    target_weight: float = 100.0
    low_memory: bool = False

    def validate(self) -> "AttackConfig":
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not (0 < self.epsilon <= 255):
            raise ValueError(f"epsilon is in pixel levels and must be in (0, 255], got {self.epsilon}")
        if not (0 < self.step_size <= 255):
            raise ValueError(f"step_size is in pixel levels and must be in (0, 255], got {self.step_size}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not (0 <= self.t_min <= self.t_max):
            raise ValueError(f"need 0 <= t_min <= t_max, got {self.t_min}..{self.t_max}")
        return self


PRESETS = {
    # Anti-DreamBooth / the paper's Stage-1 PGD: eps 0.05, step 0.005 in [-1, 1]
    "anti_dreambooth": AttackConfig("pgd", published_to_levels(0.05), published_to_levels(0.005), 50),
    "pgd_2": AttackConfig("pgd", published_to_levels(0.05), published_to_levels(0.005), 2),
    # mist-v2 defaults: eps 8/255 and step 0.005 in [-1, 1], 5 x 30 PGD steps
    "mist_v2_ace": AttackConfig("ace", published_to_levels(8 / 255), published_to_levels(0.005), 150),
    "mist_v2_ace_plus": AttackConfig("ace_plus", published_to_levels(8 / 255), published_to_levels(0.005), 150),
    "photoguard_encoder": AttackConfig("photoguard", published_to_levels(0.06), published_to_levels(0.005), 100),
}


@dataclasses.dataclass
class AttackResult:
    images: torch.Tensor  # [B, 3, H, W] in [0, 1], within epsilon of the input
    loss_trace: list[float]  # the objective (mean over the batch) before each step


# Attack presets that the Stage-1 data presets (lord_ops/training.py STAGE1_DATA_PRESETS) name; kept
# when defined above. ace_fixed: mist-v2's ACE objective, budget and step, against the fixed model
# (no LoRA steps in between). pgd_full: Anti-DreamBooth's eps/step from a random start in the ball,
# 10 iterations (10 x 0.6375 = 6.375 levels: every pixel can reach the full budget).
PRESETS.setdefault("ace_fixed", AttackConfig("ace", published_to_levels(8 / 255), published_to_levels(0.005), 150))
PRESETS.setdefault("pgd_full", AttackConfig("pgd", published_to_levels(0.05), published_to_levels(0.005), 10,
                                            random_start=True))


def project(x: torch.Tensor, original: torch.Tensor, epsilon_levels: float) -> torch.Tensor:
    """L-inf projection onto the epsilon ball around ``original`` intersected with [0, 1]."""
    eps = levels_to_unit(epsilon_levels)
    return torch.max(torch.min(x, original + eps), original - eps).clamp(0.0, 1.0)


def quantize_uint8(adversarial: torch.Tensor, original: torch.Tensor, epsilon_levels: float) -> torch.Tensor:
    """Round to 8-bit levels so that every pixel stays within ``floor(epsilon)`` levels of the
    rounded original and inside 0..255; returns uint8 values (same layout)."""
    q_orig = torch.round(original.clamp(0, 1) * 255)
    q = torch.round(adversarial.clamp(0, 1) * 255)
    limit = float(int(epsilon_levels))
    return torch.max(torch.min(q, q_orig + limit), q_orig - limit).clamp(0, 255).to(torch.uint8)


def objective(method: str, z: torch.Tensor, predict_noise: Optional[Callable], alphas_cumprod: Optional[torch.Tensor],
              t: Optional[torch.Tensor], noise: Optional[torch.Tensor], target_latent: Optional[torch.Tensor],
              target_weight: float = 100.0) -> torch.Tensor:
    """The per-sample objective ``[B]`` of ``method`` at latents ``z`` (see the module docstring)."""
    dims = tuple(range(1, z.dim()))
    if method == "photoguard":
        target = torch.zeros_like(z) if target_latent is None else target_latent
        return (z.float() - target.float()).square().mean(dim=dims)
    if method == "pgd":
        return denoising_loss(predict_noise, z, t, noise, alphas_cumprod)
    pred = predict_noise(add_noise(z, noise, t, alphas_cumprod).to(z.dtype), t).float()
    if target_latent is None:
        raise ValueError(f"method {method!r} needs a target image latent")
    loss = (pred - target_latent.float()).square().mean(dim=dims)
    if method == "ace_plus":
        loss = loss + target_weight * (z.float() - target_latent.float()).square().mean(dim=dims)
    return loss


def run_attack(images: torch.Tensor, config: AttackConfig, encode: Callable[[torch.Tensor], torch.Tensor],
               predict_noise: Optional[Callable] = None, alphas_cumprod: Optional[torch.Tensor] = None,
               target_latent: Optional[torch.Tensor] = None,
               on_step: Optional[Callable[[int, float, torch.Tensor], None]] = None) -> AttackResult:
    """Projected sign-gradient attack on ``images`` ``[B, 3, H, W]`` in [0, 1].

    ``on_step(step, loss, current_images)`` is called after every step (progress bars, previews,
    cancellation: raise from it to stop). Deterministic for a given ``config.seed``.
    """
    config.validate()
    if config.method in _NEEDS_UNET and (predict_noise is None or alphas_cumprod is None):
        raise ValueError(f"method {config.method!r} needs predict_noise and alphas_cumprod")
    g = torch.Generator(device="cpu").manual_seed(config.seed)
    step = levels_to_unit(config.step_size)
    direction = -1.0 if _MINIMISE[config.method] else 1.0
    trace: list[float] = []
    t_hi = min(config.t_max, (len(alphas_cumprod) - 1) if alphas_cumprod is not None else config.t_max)
    if config.method in _NEEDS_UNET and config.t_min > t_hi:
        raise ValueError(f"t_min={config.t_min} is past the model's last timestep {len(alphas_cumprod) - 1}")
    # ComfyUI runs nodes under inference_mode: everything that autograd touches is created here
    with torch.inference_mode(False), torch.enable_grad():
        original = images.detach().float().clamp(0, 1).clone()
        if target_latent is not None:
            target_latent = target_latent.detach().clone()
        x = original.clone()
        if config.random_start:
            eps = levels_to_unit(config.epsilon)
            x = project(x + (torch.rand(x.shape, generator=g) * 2 - 1).to(x.device) * eps, original, config.epsilon)
        for i in range(config.steps):
            t = noise = None
            if config.method in _NEEDS_UNET:
                t = torch.randint(config.t_min, t_hi + 1, (x.shape[0],), generator=g).to(x.device)
            x_in = x.detach().clone().requires_grad_(True)

            def loss_of_latent(z):
                nonlocal noise
                if config.method in _NEEDS_UNET and noise is None:
                    noise = torch.randn(z.shape, generator=g).to(z.device, torch.float32)
                return objective(config.method, z, predict_noise, alphas_cumprod, t, noise, target_latent,
                                 config.target_weight).sum()

            if config.low_memory:
                # mist-v2's trick: no encoder graph while the UNet graph is alive
                with torch.no_grad():
                    z0 = encode(x_in)
                z = z0.detach().requires_grad_(True)
                loss = loss_of_latent(z)
                (grad_z,) = torch.autograd.grad(loss, z)
                z_again = torch.utils.checkpoint.checkpoint(encode, x_in, use_reentrant=False)
                (grad,) = torch.autograd.grad(z_again, x_in, grad_outputs=grad_z)
            else:
                loss = loss_of_latent(encode(x_in))
                (grad,) = torch.autograd.grad(loss, x_in)
            trace.append(float(loss.detach()) / x.shape[0])
            x = project(x + direction * step * grad.sign(), original, config.epsilon).detach()
            if on_step is not None:
                on_step(i, trace[-1], x)
    return AttackResult(x, trace)


def evaluate_objective(images: torch.Tensor, config: AttackConfig, encode, predict_noise=None, alphas_cumprod=None,
                       target_latent=None, samples: int = 8) -> float:
    """Mean objective of ``images`` over ``samples`` fixed (seeded) timestep/noise draws; for
    comparing an attack with random noise of the same size on the same objective."""
    g = torch.Generator().manual_seed(config.seed + 12345)
    total = 0.0
    with torch.no_grad():
        z = encode(images.float())
        for _ in range(samples):
            t = noise = None
            if config.method in _NEEDS_UNET:
                t = torch.randint(config.t_min, min(config.t_max, len(alphas_cumprod) - 1) + 1, (z.shape[0],), generator=g)
                noise = torch.randn(z.shape, generator=g)
            total += float(objective(config.method, z, predict_noise, alphas_cumprod, t, noise, target_latent,
                                     config.target_weight).mean())
    return total / samples


def high_contrast_target(height: int, width: int, cells: int = 8) -> torch.Tensor:
    """The pack's own default ACE target: a black/white checkerboard with a diagonal stripe,
    ``[1, 3, H, W]`` in [0, 1] (no copied asset)."""
    ys = torch.arange(height).reshape(-1, 1) * cells // max(height, 1)
    xs = torch.arange(width).reshape(1, -1) * cells // max(width, 1)
    board = ((ys + xs) % 2).float()
    yy = torch.arange(height).reshape(-1, 1) / max(height - 1, 1)
    xx = torch.arange(width).reshape(1, -1) / max(width - 1, 1)
    stripe = ((yy - xx).abs() < 0.08).float()
    img = torch.where(stripe > 0, 1.0 - board, board)
    return img.expand(3, height, width).unsqueeze(0).contiguous()


def resize_target(target: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A target image ``[1 or B, 3, h, w]`` resized (bilinear, antialiased) to ``height x width``."""
    if target.shape[-2:] == (height, width):
        return target
    return F.interpolate(target.float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True)
