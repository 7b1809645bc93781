"""Differentiable access to ComfyUI models (attacks, training).

**Loading** (:func:`use_models`, the one place that does it): every ComfyUI-managed module (UNet,
VAE, CLIP) that the pack runs outside ComfyUI's own calls is first loaded with
``comfy.model_management.load_models_gpu`` -- what ComfyUI's own ``VAE.encode`` does before each
use -- and its inputs go to the patcher's load device (:func:`compute_device`: ComfyUI's
``get_torch_device()`` for the UNet and CLIP; the VAE's own device under ``--cpu-vae``), never to
where a weight happens to sit (with offloading, weights may live on the CPU). The encoder and noise
predictors below call it on every use, so a module that another node unloaded in between is loaded
again instead of being run on its offload device.

**Autograd**: ComfyUI creates weights under ``torch.inference_mode()`` (the server runs every prompt
in it); autograd cannot save such tensors, so :func:`make_differentiable` swaps every
inference-mode parameter and buffer for a normal clone (values unchanged, ``requires_grad=False``)
after a load -- measured faster and leaner than identity weight wrappers. Pixels are encoded with
``vae.first_stage_model.encode`` directly (``VAE.encode()`` may take a tiled path that drops
gradients). While gradients are computed, ``comfy.model_management.in_training`` is set where the
running ComfyUI has it (newer versions use it to avoid inference-only kernels; 0.3.75 lacks it).

**Model options**: the MODEL's ``transformer_options`` (attention patches, ``patches_replace``,
wrappers and callbacks) are passed into ``apply_model`` as a sampler would; a MODEL whose
``model_options`` carry a ``model_function_wrapper`` is refused (see :func:`gradient_transformer_options`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def make_differentiable(module: torch.nn.Module) -> int:
    """Replace inference-mode parameters/buffers of ``module`` by normal clones; returns how many."""
    swapped = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                    swapped += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    swapped += 1
    return swapped


def compute_device(patcher=None) -> torch.device:
    """Where ComfyUI computes with ``patcher`` once loaded: its load device (for checkpoints ComfyUI
    loads, ``get_torch_device()``; a VAE's may be the CPU with ``--cpu-vae``). Without a patcher,
    ``comfy.model_management.get_torch_device()``."""
    import comfy.model_management as mm

    return torch.device(patcher.load_device) if patcher is not None else mm.get_torch_device()


def is_loaded(patcher) -> bool:
    """Whether ComfyUI has loaded exactly this patcher (with its own weight patches) for compute.

    The weights must carry this patcher's patches: when a loaded clone is garbage-collected, ComfyUI
    hands its slot to the clone's parent while the weights still hold the clone's patches (a LoRD's
    weight patch on the base MODEL); ``load_models_gpu`` then sees the mismatch and re-patches."""
    import comfy.model_management as mm

    current = getattr(patcher.model, "current_weight_patches_uuid", None)
    own = current is None or current == getattr(patcher, "patches_uuid", current)
    return own and any(lm.model is patcher for lm in mm.current_loaded_models)


def _modules(model_patcher=None, vae=None, clip=None) -> list[tuple[object, torch.nn.Module]]:
    out = []
    if model_patcher is not None:
        out.append((model_patcher, model_patcher.model.diffusion_model))
    if vae is not None:
        out.append((vae.patcher, vae.first_stage_model))
    if clip is not None:
        out.append((clip.patcher, clip.cond_stage_model))
    return out


def use_models(model_patcher=None, vae=None, clip=None, differentiable: bool = True) -> torch.device:
    """Load the given MODEL (with its patches/LoRD), VAE and CLIP for compute, in one
    ``load_models_gpu`` call so that ComfyUI keeps all of them (it is skipped when all are loaded
    already), freeze them and, with ``differentiable``, make their tensors usable by autograd.

    Returns the compute device of the first one given (:func:`compute_device`). Call it right before
    each use, as ComfyUI's own ``VAE.encode`` does: ComfyUI may unload a model between two nodes.
    """
    import comfy.model_management as mm

    pairs = _modules(model_patcher, vae, clip)
    if not pairs:
        return compute_device()
    patchers = [p for p, _ in pairs]
    if not all(is_loaded(p) for p in patchers):
        with torch.inference_mode(False):
            mm.load_models_gpu(patchers)
    for _, module in pairs:
        module.requires_grad_(False)
        if differentiable:
            make_differentiable(module)
    return compute_device(patchers[0])


def load_for_gradients(model_patcher=None, vae=None) -> None:
    """Load the MODEL and the VAE, ready for backward (kept for callers; see :func:`use_models`)."""
    use_models(model_patcher, vae)


@contextlib.contextmanager
def training_flag(enabled: bool = True):
    """Set ``comfy.model_management.in_training`` for the duration, where that ComfyUI has it
    (newer ComfyUI picks autograd-safe kernels then); restored after. A no-op on ComfyUI 0.3.75."""
    import comfy.model_management as mm

    if not enabled or not hasattr(mm, "in_training"):
        yield
        return
    previous = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = previous


def gradient_transformer_options(model_patcher) -> dict:
    """The MODEL's ``transformer_options`` as ComfyUI's sampler passes them to ``apply_model``
    (a copy, with the patcher's wrappers and callbacks merged in).

    ``model_options["model_function_wrapper"]`` replaces the whole model call inside ComfyUI's
    sampler, which the gradient paths bypass: such a MODEL is refused with a message naming it.
    CFG-level options (``sampler_cfg_function``, ``sampler_post_cfg_function``) do not apply: the
    training and attack losses evaluate one conditional prediction, without CFG.
    """
    import comfy.model_patcher
    import comfy.patcher_extension

    options = getattr(model_patcher, "model_options", None) or {}
    if options.get("model_function_wrapper") is not None:
        raise ValueError("the MODEL carries a model_function_wrapper patch (set by a node such as a model "
                         "wrapper/TeaCache-style accelerator), which training and the attacks cannot apply "
                         "to their gradient computation: connect the MODEL before that node")
    options = comfy.model_patcher.create_model_options_clone(options)
    to = options.get("transformer_options", {})
    merge = comfy.patcher_extension.merge_nested_dicts
    for key in ("wrappers", "callbacks"):
        extra = getattr(model_patcher, key, None)
        if extra:
            merge(to.setdefault(key, {}), extra, copy_dict1=False)
    return to


def latent_encoder(vae, model_patcher=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode(x)``: ``[B, 3, H, W]`` in [0, 1] -> scaled latents (``latent_format.process_in`` of
    ``model_patcher``'s format, raw VAE latents without one), differentiable, through
    ``vae.first_stage_model.encode`` on [-1, 1] input in the VAE's dtype. Each call loads the VAE
    first (:func:`use_models`) and runs it on its compute device; the result is on that device."""
    fmt = model_patcher.model.latent_format if model_patcher is not None else None

    def encode(x: torch.Tensor) -> torch.Tensor:
        device = use_models(vae=vae)
        with training_flag(torch.is_grad_enabled()):
            z = vae.first_stage_model.encode((x * 2 - 1).to(device, vae.vae_dtype)).float()
        return fmt.process_in(z) if fmt is not None else z

    return encode


def alphas_cumprod(model_patcher) -> torch.Tensor:
    """The discrete DDPM schedule of the MODEL: ``1 / (1 + sigma_t^2)``, ``[T]``."""
    return schedule_alphas_cumprod(model_patcher.get_model_object("model_sampling"))


def schedule_alphas_cumprod(model_sampling) -> torch.Tensor:
    """``1 / (1 + sigma_t^2)`` ``[T]`` of a ComfyUI ``model_sampling`` object (discrete schedules),
    e.g. ``comfy.model_sampling.ModelSamplingDiscrete(comfy.supported_models.SD15({}))`` when a
    script trains a UNet before any checkpoint exists."""
    sigmas = model_sampling.sigmas.float().cpu()
    return 1.0 / (1.0 + sigmas ** 2)


def batched_noise_predictor(model_patcher, conditionings: list, image_hw: tuple[int, int]) -> Callable:
    """``predict_noise(z_t, t, which)``: DDPM-noised latents ``z_t`` ``[B, ...]``, integer timesteps
    ``t`` ``[B]``, and ``which[b]`` = index into ``conditionings`` (one ComfyUI CONDITIONING per
    caption; its first entry is used) for each batch item.

    Works in ComfyUI's sigma space: ``x = z_t sqrt(1 + s^2)``, ``s = sigma_t``, the model's
    denoised output ``D`` gives ``eps = (x - D) / s`` -- valid for eps- and v-prediction models.
    """
    model = model_patcher.model
    sampling = model_patcher.get_model_object("model_sampling")
    device = compute_device(model_patcher)
    base_options = gradient_transformer_options(model_patcher)
    h, w = image_hw
    per_item: dict[int, dict] = {}

    def item_kwargs(i: int, like: torch.Tensor) -> dict:
        if i not in per_item:
            cross_attn, extras = conditionings[i][0][0], dict(conditionings[i][0][1])
            conds = model.extra_conds(cross_attn=cross_attn.to(device), noise=like, device=device, width=w, height=h,
                                      **{k: v for k, v in extras.items() if k not in ("cross_attn", "noise", "device")})
            kw = {k: c.process_cond(batch_size=1, device=device, area=None).cond for k, c in conds.items()}
            per_item[i] = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        return per_item[i]

    def options(sigma: torch.Tensor, which) -> dict:
        to = dict(base_options)
        to.update(sigmas=sigma, cond_or_uncond=[0] * len(which), uuids=[f"lord-cond-{int(i)}" for i in which])
        return to

    def predict_noise(z_t: torch.Tensor, t: torch.Tensor, which) -> torch.Tensor:
        use_models(model_patcher)
        sigma = sampling.sigmas.to(device)[t.to(device)].float()
        s = sigma.reshape(-1, 1, 1, 1)
        x = z_t.to(device).float() * (1 + s ** 2).sqrt()
        items = [item_kwargs(int(i), x[:1]) for i in which]
        shapes = {k: {tuple(v.shape) for it in items for kk, v in it.items() if kk == k and isinstance(v, torch.Tensor)}
                  for k in items[0]}
        if all(len(v) <= 1 for v in shapes.values()):
            kwargs = {k: (torch.cat([it[k] for it in items]) if isinstance(items[0][k], torch.Tensor) else items[0][k])
                      for k in items[0]}
            with training_flag(torch.is_grad_enabled()):
                denoised = model.apply_model(x, sigma, transformer_options=options(sigma, which), **kwargs).float()
        else:  # captions of different token lengths: one item at a time
            with training_flag(torch.is_grad_enabled()):
                denoised = torch.cat([model.apply_model(x[b:b + 1], sigma[b:b + 1], transformer_options=options(sigma[b:b + 1], which[b:b + 1]),
                                                        **items[b]).float() for b in range(x.shape[0])])
        return (x - denoised) / s

    return predict_noise


def noise_predictor(model_patcher, conditioning, image_hw: tuple[int, int]) -> Callable:
    """``predict_noise(z_t, t)`` with one CONDITIONING for every batch item (see
    :func:`batched_noise_predictor`)."""
    predict = batched_noise_predictor(model_patcher, [conditioning], image_hw)
    return lambda z_t, t: predict(z_t, t, [0] * z_t.shape[0])


def encode_target(vae, model_patcher, target: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Latent of an ACE/PhotoGuard target image ``[1|B, 3, h, w]`` in [0, 1], resized to ``like``'s
    pixel size; the pack's high-contrast pattern when ``target`` is None."""
    from ..attacks import target_image

    h, w = like.shape[-2:]
    img = target_image(target, h, w, min_cell=vae_downscale(vae))
    with torch.no_grad():
        z = latent_encoder(vae, model_patcher)(img.float())
    return z.expand(like.shape[0], -1, -1, -1) if z.shape[0] == 1 else z


def vae_downscale(vae) -> int:
    """Pixels per latent cell of a ComfyUI VAE (8 for SD1.x/SDXL)."""
    ratio = getattr(vae, "downscale_ratio", 8)
    return int(ratio) if isinstance(ratio, (int, float)) else 8


def pad_to_multiple(x: torch.Tensor, multiple: int = 8) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad ``[B, C, H, W]`` on the bottom/right to a multiple; returns (padded, (H, W))."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)
