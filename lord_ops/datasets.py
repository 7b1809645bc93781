"""Training datasets: a folder of images with same-name ``.txt`` captions, and the Stage-1
perturbation cache. Images are held as 8-bit tensors ``[3, H, W]`` (uint8 0..255: a quarter of the
memory of float32 pixels); :func:`to_unit` gives the float ``[0, 1]`` view the models take.

Folder convention (kohya / most LoRA trainers): ``cat.png`` + ``cat.txt`` (UTF-8 caption). Every
problem is found before training starts and named with its file: empty or missing folder,
unreadable image, missing or empty caption, sizes that differ or are not multiples of 8 (pass a
``resolution`` to resize the shorter side and centre-crop every image to a square).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .images import EXTENSIONS, load_image, resize_center_crop, to_uint8, to_unit


class DatasetError(ValueError):
    """A dataset problem a user can fix: names the file, the problem and the fix."""

    def __init__(self, path, problem: str, fix: str = ""):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{path}: {problem}" + (f" -- {fix}" if fix else ""))


@dataclasses.dataclass
class CaptionedImage:
    path: Path
    image: torch.Tensor  # [3, H, W] uint8 (0..255); to_unit(image) for [0, 1]
    caption: str


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
        image = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
        if image.dtype != torch.uint8:
            image = to_uint8(image.float().div(255 if rgb.dtype.kind in "ui" else 1))
        if resolution is not None:
            image = to_uint8(resize_center_crop(to_unit(image), resolution))
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


def float_bytes(t: torch.Tensor) -> bytes:
    """A tensor's values as float32 bytes (CPU): what the digests below hash."""
    return t.detach().float().cpu().numpy().tobytes()


def conditioning_digest(conditioning) -> str:
    """sha256 of a ComfyUI CONDITIONING's tensors (``[[cross_attn, {extras}], ...]``: what the PGD
    objective actually sees of the caption)."""
    h = hashlib.sha256()
    for cross_attn, extras in conditioning:
        h.update(float_bytes(cross_attn))
        for k in sorted(extras):
            if isinstance(extras[k], torch.Tensor):
                h.update(k.encode() + float_bytes(extras[k]))
    return h.hexdigest()[:32]


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of an image's 8-bit levels (what a PNG of it would hold); float [0, 1] or uint8 input."""
    q = to_uint8(t)
    return hashlib.sha256(q.numpy().tobytes() + str(tuple(q.shape)).encode()).hexdigest()


