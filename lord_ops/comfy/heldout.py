"""Gate evaluation after Stage-1: AUROC of the gate on clean vs perturbed latents, in-sample (the
training pairs) and on held-out images protected as a user would publish them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from .. import trainer as T
from ..diffusion import denoising_loss
from ..metrics import auroc
from . import grad
from .data import Pixels, encode_images
from .perturb import attack_params, protected_copies

EVAL_TIMESTEPS = (50, 200, 400)
# Held-out evaluation: what a protected image on the web carries -- mist-v2's ACE against the fixed
# model at mist-v2's budget, and Anti-DreamBooth's PGD (50 iterations) -- 8-bit rounded like a saved file.
HELDOUT_ATTACKS = ("ace_fixed", "pgd_fixed")


def gate_separation(clone, hooks: T.AdapterHooks, predict, z_clean, z_adv, alphas_cumprod, gate_names, seed: int,
                    limit: int = 64, check: Optional[Callable[[], None]] = None) -> dict:
    """Mean gate of clean vs perturbed latents at :data:`EVAL_TIMESTEPS`; AUROC of the score (the
    gate averaged over the timesteps), and the same per timestep (``by_timestep``).

    ``predict(z_t, t, [i])`` predicts the noise of item ``i``. ``check()`` runs before every item
    (Cancel: ComfyUI's ``throw_exception_if_processing_interrupted``)."""
    n = min(limit, z_clean.shape[0])
    device = grad.compute_device(clone)
    clean_scores, adv_scores = [], []
    steps = [min(t, len(alphas_cumprod) - 1) for t in EVAL_TIMESTEPS]
    by_t = {t: {"clean": [], "adv": []} for t in steps}
    with torch.no_grad():
        for i in range(n):
            if check is not None:
                check()
            per = {"clean": [], "adv": []}
            for t in steps:
                noise = T.Draw(t, T.mix_seed(seed, "eval", i, t)).noise(z_clean.shape[1:])[None].to(device)
                tt = torch.tensor([t])
                for label, z in (("clean", z_clean), ("adv", z_adv)):
                    hooks.take()
                    denoising_loss(lambda zt, ts: predict(zt, ts, [i]), z[i:i + 1].to(device), tt, noise, alphas_cumprod)
                    value = float(T.gate_scores(hooks.take(), gate_names)[0])
                    per[label].append(value)
                    by_t[t][label].append(value)
            clean_scores.append(sum(per["clean"]) / len(per["clean"]))
            adv_scores.append(sum(per["adv"]) / len(per["adv"]))
    # per timestep: where a clean and a perturbed latent are indistinguishable (high noise), BCE over
    # all t pulls the gate to 0.5; the breakdown shows where it separates
    by_timestep = {str(t): {"auroc": auroc(v["clean"], v["adv"]), "mean_gate_clean": sum(v["clean"]) / n,
                            "mean_gate_perturbed": sum(v["adv"]) / n} for t, v in by_t.items()}
    return {"auroc": auroc(clean_scores, adv_scores), "samples": n, "timesteps": list(EVAL_TIMESTEPS),
            "mean_gate_clean": sum(clean_scores) / n, "mean_gate_perturbed": sum(adv_scores) / n,
            "by_timestep": by_timestep}


@dataclasses.dataclass
class HeldOut:
    """Images not trained on (``[3, H, W]``, the training size) and one CONDITIONING each (or one for
    all) for the held-out gate evaluation; ``attack_steps`` caps the protections' iterations (cheap
    checks; None: the presets' own counts). ``seed``: the protections' seed, independent of the
    training seed, so runs with different seeds are scored on the same protected images."""

    images: list
    conds: list
    attacks: tuple = HELDOUT_ATTACKS
    attack_steps: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        self.images = Pixels(self.images)
        if len(self.conds) == 1 and len(self.images) > 1:
            self.conds = list(self.conds) * len(self.images)
        if not self.images:
            raise ValueError("held-out evaluation: give at least one held-out image")
        if len(self.conds) != len(self.images):
            raise ValueError(f"held-out evaluation: {len(self.images)} images but {len(self.conds)} conditionings")

    def attack(self, name: str):
        from ..attacks import PRESETS

        attack = dataclasses.replace(PRESETS[name], seed=self.seed)
        return attack if self.attack_steps is None else dataclasses.replace(attack, steps=int(self.attack_steps))


def prepare_heldout(model_patcher, vae, heldout: HeldOut, image_hw, cache_dir,
                     check: Optional[Callable[[], None]]) -> dict:
    """Protected copies of the held-out images per attack and the latents of every set (before training)."""
    from ..attacks import PRESETS

    sizes = {tuple(im.shape[-2:]) for im in heldout.images.raw}
    if sizes != {tuple(image_hw)}:
        raise ValueError(f"held-out images are {sorted(sizes)} px but the training images are {tuple(image_hw)}: "
                         f"give held-out images of the training size")
    unknown = [a for a in heldout.attacks if a not in PRESETS]
    if unknown:
        raise ValueError(f"held-out evaluation: unknown attack preset(s) {unknown}; known: {sorted(PRESETS)}")
    on_item = (lambda i, cached: check()) if check is not None else None
    latents = {"clean": encode_images(vae, model_patcher, heldout.images)}
    for name in heldout.attacks:
        copies = protected_copies(model_patcher, vae, heldout.images, heldout.conds, name, cache_dir,
                                  heldout.attack_steps, heldout.seed, on_item, check=check)
        latents[name] = encode_images(vae, model_patcher, copies)
        del copies
    return latents


def heldout_separation(clone, hooks: T.AdapterHooks, heldout: HeldOut, latents: dict, alphas_cumprod, gate_names,
                       seed: int, check: Optional[Callable[[], None]] = None) -> dict:
    """Gate AUROC of held-out protected images vs their clean versions, per attack (see
    :data:`HELDOUT_ATTACKS`): whether the gate flags protections of images it never saw, unlike the
    in-sample ``gate_separation_train``."""
    predict = grad.batched_noise_predictor(clone, heldout.conds, tuple(heldout.images.raw[0].shape[-2:]))
    out = {"images": len(heldout.images), "in_sample": False, "attacks": {}}
    for name in heldout.attacks:
        sep = gate_separation(clone, hooks, predict, latents["clean"], latents[name], alphas_cumprod, gate_names,
                              seed, limit=len(heldout.images), check=check)
        out["attacks"][name] = {**sep, "attack": {**attack_params(heldout.attack(name)), "rounded": "uint8"}}
    return out


NO_HELDOUT = {"images": 0, "note": "no held-out images were given: the gate was not evaluated on images it was "
                                   "not trained on (give held-out images to measure it)"}
