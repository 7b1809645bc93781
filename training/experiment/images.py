"""Image sets of an experiment on disk: uint8 ``[3, H, W]`` tensors in memory (levels 0..255), PNG
files in the stage folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lord_ops.atomic import atomic_write
from lord_ops.datasets import CaptionedImage, DatasetError, image_files
from lord_ops.images import load_image, resize_center_crop, to_uint8, to_unit
from training.experiment_config import ConfigError


def load_set(folder: Path, resolution: int) -> dict:
    """``{stem: uint8 [3, H, W]}`` of the images in ``folder``; images not ``resolution`` squared are
    resized + centre-cropped (images already that size are kept bit-exact: a protection survives)."""
    out = {}
    for item in _load_any(folder):
        image = item.image
        if tuple(image.shape[-2:]) != (resolution, resolution):
            image = to_uint8(resize_center_crop(to_unit(image), resolution))
        if item.path.stem in out:
            raise ConfigError(f"{folder}: two images share the name {item.path.stem!r}; rename one")
        out[item.path.stem] = image
    return out


def _load_any(folder: Path) -> list[CaptionedImage]:
    """Images of any size (``load_caption_folder`` insists on one size)."""
    items = []
    for path in image_files(folder):
        try:
            rgb = load_image(path)[0]
        except Exception as e:  # noqa: BLE001
            raise DatasetError(path, f"cannot be read as an image ({type(e).__name__}: {e})", "replace or remove it") from e
        items.append(CaptionedImage(path, torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), ""))
    return items


def save_png(path: Path, image_chw_u8: torch.Tensor) -> None:
    """Write uint8 ``[3, H, W]`` as a PNG, atomically."""
    image = Image.fromarray(np.ascontiguousarray(image_chw_u8.permute(1, 2, 0).numpy()))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def read_png(path: Path) -> torch.Tensor:
    """An image file -> uint8 ``[3, H, W]``."""
    return torch.from_numpy(load_image(path)[0]).permute(2, 0, 1).contiguous()


def hwc(images_chw: list) -> torch.Tensor:
    """list of uint8 ``[3, H, W]`` -> uint8 ``[N, H, W, 3]``."""
    return torch.stack([im.permute(1, 2, 0) for im in images_chw])


def unit_hwc(chw_u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[3, H, W]`` -> float ``[H, W, 3]`` in [0, 1] (one ComfyUI IMAGE, without the batch axis)."""
    return chw_u8.permute(1, 2, 0).float().div(255)


def u8_chw(bhwc_or_hwc: torch.Tensor) -> torch.Tensor:
    """The first image of a float IMAGE ``[B, H, W, 3]`` (or one ``[H, W, 3]``) in [0, 1] -> uint8 ``[3, H, W]``."""
    x = bhwc_or_hwc[0] if bhwc_or_hwc.dim() == 4 else bhwc_or_hwc
    return to_uint8(x.permute(2, 0, 1))
