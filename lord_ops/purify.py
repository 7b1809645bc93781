"""Purification baselines that need no model: JPEG re-compression.

Hönig et al. 2024 ("Adversarial perturbations cannot reliably protect artists from generative AI")
show that simple purifications often remove protective perturbations; the pack measures them beside
LoRD. The model-based baseline (DiffPure-style img2img) is ``lord_ops.comfy.generate.diffpure``.

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
