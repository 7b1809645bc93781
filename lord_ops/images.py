"""Images: reading user files with one documented policy, and the one conversion between float
pixels and 8-bit levels.

``load_image`` returns 8-bit RGB ``[H, W, 3]`` plus the alpha channel when there is one:
EXIF orientation applied; greyscale/palette/CMYK converted to RGB; 16-bit samples reduced to 8 bits
by keeping the high byte (value // 256); 32-bit float images refused.

Units: *levels* are uint8 0..255; *unit* pixels are float32 in [0, 1] (ComfyUI's IMAGE range).
:func:`to_uint8` is the one rounding rule (nearest level, clamped); :func:`to_unit` its inverse.
"""
from __future__ import annotations

from pathlib import Path

import torch

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


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Pixels of any layout, float in [0, 1] (or already uint8 0..255) -> uint8 levels on the CPU,
    contiguous: rounded to the nearest level, clamped to 0..255."""
    if image.dtype == torch.uint8:
        return image.detach().cpu().contiguous()
    return torch.round(image.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu().contiguous()


def to_unit(image) -> torch.Tensor:
    """uint8 levels (a tensor or a numpy array, any layout) -> float32 in [0, 1]; float input passes
    through as float32."""
    image = torch.as_tensor(image)
    return image.float().div(255) if image.dtype == torch.uint8 else image.float()


def image_to_uint8(images_bhwc: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` in [0, 1] -> uint8 levels ``[B, H, W, 3]`` on the CPU (alpha dropped)."""
    return to_uint8(images_bhwc[..., :3])


def resize_center_crop(rgb: torch.Tensor, size: int) -> torch.Tensor:
    """``[3, H, W]`` float in [0, 1] -> ``[3, size, size]``: scaled (bicubic, antialiased) so that the
    shorter side is ``size``, then the centre cropped; clamped to [0, 1]."""
    import torch.nn.functional as F

    _, h, w = rgb.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(rgb[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[:, top:top + size, left:left + size].clamp(0, 1)
