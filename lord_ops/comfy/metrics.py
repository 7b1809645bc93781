"""ComfyUI glue for the metric nodes: the ``models/lord_metrics`` folder, cached metric networks, a
reference-image folder reader, and a progress bar over images with Cancel."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..weights import MetricWeightsError
from ..images import EXTENSIONS, load_image

METRICS_FOLDER = "lord_metrics"
METRICS_EXTENSIONS = {".pth", ".pt", ".bin", ".safetensors"}
_cache: dict[tuple, object] = {}


def register_metrics_folder() -> None:
    """Register ``models/lord_metrics`` (metric network weights) without dropping paths that
    ``extra_model_paths.yaml`` already added for it."""
    import folder_paths

    folder_paths.add_model_folder_path(METRICS_FOLDER, os.path.join(folder_paths.models_dir, METRICS_FOLDER), is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[METRICS_FOLDER]
    folder_paths.folder_names_and_paths[METRICS_FOLDER] = (paths, set(METRICS_EXTENSIONS))


def metric_weight_files() -> list[str]:
    import folder_paths

    if METRICS_FOLDER not in folder_paths.folder_names_and_paths:
        return []
    return folder_paths.get_filename_list(METRICS_FOLDER)


def metric_weights_path(name: str, what: str) -> str:
    """Full path of a file chosen in ``models/lord_metrics``; a clear error when there is none."""
    import folder_paths

    folders = folder_paths.get_folder_paths(METRICS_FOLDER) if METRICS_FOLDER in folder_paths.folder_names_and_paths else []
    where = ", ".join(folders) or os.path.join(folder_paths.models_dir, METRICS_FOLDER)
    if not name:
        raise MetricWeightsError(f"no weights file chosen: put {what} into {where} and pick it in the node's weights input")
    path = folder_paths.get_full_path(METRICS_FOLDER, name) if folders else None
    if not path or not os.path.isfile(path):
        raise MetricWeightsError(f"weights file '{name}' not found in {where}: put {what} there "
                                    f"(and press R in ComfyUI to refresh the list)")
    return path


def _stamp(path: str) -> tuple:
    st = os.stat(path)
    return (path, st.st_size, st.st_mtime_ns)


def cached(kind: str, name: str, path: str, loader):
    """The loaded network for (kind, name, file), re-loaded only when the file changes; one kept per kind."""
    key = (kind, name, _stamp(path))
    hit = _cache.get(kind)
    if hit is not None and hit[0] == key:
        return hit[1]
    _cache.pop(kind, None)
    value = loader()
    _cache[kind] = (key, value)
    return value


def resolve_folder(folder: str) -> Path:
    """A folder given as an absolute path, or relative to ComfyUI's input directory."""
    import folder_paths

    text = str(folder).strip()
    if not text:
        raise ValueError("reference_folder is empty: give a folder of reference images (absolute, or inside ComfyUI's input folder)")
    p = Path(text).expanduser()
    candidates = [p] if p.is_absolute() else [Path(folder_paths.get_input_directory()) / p, p]
    for c in candidates:
        if c.is_dir():
            return c
    raise ValueError(f"reference_folder '{text}' not found (looked at {', '.join(str(c) for c in candidates)})")


def load_reference_images(folder: Path) -> tuple[list[torch.Tensor], list[str]]:
    """Every image in ``folder`` (sorted by name; not recursive) as uint8 ``[H, W, 3]`` (alpha dropped)."""
    names = sorted(f.name for f in folder.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)
    if not names:
        raise ValueError(f"reference_folder {folder} holds no images ({', '.join(sorted(EXTENSIONS))})")
    images = []
    for name in names:
        try:
            rgb = load_image(folder / name)[0]
        except Exception as e:  # noqa: BLE001 - name the file
            raise ValueError(f"reference image {folder / name} cannot be read: {e}") from e
        images.append(torch.from_numpy(rgb))
    return images, names


class ImageProgress:
    """One progress bar over ``total`` images; Cancel checked after every batch."""

    def __init__(self, total: int):
        import comfy.utils

        self.total, self.offset = int(total), 0
        self.pbar = comfy.utils.ProgressBar(self.total)

    def part(self, offset: int):
        """Callback ``(done, n)`` for a part of the images that starts at ``offset``."""
        import comfy.model_management

        def update(done: int, _n: int) -> None:
            self.pbar.update_absolute(offset + done, self.total)
            comfy.model_management.throw_exception_if_processing_interrupted()

        return update
