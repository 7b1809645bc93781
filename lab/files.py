"""Reading the lab's own training checkpoints (weights only, plus the numpy scalars an LR scheduler's
state may hold)."""
from __future__ import annotations


def load_state(path):
    import numpy as np
    import torch

    allowed = [np._core.multiarray.scalar, np.dtype, type(np.dtype(np.float64))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


def restore(path, **parts) -> int:
    """Resume from the training checkpoint ``path`` (``{name: state_dict, ..., "step": n}``): each of
    ``parts`` (objects with ``load_state_dict``, by their name in the file) loads its state. Returns
    the checkpoint's step, or 0 when there is no file (a fresh start)."""
    from pathlib import Path

    if not Path(path).is_file():
        return 0
    state = load_state(path)
    for name, part in parts.items():
        part.load_state_dict(state[name])
    return int(state["step"])
