"""Perturbed training/evaluation images: the Stage-1 perturbations (cached losslessly, or online
against the model being trained) and 8-bit protected copies for held-out evaluation, made with the
fixed-model attack engine (``lord_ops.attacks``) on a ComfyUI MODEL + VAE -- or, for a Stage-1 data
preset with a surrogate loop (ASPL), with the published loop over sets of images (``surrogate``).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Optional

import torch

from .. import trainer as T
from ..attacks import image_seed
from ..datasets import (DEFAULT_CACHE_MAX_BYTES, cache_entry_path, cached_perturbations, conditioning_digest,
                        evict_cache, tensor_digest)
from ..train_config import STAGE1_DATA_PRESETS, STAGE1_METHODS, TrainConfig
from . import grad
from .data import Pixels, TrainingData
from .patch import weights_fingerprint


def attack_params(attack) -> dict:
    """The cache-key view of an attack (everything that changes its result)."""
    params = {k: v for k, v in dataclasses.asdict(attack).items() if k != "low_memory"}
    if attack.method in ("ace", "ace_plus"):
        params["target"] = "pack_pattern"  # grad.encode_target's default: attacks.high_contrast_target
    return params


def attack_image(model_patcher, vae, conditioning, image: torch.Tensor, attack, predict=None, acp=None,
                  check: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """One perturbed copy ``[1, 3, H, W]`` float32 in [0, 1] (not rounded to 8 bits) of ``image``
    ``[1, 3, H, W]`` with a fixed-model attack (pgd / ace / ace_plus / photoguard); ACE targets the
    pack's high-contrast pattern, as the Protect node does by default. ``predict``/``acp``: the noise
    predictor to attack (default: the MODEL with ``conditioning``). ``check()`` (Cancel) runs after every
    attack step."""
    from ..attacks import run_attack

    if attack.method not in STAGE1_METHODS:
        raise ValueError(f"the Stage-1 perturbation path runs the fixed-model attacks {STAGE1_METHODS}, "
                         f"not {attack.method!r}: choose a Stage-1 data preset ({', '.join(STAGE1_DATA_PRESETS)})")
    uses_unet = attack.method != "photoguard"
    encode = grad.latent_encoder(vae, model_patcher)
    with torch.inference_mode(False):
        img = image.float().clone()
        if uses_unet and predict is None:
            predict = grad.noise_predictor(model_patcher, conditioning, tuple(img.shape[-2:]))
        if uses_unet and acp is None:
            acp = grad.alphas_cumprod(model_patcher)
        target = grad.encode_target(vae, model_patcher, None, img) if attack.method in ("ace", "ace_plus") else None
        on_step = (lambda step, loss, current: check()) if check is not None else None
        return run_attack(img, attack, encode, predict if uses_unet else None, acp if uses_unet else None,
                          target, on_step).images.detach()


# images per surrogate set in the Stage-1 data: about one subject's photos (the threat protects 8)
SURROGATE_SET_SIZE = 8


def surrogate_sets(indices: list, conditioning_keys: list, size: int = SURROGATE_SET_SIZE) -> list[list[int]]:
    """The sets that a surrogate attack (ASPL) protects together: the ``indices`` whose conditioning
    (caption encoding) is the same -- one "subject" each, as the published loops fine-tune their
    surrogate on one subject's photos -- in index order, cut into sets of at most ``size``."""
    by_caption: dict = {}
    for i in indices:
        by_caption.setdefault(conditioning_keys[i], []).append(i)
    return [members[s:s + size] for members in by_caption.values() for s in range(0, len(members), size)]


def _set_attack(attack, members: list):
    """The attack of one surrogate set: seeded like the set's first image."""
    return dataclasses.replace(attack, seed=image_seed(attack.seed, members[0]))


def _set_params(attack, surrogate, data: TrainingData, members: list) -> dict:
    """Cache key of each member of one surrogate set: the set's attack (:func:`_set_attack`), the
    schedule, the set's images (every member shapes the surrogate) and the member's place."""
    seeded = _set_attack(attack, members)
    digest = hashlib.sha256("".join(tensor_digest(data.images.raw[i]) for i in members).encode()).hexdigest()[:32]
    common = {**attack_params(seeded), "surrogate": dataclasses.asdict(surrogate), "set": digest,
              "rounded": "uint8"}
    return {i: {**common, "position": k} for k, i in enumerate(members)}


