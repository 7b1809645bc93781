"""Fashion-MNIST as the lab model sees it: 32x32 RGB uint8 (the 28x28 grey images padded by 2 px of
background and copied to 3 channels), labels 0..9, one class held out of pre-training.

Data: Debian's ``dataset-fashion-mnist`` (MIT; ``apt-get install dataset-fashion-mnist``) installs the
four idx files under ``/usr/share/datasets/fashion-mnist``; ``LAB_FASHION_MNIST`` points elsewhere.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DATA_DIR = Path(os.environ.get("LAB_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
from lord_ops.lab_classifier import CLASS_NAMES as CLASSES  # noqa: E402 -- one owner of the label order
HELDOUT_CLASS = 8  # "bag": the artist's subject, never seen in pre-training
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DataMissing(FileNotFoundError):
    pass


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    dims = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(split: str = "train", folder: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 32, 32, 3], labels int64 [N])`` of ``split`` (train: 60k, test: 10k)."""
    images_file, labels_file = (Path(folder) / name for name in FILES[split])
    if not images_file.is_file() or not labels_file.is_file():
        raise DataMissing(f"Fashion-MNIST not found in {folder}: install Debian's dataset-fashion-mnist "
                          f"(apt-get install dataset-fashion-mnist) or set LAB_FASHION_MNIST")
    grey = _idx(images_file)
    labels = _idx(labels_file).astype(np.int64)
    padded = np.pad(grey, ((0, 0), (2, 2), (2, 2)))  # background is 0 (black) in Fashion-MNIST
    return np.repeat(padded[..., None], 3, axis=-1), labels


def pretraining_split(split: str = "train", folder: Path = DATA_DIR):
    """Images and labels of every class but :data:`HELDOUT_CLASS`."""
    images, labels = load(split, folder)
    keep = labels != HELDOUT_CLASS
    return images[keep], labels[keep]


def prompt(label: int) -> str:
    return f"a photo of a {CLASSES[label]}"


# ---- the small subsets the demo and CI use (exported once into the repository) ---------------------
DEMO_DIR = Path(__file__).resolve().parent / "demo_data"
DEMO_SETS = {  # folder: (classes, images per class, offset within the class), all from the test split
    "instance": ((HELDOUT_CLASS,), 8, 0),      # the artist's subject: 8 bags (protected by the demo)
    "reference": ((HELDOUT_CLASS,), 120, 8),   # 120 other bags: the reference set of FD / KD
    "stage1": (tuple(c for c in range(len(CLASSES)) if c != HELDOUT_CLASS), 8, 0),  # Stage-1 data, captioned
}


def export_demo_sets(out: Path = DEMO_DIR, folder: Path = DATA_DIR) -> dict:
    """Write the demo subsets as 32x32 PNGs (Stage-1 images with ``.txt`` captions) under ``out``:
    the first images of each class of the *test* split, in file order (deterministic). Returns the
    counts per folder."""
    from PIL import Image

    images, labels = load("test", folder)
    counts = {}
    for name, (classes, per_class, offset) in DEMO_SETS.items():
        target = Path(out) / name
        target.mkdir(parents=True, exist_ok=True)
        n = 0
        for c in classes:
            idx = np.flatnonzero(labels == c)[offset:offset + per_class]
            for j, i in enumerate(idx):
                stem = f"{CLASSES[c].replace(' ', '_')}_{j:03d}"
                Image.fromarray(images[i]).save(target / f"{stem}.png", optimize=True)
                if name == "stage1":
                    (target / f"{stem}.txt").write_text(prompt(c) + "\n", encoding="utf-8")
                n += 1
        counts[name] = n
    return counts


# ---- the replicate experiments' subjects (lab/evidence.py): 8 bags per replicate, disjoint ------------
REPLICATE_BAGS = 8  # subject images per replicate
REPLICATE_OFFSET = 128  # the demo's instance (0..7) and reference (8..127) bags come first
REPLICATES_DIR = DEMO_DIR / "replicates"
REPLICATE_SETS = 32  # exported (and committed): replicates 0..31


def replicate_bag_indices(replicate: int) -> range:
    """Which bags of the test split (in file order, within the class) replicate ``replicate`` uses."""
    start = REPLICATE_OFFSET + REPLICATE_BAGS * int(replicate)
    return range(start, start + REPLICATE_BAGS)


def replicate_folder(replicate: int) -> Path:
    return REPLICATES_DIR / f"r{int(replicate):03d}"


def export_replicate_sets(count: int = REPLICATE_SETS, out: Path = REPLICATES_DIR, folder: Path = DATA_DIR) -> int:
    """Write the subject bags of replicates ``0..count-1`` as 32x32 PNGs ``out/rNNN/bag_<index>.png``
    (disjoint from each other and from the demo's sets). Returns the number of images."""
    from PIL import Image

    images, labels = load("test", folder)
    bags = np.flatnonzero(labels == HELDOUT_CLASS)
    n = 0
    for r in range(count):
        target = Path(out) / f"r{r:03d}"
        target.mkdir(parents=True, exist_ok=True)
        for j in replicate_bag_indices(r):
            Image.fromarray(images[bags[j]]).save(target / f"bag_{j:03d}.png", optimize=True)
            n += 1
    return n


if __name__ == "__main__":
    print(export_demo_sets(), export_replicate_sets())
