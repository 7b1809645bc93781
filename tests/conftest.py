"""Shared fixtures. Tests run against the pinned real ComfyUI (``make setup``) or ``$COMFYUI_PATH``.

Imports (docs/design.md, "Importing"): the repository root is on ``sys.path`` (pytest's
``pythonpath`` in pyproject.toml), so the math, the entry points and the tooling are imported by
their own names (``lord_ops``, ``training``, ``lab``, ``tools``); the node glue is imported the way
ComfyUI imports it, as a package (named ``comfyui_lord`` here) whose modules use relative imports, so
``nodes`` never clashes with ComfyUI's own ``nodes.py`` (``comfyui_lord.lord_ops`` is ``lord_ops``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from lord_ops.comfy.bootstrap import ensure_comfyui_importable, import_pack

COMFYUI = ensure_comfyui_importable()
PACK = import_pack()


def _share_cores_between_xdist_workers() -> None:
    """Under ``pytest -n N`` (``make test``), give each worker its share of the CPU cores, for torch here and
    for the scripts the tests start (``OMP_NUM_THREADS``), so that N workers never run N x cores threads.
    Without xdist nothing changes."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // workers)
        torch.set_num_threads(threads)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))


_share_cores_between_xdist_workers()

# ``make test`` hands each xdist worker whole files (``--dist loadfile --no-loadscope-reorder``) in collection
# order. The files that take longest on 2 cores (``pytest --durations=0``, 2026-12-03: 670, 610, 440, 365, 355,
# 335 and 230 s; every other file under 100 s) are collected first, so that no worker is handed a long file
# while the other has finished. Within a file the order is pytest's own.
LONGEST_FILES_FIRST = ("test_scripts.py", "test_lab_textures.py", "test_experiment.py", "test_lab.py",
                       "test_evidence.py", "test_train.py", "test_server.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    return COMFYUI


@pytest.fixture()
def tiny_model():
    from tools import tiny

    return tiny.build_tiny_model_patcher(seed=0)


@pytest.fixture(scope="session")
def sd15_checkpoint(tmp_path_factory) -> Path:
    """The random SD15-geometry checkpoint (built from a seed, never committed)."""
    from tools import tiny

    return tiny.write_sd15_geometry_checkpoint(tmp_path_factory.mktemp("ckpt") / "v1-5-pruned-emaonly-fp16.safetensors")


CKPT_NAME = "v1-5-pruned-emaonly-fp16.safetensors"  # the file names the shipped workflows load
LORD_NAME = "lord_sd15.safetensors"
LORA_NAME = "lord_stage2_sks.safetensors"


@pytest.fixture(scope="session")
def make_comfy_base(tmp_path_factory, sd15_checkpoint, comfyui_path):
    """A factory for ComfyUI base folders (``models/``, ``input/``) holding every file the shipped
    workflows read: the random SD15-geometry checkpoint (symlinked), a random LoRD
    (``models/lord/lord_sd15.safetensors``, gate and defense branch non-zero) and a random Stage-2
    LoRA on the same layers (``models/loras/lord_stage2_sks.safetensors``), ComfyUI's
    ``example.png``, ``input/protect_me`` and the training sets ``input/lord_train`` (4 captioned
    64x64 images) and ``input/lord_sks`` (3). ``make(name, example=None)`` returns a new folder;
    ``example`` replaces the image copied to ``input/example.png`` (e.g. a smaller one)."""
    import comfy.sd

    from tools.example_inputs import prepare_inputs, prepare_training_inputs

    from lord_ops import format as fmt
    from lord_ops.comfy import patch

    model = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), output_vae=False, output_clip=False)[0]
    lord = patch.init_lord_for_model(model, random_up=0.05, seed=1, provenance={"made_by": "tests"})
    g = torch.Generator().manual_seed(5)
    lora = {n: (torch.randn(4, w.in_features, generator=g) * 0.1, torch.randn(w.out_features, 4, generator=g) * 0.1, 4.0)
            for n, w in lord.targets.items()}
    del model

    def make(name: str = "comfy_base", example: Path | None = None) -> Path:
        base = tmp_path_factory.mktemp(name)
        models = base / "models"
        for sub in ("checkpoints", "lord", "loras"):
            (models / sub).mkdir(parents=True)
        (models / "checkpoints" / CKPT_NAME).symlink_to(sd15_checkpoint)
        fmt.save_lord_file(models / "lord" / LORD_NAME, lord)
        fmt.save_kohya_lora(models / "loras" / LORA_NAME, lora)
        source = comfyui_path / "input" / "example.png"
        prepare_inputs(base / "input", source)  # input/example.png and input/protect_me
        prepare_training_inputs(base / "input", source)  # input/lord_train and input/lord_sks
        if example is not None:
            shutil.copy(example, base / "input" / "example.png")
        return base

    return make


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
