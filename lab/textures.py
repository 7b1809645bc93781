"""Lab model 2's data: 64 px crops of photographic game textures from Debian's ``ufoai-textures``.

Why textures: mist-v2's ACE pulls each protected image's latent towards a target *texture*; the first
lab model (32 px grey garments, 4x4x4 latents) has no texture for it to work on. Here the images are
natural-looking surface photographs (brick, rock, grass, wood, ...) at 64 px, i.e. 8x8x4 latents with
SD's f = 8, the smallest size at which a latent has spatial texture.

Source: Debian's ``ufoai-textures`` (UFO: Alien Invasion; ``apt-get install ufoai-textures``, 336 MB;
``make lab2-data`` installs it) ships one zip archive, ``0textures.pk3``; :data:`PK3` points to it
(``LAB_UFOAI_PK3`` overrides). Each file's licence comes from the package's machine-readable
``copyright`` file (:func:`licences`): GPL-2+ unless a paragraph names the file (several are
CC-BY-3.0 / CC-BY-SA-3.0 / CC0 / public domain). Normal, specular and other material maps are skipped.

Categories (:data:`CATEGORIES`) are chosen by file-name keywords; every source texture gets one
category or none. The **held-out subject** is :data:`SUBJECT` ("wood"): pre-training never sees a wood
texture; a user personalises "a photo of sks wood". Source textures are split, per category, into
``train`` and ``test`` by a hash of their path (:func:`split_of`), so the split never changes when a
file is added elsewhere. Wood textures are split three ways: ``subject`` sources (the replicates'
images), ``reference`` sources (FD reference and held-out-loss images) and ``train`` sources (only
the lab classifier trains on them: an evaluator must know the subject's class, as lab model 1's
classifier knows "bag"); a replicate's subject, its reference and the classifier's wood never share a
texture.

Crops (:func:`crop`): a source is resized (area filter) so that its shorter side is one of
:data:`SCALES` (64, 128, 256 px: the whole texture, or 1/4 / 1/16 of it), then a 64 x 64 window is
cut at a seeded position. Pixel values are uint8 0..255, layout ``[H, W, 3]`` (RGB).
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

PK3 = Path(os.environ.get("LAB_UFOAI_PK3", "/usr/share/games/ufoai/base/0textures.pk3"))
COPYRIGHT = Path(os.environ.get("LAB_UFOAI_COPYRIGHT", "/usr/share/doc/ufoai-textures/copyright"))
PACKAGE = "ufoai-textures"
SIZE = 64  # crop size in pixels
SCALES = (64, 128, 256)  # the source's shorter side before cropping

# category -> file-name pattern (searched in the lower-case file stem); first match wins, in this order
CATEGORIES = {
    "wood": r"wood",
    "brick": r"brick",
    "rock": r"rock|stone",
    "grass": r"grass|hedge|leaves",
    "carpet": r"carpet|textil",
    "concrete": r"concrete",
    "metal": r"metal|mtl",
    "dirt": r"dirt|desert|sand|ground",
    "tiles": r"tile",
    "roof": r"roof",
    "snow": r"snow|ice",
}
SUBJECT = "wood"
PRETRAINING = tuple(c for c in CATEGORIES if c != SUBJECT)
MATERIAL_MAP = re.compile(r"_(nm|sm|gm|rm|hm|em|glow|bump|norm|spec)(\.|_)")
TEST_SHARE = 0.2  # share of each pre-training category's source textures kept for test sets
REFERENCE_SHARE = 0.3  # share of the subject's source textures kept for the reference set
CLASSIFIER_SHARE = 0.35  # share of the subject's source textures the classifier trains on (the rest: subject)


class DataMissing(FileNotFoundError):
    pass


@dataclass(frozen=True)
class Source:
    """One source texture: its path inside the archive, category and licence."""

    path: str
    category: str
    licence: str


def _hash01(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16 ** 12


def category_of(path: str) -> str | None:
    stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0].lower()
    if MATERIAL_MAP.search(stem + "."):
        return None
    for name, pattern in CATEGORIES.items():
        if re.search(pattern, stem):
            return name
    return None


def split_of(source: Source) -> str:
    """``train`` / ``test`` for pre-training categories, ``subject`` / ``reference`` for the subject."""
    u = _hash01(source.path)
    if source.category == SUBJECT:
        return "reference" if u < REFERENCE_SHARE else "train" if u < REFERENCE_SHARE + CLASSIFIER_SHARE else "subject"
    return "test" if u < TEST_SHARE else "train"


def licences(copyright_file: Path = COPYRIGHT) -> list[tuple[list[str], str]]:
    """The DEP-5 ``Files:`` paragraphs of the package's copyright file: ``[(globs, licence), ...]``
    in file order (the last matching paragraph applies)."""
    if not Path(copyright_file).is_file():
        raise DataMissing(f"{copyright_file} not found: install Debian's {PACKAGE} (make lab2-data)")
    out = []
    for para in re.split(r"\n\s*\n", Path(copyright_file).read_text(encoding="utf-8")):
        files = re.search(r"^Files:(.*(?:\n[ \t].*)*)", para, re.M)
        lic = re.search(r"^License:[ \t]*(\S.*)$", para, re.M)
        if files and lic:
            out.append((files.group(1).split(), lic.group(1).strip()))
    return out


def licence_of(path: str, table: list[tuple[list[str], str]]) -> str:
    """The licence of archive member ``path`` (``textures/...``; the copyright file says ``base/textures/...``)."""
    name = "base/" + path
    found = "unknown"
    for globs, lic in table:
        if any(fnmatch.fnmatchcase(name, g) for g in globs):
            found = lic
    return found


@lru_cache(maxsize=2)
def sources(pk3: Path = PK3, copyright_file: Path = COPYRIGHT) -> tuple[Source, ...]:
    """Every usable source texture of the archive (sorted by path): categorised, not a material map,
    at least :data:`SIZE` px on its shorter side, opaque."""
    if not Path(pk3).is_file():
        raise DataMissing(f"{pk3} not found: install Debian's {PACKAGE} (make lab2-data) or set LAB_UFOAI_PK3")
    table = licences(copyright_file)
    out = []
    with zipfile.ZipFile(pk3) as z:
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            name = info.filename
            if name.endswith("/") or not name.lower().endswith((".png", ".jpg", ".jpeg")):
                continue
            cat = category_of(name)
            if cat is None:
                continue
            out.append(Source(name, cat, licence_of(name, table)))
    return tuple(s for s in out if _usable(pk3, s.path))


@lru_cache(maxsize=4096)
def _usable(pk3: Path, path: str) -> bool:
    image = _open(pk3, path)
    return image is not None and min(image.size) >= SIZE


def _open(pk3: Path, path: str):
    from PIL import Image

    with zipfile.ZipFile(pk3) as z:
        image = Image.open(io.BytesIO(z.read(path)))
        image.load()
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 250:  # cut-outs (grates, leaves on transparency): not a surface photograph
            return None
    return image.convert("RGB")


def pyramid(pk3: Path, path: str) -> dict[int, np.ndarray]:
    """The source resized so that its shorter side is each of :data:`SCALES` (uint8 ``[H, W, 3]``)."""
    from PIL import Image

    image = _open(pk3, path)
    out = {}
    for s in SCALES:
        w, h = image.size
        f = s / min(w, h)
        out[s] = np.asarray(image.resize((max(s, round(w * f)), max(s, round(h * f))), Image.BOX), dtype=np.uint8)
    return out


def crop(levels: dict[int, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One :data:`SIZE` px crop: a random scale, then a random window (uint8 ``[SIZE, SIZE, 3]``)."""
    image = levels[SCALES[int(rng.integers(len(SCALES)))]]
    y = int(rng.integers(image.shape[0] - SIZE + 1))
    x = int(rng.integers(image.shape[1] - SIZE + 1))
    return image[y:y + SIZE, x:x + SIZE]


