"""Sampling through ComfyUI's own sampler: text-to-image and DiffPure-style img2img purification.

Everything runs the way core's nodes do (``CLIPTextEncode`` -> ``KSampler`` -> ``VAEDecode``, or
``VAEEncode`` -> ``KSampler`` with ``denoise`` for img2img): ``comfy.sample.prepare_noise`` and
``comfy.sample.sample`` with the arguments of ``nodes.common_ksampler``, so ComfyUI loads the models
itself (``load_models_gpu`` inside the sampler, ``VAE.encode``/``decode`` and the CLIP encoder).

Images are "U8 images": ``torch.uint8`` ``[N, H, W, 3]``, pixel levels 0..255, the decoded 0..1 image
as ``round(x * 255)`` clamped to 0..255.

**One image per sampler call.** Image ``i`` depends only on its own seed, never on which other
images were generated with it: ComfyUI's batched sampling gives slightly different numbers for the
same seed (float rounding of batched convolutions; measured on the CPU with the SD15-geometry test
checkpoint: 1 level in about 0.01% of the pixels at a batch of 3, more on a GPU whose kernels depend
on the batch size), and ancestral / SDE samplers draw their noise for the whole batch. So every image
is sampled alone and ``SamplingConfig.batch_size`` does not group images (it is kept so configs stay
compatible and recorded).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import torch

from ..images import image_to_uint8
from ..purify import check_u8_images

SEED_MODULUS = 2 ** 64  # ComfyUI's seed widgets go up to 0xFFFFFFFFFFFFFFFF; seed + i wraps around


@dataclasses.dataclass
class SamplingConfig:
    """What core's KSampler takes, plus the image size and the negative prompt.

    steps: sampler steps actually run (for img2img, ComfyUI schedules ``steps / denoise`` and runs
    the last ``steps``, as core's KSampler does); cfg: classifier-free guidance scale (1.0 skips the
    negative); sampler / scheduler: names from ``comfy.samplers.KSampler.SAMPLERS`` / ``SCHEDULERS``;
    width / height: text-to-image size in pixels (multiples of the VAE's 8-pixel block; img2img keeps
    each input's own size); batch_size: recorded only (see the module docstring); negative: the
    negative prompt text.
    """
    steps: int = 30
    cfg: float = 7.5
    sampler: str = "euler"
    scheduler: str = "normal"
    width: int = 512
    height: int = 512
    batch_size: int = 4
    negative: str = ""

    def validate(self) -> "SamplingConfig":
        import comfy.samplers

        def whole(name, lo, hi=None):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
                span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
                raise ValueError(f"SamplingConfig.{name}: expected an integer {span}, got {value!r}")

        whole("steps", 1, 10000)
        whole("batch_size", 1)
        for name in ("width", "height"):
            whole(name, 8, 16384)
            if getattr(self, name) % 8:
                raise ValueError(f"SamplingConfig.{name}: {getattr(self, name)} is not a multiple of 8 (the VAE's "
                                 f"block); use e.g. {getattr(self, name) // 8 * 8 or 8}")
        if isinstance(self.cfg, bool) or not isinstance(self.cfg, (int, float)) or not math.isfinite(self.cfg) \
                or not 0.0 <= self.cfg <= 100.0:
            raise ValueError(f"SamplingConfig.cfg: expected a number in 0..100 (core's KSampler range), got {self.cfg!r}")
        if self.sampler not in comfy.samplers.KSampler.SAMPLERS:
            raise ValueError(f"SamplingConfig.sampler: {self.sampler!r} is not a ComfyUI sampler; choose one of "
                             f"{', '.join(comfy.samplers.KSampler.SAMPLERS)}")
        if self.scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise ValueError(f"SamplingConfig.scheduler: {self.scheduler!r} is not a ComfyUI scheduler; choose one "
                             f"of {', '.join(comfy.samplers.KSampler.SCHEDULERS)}")
        if not isinstance(self.negative, str):
            raise ValueError(f"SamplingConfig.negative: expected the negative prompt text, got {self.negative!r}")
        return self


def encode_prompt(clip, text: str):
    """CONDITIONING for ``text``, exactly as core's ``CLIPTextEncode`` makes it."""
    if clip is None:
        raise ValueError("no CLIP text encoder: the checkpoint has none (or the clip input is empty); load a "
                         "checkpoint with a text encoder or connect a CLIP loader")
    if not isinstance(text, str):
        raise ValueError(f"prompt must be text, got {type(text).__name__}")
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def cached_encoder(clip) -> Callable[[str], object]:
    """``encode(text)``: :func:`encode_prompt` with ``clip``, once per distinct text (CLIP-L costs about 1 s a
    prompt on one CPU core, and captions repeat: a DreamBooth class set, a Stage-1 set). Encoded under
    ``no_grad``, so training and sampling can both use the result; callers read it and never modify it
    (ComfyUI's sampler and ``lord_ops.comfy.grad`` copy its dicts)."""
    conditionings: dict = {}

    def encode(text: str):
        if text not in conditionings:
            with torch.no_grad():
                conditionings[text] = encode_prompt(clip, text)
        return conditionings[text]

    return encode


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seeds must be non-negative integers, got {seed!r}")
    return seed % SEED_MODULUS


def sample_latent(model_patcher, latent: torch.Tensor, seed: int, positive, negative, config: SamplingConfig,
                  denoise: float = 1.0, callback=None, console_bar: bool = True) -> torch.Tensor:
    """Core's ``common_ksampler`` for one latent ``[B, C, h, w]`` (the VAE's raw latent, as ``VAEEncode``
    gives it, or zeros for text-to-image): noise from ``prepare_noise(latent, seed)``, then
    ``comfy.sample.sample`` with ``denoise``. ``callback(step, x0, x, total_steps)`` as core's.
    ``console_bar`` False: no console progress bar (else ComfyUI's setting decides)."""
    import comfy.sample
    import comfy.utils

    latent = comfy.sample.fix_empty_latent_channels(model_patcher, latent)
    noise = comfy.sample.prepare_noise(latent, seed, None)
    return comfy.sample.sample(model_patcher, noise, config.steps, config.cfg, config.sampler, config.scheduler,
                               positive, negative, latent, denoise=denoise, disable_noise=False, start_step=None,
                               last_step=None, force_full_denoise=False, noise_mask=None, callback=callback,
                               disable_pbar=not (console_bar and comfy.utils.PROGRESS_BAR_ENABLED), seed=seed)


def decode_u8(vae, samples: torch.Tensor) -> torch.Tensor:
    """``VAE.decode`` (core's ``VAEDecode``) -> U8 images ``[N, H, W, 3]`` (round(x * 255), clamped)."""
    images = vae.decode(samples)
    if images.dim() == 5:  # video VAEs: frames into the batch, like VAEDecode
        images = images.reshape(-1, *images.shape[-3:])
    return image_to_uint8(images)


def _block(vae) -> int:
    f = vae.spacial_compression_encode()
    return int(f) if f else 8


def _step_callback(index: int, on_step, check):
    if on_step is None and check is None:
        return None

    def callback(step, x0, x, total_steps):
        if check is not None:
            check()
        if on_step is not None:
            on_step(index, step + 1, total_steps)

    return callback


def sample_images(model_patcher, vae, positive, negative, seeds: Sequence[int], config: SamplingConfig,
                  on_image: Callable | None = None, check: Callable | None = None,
                  on_step: Callable | None = None) -> torch.Tensor:
    """Text-to-image from CONDITIONING (what :func:`text_to_image` does after encoding the prompts).

    Returns U8 images ``[len(seeds), height, width, 3]``; image ``i`` from ``seeds[i]`` alone.
    ``on_image(i, u8 [H, W, 3])`` after each image, ``check()`` before each image and at every sampler
    step (raise there to cancel), ``on_step(i, step, total_steps)`` at every sampler step."""
    config.validate()
    seeds = [_seed(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds: give at least one seed (one image per seed)")
    if model_patcher is None or vae is None:
        raise ValueError("text_to_image needs a MODEL and a VAE: load a checkpoint that has both (or connect them)")
    f = _block(vae)
    if config.width % f or config.height % f:
        raise ValueError(f"SamplingConfig.width/height: {config.width}x{config.height} must be multiples of the "
                         f"VAE's {f}-pixel block")
    out = []
    with torch.inference_mode():
        for i, seed in enumerate(seeds):
            if check is not None:
                check()
            latent = torch.zeros([1, 4, config.height // f, config.width // f])
            samples = sample_latent(model_patcher, latent, seed, positive, negative, config, 1.0,
                                    _step_callback(i, on_step, check))
            image = decode_u8(vae, samples)[0]
            out.append(image)
            if on_image is not None:
                on_image(i, image)
    return torch.stack(out)


def text_to_image(model_patcher, clip, vae, prompt: str, seeds: list[int], config: SamplingConfig,
                  on_image: Callable | None = None, check: Callable | None = None,
                  on_step: Callable | None = None) -> torch.Tensor:
    """Sample ``len(seeds)`` images for ``prompt`` (negative prompt ``config.negative``) with ComfyUI's
    sampler; U8 images ``[len(seeds), config.height, config.width, 3]``. Image ``i`` uses ``seeds[i]``
    and does not depend on the other seeds. Callbacks as in :func:`sample_images`."""
    config.validate()
    with torch.inference_mode():
        positive, negative = encode_prompt(clip, prompt), encode_prompt(clip, config.negative)
    return sample_images(model_patcher, vae, positive, negative, seeds, config, on_image, check, on_step)


def _as_image_list(images_u8):
    if isinstance(images_u8, torch.Tensor):
        return list(check_u8_images(images_u8, "diffpure images")), True
    if isinstance(images_u8, (list, tuple)):
        if not images_u8:
            raise ValueError("diffpure images: empty list")
        return [check_u8_images(im.unsqueeze(0) if isinstance(im, torch.Tensor) and im.dim() == 3 else im,
                                f"diffpure images[{i}]")[0] for i, im in enumerate(images_u8)], False
    raise TypeError(f"diffpure images: expected a uint8 tensor [N, H, W, 3] or a list of [H, W, 3], got "
                    f"{type(images_u8).__name__}")


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"diffpure strength must be in (0, 1] (the share of the noise schedule, core's KSampler "
                         f"denoise; 0.1..0.3 purifies while keeping the image), got {strength!r}")
    return float(strength)


def diffpure_conditioned(model_patcher, vae, images_u8, positive, negative, strength: float, seed: int,
                         config: SamplingConfig, on_image: Callable | None = None, check: Callable | None = None,
                         on_step: Callable | None = None):
    """DiffPure-style purification from CONDITIONING (what :func:`diffpure` does after encoding).

    Per image: pad right/bottom by edge replication to a multiple of the VAE block, ``VAE.encode``,
    noise to ``t* = strength`` and denoise with ComfyUI's sampler (core's img2img: KSampler with
    ``denoise=strength``, seed ``seed + i``), ``VAE.decode``, crop back to the input size.
    ``images_u8``: uint8 ``[N, H, W, 3]`` (returns the same layout) or a list of ``[H, W, 3]`` of any
    sizes (returns a list). Callbacks as in :func:`sample_images`."""
    config.validate()
    strength = check_strength(strength)
    base = _seed(seed)
    images, stacked = _as_image_list(images_u8)
    if model_patcher is None or vae is None:
        raise ValueError("diffpure needs a MODEL and a VAE: load the base checkpoint (or connect them)")
    f = _block(vae)
    out = []
    with torch.inference_mode():
        for i, image in enumerate(images):
            if check is not None:
                check()
            h, w = image.shape[0], image.shape[1]
            x = image.float().div(255).movedim(-1, 0).unsqueeze(0)  # [1, 3, H, W] in 0..1
            pad_h, pad_w = (-h) % f, (-w) % f
            if pad_h or pad_w:
                x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
            latent = vae.encode(x.movedim(1, -1))
            samples = sample_latent(model_patcher, latent, (base + i) % SEED_MODULUS, positive, negative, config,
                                    strength, _step_callback(i, on_step, check))
            purified = decode_u8(vae, samples)[0, :h, :w].contiguous()
            out.append(purified)
            if on_image is not None:
                on_image(i, purified)
    return torch.stack(out) if stacked else out


def diffpure(model_patcher, clip, vae, images_u8, prompt: str, strength: float, seed: int, config: SamplingConfig,
             on_image: Callable | None = None, check: Callable | None = None, on_step: Callable | None = None):
    """DiffPure-style img2img purification with the base model: every image is noised to
    ``t* = strength`` (core's KSampler ``denoise``) and denoised under ``prompt`` (the caller's class
    prompt, e.g. ``"a photo of a person"``; negative ``config.negative``); image ``i`` uses seed
    ``seed + i``. Output has the input's size and layout. See :func:`diffpure_conditioned`."""
    config.validate()
    check_strength(strength)
    with torch.inference_mode():
        positive, negative = encode_prompt(clip, prompt), encode_prompt(clip, config.negative)
    return diffpure_conditioned(model_patcher, vae, images_u8, positive, negative, strength, seed, config,
                                on_image, check, on_step)
