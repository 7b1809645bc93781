"""Where the pack writes in ComfyUI's folders: training run folders and the perturbation cache under
``output/lord_training/``, and trained files into ``models/<folder>`` under a free name."""
from __future__ import annotations

import os


def training_dir(run_name: str) -> str:
    import folder_paths

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_name.strip()) or "run"
    return os.path.join(folder_paths.get_output_directory(), "lord_training", safe)


def cache_dir() -> str:
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), "lord_training", "pgd_cache")


def free_name(folder: str, prefix: str, overwrite: bool) -> str:
    """A path for ``<prefix>.safetensors`` inside ``folder`` (numbered unless ``overwrite``).

    ``prefix`` may name sub-folders (``a/b``); it may not leave ``folder``: ``..`` components and
    drive prefixes or colons (``C:x``, ``C:\\x``, ``x:stream``; on Windows these escape the folder or
    write an alternate data stream) are refused.
    """
    raw = prefix
    prefix = prefix.strip().replace("\\", "/").strip("/")
    if not prefix or ".." in prefix.split("/") or ":" in prefix:
        raise ValueError(f"filename_prefix {raw!r} is not a usable file name inside the models folder: use a plain "
                         f"name or sub-folder path such as 'lord_stage1' or 'mine/lord_stage1' (no '..', no drive "
                         f"prefix like 'C:', no ':').")
    if prefix.endswith(".safetensors"):
        prefix = prefix[: -len(".safetensors")]
    path = os.path.join(folder, prefix + ".safetensors")
    n = 1
    while os.path.exists(path) and not overwrite:
        path = os.path.join(folder, f"{prefix}_{n:05d}.safetensors")
        n += 1
    return path


def save_into_models(folder_name: str, prefix: str, overwrite: bool, write) -> tuple[str, str]:
    """``write(path)`` into the first ``models/<folder_name>`` folder; returns the file name inside it and
    the path to show in the UI (``models/<folder_name>/<name>``)."""
    import folder_paths

    folder = folder_paths.get_folder_paths(folder_name)[0]
    path = free_name(folder, prefix, overwrite)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write(path)
    name = os.path.relpath(path, folder)
    return name, f"models/{folder_name}/{name}"
