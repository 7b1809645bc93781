"""Make the pictures of the node help pages (``web/docs/images/``) with the pack's own nodes.

Runs LoRD Protect, LoRD Detect and LoRD Purify in-process on the random SD15-geometry test
checkpoint (``tools/tiny.py``; built from a seed, nothing downloaded) and ComfyUI's bundled
``input/example.png``, and writes small labelled PNG strips:

* ``protect_ace.png``: original | protected (ACE, 4 levels, 30 steps) | perturbation view
* ``detect_heatmap.png``: clean | its gate heatmap | protected | its gate heatmap
* ``purify_jpeg.png``: protected | JPEG q75 | its change from the original (+/-16 levels)

The model and the LoRD are random, so the pictures show what the outputs look like, not how well a
trained LoRD detects. Usage (a few minutes on a CPU)::

    python -m tools.make_doc_images [--checkpoint sd15_geometry.safetensors] [--out web/docs/images]
    python -m tools.make_doc_images --quick --out DIR    # smoke run: 32 px, 2 attack steps, into DIR

``--quick`` makes the same three strips at 32 px with 2 ACE steps (seconds), only into a folder given
with ``--out`` (never the committed ``web/docs/images``).
"""
from __future__ import annotations

import argparse
import io as _io
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_IMAGES = ROOT / "web" / "docs" / "images"
TILE = 128
LABEL_H = 16


def _tiles_to_png(tiles: list, labels: list[str]) -> bytes:
    """IMAGE tensors ``[H, W, 3]`` in 0..1 side by side with a label under each, as PNG bytes."""
    from PIL import Image, ImageDraw, ImageFont

    strip = Image.new("RGB", (len(tiles) * (TILE + 4) - 4, TILE + LABEL_H), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default()
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        arr = (tile[..., :3].clamp(0, 1) * 255).round().byte().cpu().numpy()
        im = Image.fromarray(arr).resize((TILE, TILE), Image.NEAREST)
        x = i * (TILE + 4)
        strip.paste(im, (x, 0))
        width = draw.textlength(label, font=font)
        draw.text((x + (TILE - width) / 2, TILE + 2), label, fill=(0, 0, 0), font=font)
    buf = _io.BytesIO()
    strip.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="the SD15-geometry test checkpoint (default: build it from seed 0)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default web/docs/images; --quick: required)")
    ap.add_argument("--size", type=int, default=None, help="image side in px the nodes run on (default 96, quick 32)")
    ap.add_argument("--steps", type=int, default=None, help="LoRD Protect's ACE steps (default 30, quick 2)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 32 px, 2 attack steps, into --out (not the committed pictures)")
    args = ap.parse_args(argv)
    if args.quick and (args.out is None or args.out.resolve() == DOC_IMAGES.resolve()):
        ap.error(f"--quick writes smoke-run pictures: give --out DIR (not {DOC_IMAGES.relative_to(ROOT)})")
    args.out = args.out or DOC_IMAGES
    args.size = args.size or (32 if args.quick else 96)
    args.steps = args.steps or (2 if args.quick else 30)

    from lord_ops.comfy.bootstrap import ensure_comfyui_importable, import_pack

    comfyui = ensure_comfyui_importable()
    import_pack()
    import comfy.sd
    import numpy as np
    import torch
    from PIL import Image

    from lord_ops.atomic import atomic_write_bytes
    from lord_ops.comfy import patch
    from comfyui_lord.nodes.attack import LoRDProtect
    from comfyui_lord.nodes.detect import LoRDDetect
    from comfyui_lord.nodes.purify import LoRDPurify
    from tools import tiny

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or tiny.write_sd15_geometry_checkpoint(Path(tmp) / "sd15_geometry.safetensors", seed=0)
        model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(ckpt))
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a person"))
    with Image.open(comfyui / "input" / "example.png") as im:
        im = im.convert("RGB").resize((args.size, args.size), Image.LANCZOS)
        image = torch.from_numpy(np.array(im)).float().div(255).unsqueeze(0)  # IMAGE [1, H, W, 3] in 0..1

    torch.manual_seed(0)
    protected, view, _ = LoRDProtect.execute(model, vae, cond, image, "ace", 4.0, 0.6375, args.steps, 0, False,
                                             None).args
    moved = int(((protected - image).abs() * 255).round().max())
    args.out.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_bytes(args.out / "protect_ace.png", _tiles_to_png(
        [image[0], protected[0], view[0]], ["original", f"protected (max {moved} lv)", "perturbation"]))]

    lord = patch.init_lord_for_model(model, random_up=0.05, seed=3)
    for w in lord.targets.values():
        w.gate_w2.mul_(40)  # an untrained gate is ~0.5 everywhere: sharpen it so the map shows structure
    lorded = patch.apply_lord(model, lord)
    heat, _, _, report = LoRDDetect.execute(lorded, vae, torch.cat([image, protected]), cond, 200, 0).args
    import json

    scores = json.loads(report)["scores"]
    written.append(atomic_write_bytes(args.out / "detect_heatmap.png", _tiles_to_png(
        [image[0], heat[0], protected[0], heat[1]],
        ["clean image", f"heatmap, score {scores[0]:.3f}", "protected image", f"heatmap, score {scores[1]:.3f}"])))

    purified = LoRDPurify.execute(protected, "jpeg", 75, 0.2, 20, 7.5, 0).args[0]
    left = (0.5 + 0.5 * (purified - image) / (16.0 / 255)).clamp(0, 1)
    written.append(atomic_write_bytes(args.out / "purify_jpeg.png", _tiles_to_png(
        [protected[0], purified[0], left[0]], ["protected", "JPEG quality 75", "change (+/-16 lv)"])))
    for path in written:
        print(f"{path}  {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
