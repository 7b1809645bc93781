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

Fixed-model attacks (:func:`run_attack`, :data:`PRESETS`) optimise against the model as given. The
published tools alternate PGD with fine-tuning of a surrogate copy of the model on the images
(mist-v2, Anti-DreamBooth ASPL; FSMG fine-tunes once on clean images first):
:func:`run_alternating_attack` is that loop over callables, :func:`train_surrogate_steps` its
fine-tuning step, :class:`AlternatingConfig` its schedule and :data:`SURROGATE_PRESETS` the
published numbers (source file and line of each: README, "Attack presets").
"""
from __future__ import annotations

import dataclasses
import hashlib
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


MIN_8BIT_EPSILON = 1.0


def check_8bit_budget(epsilon_levels: float, where: str = "epsilon") -> None:
    """Refuse a budget below one pixel level for an 8-bit output: rounding to 0..255 would undo
    every change (each pixel stays within ``floor(epsilon)`` = 0 levels of its input)."""
    if epsilon_levels < MIN_8BIT_EPSILON:
        raise ValueError(f"{where} {epsilon_levels:g} is below one pixel level: the 8-bit output would equal the "
                         f"input (every pixel stays within floor({epsilon_levels:g}) = 0 levels). Use a budget of "
                         f"at least 1 level (mist-v2: 4, Anti-DreamBooth: 6.375).")


# Fixed-model attacks: the perturbation is optimised against the given MODEL as it is. Stage-1 uses
# these by name (``TrainConfig.attack_preset``). Source file/line of every number: README, "Attack presets".
PRESETS = {
    # PGD/AdvDM objective at Anti-DreamBooth's budget (eps 0.05, step 0.005 in [-1, 1]), 50 steps,
    # against the fixed base model (not ASPL/FSMG: those are below)
    "pgd_fixed": AttackConfig("pgd", published_to_levels(0.05), published_to_levels(0.005), 50),
    # the paper's Stage-1 "PGD-2": Anti-DreamBooth's budget and step, 2 iterations
    "pgd_2": AttackConfig("pgd", published_to_levels(0.05), published_to_levels(0.005), 2),
    # mist-v2's objective and numbers (eps 8/255, step 0.005 in [-1, 1], 5 x 30 PGD steps) against the
    # fixed model, without its LoRA surrogate loop (that is the ``mist_v2`` preset)
    "ace_fixed": AttackConfig("ace", published_to_levels(8 / 255), published_to_levels(0.005), 150),
    "ace_plus_fixed": AttackConfig("ace_plus", published_to_levels(8 / 255), published_to_levels(0.005), 150),
    "photoguard_encoder": AttackConfig("photoguard", published_to_levels(0.06), published_to_levels(0.005), 100),
}


@dataclasses.dataclass
class AlternatingConfig:
    """The surrogate schedule of mist-v2 / Anti-DreamBooth ASPL / FSMG.

    ``rounds`` times: (1) when ``clean_steps`` > 0, a copy of the surrogate LoRA is fine-tuned that
    many steps on the clean images (ASPL's ``f' = f.clone(); train(f', clean)``, FSMG's reference
    fine-tune); (2) one PGD round (``AttackConfig.steps`` steps per image) against base + surrogate
    (the copy when there is one), starting from the current perturbed images, inside the budget
    around the originals; (3) the surrogate itself is fine-tuned ``train_steps`` steps on the
    perturbed images. The last round's step (3) cannot change the output and is skipped.

    Surrogate = a standard LoRA (``rank``, ``alpha``; ``alpha=None`` = rank, scale 1) on ``targets``
    (``attn``: attention q/k/v/out; ``attn+ff``: also the feed-forward input projection, as
    lora_diffusion's default), AdamW (``learning_rate``, ``betas``, ``weight_decay``, ``adam_eps``),
    fresh each time a phase starts (both sources build a new optimizer per call), global gradient
    norm clipped at ``max_grad_norm`` (0: off). One image per step (``batch_size`` 1), timesteps
    uniform in the attack's ``[t_min, t_max]``. With class images (DreamBooth prior preservation,
    optional), each step adds ``prior_weight`` x the denoising loss of one class image.
    """

    rounds: int = 5
    clean_steps: int = 0
    train_steps: int = 10
    learning_rate: float = 1e-4
    rank: int = 4
    alpha: Optional[float] = None
    targets: str = "attn+ff"
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    prior_weight: float = 1.0

    def validate(self) -> "AlternatingConfig":
        if self.rounds < 1:
            raise ValueError(f"surrogate rounds must be >= 1, got {self.rounds}")
        if self.clean_steps < 0 or self.train_steps < 0:
            raise ValueError(f"surrogate steps must be >= 0, got clean {self.clean_steps}, train {self.train_steps}")
        if self.rank < 1 or not (self.learning_rate > 0) or (self.alpha is not None and self.alpha <= 0):
            raise ValueError(f"surrogate LoRA needs rank >= 1, learning_rate > 0, alpha > 0 (got {self.rank}, "
                             f"{self.learning_rate}, {self.alpha})")
        if self.targets not in SURROGATE_TARGETS:
            raise ValueError(f"surrogate targets must be one of {tuple(SURROGATE_TARGETS)}, got {self.targets!r}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = off), got {self.max_grad_norm}")
        if self.prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {self.prior_weight}")
        return self

    def surrogate_steps(self) -> int:
        """LoRA optimizer steps of a whole run (progress bars)."""
        return self.rounds * self.clean_steps + (self.rounds - 1) * self.train_steps


# kohya-name patterns of the surrogate LoRA's layers (UNet transformer blocks)
SURROGATE_TARGETS = {
    "attn": r"attentions_\d+_transformer_blocks_\d+_attn[12]_to_(q|k|v|out_0)$",
    "attn+ff": r"attentions_\d+_transformer_blocks_\d+_(attn[12]_to_(q|k|v|out_0)|ff_net_0_proj)$",
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named attack: the PGD part (``attack``; ``steps`` = per round when ``surrogate`` is set)
    and, for the published surrogate methods, their schedule."""

    attack: AttackConfig
    surrogate: Optional[AlternatingConfig] = None
    reproduces: str = ""


# Attacks with a surrogate model fine-tuned during the attack (the published loops).
SURROGATE_PRESETS = {
    # psyker-team/mist-v2 attacks/mist.py defaults: mode lunet (ACE), eps 8/255, step 0.005,
    # 5 epochs x (30 PGD steps per image, then 10 LoRA steps), LoRA rank 4, lr 1e-4
    "mist_v2": Preset(
        AttackConfig("ace", published_to_levels(8 / 255), published_to_levels(0.005), 30, low_memory=True),
        AlternatingConfig(rounds=5, clean_steps=0, train_steps=10, learning_rate=1e-4, rank=4, targets="attn+ff",
                          prior_weight=0.1),
        "mist-v2 attacks/mist.py (lunet/ACE) with its argparse defaults"),
    # VinAIResearch/Anti-DreamBooth scripts/attack_with_aspl.sh: 50 x (3 surrogate steps on clean
    # images, 6 PGD steps, 3 steps on the perturbed images), eps 0.05, step 0.005
    "anti_dreambooth_aspl": Preset(
        AttackConfig("pgd", published_to_levels(0.05), published_to_levels(0.005), 6),
        AlternatingConfig(rounds=50, clean_steps=3, train_steps=3, learning_rate=1e-4, rank=4, targets="attn"),
        "Anti-DreamBooth attacks/aspl.py as run by scripts/attack_with_aspl.sh"),
    # Anti-DreamBooth FSMG: PGD (100 steps) against a model fine-tuned 1000 steps on clean images
    "anti_dreambooth_fsmg": Preset(
        AttackConfig("pgd", published_to_levels(0.05), published_to_levels(0.005), 100),
        AlternatingConfig(rounds=1, clean_steps=1000, train_steps=0, learning_rate=1e-4, rank=4, targets="attn"),
        "Anti-DreamBooth attacks/fsmg.py as run by scripts/attack_with_fsmg.sh"),
}


def preset(name: str) -> Preset:
    """A fixed-model (:data:`PRESETS`) or surrogate (:data:`SURROGATE_PRESETS`) preset by name."""
    if name in SURROGATE_PRESETS:
        return SURROGATE_PRESETS[name]
    if name in PRESETS:
        return Preset(PRESETS[name])
    raise ValueError(f"unknown attack preset {name!r}; choose one of {sorted(ALL_PRESETS)}")


ALL_PRESETS = tuple(PRESETS) + tuple(SURROGATE_PRESETS)


@dataclasses.dataclass
class AttackResult:
    images: torch.Tensor  # [B, 3, H, W] in [0, 1], within epsilon of the input
    loss_trace: list[float]  # the objective (mean over the batch) before each step


# Attack presets that the Stage-1 data presets (lord_ops/train_config.py STAGE1_DATA_PRESETS) name; kept
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
               on_step: Optional[Callable[[int, float, torch.Tensor], None]] = None,
               start: Optional[torch.Tensor] = None,
               penalty: Optional[Callable[[], torch.Tensor]] = None) -> AttackResult:
    """Projected sign-gradient attack on ``images`` ``[B, 3, H, W]`` in [0, 1].

    The budget is around ``images``; ``start`` (same shape, e.g. the previous round of a surrogate
    loop) is where the steps begin, projected into that budget (``random_start`` is then ignored).
    ``on_step(step, loss, current_images)`` is called after every step (progress bars, previews,
    cancellation: raise from it to stop). Deterministic for a given ``config.seed``.
    ``penalty()``: a differentiable scalar read right after each evaluation of the objective (e.g. a
    defense's gate on the forward pass just made, ``lord_ops.comfy.evasion``), **minimised** alongside
    the objective whichever way the objective goes; the loss trace stays the objective's.
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
        if start is not None:
            x = project(start.detach().float().to(x.device), original, config.epsilon)
        elif config.random_start:
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

            def total(loss):  # the step's direction: up the objective (or down) and down the penalty
                return loss if penalty is None else loss - direction * penalty()

            if config.low_memory:
                # mist-v2's trick: no encoder graph while the UNet graph is alive
                with torch.no_grad():
                    z0 = encode(x_in)
                z = z0.detach().requires_grad_(True)
                loss = loss_of_latent(z)
                (grad_z,) = torch.autograd.grad(total(loss), z)
                z_again = torch.utils.checkpoint.checkpoint(encode, x_in, use_reentrant=False)
                (grad,) = torch.autograd.grad(z_again, x_in, grad_outputs=grad_z)
            else:
                loss = loss_of_latent(encode(x_in))
                (grad,) = torch.autograd.grad(total(loss), x_in)
            trace.append(float(loss.detach()) / x.shape[0])
            x = project(x + direction * step * grad.sign(), original, config.epsilon).detach()
            if on_step is not None:
                on_step(i, trace[-1], x)
    return AttackResult(x, trace)


def train_surrogate_steps(parameters: list, loss_of: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
                          count: int, steps: int, config: AlternatingConfig, seed: int, t_min: int, t_max: int,
                          noise_shape: tuple, on_step: Optional[Callable[[int, float], None]] = None,
                          prior_of: Optional[Callable] = None, prior_count: int = 0,
                          scaler: Optional["torch.amp.GradScaler"] = None) -> list[float]:
    """``steps`` AdamW steps on ``parameters`` (a fresh optimizer, as both sources build one per
    phase), one sample per step: image ``i`` uniform in ``range(count)``, timestep uniform in
    ``[t_min, t_max]``, noise ``N(0, 1)`` of ``noise_shape``, all drawn from ``seed``;
    ``loss_of(i, t [1], noise [1, ...])`` is the scalar loss. With ``prior_of`` (same signature, over
    ``prior_count`` class images) each step adds ``config.prior_weight * prior_of(j, t', noise')``
    with its own draws. The gradient's global norm is clipped at ``config.max_grad_norm`` (0: off).
    ``scaler``: a ``torch.amp.GradScaler`` for fp16 models (mist-v2 scales its fp16 training too);
    steps whose gradients overflow are skipped by it. ``on_step(step, loss)`` after each step
    (raise to stop). Returns the losses."""
    g = torch.Generator().manual_seed(seed % (2 ** 63))
    with torch.inference_mode(False), torch.enable_grad():
        opt = torch.optim.AdamW(parameters, lr=config.learning_rate, betas=tuple(config.betas),
                                weight_decay=config.weight_decay, eps=config.adam_eps)
        losses = []
        for step in range(steps):
            i = int(torch.randint(0, count, (1,), generator=g))
            t = torch.randint(t_min, t_max + 1, (1,), generator=g)
            noise = torch.randn((1, *noise_shape), generator=g)
            opt.zero_grad(set_to_none=True)
            loss = loss_of(i, t, noise)
            if prior_of is not None and prior_count > 0 and config.prior_weight > 0:
                j = int(torch.randint(0, prior_count, (1,), generator=g))
                t2 = torch.randint(t_min, t_max + 1, (1,), generator=g)
                noise2 = torch.randn((1, *noise_shape), generator=g)
                loss = loss + config.prior_weight * prior_of(j, t2, noise2)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"surrogate step {step + 1}: loss is not finite; lower the surrogate "
                                         f"learning rate")
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    return losses


@dataclasses.dataclass
class AlternatingResult:
    images: object  # like the input: [B, 3, H, W] (or a list) in [0, 1], within epsilon of it
    rounds: list[dict]  # per round: {"round", "clean_losses", "pgd_losses", "train_losses"}


def run_alternating_attack(images: torch.Tensor, config: AlternatingConfig,
                           pgd_round: Callable[[torch.Tensor, int], tuple[torch.Tensor, list]],
                           surrogate_train: Callable[[torch.Tensor, int, int, str], list[float]],
                           snapshot: Callable[[], object], restore: Callable[[object], None]) -> AlternatingResult:
    """The surrogate loop of mist-v2 / ASPL / FSMG (see :class:`AlternatingConfig`) over callables:

    * ``pgd_round(current, round) -> (new current, losses)``: PGD steps against base + the surrogate
      as it is now, starting at ``current`` (inside the budget around the original images),
    * ``surrogate_train(images, steps, round, phase)`` -> losses: fine-tune the surrogate in place
      on ``images`` (``phase`` ``"clean"`` or ``"perturbed"``),
    * ``snapshot()`` / ``restore(state)``: save / put back the surrogate's weights (ASPL fine-tunes
      a copy on the clean images for the PGD round only).

    ``images`` ``[B, 3, H, W]`` in [0, 1] (or a list of ``[1, 3, H_i, W_i]`` for images of different
    sizes) are the clean originals; the callables receive the same form.
    """
    config.validate()
    original = [im.detach().clone() for im in images] if isinstance(images, (list, tuple)) else images.detach().clone()
    current = original
    log = []
    for r in range(config.rounds):
        entry = {"round": r, "clean_losses": [], "pgd_losses": [], "train_losses": []}
        saved = None
        if config.clean_steps:
            saved = snapshot()
            entry["clean_losses"] = surrogate_train(original, config.clean_steps, r, "clean")
        current, entry["pgd_losses"] = pgd_round(current, r)
        if saved is not None:
            restore(saved)
        if config.train_steps and r < config.rounds - 1:
            entry["train_losses"] = surrogate_train(current, config.train_steps, r, "perturbed")
        log.append(entry)
    return AlternatingResult(current, log)


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


def image_seed(seed: int, index: int) -> int:
    """The attack seed of image ``index`` of a set attacked with ``seed``: a hash of both (not
    ``seed + index``, which gives seed s's image 1 the draws of seed s+1's image 0), so every copy has
    its own timesteps, noise and random start and no common fingerprint ties the perturbed copies."""
    digest = hashlib.sha256(f"attack-image:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # < 2**62


def high_contrast_target(height: int, width: int, cells: int = 8, min_cell: int = 8) -> torch.Tensor:
    """The pack's own default ACE target: a black/white checkerboard with a diagonal stripe,
    ``[1, 3, H, W]`` in [0, 1] (no copied asset).

    ``cells`` squares along the shorter side, but none smaller than ``min_cell`` pixels (the VAE's
    downscale factor, 8 for SD): a finer pattern falls inside one latent cell and encodes to a nearly
    featureless latent, so ACE would aim at nothing (at 32 px, 8 cells of 4 px did). The stripe is at
    least ``min_cell`` pixels wide for the same reason. From 64 px up the pattern is unchanged."""
    n = max(1, min(cells, min(height, width) // max(1, min_cell)))
    ys = torch.arange(height).reshape(-1, 1) * n // max(height, 1)
    xs = torch.arange(width).reshape(1, -1) * n // max(width, 1)
    board = ((ys + xs) % 2).float()
    yy = torch.arange(height).reshape(-1, 1) / max(height - 1, 1)
    xx = torch.arange(width).reshape(1, -1) / max(width - 1, 1)
    half_width = max(0.08, min_cell / (2 * max(height, width, 1)))
    stripe = ((yy - xx).abs() < half_width).float()
    img = torch.where(stripe > 0, 1.0 - board, board)
    return img.expand(3, height, width).unsqueeze(0).contiguous()


def target_image(target: Optional[torch.Tensor], height: int, width: int, min_cell: int = 8) -> torch.Tensor:
    """The ACE / PhotoGuard target in pixels, ``[1|B, 3, height, width]`` in [0, 1]: a user's ``target``
    (``[1|B, 3, h, w]`` in [0, 1]) resized, or the pack's :func:`high_contrast_target` when it is None
    (``min_cell``: the VAE's pixels per latent cell). What the attack aims at and what the texture
    metrics look for in generated images (``lord_ops.metrics.pattern_correlation``)."""
    if target is None:
        return high_contrast_target(height, width, min_cell=min_cell)
    return resize_target(target, height, width)


def latent_contrast(latent: torch.Tensor) -> float:
    """How much a target latent ``[B, C, h, w]`` varies over the latent grid: the spatial standard
    deviation per channel, averaged (0 = featureless, nothing for ACE to aim at)."""
    z = latent.float()
    return float(z.flatten(2).std(dim=-1, unbiased=False).mean())


def resize_target(target: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A target image ``[1 or B, 3, h, w]`` resized (bilinear, antialiased) to ``height x width``."""
    if target.shape[-2:] == (height, width):
        return target
    return F.interpolate(target.float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True)
