"""A miniature experiment (tests and CI): small images cut from ComfyUI's bundled ``example.png``,
a config that runs every stage of ``training.experiment`` in about a minute on a CPU.

The numbers it produces are real measurements of a random (or lab) model on a handful of 64 px
images: they check the runner, not the defense.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

# (crop box in example.png's 768x768 pixels, mirrored)
_CROPS = [((0, 0, 768, 768), False), ((200, 100, 600, 500), False), ((150, 250, 650, 750), True),
          ((0, 0, 500, 500), True), ((100, 50, 700, 650), False), ((180, 80, 620, 520), True),
          ((60, 120, 700, 760), False), ((300, 300, 700, 700), True)]
_CAPTIONS = ["a drawing of a girl", "a drawing of a face", "a drawing of a person on grass", "a drawing of yellow hair"]


def cut_images(example: Path, folder: Path, count: int, size: int, offset: int = 0, captions: bool = False) -> list[Path]:
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with Image.open(example) as im:
        im = im.convert("RGB")
        for i in range(count):
            box, mirror = _CROPS[(i + offset) % len(_CROPS)]
            img = im.crop(box).resize((size, size), Image.LANCZOS)
            img = ImageOps.mirror(img) if mirror else img
            path = folder / f"img_{i:02d}.png"
            img.save(path)
            if captions:
                path.with_suffix(".txt").write_text(_CAPTIONS[i % len(_CAPTIONS)] + "\n", encoding="utf-8")
            out.append(path)
    return out


def write_mini_experiment(root: Path, checkpoint: Path, example: Path, *, clip_iqa: Optional[tuple] = None,
                          inception: Optional[Path] = None, fid_features: int = 64, size: int = 64,
                          instance_images: int = 3, sampling_images: int = 4, shares=(0.0, 0.5, 1.0),
                          stage1_steps: int = 4, stage2_steps: int = 3) -> Path:
    """Write ``root/exp.toml`` and its image folders; returns the config path.

    ``clip_iqa``: ``(open_clip model name or config .json, weights file)``; ``inception``: an
    Inception-v3 weights file (``fid_features`` 64: the first pooling layer, reported as FD).
    """
    root = Path(root)
    cut_images(example, root / "instance", instance_images, size)
    cut_images(example, root / "stage1", 4, size, offset=4, captions=True)
    lines = [
        "[experiment]", 'output = "run"', "seed = 0", "",
        "[model]", f'checkpoint = "{Path(checkpoint).resolve()}"', "",
        "[subject]", 'class_name = "person"', 'instance_images = "instance"', f"resolution = {size}", "",
        "[attack]", 'preset = "mist_v2"', "steps = 2", "rounds = 2", "",
        "[stage1]", 'data = "stage1"', f"steps = {stage1_steps}", "checkpoint_every = 2", 'attack_preset = "pgd_2"', "",
        "[stage2]", f"steps = {stage2_steps}", "checkpoint_every = 1", "",
        "[sampling]", f"images = {sampling_images}", "steps = 2", "cfg = 2.0", "batch_size = 2", "",
        "[purification]", "diffpure_steps = 2", "diffpure_strength = 0.3", "",
        "[sweep]", f"shares = [{', '.join(str(float(s)) for s in shares)}]", "",
        "[metrics]", f"fid_features = {fid_features}", "kid_subsets = 5", "kid_subset_size = 3", "batch_size = 4",
    ]
    if clip_iqa is not None:
        lines += [f'clip_iqa_model = "{clip_iqa[0]}"', f'clip_iqa_weights = "{Path(clip_iqa[1]).resolve()}"']
    if inception is not None:
        lines += [f'inception_weights = "{Path(inception).resolve()}"']
    path = root / "exp.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
