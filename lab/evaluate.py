"""How recognisable a lab model's samples are: for every trained class, ``--per-class`` images of its
prompt ("a photo of a {class}"; lab model 2: "a photo of {texture}") sampled through ComfyUI (the
assembled checkpoint, as a user loads it), then the lab classifier's accuracy on them (chance: 1 / its
classes) and a grid (one row per class).

    python -m lab.evaluate [--lab fashion|textures] [--parts ...] [--per-class 8] [--grid out.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path


def sample_accuracy(checkpoint: Path, classifier: Path, per_class: int = 8, steps: int = 12, cfg: float = 4.0,
                    seed: int = 0, lab=None) -> tuple[dict, "torch.Tensor"]:  # noqa: F821
    """``({"accuracy", "per_class": {name: hits}, "images_per_class", "chance"}, u8 images [classes * per_class,
    S, S, 3])`` for the lab model ``lab`` (a ``lab.experiment.LabModel``; default lab model 1, S = its size)."""
    import torch

    from lab.experiment import LABS
    from lord_ops.comfy.generate import SamplingConfig, text_to_image
    from lord_ops.metric_models import load_feature_extractor
    from lord_ops.comfy.bootstrap import load_checkpoint_models

    lab = lab or LABS["fashion"]
    per_class_count = int(per_class)
    model, clip, vae = load_checkpoint_models(checkpoint)[:3]
    judge = load_feature_extractor("lab-classifier", classifier)
    size = lab.resolution
    config = SamplingConfig(steps=steps, cfg=cfg, width=size, height=size, batch_size=1)
    per_class, images = {}, []  # name -> hits
    for label, name, text in lab.trained_classes():
        out = text_to_image(model, clip, vae, text, list(range(seed, seed + per_class_count)), config)
        per_class[name] = int((judge.predict(out) == label).sum())
        images.append(out)
    classes = len(getattr(judge, "classes", None) or ()) or len(per_class) + 1
    return ({"accuracy": sum(per_class.values()) / (len(per_class) * per_class_count),
             "per_class": per_class, "images_per_class": per_class_count, "chance": 1 / classes}, torch.cat(images))


def main(argv=None) -> int:
    from lab.experiment import LABS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lab", default="fashion", choices=sorted(LABS), help="which lab model (default fashion)")
    ap.add_argument("--parts", default=None, help="its parts file (default: the shipped one)")
    ap.add_argument("--classifier", default=None, help="its lab classifier (default: the shipped one)")
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--grid", default=None, help="write the samples as a PNG grid (one row per class)")
    args = ap.parse_args(argv)
    from lord_ops.comfy.bootstrap import ensure_comfyui_importable

    ensure_comfyui_importable(cpu=True)
    from lab.ship import REPO, ensure_checkpoint

    lab = LABS[args.lab]
    parts = Path(args.parts or lab.parts)
    # .cache/lab/, rebuilt only when the parts change
    ckpt = ensure_checkpoint(REPO / ".cache" / "lab" / lab.checkpoint_name, parts=parts)
    result, images = sample_accuracy(ckpt, Path(args.classifier or lab.classifier), args.per_class, args.steps,
                                     args.cfg, lab=lab)
    print(f"[lab] classifier accuracy on samples of the {len(result['per_class'])} trained classes: "
          f"{result['accuracy']:.3f} (chance {result['chance']:.3f}; {args.per_class} per class, {args.steps} steps, "
          f"cfg {args.cfg}): {result['per_class']}")
    if args.grid:
        from PIL import Image

        n, s = args.per_class, lab.resolution
        rows = images.view(-1, n, s, s, 3).permute(0, 2, 1, 3, 4).reshape(-1, n * s, 3)
        scale = max(1, 64 // s)
        Image.fromarray(rows.numpy()).resize((n * s * scale, rows.shape[0] * scale), Image.NEAREST).save(args.grid)
        print(f"[lab] grid: {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
