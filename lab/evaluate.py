"""How recognisable the lab model's samples are: for every trained class, ``--per-class`` images of
"a photo of a {class}" sampled through ComfyUI (the assembled checkpoint, as a user loads it), then
the lab classifier's accuracy on them (chance: 1/10) and a grid (one row per class).

    python -m lab.evaluate [--parts lab/weights/lab_fashion_parts.safetensors] [--per-class 8] [--grid out.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path


def sample_accuracy(checkpoint: Path, classifier: Path, per_class: int = 8, steps: int = 12, cfg: float = 4.0,
                    seed: int = 0) -> tuple[dict, "torch.Tensor"]:  # noqa: F821
    """``({"accuracy", "per_class": {name: hits}, "images_per_class"}, u8 images [9 * per_class, 32, 32, 3])``."""
    import torch

    from lab.data import CLASSES, HELDOUT_CLASS, prompt
    from lord_ops.comfy.generate import SamplingConfig, text_to_image
    from lord_ops.metric_models import load_feature_extractor
    from lord_ops.comfy.bootstrap import load_checkpoint_models

    per_class_count = int(per_class)
    model, clip, vae = load_checkpoint_models(checkpoint)[:3]
    judge = load_feature_extractor("lab-classifier", classifier)
    config = SamplingConfig(steps=steps, cfg=cfg, width=32, height=32, batch_size=1)
    per_class, images = {}, []  # name -> hits
    for c, name in enumerate(CLASSES):
        if c == HELDOUT_CLASS:
            continue
        out = text_to_image(model, clip, vae, prompt(c), list(range(seed, seed + per_class_count)), config)
        per_class[name] = int((judge.predict(out) == c).sum())
        images.append(out)
    return ({"accuracy": sum(per_class.values()) / (len(per_class) * per_class_count),
             "per_class": per_class, "images_per_class": per_class_count}, torch.cat(images))


def main(argv=None) -> int:
    from lab.ship import SHIPPED_CLASSIFIER, SHIPPED_PARTS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=str(SHIPPED_PARTS))
    ap.add_argument("--classifier", default=str(SHIPPED_CLASSIFIER))
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--grid", default=None, help="write the samples as a PNG grid (one row per class)")
    args = ap.parse_args(argv)
    from lord_ops.comfy.bootstrap import ensure_comfyui_importable

    ensure_comfyui_importable(cpu=True)
    from lab.ship import ensure_checkpoint

    ckpt = ensure_checkpoint(parts=Path(args.parts))  # .cache/lab/, rebuilt only when the parts change
    result, images = sample_accuracy(ckpt, Path(args.classifier), args.per_class, args.steps, args.cfg)
    print(f"[lab] classifier accuracy on samples of the 9 trained classes: {result['accuracy']:.3f} "
          f"({args.per_class} per class, {args.steps} steps, cfg {args.cfg}): {result['per_class']}")
    if args.grid:
        from PIL import Image

        n = args.per_class
        rows = images.view(-1, n, 32, 32, 3).permute(0, 2, 1, 3, 4).reshape(-1, n * 32, 3)
        Image.fromarray(rows.numpy()).resize((n * 64, rows.shape[0] * 2), Image.NEAREST).save(args.grid)
        print(f"[lab] grid: {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
