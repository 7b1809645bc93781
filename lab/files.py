"""Reading the lab's own training checkpoints (weights only, plus the numpy scalars an LR scheduler's
state may hold)."""
from __future__ import annotations

WEIGHTS_FORMAT = "lord-lab-weights"


def load_state(path):
    """A training file's contents: a ``.pt`` checkpoint (``{part: state_dict, ..., "step": n}``) or a
    weights file written by :func:`export_weights` (``.safetensors``: ``{part: state_dict, "step": n}``)."""
    import numpy as np
    import torch

    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != WEIGHTS_FORMAT:
                raise ValueError(f"{path} is not a lab weights file (written by python -m lab.ship weights)")
            return {meta["part"]: {k: f.get_tensor(k) for k in f.keys()}, "step": int(meta["step"])}
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


def export_weights(checkpoint, out, part: str):
    """Write ``part``'s weights (float32, unchanged) and step of a training file as safetensors: a
    file small enough to keep in the repository, that every reader of the ``.pt`` file also reads
    (:func:`load_state`), e.g. the lab-2 VAE that the UNet trains on. Atomic; returns ``out``."""
    from pathlib import Path

    from safetensors.torch import save_file

    from lord_ops.atomic import atomic_write

    state = load_state(checkpoint)
    if part not in state:
        raise KeyError(f"{checkpoint} holds no {part!r} weights (it has: {', '.join(sorted(state))})")
    tensors = {k: v.detach().float().contiguous() for k, v in state[part].items()}
    meta = {"format": WEIGHTS_FORMAT, "part": part, "step": str(int(state.get("step", 0))),
            "source": Path(checkpoint).name}
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return Path(out)
