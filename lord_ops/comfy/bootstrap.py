"""Start-up outside ComfyUI: find a ComfyUI installation, make it importable, import the pack the
way ComfyUI does, and load a checkpoint the way its stock loader does.

Used by the command-line entry points (``training/``, ``lab/``), the tests, the tools and the
benchmarks. Importing this module imports neither ComfyUI nor torch; everything else in
``lord_ops.comfy`` may be imported only after :func:`ensure_comfyui_importable` (or inside ComfyUI).

ComfyUI is located, in order, by an explicit path, ``$COMFYUI_PATH``, the parent of the
``custom_nodes`` folder this pack sits in, or the pinned copy that ``make setup`` installs into
``.cache/ComfyUI``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
PINNED_COMFYUI = REPO_ROOT / ".cache" / "ComfyUI"
PACK_NAME = "comfyui_lord"  # the package name the tests and tools give the pack (ComfyUI uses its folder name)


class ComfyUINotFound(RuntimeError):
    """No ComfyUI source folder at any of the places looked at (the message lists them and the fix)."""


class Refused(Exception):
    """A problem the user can fix (arguments, folders, config, checkpoint, data): the command-line
    entry points report it and exit with status 2."""


def find_comfyui(explicit: Optional[str] = None) -> Path:
    """The ComfyUI source folder (the one holding ``main.py`` and ``comfy/``)."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    if REPO_ROOT.parent.name == "custom_nodes":
        candidates.append(REPO_ROOT.parent.parent)
    candidates.append(PINNED_COMFYUI)
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    raise ComfyUINotFound(
        "ComfyUI not found (looked at: " + ", ".join(str(c) for c in candidates) + "). "
        "Pass --comfyui PATH, set COMFYUI_PATH, or run `make setup` to install the pinned copy.")


def ensure_comfyui_importable(explicit: Optional[str] = None, cpu: Optional[bool] = None) -> Path:
    """Put ComfyUI on ``sys.path`` for in-process use; ``cpu=None`` picks the CPU when CUDA is absent.

    Must run before anything imports ``comfy.model_management``. Returns the ComfyUI folder.
    """
    import torch

    root = find_comfyui(explicit)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu:
        comfy.cli_args.args.cpu = True
    return root


def load_checkpoint_models(path: Path):
    """UNet, CLIP and VAE of a checkpoint, loaded exactly as ComfyUI's CheckpointLoaderSimple loads
    them (ComfyUI picks the storage dtype: fp16 weights of an fp16 checkpoint on a GPU). The training
    compute dtype (``TrainConfig.dtype``) is applied by the trainer, so the CLI and the nodes train
    the same way for the same config. Raises :class:`Refused` naming the file."""
    import comfy.sd

    try:
        model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    except Exception as e:  # noqa: BLE001
        raise Refused(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
    if model is None or clip is None or vae is None:
        raise Refused(f"checkpoint {path} lacks a diffusion model, text encoder or VAE")
    return model, clip, vae


class _MathAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``<pack>.lord_ops[.x]`` to the module ``lord_ops[.x]``: one copy of the math in a
    process that imports it by its own name (scripts, tests) and also loads the nodes, whose relative
    imports reach it through the pack's package name. (Without it, every ``lord_ops`` module would
    exist twice, with two distinct exception classes, caches and registries.)"""

    def __init__(self, pack: str):
        self.prefix = pack + ".lord_ops"

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.prefix or fullname.startswith(self.prefix + "."):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("lord_ops" + spec.name[len(self.prefix):])

    def exec_module(self, module):
        pass  # already executed under its own name


def import_pack(name: str = PACK_NAME):
    """Import this repository as a package named ``name``, the way ComfyUI imports a custom node
    (its modules use relative imports, so ``nodes`` never clashes with ComfyUI's ``nodes.py``).

    ``<name>.lord_ops`` is the module ``lord_ops`` itself (needs the repository root on
    ``sys.path``, as ``python -m`` from the root and pytest give it)."""
    if name in sys.modules:
        return sys.modules[name]
    if not any(isinstance(f, _MathAlias) and f.prefix == name + ".lord_ops" for f in sys.meta_path):
        sys.meta_path.insert(0, _MathAlias(name))
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    return pkg