def prompt(category: str) -> str:
    return f"a photo of {category}"


SUBJECT_PROMPT = f"a photo of sks {SUBJECT}"  # what a user's LoRA learns (the runner's instance prompt)


class Pool:
    """The source pyramids of one split in memory, for seeded random crops (pre-training batches).

    ``Pool("train")`` holds every pre-training category's train sources (about 100 MB);
    ``sample(n, seed)`` -> ``(uint8 [n, 64, 64, 3], labels int64 [n])``, labels index :data:`CATEGORIES`
    (the classifier's order); categories are drawn uniformly, then a source, a scale and a window."""

    def __init__(self, split: str = "train", categories: tuple = PRETRAINING, pk3: Path = PK3):
        self.categories = tuple(categories)
        chosen = [s for s in sources(pk3) if s.category in self.categories and split_of(s) == split]
        if not chosen:
            raise DataMissing(f"no {split} sources for {self.categories} in {pk3}")
        self.by_category = {c: [pyramid(pk3, s.path) for s in chosen if s.category == c] for c in self.categories}
        self.counts = {c: len(v) for c, v in self.by_category.items()}

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        labels = np.empty(n, dtype=np.int64)
        images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
        names = list(CATEGORIES)
        for i in range(n):
            c = self.categories[int(rng.integers(len(self.categories)))]
            levels = self.by_category[c][int(rng.integers(len(self.by_category[c])))]
            images[i] = crop(levels, rng)
            labels[i] = names.index(c)
        return images, labels


