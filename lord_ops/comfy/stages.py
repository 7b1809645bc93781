"""Stage-1 / Stage-2 training on ComfyUI models (shared by the trainer nodes and ``training/train.py``).

The engine (losses, schedule, checkpoints, DDP) is ``lord_ops.trainer``; this module makes a
ComfyUI MODEL trainable (a clone, loaded, with inference-mode tensors swapped for normal ones and
the base frozen), encodes images through the VAE, generates/caches the Stage-1 perturbations with
the attack engine, and hooks the trainable LoRD / LoRA into the UNet's target layers.
"""
from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import datetime
from typing import Callable, Optional

import torch

from .. import trainer as T
from ..datasets import (DEFAULT_CACHE_MAX_BYTES, cache_entry_path, cached_perturbations, evict_cache, model_fingerprint,
                        tensor_digest, to_uint8, to_unit)
from ..diffusion import denoising_loss
from ..format import LoRDFile
from ..keys import CONTEXT_FED, select_targets
from . import grad
from .patch import _module, init_lord_for_model, lord_injections, model_family, prediction_type, unet_names

EVAL_TIMESTEPS = (50, 200, 400)
# Held-out evaluation: what a protected image on the web carries -- mist-v2's ACE against the fixed
# model at mist-v2's budget, and Anti-DreamBooth's PGD (50 iterations) -- 8-bit rounded like a saved file.
HELDOUT_ATTACKS = ("ace_fixed", "pgd_fixed")


class Pixels(collections.abc.Sequence):
    """Images held as uint8 ``[3, H, W]`` (a quarter of float32's memory); items read as float32 in
    [0, 1], one at a time, so code that iterates or indexes sees the usual float images."""

    def __init__(self, images=()):
        self.raw = [to_uint8(im) for im in (images.raw if isinstance(images, Pixels) else images)]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [to_unit(im) for im in self.raw[i]]
        return to_unit(self.raw[i])

    def __len__(self) -> int:
        return len(self.raw)

    def __repr__(self) -> str:
        return f"Pixels({len(self.raw)} x {tuple(self.raw[0].shape) if self.raw else ()} uint8)"


@dataclasses.dataclass
class TrainingData:
    """Images ``[3, H, W]`` (one size, multiples of 8), one CONDITIONING and caption each.

    Images may be given as float32 in [0, 1] or uint8; they are kept as 8-bit levels
    (:class:`Pixels`: reading ``images[i]`` gives float32 in [0, 1]), so a float input is rounded
    to 8 bits -- what an image file holds.

    Stage-2 may be given ComfyUI LATENTs instead of images: ``latents`` (raw VAE latents
    ``[C, h, w]`` as VAE Encode makes them; ``images`` then stays empty). ``class_*``: DreamBooth
    prior-preservation images (Stage-2, optional).
    """

    images: list
    conds: list
    captions: list
    class_images: list = dataclasses.field(default_factory=list)
    class_conds: list = dataclasses.field(default_factory=list)
    latents: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.images, self.class_images = Pixels(self.images), Pixels(self.class_images)
        if self.images and self.latents:
            raise ValueError("give training images or latents, not both")
        count = len(self.images) or len(self.latents)
        if not count:
            raise ValueError("the training set is empty: give at least one image")
        if len(self.conds) == 1 and count > 1:
            self.conds = list(self.conds) * count
        if len(self.conds) != count:
            raise ValueError(f"{count} images but {len(self.conds)} conditionings: give one per image, or one for all")
        if len(self.captions) != count:
            self.captions = [f"item {i}" for i in range(count)]
        if len(self.class_conds) == 1 and len(self.class_images) > 1:
            self.class_conds = list(self.class_conds) * len(self.class_images)
        if len(self.class_conds) != len(self.class_images):
            raise ValueError(f"{len(self.class_images)} class images but {len(self.class_conds)} class conditionings")
        sizes = {tuple(im.shape[-2:]) for im in self.images.raw + self.class_images.raw}
        sizes |= {tuple(8 * d for d in z.shape[-2:]) for z in self.latents}
        if len(sizes) != 1:
            raise ValueError(f"training images have different sizes {sorted(sizes)} (px): resize them to one size")
        (h, w), = sizes
        if h % 8 or w % 8:
            raise ValueError(f"training images are {w}x{h} px: width and height must be multiples of 8")

    def __len__(self) -> int:
        return len(self.images) or len(self.latents)

    @property
    def image_hw(self) -> tuple[int, int]:
        if self.images:
            return tuple(self.images.raw[0].shape[-2:])
        return tuple(8 * d for d in self.latents[0].shape[-2:])


