"""Reading the lab's own training checkpoints (weights only, plus the numpy scalars an LR scheduler's
state may hold)."""
from __future__ import annotations


def load_state(path):
    import numpy as np
    import torch

    allowed = [np._core.multiarray.scalar, np.dtype, type(np.dtype(np.float64))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)
