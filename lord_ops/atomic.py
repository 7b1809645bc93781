"""Atomic file writes (one owner): a file is either the old one or the complete new one, never half
written. The data goes to a hidden temp file in the target's folder, is flushed to disk, then
``os.replace``-d over the target; on any error the temp file is removed and the target untouched.
The result gets the permissions of a normally created file (``0o666`` minus the umask).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path, write_to: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """``write_to(temp_path)`` writes the content (e.g. ``safetensors.torch.save_file`` or
    ``torch.save``); then it replaces ``path``. Creates the parent folder. ``suffix`` names the temp
    file (``.<name>.<random><suffix>``) so a tool can find and delete the leftovers of a killed run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp files are 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, value) -> Path:
    """``value`` as indented JSON with sorted keys and a final newline."""
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
