"""The sample grids (PIL): ``grid_<method>.png`` per method with samples and ``grid_all.png`` (the
first samples of every method, one row each); an unreadable sample becomes a grey "missing file" tile.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from training.report.common import ordered_methods

__all__ = ["grid_names", "grid_method_png", "grid_all_png"]

_GRID_TILE, _GRID_COLS, _GRID_MAX = 192, 4, 16
_ALL_TILE, _ALL_MAX, _ALL_LABEL_W = 128, 8, 220


def _png_bytes_pil(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")  # PIL writes no date or software chunk: deterministic
    return buf.getvalue()


def _safe_name(method_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(method_id)) or "method"


def grid_names(results: dict) -> dict[str, str]:
    """method id -> grid file name (unique) for each method with samples."""
    names, used = {}, set()
    for mid, m in ordered_methods(results):
        if not m.get("samples"):
            continue
        base = name = f"grid_{_safe_name(mid)}.png"
        k = 2
        while name in used or name == "grid_all.png":
            name = base[:-4] + f"_{k}.png"
            k += 1
        used.add(name)
        names[mid] = name
    return names


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _tile(path: Path, size: int):
    """The image at ``path`` scaled to fit a size x size RGB tile (aspect kept), or a grey "missing file" tile."""
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (size, size), (235, 235, 235))
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = min(size / im.width, size / im.height)
            new_size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            # small samples (tests, tiny models) are enlarged with visible pixels, large ones reduced smoothly
            resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
            im = im.resize(new_size, resample)
            tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
        return tile, True
    except (OSError, ValueError):
        draw = ImageDraw.Draw(tile)
        draw.text((8, size // 2 - 8), "missing file", fill=(150, 30, 30), font=_font(max(10, size // 12)))
        return tile, False


def _fit_text(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def grid_method_png(out_dir: Path, label: str, samples: list[str], missing_files: list[str]) -> bytes:
    from PIL import Image, ImageDraw

    shown = samples[:_GRID_MAX]
    cols = min(_GRID_COLS, len(shown))
    rows = math.ceil(len(shown) / cols)
    header, pad = 34, 4
    width = cols * _GRID_TILE + (cols + 1) * pad
    canvas = Image.new("RGB", (width, header + rows * (_GRID_TILE + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(18)
    title = f"{label} ({len(shown)} of {len(samples)} samples)"
    draw.text((pad + 2, 7), _fit_text(draw, title, font, width - 2 * pad), fill=(0, 0, 0), font=font)
    for i, rel in enumerate(shown):
        tile, ok = _tile(out_dir / rel, _GRID_TILE)
        if not ok:
            missing_files.append(rel)
        r, c = divmod(i, cols)
        canvas.paste(tile, (pad + c * (_GRID_TILE + pad), header + r * (_GRID_TILE + pad)))
    return _png_bytes_pil(canvas)


def grid_all_png(out_dir: Path, entries: list[tuple[str, list[str]]]) -> bytes:
    from PIL import Image, ImageDraw

    pad = 4
    cols = max(min(_ALL_MAX, len(s)) for _, s in entries)
    width = _ALL_LABEL_W + cols * (_ALL_TILE + pad) + pad
    canvas = Image.new("RGB", (width, len(entries) * (_ALL_TILE + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(16)
    for r, (label, samples) in enumerate(entries):
        y = pad + r * (_ALL_TILE + pad)
        draw.text((8, y + _ALL_TILE // 2 - 10), _fit_text(draw, label, font, _ALL_LABEL_W - 16), fill=(0, 0, 0),
                  font=font)
        for c, rel in enumerate(samples[:_ALL_MAX]):
            tile, _ok = _tile(out_dir / rel, _ALL_TILE)
            canvas.paste(tile, (_ALL_LABEL_W + c * (_ALL_TILE + pad), y))
    return _png_bytes_pil(canvas)
