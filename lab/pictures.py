"""What the pack's pictures are made on: the lab model (``lab/MODEL_CARD.md``) and a LoRD whose gate
separates, with its held-out ROC measured by the pack's own evaluation runner.

``lab/make_template_thumbnails.py`` (template thumbnails, ``docs/examples/*.png``) and
``lab/make_doc_images.py`` (the node help pages' pictures) both use it:

* :func:`lab_checkpoint` assembles the lab model from ``lab/weights/`` (``lab.ship.ensure_checkpoint``);
* :func:`detection_lord` runs ``training.experiment`` with ``lab/experiment.py``'s config at scale
  :data:`SCALE` (RESULTS.md's Stage-1 ablation: Stage 1 on PGD copies at 32 levels, whose gate
  separates) up to its ``detect`` stage only (``--only detect``: the 8 held-out bags protected with ASPL
  at 32 levels, Stage 1, and the LoRD Detect score of every clean and protected bag), then scores 3 more
  sets of 8 held-out bags (``lab/demo_data/reference``, each protected the same way) with the same LoRD
  file. It returns the LoRD file, the clean and protected bags and the pooled held-out AUROC (32 clean
  vs 32 protected bags) with a bootstrap interval, which the pictures' captions quote. ``quick`` shrinks every step (:data:`QUICK`) for the tools' smoke runs:
  its LoRD is barely trained and its AUROC means nothing.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SCALE = "demo-stage1-pgd32"  # lab/experiment.py: the demo with Stage 1 on 32-level PGD copies
# --quick: 1 image per class, 2 Stage-1 steps, 1 ASPL round of 1 PGD step, 1 PGD step for the Stage-1 copies
# (a smoke run, not a measurement)
QUICK = {"stage1_per_class": 1, "stage1_steps": 2, "stage1_batch": 2, "attack_rounds": 1, "attack_steps": 1}
MORE_SETS = 3  # sets of 8 reference bags measured besides the subject's 8 (32 + 32 bags in all)
BOOTSTRAP = 2000  # resamples of the AUROC's percentile interval (clean and protected resampled separately)


def lab_checkpoint(folder: Path) -> Path:
    """The lab model assembled as ``folder/lord_lab_fashion.safetensors`` (rebuilt only when the parts
    changed)."""
    from lab.ship import CHECKPOINT_NAME, ensure_checkpoint

    return ensure_checkpoint(Path(folder) / CHECKPOINT_NAME)


def auroc(clean, protected) -> float:
    from lord_ops.metrics import auroc as _auroc

    return float(_auroc(clean, protected))


def auroc_interval(clean: list[float], protected: list[float], draws: int = BOOTSTRAP, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC (each group resampled with replacement, seeded)."""
    rng = random.Random(seed)
    values = sorted(auroc([rng.choice(clean) for _ in clean], [rng.choice(protected) for _ in protected])
                    for _ in range(draws))
    lo = values[int((1 - level) / 2 * draws)]
    hi = values[min(draws - 1, int((1 + level) / 2 * draws))]
    return round(lo, 3), round(hi, 3)


def _run_detect(work: Path, checkpoint: Path, quick: bool, seed: int, instance: Path | None = None,
                lord: Path | None = None) -> dict:
    """``training.experiment --only detect`` at :data:`SCALE` in ``work``; returns the detect stage's result.
    ``instance``: another folder of bags to protect and score; ``lord``: a trained LoRD (no Stage 1)."""
    from lab.experiment import write_config
    from lab.ship import SHIPPED_CLASSIFIER
    from training.experiment.cli import main as run_experiment

    config = write_config(work, checkpoint, SHIPPED_CLASSIFIER, SCALE, seed=seed, instance=instance,
                          overrides=QUICK if quick else None)
    if lord is not None:
        text = config.read_text(encoding="utf-8")
        config.write_text(text.replace("[stage1]\n", f'[stage1]\nlord = "{Path(lord).resolve().as_posix()}"\n', 1),
                          encoding="utf-8")
    code = run_experiment(["--config", str(config), "--only", "detect"])
    if code != 0:
        raise RuntimeError(f"the evaluation runner failed (exit {code}); config {config}")
    done = json.loads((work / "run" / "stages" / "detect" / "stage.json").read_text(encoding="utf-8"))
    return done.get("result", done)