@dataclasses.dataclass
class StageResult:
    result: T.TrainResult
    lord: Optional[LoRDFile] = None  # Stage-1
    lora: Optional[dict] = None  # Stage-2: {kohya name: (down, up, alpha)}
    report: dict = dataclasses.field(default_factory=dict)


def _fingerprint(model_patcher, vae=None) -> str:
    """Identity of the UNet weights (+ VAE when given) and the number of weight patches on the MODEL."""
    state = dict(model_patcher.model.diffusion_model.state_dict())
    if vae is not None:
        state.update({f"vae.{k}": v for k, v in vae.first_stage_model.state_dict().items()})
    patches = sorted(model_patcher.patches.keys()) if getattr(model_patcher, "patches", None) else []
    return model_fingerprint(state) + f":{len(patches)}"


def _lord_fingerprint(model_patcher) -> str:
    """Identity of the LoRDs applied to a MODEL (weights, strength, gate mode, implementation)."""
    parts = [f"{model_fingerprint(inj.lord.state_dict())}:{inj.strength}:{inj.gate_mode}:{inj.implementation}"
             for _, inj in lord_injections(model_patcher)]
    return ";".join(parts) or "none"


def _identity(loaded_clone, vae, data: "TrainingData", with_lord: bool) -> dict[str, str]:
    """What a checkpoint must have been trained on to be resumed (see ``trainer.train``); taken from
    the loaded training clone so the in-place weight patches are exactly this MODEL's."""
    ident = {"dataset": _dataset_digest(data), "model": _fingerprint(loaded_clone, vae),
             "dtype": dtype_label(effective_dtype(loaded_clone))}
    if with_lord:
        ident["LoRD"] = _lord_fingerprint(loaded_clone)
    return ident