def category_grid(out: Path, per_category: int = 12, seed: int = 0, pk3: Path = PK3) -> Path:
    """A PNG with one row of random crops per category (wood from its subject sources), for the model card."""
    from PIL import Image

    rows = []
    for i, c in enumerate(CATEGORIES):
        pool = Pool("subject" if c == SUBJECT else "train", (c,), pk3)
        images, _ = pool.sample(per_category, seed * 1000 + i)
        rows.append(np.concatenate(list(images), axis=1))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out, optimize=True)
    return Path(out)


# ---- the subsets the runner, the demo and CI use (exported once into the repository) ---------------
DATA_DIR = Path(__file__).resolve().parent / "texture_data"
REPLICATE_IMAGES = 8  # subject images per replicate
REPLICATE_SETS = 32  # replicates 0..31 (0-9 exploration, 10-31 confirmatory, as for lab model 1)
REFERENCE_IMAGES = 120
STAGE1_PER_CATEGORY = 8


def replicate_folder(replicate: int) -> Path:
    return DATA_DIR / "replicates" / f"r{int(replicate):03d}"


def _unique_crops(chosen: list[Source], count: int, rng: np.random.Generator, pk3: Path, seen: set,
                  distinct_sources: bool) -> list[tuple[Source, str, np.ndarray]]:
    """``count`` crops of ``chosen`` (each source at most once when ``distinct_sources``), never a crop
    already in ``seen`` (pixel hashes; flat crops skipped): ``[(source, "scale y x", pixels)]``."""
    out = []
    order = list(rng.permutation(len(chosen))) if distinct_sources else None
    while len(out) < count:
        if distinct_sources:
            if not order:
                raise ValueError(f"only {len(chosen)} sources for {count} distinct crops")
            source = chosen[order.pop()]
        else:
            source = chosen[int(rng.integers(len(chosen)))]
        levels = _pyramid_cached(pk3, source.path)
        for _ in range(20):
            scale = SCALES[int(rng.integers(len(SCALES)))]
            image = levels[scale]
            y = int(rng.integers(image.shape[0] - SIZE + 1))
            x = int(rng.integers(image.shape[1] - SIZE + 1))
            pixels = image[y:y + SIZE, x:x + SIZE]
            key = hashlib.sha256(pixels.tobytes()).hexdigest()
            if key not in seen and pixels.std() > 2:
                seen.add(key)
                out.append((source, f"{scale} {y} {x}", pixels))
                break
    return out


@lru_cache(maxsize=512)
def _pyramid_cached(pk3: Path, path: str) -> dict[int, np.ndarray]:
    return pyramid(pk3, path)


def export_sets(out: Path = DATA_DIR, pk3: Path = PK3, seed: int = 0) -> dict:
    """Write the lab-2 subsets as 64 px PNGs under ``out`` (deterministic for a given package version):

    - ``replicates/rNNN/wood_*.png``: 8 crops of 8 different subject sources per replicate, r = 0..31,
    - ``instance/``: the demo's subject (8 more crops of subject sources),
    - ``reference/``: 120 crops of the reference sources (FD reference; the first 32: held-out loss),
    - ``stage1/``: 8 crops per pre-training category of its *test* sources, with ``.txt`` captions,
    - ``SOURCES.tsv``: every file's source texture, crop (scale, y, x) and licence.

    No two files hold the same crop. Returns the counts per folder."""
    from PIL import Image

    all_sources = sources(pk3)
    by = {}
    for s in all_sources:
        by.setdefault((s.category, split_of(s)), []).append(s)
    rng = np.random.default_rng(seed)
    seen: set = set()
    rows = ["file\tsource\tscale y x\tlicence"]
    counts = {}

    def write(folder: str, stem: str, crops, caption: str | None = None):
        target = Path(out) / folder
        target.mkdir(parents=True, exist_ok=True)
        for j, (source, where, pixels) in enumerate(crops):
            name = f"{stem}_{j:03d}.png"
            Image.fromarray(pixels).save(target / name, optimize=True)
            if caption:
                (target / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            rows.append(f"{folder}/{name}\t{source.path}\t{where}\t{source.licence}")
        counts[folder] = counts.get(folder, 0) + len(crops)

    subject = by[(SUBJECT, "subject")]
    for r in range(REPLICATE_SETS):
        write(f"replicates/r{r:03d}", SUBJECT, _unique_crops(subject, REPLICATE_IMAGES, rng, pk3, seen, True))
    write("instance", SUBJECT, _unique_crops(subject, REPLICATE_IMAGES, rng, pk3, seen, True))
    write("reference", SUBJECT, _unique_crops(by[(SUBJECT, "reference")], REFERENCE_IMAGES, rng, pk3, seen, False))
    for c in PRETRAINING:
        write("stage1", c, _unique_crops(by[(c, "test")], STAGE1_PER_CATEGORY, rng, pk3, seen, False), prompt(c))
    (Path(out) / "SOURCES.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return counts
