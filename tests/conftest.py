"""Shared fixtures. Tests run against the pinned real ComfyUI (``make setup``) or ``$COMFYUI_PATH``.

The pack is imported the way ComfyUI imports it: as a package (named ``comfyui_lord`` here) whose
modules use relative imports, so ``nodes`` never clashes with ComfyUI's own ``nodes.py``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.comfy_runtime import ensure_comfyui_importable, import_pack  # noqa: E402

COMFYUI = ensure_comfyui_importable()
PACK = import_pack()


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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