def conditioning_digest(conditioning) -> str:
    """sha256 of a CONDITIONING's tensors (what the PGD objective actually sees of the caption)."""
    import hashlib

    h = hashlib.sha256()
    for cross_attn, extras in conditioning:
        h.update(cross_attn.detach().float().cpu().numpy().tobytes())
        for k in sorted(extras):
            if isinstance(extras[k], torch.Tensor):
                h.update(k.encode() + extras[k].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _attack_params(attack) -> dict:
    """The cache-key view of an attack (everything that changes its result)."""
    params = {k: v for k, v in dataclasses.asdict(attack).items() if k != "low_memory"}
    if attack.method in ("ace", "ace_plus"):
        params["target"] = "pack_pattern"  # grad.encode_target's default: attacks.high_contrast_target
    return params


def _attack_image(model_patcher, vae, conditioning, image: torch.Tensor, attack, predict=None, acp=None,
                  check: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """One perturbed copy ``[1, 3, H, W]`` float32 in [0, 1] (not rounded to 8 bits) of ``image``
    ``[1, 3, H, W]`` with a fixed-model attack (pgd / ace / ace_plus / photoguard); ACE targets the
    pack's high-contrast pattern, as the Protect node does by default. ``predict``/``acp``: the noise
    predictor to attack (default: the MODEL with ``conditioning``). ``check()`` (Cancel) runs after every
    attack step."""
    from ..attacks import run_attack

    if attack.method not in T.STAGE1_METHODS:
        raise ValueError(f"the Stage-1 perturbation path runs the fixed-model attacks {T.STAGE1_METHODS}, "
                         f"not {attack.method!r}: choose a Stage-1 data preset ({', '.join(T.STAGE1_DATA_PRESETS)})")
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


def stage1_perturbations(model_patcher, vae, data: TrainingData, config: T.TrainConfig, cache_dir,
                         on_item: Optional[Callable[[int, bool], None]] = None,
                         max_cache_bytes: Optional[int] = DEFAULT_CACHE_MAX_BYTES,
                         check: Optional[Callable[[], None]] = None) -> list[torch.Tensor]:
    """Perturbed copies ``[3, H, W]`` (float32 in [0, 1], **not** rounded to 8 bits, so PGD-2's ~1.3-level
    moves survive) of ``data.images`` with ``config.attack_configs()`` (the Stage-1 data preset; image
    ``i`` gets attack ``i mod k``) against the base MODEL. Cached losslessly (float32 safetensors) in
    ``cache_dir``, keyed by image, caption, attack and model; the folder is bounded to
    ``max_cache_bytes`` (least recently used entries of other runs go first, see
    ``datasets.evict_cache``). Every image uses the attack's seed (as the Protect node does for a
    one-image batch). Under DDP each process computes its share, then all read the cache."""
    attacks = config.attack_configs()
    # fingerprint the weights as loaded for this MODEL (ComfyUI patches shared weights in place, so
    # before a load they may still carry another clone's patches)
    grad.load_for_gradients(model_patcher, vae)
    fp = _fingerprint(model_patcher, vae)
    rank, world = T.distributed_context()
    keys = [conditioning_digest(c) for c in data.conds]
    out: list = [None] * len(data)
    used = []
    for j, attack in enumerate(attacks):
        idx = [i for i in range(len(data)) if i % len(attacks) == j]
        params = _attack_params(attack)
        used += [cache_entry_path(cache_dir, data.images.raw[i], keys[i], params, fp) for i in idx]

        def compute(k: int, attack=attack, idx=idx) -> torch.Tensor:
            i = idx[k]
            return _attack_image(model_patcher, vae, data.conds[i], data.images[i][None], attack, check=check)[0]

        item = (lambda k, cached, idx=idx: on_item(idx[k], cached)) if on_item is not None else None
        args = ([data.images.raw[i] for i in idx], [keys[i] for i in idx], params, fp, cache_dir, compute)
        if world > 1:
            cached_perturbations(*args, owned=lambda k, idx=idx: idx[k] % world == rank, on_item=item, max_bytes=None)
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
    [0, 1] (exact 8-bit levels), cached like the Stage-1 copies. ``attack_steps`` caps the iterations."""
    from ..attacks import PRESETS, quantize_uint8

    attack = dataclasses.replace(PRESETS[attack_name], seed=seed)
    if attack_steps is not None:
        attack = dataclasses.replace(attack, steps=int(attack_steps))
    attack.validate()
    params = {**_attack_params(attack), "rounded": "uint8"}
    grad.load_for_gradients(model_patcher, vae)
    fp = _fingerprint(model_patcher, vae)

    def compute(i: int) -> torch.Tensor:
        img = images[i][None]
        adv = _attack_image(model_patcher, vae, conds[i], img, attack, check=check)
        return quantize_uint8(adv, img, attack.epsilon)[0].float() / 255.0

    return cached_perturbations(images.raw, [conditioning_digest(c) for c in conds], params, fp, cache_dir, compute,
                                on_item=on_item, max_bytes=max_cache_bytes)


def encode_images(vae, model_patcher, images: list) -> torch.Tensor:
    """Latents ``[N, C, h, w]`` (float32 on the CPU, ``latent_format.process_in`` of ``model_patcher``;
    raw VAE latents when it is None) of images ``[3, H, W]`` in [0, 1]. The VAE is loaded by ComfyUI
    first and runs on its compute device (:func:`grad.latent_encoder`)."""
    if vae is None:
        raise ValueError("training from images needs the VAE: connect it (or give latents)")
    encode = grad.latent_encoder(vae, model_patcher)
    with torch.inference_mode(False), torch.no_grad():
        return torch.cat([encode(im[None].float()).float().cpu() for im in images])


@contextlib.contextmanager
def checkpointed_blocks(diffusion_model, enabled: bool):
    """Gradient checkpointing on every layer (res block, transformer, up/down sample) of the UNet's
    input/middle/output blocks, undone on exit.

    ComfyUI's UNet runs a block through ``forward_timestep_embed``, which calls each layer of the
    block rather than ``block.forward``; so each layer's ``forward`` is wrapped (what core's trainer
    does too). Forward hooks inside a layer run again during the recompute.
    """
    layers = []
    if enabled:
        for attr in ("input_blocks", "middle_block", "output_blocks"):
            part = getattr(diffusion_model, attr, None)
            if part is None:
                continue
            for block in (part if isinstance(part, torch.nn.ModuleList) else [part]):
                layers.extend(block.children() if isinstance(block, torch.nn.Sequential) else [block])
    # a forward already replaced on the instance (newer ComfyUI's bypass LoRA injects that way) is
    # wrapped, and put back on exit
    before = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        original = layer.forward
        layer.forward = (lambda f: lambda *a, **k: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False, **k))(original)
    try:
        yield
    finally:
        for layer, prev in zip(layers, before):
            if prev is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = prev


def _dtype_name(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype).replace("torch.", ""))


def effective_dtype(clone) -> dict:
    """How the training clone computes: ``compute`` (the dtype set with ``set_model_compute_dtype``,
    else the weights'), ``weights`` (storage dtype of the UNet weights; cast per layer to the compute
    dtype when they differ) and ``grad_scaler`` (fp16 compute: the loss is scaled, see
    ``lord_ops.trainer.train``). The adapters keep float32 master weights in every case."""
    weights = clone.model_dtype()
    compute = clone.get_model_object("manual_cast_dtype") if "manual_cast_dtype" in clone.object_patches else None
    compute = compute or weights
    return {"compute": _dtype_name(compute), "weights": _dtype_name(weights), "grad_scaler": compute == torch.float16}


def dtype_label(eff: dict) -> str:
    return f"compute {eff['compute']}, weights {eff['weights']}" + (", grad scaler" if eff["grad_scaler"] else "")


@contextlib.contextmanager
def trainable_model(model_patcher, vae, config: T.TrainConfig):
    """A loaded, differentiable clone of the MODEL (base frozen) for the duration of training.

    The compute dtype is ``config.dtype``, set explicitly (``set_model_compute_dtype``, as core's
    Train LoRA node does): weights stored in another dtype (an fp16 checkpoint on a GPU) are cast per
    layer, so node and CLI compute the same way whatever dtype ComfyUI stored the weights in.
    ``comfy.model_management.in_training`` is set for the duration where ComfyUI has it.
    """
    import comfy.model_management as mm

    clone = model_patcher.clone()
    clone.set_model_compute_dtype(T.DTYPES[config.dtype])
    with torch.inference_mode(False), torch.enable_grad(), grad.training_flag():
        grad.use_models(clone, vae)
        with checkpointed_blocks(clone.model.diffusion_model, config.gradient_checkpointing):
            try:
                yield clone
            finally:
                mm.soft_empty_cache()


def _autocast(config: T.TrainConfig, device) -> Callable:
    """Autocast to the compute dtype (bf16/fp16; fp32 runs without autocast)."""
    dtype = T.DTYPES[config.dtype]
    if dtype != torch.float32:
        return lambda: torch.autocast(torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext


def _target_modules(clone, names: list[str]) -> dict[str, torch.nn.Module]:
    paths = unet_names(clone)
    return {n: _module(clone, paths[n]) for n in names}


def _dataset_digest(data: TrainingData) -> str:
    import hashlib

    h = hashlib.sha256()
    for im, cap in zip(data.images, data.captions):
        h.update(tensor_digest(im).encode() + cap.encode())
    for z in data.latents:
        h.update(z.detach().float().cpu().numpy().tobytes())
    for im in data.class_images:
        h.update(b"class" + tensor_digest(im).encode())
    for c in data.conds + data.class_conds:
        h.update(conditioning_digest(c).encode())
    return h.hexdigest()[:16]


def _provenance(config: T.TrainConfig, data: TrainingData, result: T.TrainResult, extra: dict) -> dict:
    from .. import tool_version

    attack = None
    if config.needs_perturbations:
        attacks = config.attack_configs()
        attack = {**dataclasses.asdict(attacks[0]), "preset": config.attack_preset,
                  "stored_as": "float32 (not rounded to 8 bits)"}
        if len(attacks) > 1:
            attack["attacks"] = [dataclasses.asdict(a) for a in attacks]  # image i: attack i mod k
    return {"stage": config.stage, "tool": f"ComfyUI-LoRD {tool_version()}",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": config.to_dict(), "attack": attack,
            "dataset": {"images": len(data), "given_as": "latents" if data.latents else "images", "size_hw": list(data.image_hw), "digest": _dataset_digest(data),
                        "class_images": len(data.class_images)},
            "steps_trained": len(result.history),
            "final_loss": result.history[-1]["loss"] if result.history else None, **extra}


def gate_separation(clone, hooks: T.AdapterHooks, predict, z_clean, z_adv, alphas_cumprod, gate_names, seed: int,
                    limit: int = 64, check: Optional[Callable[[], None]] = None) -> dict:
    """Mean gate of clean vs perturbed latents at :data:`EVAL_TIMESTEPS`; AUROC of the score.

    ``predict(z_t, t, [i])`` predicts the noise of item ``i``. ``check()`` runs before every item
    (Cancel: ComfyUI's ``throw_exception_if_processing_interrupted``)."""
    n = min(limit, z_clean.shape[0])
    device = grad.compute_device(clone)
    clean_scores, adv_scores = [], []
    with torch.no_grad():
        for i in range(n):
            if check is not None:
                check()
            per = {"clean": [], "adv": []}
            for t in EVAL_TIMESTEPS:
                t = min(t, len(alphas_cumprod) - 1)
                noise = T.Draw(t, T._mix(seed, "eval", i, t)).noise(z_clean.shape[1:])[None].to(device)
                tt = torch.tensor([t])
                for label, z in (("clean", z_clean), ("adv", z_adv)):
                    hooks.take()
                    denoising_loss(lambda zt, ts: predict(zt, ts, [i]), z[i:i + 1].to(device), tt, noise, alphas_cumprod)
                    per[label].append(float(T.gate_scores(hooks.take(), gate_names)[0]))
            clean_scores.append(sum(per["clean"]) / len(per["clean"]))
            adv_scores.append(sum(per["adv"]) / len(per["adv"]))
    return {"auroc": T.auroc(clean_scores, adv_scores), "samples": n, "timesteps": list(EVAL_TIMESTEPS),
            "mean_gate_clean": sum(clean_scores) / n, "mean_gate_perturbed": sum(adv_scores) / n}


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


def _prepare_heldout(model_patcher, vae, heldout: HeldOut, image_hw, cache_dir,
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
        out["attacks"][name] = {**sep, "attack": {**_attack_params(heldout.attack(name)), "rounded": "uint8"}}
    return out


NO_HELDOUT = {"images": 0, "note": "no held-out images were given: the gate was not evaluated on images it was "
                                   "not trained on (give held-out images to measure it)"}


def _online_perturber(clone, vae, data: TrainingData, config: T.TrainConfig, predict, alphas_cumprod) -> Callable:
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
            adv = _attack_image(clone, vae, data.conds[i], data.images[i][None].to(device), cfg,
                                predict=lambda z, tt, i=i: predict(z, tt, [i]), acp=alphas_cumprod)
            with torch.no_grad():
                out.append(encode(adv).float())
        return torch.cat(out)

    return perturb


def train_stage1(model_patcher, vae, data: TrainingData, config: T.TrainConfig, cache_dir, checkpoint_path=None,
                 on_step=None, on_data: Optional[Callable[[int, bool], None]] = None,
                 evaluate: bool = True, heldout: Optional[HeldOut] = None,
                 check: Optional[Callable[[], None]] = None,
                 max_cache_bytes: Optional[int] = DEFAULT_CACHE_MAX_BYTES) -> StageResult:
    """Eq. 7-8: learn a LoRD (A, B, B', gate) on clean + perturbed copies of ``data`` (the Stage-1 data
    preset ``config.attack_preset``); base frozen.

    Pixels are encoded to latents before training; only the uint8 originals stay (for online
    perturbations). With ``evaluate`` the report holds the gate AUROC on the training pairs
    (``gate_separation_train``, in-sample) and, with ``heldout``, on held-out images protected with
    each of ``heldout.attacks`` vs their clean versions (``gate_separation_heldout``); without
    held-out images that entry says so. ``check()`` (Cancel) runs during data preparation and the
    evaluation loops.
    """
    config = dataclasses.replace(config, stage="stage1", mode="lord").validate()
    if not data.images:
        raise ValueError("Stage-1 perturbs pixels: give training images, not latents")
    if lord_injections(model_patcher):
        raise ValueError("the MODEL already has a LoRD applied: Stage-1 trains a new LoRD on the base model; "
                         "connect the checkpoint's MODEL directly")
    online = config.online_perturbations
    adv_images = None if online else stage1_perturbations(model_patcher, vae, data, config, cache_dir, on_data,
                                                           max_cache_bytes, check)
    z_clean = encode_images(vae, model_patcher, data.images)
    z_adv = z_clean if online else encode_images(vae, model_patcher, adv_images)
    del adv_images  # float pixels are not kept once encoded
    heldout_latents = None
    if evaluate and heldout is not None:
        heldout_latents = _prepare_heldout(model_patcher, vae, heldout, data.image_hw, cache_dir, check)
    lord0 = init_lord_for_model(model_patcher, config.targets, config.rank, config.alpha, config.gate_hidden,
                                config.gate_activation, config.seed)
    gate_names = {n for n in lord0.targets if not CONTEXT_FED.search(n)}
    with trainable_model(model_patcher, vae, config) as clone:
        device = grad.compute_device(clone)
        trainable = T.TrainableLoRD(lord0).to(device)
        predict = grad.batched_noise_predictor(clone, data.conds, data.image_hw)
        acp = grad.alphas_cumprod(clone)
        zc, za = z_clean.to(device), z_adv.to(device)
        autocast = _autocast(config, device)
        with T.AdapterHooks(_target_modules(clone, sorted(lord0.targets)), trainable) as hooks:
            perturb = _online_perturber(clone, vae, data, config, predict, acp) if online else None

            def sample_losses(indices, draws):
                t = torch.tensor([d.t for d in draws])
                noise = torch.stack([d.noise(zc.shape[1:]) for d in draws]).to(device)
                z_adv = perturb(indices, draws) if online else za[indices]
                return T.paired_losses(lambda z, tt: predict(z, tt, indices), hooks, zc[indices], z_adv, t, noise,
                                       acp, config.lambda_adv, config.lambda_gate, gate_names, autocast, prediction_type(clone))

            result = T.train(config, trainable, sample_losses, len(data), checkpoint_path, on_step, device,
                             identity=_identity(clone, vae, data, with_lord=False))
            report = {}
            if evaluate:
                if online:  # perturbed copies against the final model
                    n = min(64, len(data.images))
                    za = perturb(list(range(n)), [T.Draw(0, T._mix(config.seed, "eval-pgd", i)) for i in range(n)])
                train_sep = gate_separation(clone, hooks, predict, zc, za, acp, gate_names, config.seed, check=check)
                report["gate_separation_train"] = {**train_sep, "in_sample": True,
                                                   "note": "in-sample: the training images and their own perturbed copies"}
                report["gate_separation_heldout"] = (NO_HELDOUT if heldout is None else heldout_separation(
                    clone, hooks, heldout, heldout_latents, acp, gate_names, config.seed, check))
        lord = trainable.export(_provenance(config, data, result, {**report, "effective_dtype": effective_dtype(clone)}))
    lord.base_family = model_family(model_patcher)
    return StageResult(result, lord=lord, report={**report, "final": result.history[-1]})


def train_stage2(model_patcher, vae, data: TrainingData, config: T.TrainConfig, cache_dir=None, checkpoint_path=None,
                 on_step=None, on_data: Optional[Callable[[int, bool], None]] = None) -> StageResult:
    """Eq. 9: a new standard LoRA, DreamBooth-style (optional prior preservation).

    ``mode``: ``lord`` -- the MODEL must carry a LoRD (Load LoRD), which stays frozen and live;
    ``plain`` -- a plain LoRA on the given images (the attacked user's baseline);
    ``pgd2_defense`` -- a plain LoRA on the images plus PGD-2 perturbed copies (the paper's baseline).
    """
    config = dataclasses.replace(config, stage="stage2").validate()
    has_lord = bool(lord_injections(model_patcher))
    if config.mode == "lord" and not has_lord:
        raise ValueError("Stage-2 mode 'lord' needs a MODEL with a LoRD applied (Load LoRD, or --lord); "
                         "use mode 'plain' to train without one")
    if config.mode != "lord" and has_lord:
        raise ValueError(f"Stage-2 mode {config.mode!r} is a baseline without LoRD, but the MODEL has a LoRD applied")
    if vae is None and (data.images or data.class_images):
        raise ValueError("training from images needs the VAE: connect it (or give latents)")
    adv_images = None
    if config.mode == "pgd2_defense":
        if not data.images:
            raise ValueError("mode pgd2_defense perturbs pixels: give images, not latents")
        adv_images = stage1_perturbations(model_patcher, vae, data, config, cache_dir, on_data)
    if data.latents:
        with torch.inference_mode(False):
            z = model_patcher.model.process_latent_in(torch.stack([lat.float().cpu().clone() for lat in data.latents]))
    else:
        z = encode_images(vae, model_patcher, data.images)
    z_adv = encode_images(vae, model_patcher, adv_images) if adv_images is not None else None
    z_class = encode_images(vae, model_patcher, data.class_images) if data.class_images else None
    names = select_targets(unet_names(model_patcher), config.targets)
    shapes = {}
    for n, m in _target_modules(model_patcher, names).items():
        kernel = tuple(m.kernel_size) if isinstance(m, torch.nn.Conv2d) else None
        shapes[n] = (m.in_channels, m.out_channels, kernel) if kernel else (m.in_features, m.out_features, None)
    with trainable_model(model_patcher, vae, config) as clone:
        device = grad.compute_device(clone)
        trainable = T.TrainableLoRA.create(shapes, config.rank, config.alpha, config.seed).to(device)
        predict = grad.batched_noise_predictor(clone, data.conds, data.image_hw)
        predict_class = grad.batched_noise_predictor(clone, data.class_conds, data.image_hw) if z_class is not None else None
        acp = grad.alphas_cumprod(clone)
        zi = z.to(device)
        za = z_adv.to(device) if z_adv is not None else None
        zk = z_class.to(device) if z_class is not None else None
        autocast = _autocast(config, device)
        with T.AdapterHooks(_target_modules(clone, names), trainable):
            def sample_losses(indices, draws):
                t = torch.tensor([d.t for d in draws])
                noise = torch.stack([d.noise(zi.shape[1:]) for d in draws]).to(device)
                pred = lambda zt, tt: predict(zt, tt, indices)  # noqa: E731
                if za is not None:
                    total, parts = T.paired_losses(pred, None, zi[indices], za[indices], t, noise, acp,
                                                   config.lambda_adv, 0.0, autocast=autocast, prediction=prediction_type(clone))
                else:
                    with autocast():
                        total = denoising_loss(pred, zi[indices], t, noise, acp, prediction_type(clone)).float()
                    parts = {"instance": total.detach()}
                if zk is not None:
                    which = [d.noise_seed % zk.shape[0] for d in draws]
                    class_noise = torch.stack([T.Draw(d.t, d.noise_seed + 1).noise(zk.shape[1:]) for d in draws]).to(device)
                    with autocast():
                        prior = denoising_loss(lambda zt, tt: predict_class(zt, tt, which), zk[which], t, class_noise, acp,
                                               prediction_type(clone)).float()
                    total = total + config.prior_weight * prior
                    parts["prior"] = prior.detach()
                return total, parts

            result = T.train(config, trainable, sample_losses, len(data), checkpoint_path, on_step, device,
                             identity=_identity(clone, vae, data, with_lord=has_lord))
        eff = effective_dtype(clone)
    lora = trainable.export()
    report = {"mode": config.mode, "final": result.history[-1], "targets": len(lora),
              "provenance": _provenance(config, data, result, {"lord_live": has_lord, "effective_dtype": eff})}
    return StageResult(result, lora=lora, report=report)


def kohya_metadata(config: T.TrainConfig, family: str, report: dict) -> dict[str, str]:
    """kohya ``ss_*`` fields (shown by A1111/Forge) plus the pack's provenance."""
    import json

    base = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(family, family)
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(config.rank),
            "ss_network_alpha": str(float(config.rank if config.alpha is None else config.alpha)),
            "ss_base_model_version": base, "ss_learning_rate": str(config.learning_rate),
            "ss_max_train_steps": str(config.steps), "ss_seed": str(config.seed),
            "lord_stage2_mode": config.mode, "lord_provenance": json.dumps(report.get("provenance", {}), sort_keys=True)}
