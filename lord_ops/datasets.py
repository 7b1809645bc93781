"""Training datasets: a folder of images with same-name ``.txt`` captions, and the Stage-1
perturbation cache. Images are tensors ``[3, H, W]`` in [0, 1].

Folder convention (kohya / most LoRA trainers): ``cat.png`` + ``cat.txt`` (UTF-8 caption). Every
problem is found before training starts and named with its file: empty or missing folder,
unreadable image, missing or empty caption, sizes that differ or are not multiples of 8 (pass a
``resolution`` to resize the shorter side and centre-crop every image to a square).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .images import EXTENSIONS, load_image


class DatasetError(ValueError):
    """A dataset problem a user can fix: names the file, the problem and the fix."""

    def __init__(self, path, problem: str, fix: str = ""):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{path}: {problem}" + (f" -- {fix}" if fix else ""))


@dataclasses.dataclass
class CaptionedImage:
    path: Path
    image: torch.Tensor  # [3, H, W] float32 in [0, 1]
    caption: str


def _resize_center_crop(rgb: torch.Tensor, size: int) -> torch.Tensor:
    import torch.nn.functional as F

    _, h, w = rgb.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(rgb[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[:, top:top + size, left:left + size].clamp(0, 1)


def image_files(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, "is not a folder", "pass the folder that holds the training images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise DatasetError(folder, f"holds no images ({' '.join(sorted(EXTENSIONS))})",
                           "put the training images (and their .txt captions) in this folder")
    return files


def load_caption_folder(folder, resolution: Optional[int] = None, caption: Optional[str] = None,
                        require_captions: bool = True) -> list[CaptionedImage]:
    """Read and check every image and caption of ``folder`` (top level, sorted by name).

    ``caption`` (e.g. DreamBooth's instance prompt ``a photo of sks person``) replaces all captions,
    so no ``.txt`` files are needed. ``resolution``: resize + centre-crop to ``resolution`` squared.
    """
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise DatasetError(folder, f"resolution {resolution} is not a positive multiple of 8", "use e.g. 512")
    items: list[CaptionedImage] = []
    for path in image_files(folder):
        try:
            rgb, _alpha, _icc, _facts, _policy = load_image(path)
        except Exception as e:  # noqa: BLE001 -- PIL raises many types; name the file
            raise DatasetError(path, f"cannot be read as an image ({type(e).__name__}: {e})",
                               "replace or remove the file") from e
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
        if resolution is not None:
            image = _resize_center_crop(image, resolution)
        text = caption
        if text is None:
            cap_path = path.with_suffix(".txt")
            if not cap_path.is_file():
                if require_captions:
                    raise DatasetError(path, f"has no caption file {cap_path.name}",
                                       "add one (UTF-8 text), or give one caption/instance prompt for all images")
                text = ""
            else:
                try:
                    text = cap_path.read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as e:
                    raise DatasetError(cap_path, f"cannot be read as UTF-8 text ({e})", "save it as UTF-8") from e
                if not text and require_captions:
                    raise DatasetError(cap_path, "is empty", "write the image's caption into it")
        items.append(CaptionedImage(path, image, text))
    check_sizes([(it.path, tuple(it.image.shape[-2:])) for it in items])
    return items


def check_sizes(sizes: Sequence[tuple[object, tuple[int, int]]]) -> tuple[int, int]:
    """All ``(name, (H, W))`` equal and multiples of 8, else a :class:`DatasetError` naming the first offender."""
    (first_name, first), *_ = sizes
    for name, hw in sizes:
        if hw[0] % 8 or hw[1] % 8:
            raise DatasetError(name, f"is {hw[1]}x{hw[0]} px, not a multiple of 8",
                               "resize/crop it, or set a training resolution (e.g. 512) to resize all images")
        if hw != first:
            raise DatasetError(name, f"is {hw[1]}x{hw[0]} px but {first_name} is {first[1]}x{first[0]} px",
                               "use images of one size, or set a training resolution to resize all images")
    return first


# ----------------------------------------------------------------------------------------------
# Stage-1 perturbation cache


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of an image's 8-bit levels (what a PNG of it would hold)."""
    q = torch.round(t.detach().float().clamp(0, 1) * 255).to(torch.uint8).cpu().contiguous()
    return hashlib.sha256(q.numpy().tobytes() + str(tuple(q.shape)).encode()).hexdigest()


def cache_key(image: torch.Tensor, conditioning_key: str, attack: dict, model_fingerprint: str) -> str:
    """Key of one perturbed copy: the image, its conditioning (a digest of the caption's encoding),
    the attack parameters and the model it was computed against."""
    blob = json.dumps({"image": tensor_digest(image), "conditioning": conditioning_key, "attack": attack,
                       "model": model_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _write_png_atomic(path: Path, image: torch.Tensor) -> None:
    from PIL import Image

    arr = torch.round(image.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        Image.fromarray(arr).save(tmp, format="PNG")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_png(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float().div(255)


def cached_perturbations(images: Sequence[torch.Tensor], conditioning_keys: Sequence[str], attack: dict,
                         model_fingerprint: str, cache_dir, compute: Callable[[int], torch.Tensor],
                         owned: Optional[Callable[[int], bool]] = None,
                         on_item: Optional[Callable[[int, bool], None]] = None) -> list[Optional[torch.Tensor]]:
    """Perturbed copies ``[3, H, W]`` (8-bit exact) of ``images``, from ``cache_dir`` when present.

    Missing ones are computed with ``compute(i)`` and stored as lossless PNG (atomic). With
    ``owned`` (data-parallel runs) an item not owned by this process is neither computed nor read
    (``None``): the caller synchronises and calls again. ``on_item(i, was_cached)`` reports progress.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    out: list[Optional[torch.Tensor]] = []
    for i, (img, cap) in enumerate(zip(images, conditioning_keys)):
        path = cache / f"{cache_key(img, cap, attack, model_fingerprint)}.png"
        if path.exists():
            try:
                cached = _read_png(path)
                if tuple(cached.shape) == tuple(img.shape):
                    out.append(cached)
                    if on_item:
                        on_item(i, True)
                    continue
            except Exception:  # noqa: BLE001 -- a damaged cache entry is recomputed
                pass
        if owned is not None and not owned(i):
            out.append(None)
            continue
        adv = compute(i)
        _write_png_atomic(path, adv)
        out.append(_read_png(path))
        if on_item:
            on_item(i, False)
    return out


def model_fingerprint(state: dict[str, torch.Tensor], samples: int = 4096) -> str:
    """Cheap identity of a set of weights: shapes plus a strided sample of every tensor's values."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().reshape(-1)
        step = max(1, t.numel() // samples)
        h.update(k.encode() + str(tuple(state[k].shape)).encode())
        h.update(t[::step][:samples].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]