def cache_key(image: torch.Tensor, conditioning_key: str, attack: dict, model_fingerprint: str) -> str:
    """Key of one perturbed copy: the image, its conditioning (a digest of the caption's encoding),
    the attack parameters and the model it was computed against."""
    blob = json.dumps({"image": tensor_digest(image), "conditioning": conditioning_key, "attack": attack,
                       "model": model_fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


CACHE_FORMAT = "comfyui-lord-perturbation"
CACHE_VERSION = "2"  # 1: 8-bit PNG entries (still counted and evicted, never read)
CACHE_SUFFIX = ".safetensors"
# Default bound of a perturbation cache folder: 4 GiB (a 512 px entry is 3 MiB, so about 1,300 images).
DEFAULT_CACHE_MAX_BYTES = 4 * 1024 ** 3


def _write_entry(path: Path, image: torch.Tensor, attack: dict) -> None:
    """One cache entry: the perturbed image ``[3, H, W]`` as float32 in [0, 1], bit for bit (atomic)."""
    from .format import atomic_save_safetensors

    t = image.detach().float().clamp(0, 1).cpu().contiguous()
    atomic_save_safetensors(path, {"image": t}, {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                                                 "attack": json.dumps(attack, sort_keys=True)})


def _read_entry(path: Path, shape: tuple) -> Optional[torch.Tensor]:
    """The cached image, or None when the entry is unusable (damaged, other shape, not finite)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            if (f.metadata() or {}).get("format") != CACHE_FORMAT:
                return None
            t = f.get_tensor("image")
    except Exception:  # noqa: BLE001 -- a damaged cache entry is recomputed
        return None
    if t.dtype != torch.float32 or tuple(t.shape) != tuple(shape) or not torch.isfinite(t).all():
        return None
    if float(t.min()) < 0 or float(t.max()) > 1:
        return None
    return t


def cache_entries(cache_dir) -> list[Path]:
    """Every entry of a perturbation cache folder (float entries and legacy ``.png`` ones)."""
    cache = Path(cache_dir)
    if not cache.is_dir():
        return []
    return [p for p in cache.iterdir() if p.is_file() and not p.name.startswith(".")
            and p.suffix in (CACHE_SUFFIX, ".png")]


def evict_cache(cache_dir, max_bytes: int, keep: Sequence[Path] = ()) -> list[Path]:
    """Bound a cache folder to ``max_bytes``: delete least recently used entries (oldest modification
    time first; a read refreshes it) until the folder fits. Entries in ``keep`` (the ones the current
    run uses) are never deleted, so one run's own set may exceed the bound. Returns what was deleted."""
    keep_set = {Path(k).resolve() for k in keep}
    stats = []
    for p in cache_entries(cache_dir):
        try:
            st = p.stat()
        except OSError:
            continue
        stats.append((st.st_mtime_ns, p.name, p, st.st_size))
    total = sum(s[3] for s in stats)
    removed = []
    for _mtime, _name, p, size in sorted(stats):
        if total <= max_bytes:
            break
        if p.resolve() in keep_set:
            continue
        try:
            p.unlink()
        except OSError:
            continue
        total -= size
        removed.append(p)
    return removed


def cache_entry_path(cache_dir, image: torch.Tensor, conditioning_key: str, attack: dict, model_fingerprint: str) -> Path:
    """Where :func:`cached_perturbations` keeps the copy of ``image``."""
    return Path(cache_dir) / f"{cache_key(image, conditioning_key, attack, model_fingerprint)}{CACHE_SUFFIX}"


def cached_perturbations(images: Sequence[torch.Tensor], conditioning_keys: Sequence[str], attack,
                         model_fingerprint: str, cache_dir, compute: Callable[[int], torch.Tensor],
                         owned: Optional[Callable[[int], bool]] = None,
                         on_item: Optional[Callable[[int, bool], None]] = None,
                         max_bytes: Optional[int] = DEFAULT_CACHE_MAX_BYTES) -> list[Optional[torch.Tensor]]:
    """Perturbed copies ``[3, H, W]`` (float32 in [0, 1]) of ``images``, from ``cache_dir`` when present.

    ``images`` only feed the cache key (their 8-bit levels) and the expected shape; ``attack`` is the
    attack's parameters (a dict, part of the key), or one dict per image. Missing copies are
    computed with ``compute(i)`` and stored losslessly as float32 safetensors (atomic write), so a
    perturbation smaller than one 8-bit level survives (PGD-2 moves pixels by about 1.3 levels). With
    ``owned`` (data-parallel runs) an item not owned by this process is neither computed nor read
    (``None``): the caller synchronises and calls again. ``on_item(i, was_cached)`` reports progress.

    Bound (``max_bytes``, default :data:`DEFAULT_CACHE_MAX_BYTES`; None: unbounded): after the
    entries are made, least recently used entries of *other* runs are deleted until the folder fits
    (see :func:`evict_cache`).
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    out: list[Optional[torch.Tensor]] = []
    used: list[Path] = []
    attacks = list(attack) if isinstance(attack, (list, tuple)) else [attack] * len(images)
    for i, (img, cap) in enumerate(zip(images, conditioning_keys)):
        path = cache_entry_path(cache, img, cap, attacks[i], model_fingerprint)
        shape = tuple(img.shape)
        if path.exists():
            cached = _read_entry(path, shape)
            if cached is not None:
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used: evicted last
                out.append(cached)
                used.append(path)
                if on_item:
                    on_item(i, True)
                continue
        if owned is not None and not owned(i):
            out.append(None)
            continue
        adv = compute(i)
        _write_entry(path, adv, attacks[i])
        out.append(adv.detach().float().clamp(0, 1).cpu())
        used.append(path)
        if on_item:
            on_item(i, False)
    if max_bytes is not None:
        evict_cache(cache, max_bytes, keep=used)
    return out


def model_fingerprint(state: dict[str, torch.Tensor], samples: int = 4096) -> str:
    """Cheap identity of a set of weights: shapes plus a strided sample of every tensor's values."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().reshape(-1)
        step = max(1, t.numel() // samples)
        h.update(k.encode() + str(tuple(state[k].shape)).encode())
        h.update(float_bytes(t[::step][:samples]))
    return h.hexdigest()[:32]
