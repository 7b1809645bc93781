"""Make the pictures of the node help pages (``web/docs/images/``) with the pack's own nodes.

Runs LoRD Protect, LoRD Detect and LoRD Purify in-process on the **lab model** (``lab/MODEL_CARD.md``:
a small SD1.x-family model trained on Fashion-MNIST, assembled from ``lab/weights/``) and its held-out
bags (``lab/demo_data/instance``, 32 px), and writes small labelled PNG strips:

* ``protect_ace.png``: original bag | protected (ACE, 4 levels, 30 steps) | perturbation view
* ``detect_heatmap.png``: clean bag | its gate heatmap | the same bag protected with ASPL at 32 levels |
  its gate heatmap, with the colour bar and the gate's held-out AUROC
* ``purify_jpeg.png``: the ASPL-protected bag | JPEG q75 | its change from the original (+/-32 levels)

The LoRD of the detection strip is the one RESULTS.md's Stage-1 ablation trains (Stage 1 on PGD copies
at 32 levels, whose gate separates): ``lab/pictures.py`` runs the pack's evaluation runner up to
its ``detect`` stage (about 10 minutes on one CPU core) and the caption quotes the AUROC it measured on
the 8 held-out bags (clean vs ASPL-32). The strip shows the first bag, not a chosen one. Usage::

    python -m lab.make_doc_images [--work DIR] [--out web/docs/images]
    python -m lab.make_doc_images --quick --out DIR    # smoke run: 2 attack steps, a barely trained LoRD

``--work DIR`` keeps the runner's folder (a second run with the same DIR reuses its LoRD and scores; so does
``make_template_thumbnails --work DIR`` with the same DIR: ``make thumbnails`` runs both).
``--quick`` makes the same three strips with 2 ACE steps and the runner's smallest settings (its
AUROC means nothing), only into a folder given with ``--out`` (never the committed ``web/docs/images``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_IMAGES = ROOT / "web" / "docs" / "images"
MAX_BYTES = 150_000  # per picture
BAG = 0  # the bag shown: the first of lab/demo_data/instance (not chosen by its score)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="the lab checkpoint (default: assembled from lab/weights/)")
    ap.add_argument("--work", type=Path, default=None,
                    help="the evaluation runner's folder (default: a temporary folder, removed)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default web/docs/images; --quick: required)")
    ap.add_argument("--steps", type=int, default=None, help="LoRD Protect's ACE steps (default 30, quick 2)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 attack steps, a barely trained LoRD, into --out (not the committed pictures)")
    args = ap.parse_args(argv)
    if args.quick and (args.out is None or args.out.resolve() == DOC_IMAGES.resolve()):
        ap.error(f"--quick writes smoke-run pictures: give --out DIR (not {DOC_IMAGES.relative_to(ROOT)})")
    args.out = args.out or DOC_IMAGES
    args.steps = args.steps or (2 if args.quick else 30)

    from lord_ops.comfy.bootstrap import ensure_comfyui_importable, import_pack

    ensure_comfyui_importable(cpu=True)
    import_pack()
    with tempfile.TemporaryDirectory(prefix="lord_doc_images_") as tmp:
        work = args.work or Path(tmp)
        written = make(args, work, args.checkpoint or None)
    for path in written:
        print(f"{path}  {path.stat().st_size} bytes")
    return 0


def make(args, work: Path, checkpoint: Path | None) -> list[Path]:
    import comfy.sd
    import numpy as np
    import torch
    from PIL import Image

    from comfyui_lord.nodes.attack import LoRDProtect
    from comfyui_lord.nodes.detect import LoRDDetect
    from comfyui_lord.nodes.purify import LoRDPurify
    from lab import pictures as lp
    from lord_ops.atomic import atomic_write_bytes
    from lord_ops.comfy.patch import apply_lord
    from lord_ops.format import load_lord_file

    checkpoint = checkpoint or lp.lab_checkpoint(work / "models" / "checkpoints")  # where the thumbnails keep it
    found = lp.detection_lord(work / "detect_lord", checkpoint, quick=args.quick)
    print(f"[doc images] {lp.caption(found)}; scores clean {found['scores_clean']}, "
          f"protected {found['scores_protected']}")
    model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(checkpoint))
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(found["prompt"] or "a photo of a bag"))

    def load(path):
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).float().div(255).unsqueeze(0)  # [1, H, W, 3]

    name = found["names"][BAG]
    clean, aspl = load(found["clean"][name]), load(found["protected"][name])

    def save(file, im):
        data = lp.png_bytes(im)
        if len(data) > MAX_BYTES:
            raise RuntimeError(f"{file} would be {len(data)} bytes (limit {MAX_BYTES})")
        return atomic_write_bytes(args.out / file, data)

    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    protected, view, _ = LoRDProtect.execute(model, vae, cond, clean, "ace", 4.0, 0.6375, args.steps, 0, False,
                                             None).args
    moved = int(((protected - clean).abs() * 255).round().max())
    pil = lp.tensor_to_pil
    written = [save("protect_ace.png", lp.strip(
        [pil(clean[0]), pil(protected[0]), pil(view[0])],
        ["original", f"protected (max {moved} lv)", "perturbation"],
        caption=f"lab model, held-out bag, 32 px; ACE {args.steps} steps"))]

    lorded = apply_lord(model, load_lord_file(found["lord"]))
    heat, scores = [], []
    for image in (clean, aspl):  # one image per call, as the runner scores them
        h, _, _, report = LoRDDetect.execute(lorded, vae, image, cond, found["timestep"] or 200, 0).args
        heat.append(h[0])
        scores.append(json.loads(report)["scores"][0])
    written.append(save("detect_heatmap.png", lp.strip(
        [pil(clean[0]), pil(heat[0]), pil(aspl[0]), pil(heat[1])],
        ["clean bag", f"heatmap, score {scores[0]:.2f}", "protected (ASPL-32)", f"heatmap, score {scores[1]:.2f}"],
        caption=lp.caption(found), legend=True)))

    purified = LoRDPurify.execute(aspl, "jpeg", 75, 0.2, 20, 7.5, 0).args[0]
    left = (0.5 + 0.5 * (purified - clean) / (32.0 / 255)).clamp(0, 1)
    written.append(save("purify_jpeg.png", lp.strip(
        [pil(aspl[0]), pil(purified[0]), pil(left[0])], ["protected (ASPL-32)", "JPEG quality 75", "change (+/-32 lv)"],
        caption="lab model, held-out bag, 32 px")))
    return written


if __name__ == "__main__":
    raise SystemExit(main())