def protect_set(model_patcher, vae, data: TrainingData, members: list, attack, surrogate,
                check: Optional[Callable[[], None]] = None) -> list[torch.Tensor]:
    """The members of one surrogate set protected together with the published loop
    (``surrogate.protect_with_surrogate``; seed: that of the set's first image), as a user would publish
    them (8-bit levels within the budget); float32 ``[3, H, W]`` in [0, 1], one per member."""
    from .surrogate import protect_with_surrogate

    seeded = _set_attack(attack, members)
    images = torch.stack([data.images[i] for i in members]).movedim(1, -1).float()
    progress = (lambda *a: check()) if check is not None else None
    out, _ = protect_with_surrogate(model_patcher, vae, data.conds[members[0]], images, seeded, surrogate,
                                    on_progress=progress)
    return [o.movedim(-1, 0).float().contiguous() for o in out]


def stage1_perturbations(model_patcher, vae, data: TrainingData, config: TrainConfig, cache_dir,
                         on_item: Optional[Callable[[int, bool], None]] = None,
                         max_cache_bytes: Optional[int] = DEFAULT_CACHE_MAX_BYTES,
                         check: Optional[Callable[[], None]] = None) -> list[torch.Tensor]:
    """Perturbed copies ``[3, H, W]`` (float32 in [0, 1], **not** rounded to 8 bits, so PGD-2's ~1.3-level
    moves survive) of ``data.images`` with ``config.stage1_attacks()`` (the Stage-1 data preset; image
    ``i`` gets attack ``i mod k``) against the base MODEL. An attack with a surrogate loop (ASPL) protects
    the images of :func:`surrogate_sets` together (:func:`protect_set`: 8-bit output, as published).
    Cached losslessly (float32 safetensors) in ``cache_dir``, keyed by image, caption, attack (for a
    surrogate set: also the set's images and the member's place) and model; the folder is bounded to
    ``max_cache_bytes`` (least recently used entries of other runs go first, see
    ``datasets.evict_cache``). Image ``i`` is attacked with seed ``attacks.image_seed(seed, i)``: its
    own timesteps, noise and random start (one seed for all copies would give them a common
    fingerprint that a gate or B' could learn instead of "perturbed"). Under DDP each process computes its share, then all read the cache."""
    attacks = config.stage1_attacks()
    # fingerprint the weights as loaded for this MODEL (ComfyUI patches shared weights in place, so
    # before a load they may still carry another clone's patches)
    grad.load_for_gradients(model_patcher, vae)
    fp = weights_fingerprint(model_patcher, vae)
    rank, world = T.distributed_context()
    keys = [conditioning_digest(c) for c in data.conds]
    out: list = [None] * len(data)
    used = []
    for j, (attack, surrogate) in enumerate(attacks):
        idx = [i for i in range(len(data)) if i % len(attacks) == j]
        if surrogate is None:
            per_image = [dataclasses.replace(attack, seed=image_seed(attack.seed, i)) for i in idx]
            params = [attack_params(a) for a in per_image]
            owner = dict(zip(idx, idx))

            def compute(k: int, per_image=per_image, idx=idx) -> torch.Tensor:
                i = idx[k]
                return attack_image(model_patcher, vae, data.conds[i], data.images[i][None], per_image[k],
                                    check=check)[0]
        else:
            sets = surrogate_sets(idx, keys)
            by_image = {i: p for members in sets for i, p in _set_params(attack, surrogate, data, members).items()}
            params = [by_image[i] for i in idx]
            set_of = {i: s for s, members in enumerate(sets) for i in members}
            owner = set_of  # data-parallel: a process computes whole sets
            done: dict = {}

            def compute(k: int, idx=idx, sets=sets, set_of=set_of, done=done, attack=attack,
                        surrogate=surrogate) -> torch.Tensor:
                i = idx[k]
                s = set_of[i]
                if s not in done:  # the whole set at its first missing member; the rest read from here
                    done[s] = protect_set(model_patcher, vae, data, sets[s], attack, surrogate, check=check)
                return done[s][sets[s].index(i)]
        used += [cache_entry_path(cache_dir, data.images.raw[i], keys[i], p, fp) for i, p in zip(idx, params)]

        item = (lambda k, cached, idx=idx: on_item(idx[k], cached)) if on_item is not None else None
        args = ([data.images.raw[i] for i in idx], [keys[i] for i in idx], params, fp, cache_dir, compute)
        if world > 1:
            cached_perturbations(*args, owned=lambda k, idx=idx, owner=owner: owner[idx[k]] % world == rank,
                                 on_item=item, max_bytes=None)
            torch.distributed.barrier()
            copies = cached_perturbations(*args, owned=lambda k: False, max_bytes=None)
        else:
            copies = cached_perturbations(*args, on_item=item, max_bytes=None)
        for i, c in zip(idx, copies):
            out[i] = c
    if max_cache_bytes is not None and rank == 0:
        evict_cache(cache_dir, max_cache_bytes, keep=used)
    return out


