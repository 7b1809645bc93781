"""Purification baselines that need no model: JPEG re-compression and Gaussian noise.

Hönig et al. 2024 ("Adversarial perturbations cannot reliably protect artists from generative AI")
show that simple purifications often remove protective perturbations; the pack measures them beside
LoRD. Their ICLR 2025 version finds plain Gaussian noise (sigma 0.05 on [0, 1] pixels) a strong
baseline. The model-based baseline (DiffPure-style img2img) is ``lord_ops.comfy.generate.diffpure``.

Images are "U8 images": ``torch.uint8`` tensors ``[N, H, W, 3]`` (pixel levels 0..255, RGB).
"""
from __future__ import annotations

import io

import torch

JPEG_QUALITY_RANGE = (1, 95)  # Pillow: above 95 disables parts of the quantisation (documented as "avoid")


def check_u8_images(images, name: str = "images") -> torch.Tensor:
    """``images`` must be a uint8 tensor ``[N, H, W, 3]``; returns it (on the CPU)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.uint8 tensor [N, H, W, 3], got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name}: expected a torch.uint8 tensor [N, H, W, 3] (pixel levels 0..255), got "
                         f"{images.dtype} {list(images.shape)}; convert ComfyUI IMAGEs (0..1) with round(x * 255)")
    if 0 in images.shape:
        raise ValueError(f"{name}: no pixels (shape {list(images.shape)}); give at least one non-empty image")
    return images.cpu()


def check_jpeg_quality(quality) -> int:
    lo, hi = JPEG_QUALITY_RANGE
    if isinstance(quality, bool) or not isinstance(quality, int) or not lo <= quality <= hi:
        raise ValueError(f"jpeg quality must be an integer in {lo}..{hi} (Pillow's scale; 75 is its default), "
                         f"got {quality!r}")
    return quality


def jpeg_recompress(images_u8: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """JPEG round trip of every image through Pillow: ``[N, H, W, 3]`` uint8 in, same shape and dtype out.

    ``quality`` 1..95 on Pillow's scale; chroma subsampling is Pillow's default for that quality
    (4:2:0), no optimisation passes, baseline (not progressive). Deterministic: the same input and
    quality always give the same bytes.
    """
    import numpy as np
    from PIL import Image

    images = check_u8_images(images_u8, "jpeg_recompress images")
    quality = check_jpeg_quality(quality)
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image.numpy(), "RGB").save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out.append(torch.from_numpy(np.asarray(decoded.convert("RGB")).copy()))
    return torch.stack(out)


GAUSSIAN_SIGMA = 0.05  # Hönig et al. (ICLR 2025): noise on [0, 1] pixels


def gaussian_noise(images_u8: torch.Tensor, sigma: float = GAUSSIAN_SIGMA, seed: int = 0) -> torch.Tensor:
    """Add ``N(0, sigma^2)`` noise to every pixel (``sigma`` on the [0, 1] scale, i.e. ``255 * sigma``
    levels), clamp and round back to 8 bits: ``[N, H, W, 3]`` uint8 in, same out. Image ``i`` draws
    its noise from seed ``(seed, i)`` (reproducible, independent of the batch it is in)."""
    images = check_u8_images(images_u8, "gaussian_noise images")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma <= 1:
        raise ValueError(f"gaussian noise sigma is a share of the [0, 1] pixel range in (0, 1], got {sigma!r}")
    out = []
    for i, image in enumerate(images):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
        noisy = image.float() / 255 + sigma * torch.randn(image.shape, generator=g)
        out.append((noisy.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(out)