def detection_lord(work: Path, checkpoint: Path, quick: bool = False, seed: int = 0,
                   more_sets: int | None = None) -> dict:
    """Train (or reuse, when ``work`` holds a finished run with the same config) the Stage-1 LoRD of
    :data:`SCALE` on the lab model and measure its gate on held-out bags: the runner's 8 subject bags
    (``lab/demo_data/instance``) and ``more_sets`` (default :data:`MORE_SETS`, quick 0) more sets of 8
    from ``lab/demo_data/reference``, each protected with the same ASPL-32 attack as one set and scored
    with the same LoRD file. Returns ``lord`` (the file), ``clean`` / ``protected`` (subject bag name ->
    PNG path), ``names`` (the subject bags), the pooled per-bag scores, ``auroc``, ``interval`` (95%
    bootstrap), ``n`` (bags per group), ``pairs_higher`` (how many protected bags score above their own
    clean version) and ``quick``."""
    import shutil

    from lab.data import DEMO_DIR

    work = Path(work)
    found = _run_detect(work, checkpoint, quick, seed)
    stages = work / "run" / "stages"
    lord = stages / "stage1" / "lord.safetensors"
    names = found["names"]
    clean, protected = list(found["scores_clean"]), list(found["scores_protected"])
    reference = sorted((DEMO_DIR / "reference").glob("*.png"))
    for i in range(MORE_SETS if more_sets is None else more_sets) if not quick else ():
        bags = work / f"heldout_{i}" / "bags"
        if not bags.is_dir():
            bags.mkdir(parents=True)
            for f in reference[8 * i: 8 * i + 8]:
                shutil.copy(f, bags / f.name)
        more = _run_detect(work / f"heldout_{i}", checkpoint, quick, seed, instance=bags, lord=lord)
        clean += more["scores_clean"]
        protected += more["scores_protected"]
    return {"lord": lord, "names": names,
            "clean": {n: DEMO_DIR / "instance" / f"{n}.png" for n in names},
            "protected": {n: stages / "protect" / "images" / f"{n}.png" for n in names},
            "scores_clean": clean, "scores_protected": protected, "auroc": round(auroc(clean, protected), 3),
            "interval": auroc_interval(clean, protected), "n": len(clean), "quick": quick,
            "pairs_higher": sum(p > c for c, p in zip(clean, protected)),
            "timestep": found.get("timestep"), "prompt": found.get("prompt")}


def caption(found: dict) -> str:
    """One line for the pictures: how far the gate can be trusted."""
    if found["quick"]:
        return "smoke run: LoRD barely trained, AUROC meaningless"
    lo, hi = found["interval"]
    return (f"held-out AUROC {found['auroc']:.2f} (95% CI {lo:.2f}-{hi:.2f}), n = {found['n']} + {found['n']} bags; "
            f"{found['pairs_higher']}/{found['n']} protected above their clean")


TILE = 128  # px of one picture in a strip (the 32 px lab images scaled up, nearest neighbour)
LABEL_H = 16  # px of the label line under each tile


def colorbar(width: int, height: int = 10):
    """LoRD Detect's heatmap colours from gate 0 (left) to 1 (right), as a PIL image."""
    import torch
    from PIL import Image

    from lord_ops.detect import colorize

    ramp = torch.linspace(0, 1, width).expand(height, width)[None]
    arr = (colorize(ramp)[0] * 255).round().byte().numpy()
    return Image.fromarray(arr)


def strip(tiles: list, labels: list[str], caption: str | None = None, legend: bool = False, tile: int = TILE):
    """PIL images side by side (each scaled to ``tile`` px, nearest neighbour) with a label under each;
    with ``legend`` a heatmap colour bar ("gate 0 = clean ... 1 = perturbed") and with ``caption`` a
    line of text below. Returns a PIL image (RGB, white background)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width = len(tiles) * (tile + 4) - 4
    extra = (LABEL_H if legend else 0) + (LABEL_H if caption else 0)
    out = Image.new("RGB", (width, tile + LABEL_H + extra), (255, 255, 255))
    draw = ImageDraw.Draw(out)

    def centered(text, x0, w, y):
        draw.text((x0 + (w - draw.textlength(text, font=font)) / 2, y), text, fill=(0, 0, 0), font=font)

    for i, (im, label) in enumerate(zip(tiles, labels)):
        x = i * (tile + 4)
        out.paste(im.convert("RGB").resize((tile, tile), Image.NEAREST), (x, 0))
        centered(label, x, tile, tile + 2)
    y = tile + LABEL_H
    if legend:
        left, right = "gate 0 = looks clean", "1 = looks perturbed"
        lw, rw = draw.textlength(left, font=font), draw.textlength(right, font=font)
        bar_w = max(16, int(width - lw - rw - 16))
        draw.text((0, y + 2), left, fill=(0, 0, 0), font=font)
        out.paste(colorbar(bar_w, LABEL_H - 6), (int(lw + 8), y + 3))
        draw.text((lw + 8 + bar_w + 8, y + 2), right, fill=(0, 0, 0), font=font)
        y += LABEL_H
    if caption:
        centered(caption, 0, width, y + 2)
    return out


def tensor_to_pil(image):
    """One ComfyUI IMAGE ``[H, W, C]`` in 0..1 as a PIL image."""
    from PIL import Image

    return Image.fromarray((image[..., :3].clamp(0, 1) * 255).round().byte().cpu().numpy())


def png_bytes(im, pnginfo=None) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True, pnginfo=pnginfo)
    return buf.getvalue()