def protected_copies(model_patcher, vae, images: "Pixels", conds: list, attack_name: str, cache_dir,
                     attack_steps: Optional[int] = None, seed: int = 0,
                     on_item: Optional[Callable[[int, bool], None]] = None,
                     max_cache_bytes: Optional[int] = DEFAULT_CACHE_MAX_BYTES,
                     check: Optional[Callable[[], None]] = None) -> list[torch.Tensor]:
    """``images`` protected as a user would publish them: attack preset ``attack_name`` against the base
    MODEL, rounded to 8 bits within the budget (``attacks.quantize_uint8``); float32 ``[3, H, W]`` in
    [0, 1] (exact 8-bit levels), cached like the Stage-1 copies. ``attack_steps`` caps the iterations;
    image ``i`` uses seed ``attacks.image_seed(seed, i)``."""
    from ..attacks import PRESETS, quantize_uint8

    attack = dataclasses.replace(PRESETS[attack_name], seed=seed)
    if attack_steps is not None:
        attack = dataclasses.replace(attack, steps=int(attack_steps))
    attack.validate()
    per_image = [dataclasses.replace(attack, seed=image_seed(seed, i)) for i in range(len(images))]
    params = [{**attack_params(a), "rounded": "uint8"} for a in per_image]
    grad.load_for_gradients(model_patcher, vae)
    fp = weights_fingerprint(model_patcher, vae)

    def compute(i: int) -> torch.Tensor:
        img = images[i][None]
        adv = attack_image(model_patcher, vae, conds[i], img, per_image[i], check=check)
        return quantize_uint8(adv, img, attack.epsilon)[0].float() / 255.0

    return cached_perturbations(images.raw, [conditioning_digest(c) for c in conds], params, fp, cache_dir, compute,
                                on_item=on_item, max_bytes=max_cache_bytes)


def online_perturber(clone, vae, data: TrainingData, config: TrainConfig, predict, alphas_cumprod) -> Callable:
    """``perturb(indices, draws) -> z_adv``: the Stage-1 attacks (``config.attack_configs()``) against the
    model *as it is being trained* (LoRD hooks live, gate learned), float32 like the cached copies,
    encoded without a graph. Seeded per sample from the step's draws, so resumed and data-parallel
    runs stay reproducible."""
    attacks = config.attack_configs()
    encode = grad.latent_encoder(vae, clone)
    device = grad.compute_device(clone)

    def perturb(indices, draws):
        out = []
        for i, d in zip(indices, draws):
            cfg = dataclasses.replace(attacks[i % len(attacks)], seed=d.noise_seed % (2 ** 62))
            adv = attack_image(clone, vae, data.conds[i], data.images[i][None].to(device), cfg,
                                predict=lambda z, tt, i=i: predict(z, tt, [i]), acp=alphas_cumprod)
            with torch.no_grad():
                out.append(encode(adv).float())
        return torch.cat(out)

    return perturb
