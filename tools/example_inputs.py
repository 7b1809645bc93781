"""Inputs cut from ComfyUI's bundled ``example.png``: what the tests' ComfyUI base folders and the GPU
check feed the shipped workflows, and the file names the workflows use. (``make demo`` and the
pictures, ``lab/make_template_thumbnails.py``, run them on the lab model instead: ``lab/demo.py``.)
"""
from __future__ import annotations

import shutil
from pathlib import Path

CKPT_NAME = "v1-5-pruned-emaonly-fp16.safetensors"  # the name the shipped workflows use
LORD_NAME = "lord_sd15.safetensors"  # what lord_train_stage1 saves and the other workflows load
LORA_NAME = "lord_stage2_sks.safetensors"  # what lord_train_stage2 saves
TRAIN_FOLDER, INSTANCE_FOLDER = "lord_train", "lord_sks"  # input subfolders the training workflows read
# (crop box in example.png's 768x768 pixels, mirrored, caption)
_TRAIN_CROPS = [((0, 0, 768, 768), False, "a drawing of a girl with yellow hair in a pink dress"),
                ((200, 100, 600, 500), False, "a drawing of a smiling face with blue eyes"),
                ((150, 250, 650, 750), True, "a drawing of a person in a pink dress on green grass"),
                ((0, 0, 500, 500), True, "a drawing of yellow hair and a blue sky with clouds")]
_INSTANCE_CROPS = [((100, 50, 700, 650), False), ((180, 80, 620, 520), True), ((60, 120, 700, 760), False)]


def prepare_training_inputs(input_dir: Path, example: Path, size: int = 64) -> dict:
    """Small training sets cut from ``example`` for the training workflows: ``input/lord_train``
    (images + same-name ``.txt`` captions, Stage 1) and ``input/lord_sks`` (instance images,
    Stage 2), ``size`` x ``size`` pixels (tiny, so that CPU training stays quick)."""
    from PIL import Image, ImageOps

    train, sks = Path(input_dir) / TRAIN_FOLDER, Path(input_dir) / INSTANCE_FOLDER
    train.mkdir(parents=True, exist_ok=True)
    sks.mkdir(parents=True, exist_ok=True)
    with Image.open(example) as im:
        im = im.convert("RGB")

        def cut(box, mirror):
            out = im.crop(box).resize((size, size), Image.LANCZOS)
            return ImageOps.mirror(out) if mirror else out

        for i, (box, mirror, caption) in enumerate(_TRAIN_CROPS):
            cut(box, mirror).save(train / f"train_{i}.png")
            (train / f"train_{i}.txt").write_text(caption + "\n", encoding="utf-8")
        for i, (box, mirror) in enumerate(_INSTANCE_CROPS):
            cut(box, mirror).save(sks / f"sks_{i}.png")
    return {"stage1_images": len(_TRAIN_CROPS), "stage2_images": len(_INSTANCE_CROPS), "size": size}


def prepare_inputs(input_dir: Path, example: Path) -> None:
    """ComfyUI's bundled example.png for detection, and two small copies in ``input/protect_me``
    (the folder the protect workflow reads; small so the CPU-only demo stays quick)."""
    from PIL import Image

    (input_dir / "protect_me").mkdir(parents=True, exist_ok=True)
    shutil.copy(example, input_dir / "example.png")
    with Image.open(example) as im:
        im = im.convert("RGB")
        im.resize((96, 96), Image.LANCZOS).save(input_dir / "protect_me" / "example_96.png")
        im.crop((200, 150, 520, 390)).resize((80, 60), Image.LANCZOS).save(input_dir / "protect_me" / "crop_80x60.png")
