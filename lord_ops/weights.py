"""Weight files: the error a wrong or missing file raises, reading tensors without running pickled
code, and sha256 digests of files with one cache (in memory, optionally kept in a JSON file so a
checkpoint of several GB is hashed once across runs). Plain Python + torch."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch


class MetricWeightsError(ValueError):
    """A metric's weight file is missing or is not the expected file (the message names the file and
    which file is expected)."""


def first_line(e: BaseException) -> str:
    """``"<ExceptionType>: <first line of its message>"`` (at most 300 characters of it), for messages
    that quote a library's error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def existing_file(path, expected: str) -> Path:
    """``path`` as a Path when it names an existing file, else :class:`MetricWeightsError` naming it
    and ``expected`` (what file the caller wants)."""
    if path is None or str(path) == "":
        raise MetricWeightsError(f"no weights file given; expected {expected}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise MetricWeightsError(f"weights file {p} does not exist; expected {expected}")
    return p


def read_state_dict(path, expected: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or of a plain PyTorch state dict (read with
    ``torch.load(weights_only=True)``: no arbitrary pickled code runs). ``{"state_dict": ...}``
    wrappers are unwrapped. Anything else -> :class:`MetricWeightsError` naming the file."""
    p = existing_file(path, expected)
    try:
        if p.suffix == ".safetensors":
            import safetensors.torch

            sd = safetensors.torch.load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every reader error means "not the expected file"
        raise MetricWeightsError(f"{p} is not a tensor checkpoint readable without running pickled code "
                                 f"({first_line(e)}); expected {expected}") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise MetricWeightsError(f"{p} does not hold a dict of named tensors (got {type(sd).__name__}); "
                                 f"expected {expected}")
    return sd


class FileHashes:
    """sha256 digests (hex) of files, cached by (resolved path, size, mtime): a file is read again only
    when it changed. With ``store`` the cache is also kept in that JSON file (written atomically), so
    later processes reuse it."""

    def __init__(self, store: Optional[Path] = None):
        self.store = Path(store) if store is not None else None
        self._cache: dict[str, str] = {}
        if self.store is not None:
            try:
                loaded = json.loads(self.store.read_text(encoding="utf-8"))
                self._cache.update(loaded if isinstance(loaded, dict) else {})
            except (OSError, ValueError):
                pass

    def __call__(self, path) -> str:
        st = os.stat(path)
        key = f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = self._cache.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            digest = self._cache[key] = h.hexdigest()
            if self.store is not None:
                from .atomic import atomic_write_json

                atomic_write_json(self.store, self._cache)
        return digest


_process_hashes = FileHashes()


def file_sha256(path) -> str:
    """sha256 of a file (hex), cached in this process while the file's size and mtime are unchanged."""
    return _process_hashes(path)
