"""Reading user images with one documented policy (the attack CLI and the training datasets).

``load_image`` returns 8-bit RGB ``[H, W, 3]`` plus the alpha channel when there is one:
EXIF orientation applied; greyscale/palette/CMYK converted to RGB; 16-bit samples reduced to 8 bits
by keeping the high byte (value // 256); 32-bit float images refused.
"""
from __future__ import annotations

from pathlib import Path

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def load_image(path: Path):
    """-> (rgb uint8 [H, W, 3], alpha uint8 [H, W] or None, icc profile or None, facts, policy lines)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        facts = {"file": path.name, "format": im.format, "mode": im.mode, "size_wh": list(im.size)}
        tile_args = str(im.tile[0][3] if im.tile else "")
        im.load()
        orientation = im.getexif().get(0x0112, 1)
        im = ImageOps.exif_transpose(im)
    policy = [f"EXIF orientation {orientation} applied"] if orientation not in (1, None) else []
    mode, icc = im.mode, (im.info.get("icc_profile") if im.mode in ("RGB", "RGBA") else None)
    facts["bits"] = 16 if (mode.startswith("I") or ";16" in tile_args) else 8
    if mode == "F":
        raise ValueError("32-bit float images (mode F) are not supported; save as 8- or 16-bit first")
    if mode.startswith("I"):  # 16-bit greyscale (I;16*, or I holding 0..65535)
        grey = (np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        im = Image.fromarray(grey)
        policy.append(f"16-bit greyscale ({mode}) reduced to 8 bits (value // 256)")
    elif facts["bits"] == 16:
        policy.append("16-bit colour reduced to 8 bits by Pillow (value // 256)")
    has_alpha = "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info)
    if im.mode not in ("RGB", "RGBA"):
        policy.append(f"{im.mode} converted to RGB")
    rgba = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
    policy.append("rgba: alpha kept unchanged" if has_alpha else "rgb output")
    if im.size[0] % 8 or im.size[1] % 8:
        policy.append("size not a multiple of 8: kept exactly (padded internally)")
    return rgba[..., :3].copy(), (rgba[..., 3].copy() if has_alpha else None), icc, facts, policy


def to_uint8(images_bhwc01):
    """ComfyUI IMAGE ``[B, H, W, C]`` floats in 0..1 -> uint8 pixel levels ``[B, H, W, 3]`` on the CPU
    (rounded to the nearest level, clamped; an alpha channel is dropped)."""
    from .datasets import to_uint8 as levels  # the one rounding rule (datasets imports this module)

    return levels(images_bhwc01[..., :3])


def from_uint8(images_u8):
    """uint8 pixel levels ``[..., H, W, C]`` -> float32 in 0..1 (ComfyUI IMAGE layout when ``[B, H, W, C]``)."""
    import torch

    return torch.as_tensor(images_u8).float() / 255.0
