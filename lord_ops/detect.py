"""Turn recorded per-feature gate values into adversarial scores and heatmaps (plain torch).

The gate ``lambda`` of a LoRD layer estimates, per token / pixel, the probability that the input
feature comes from an adversarial (perturbed) image. Layers fed by image features give maps on
the latent grid or a downsampled copy of it; layers fed by the text context (cross-attention
``to_k``/``to_v``) carry no image information and are left out.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

# (position, RGB) stops of a dark-to-bright colormap: 0 = clean (dark), 1 = adversarial (bright).
_COLORMAP = torch.tensor([
    [0.000, 0.001, 0.000, 0.014],
    [0.250, 0.341, 0.062, 0.429],
    [0.500, 0.735, 0.216, 0.330],
    [0.750, 0.978, 0.557, 0.035],
    [1.000, 0.988, 0.998, 0.645],
])


def _grid_for(tokens: int, latent_hw: tuple[int, int]) -> Optional[tuple[int, int]]:
    """The ``(h, w)`` of the UNet level whose token count is ``tokens`` (stride-2 downsampling)."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == tokens:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    return None


def gate_maps(records: Iterable[tuple[str, torch.Tensor]], latent_hw: tuple[int, int],
              spatial_names: Optional[set] = None) -> dict[str, torch.Tensor]:
    """Per-layer gate maps ``[B, 1, h, w]`` from hook records ``(name, lambda)``.

    ``lambda`` is ``[B, T, 1]`` (Linear on tokens) or ``[B, 1, h, w]`` (Conv2d). Several records of
    one layer (a batch split into chunks) are concatenated in order. Records whose token count
    does not match a level of the latent grid, or whose name is not in ``spatial_names``, are skipped.
    """
    chunks: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name, lam in records:
        if spatial_names is not None and name not in spatial_names:
            continue
        if lam.dim() == 3:
            grid = _grid_for(lam.shape[1], latent_hw)
            if grid is None:
                continue
            lam = lam.float().transpose(1, 2).reshape(lam.shape[0], 1, *grid)
        chunks[name].append(lam.float())
    return {name: torch.cat(parts, dim=0) for name, parts in chunks.items()}


def adversarial_scores(maps: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-image score ``[B]``: the mean gate over layers and features (0 clean .. 1 adversarial)."""
    if not maps:
        raise ValueError("no image-fed LoRD layer recorded a gate value")
    return torch.stack([m.mean(dim=(1, 2, 3)) for m in maps.values()], dim=0).mean(dim=0)


def gate_heatmap(maps: dict[str, torch.Tensor], size_hw: tuple[int, int]) -> torch.Tensor:
    """Mean of the layer maps, each resized bilinearly to ``size_hw``: ``[B, H, W]`` in 0..1."""
    if not maps:
        raise ValueError("no image-fed LoRD layer recorded a gate value")
    resized = [F.interpolate(m, size=size_hw, mode="bilinear", align_corners=False) for m in maps.values()]
    return torch.stack(resized, dim=0).mean(dim=0)[:, 0].clamp(0, 1)


def colorize(values: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` in 0..1 -> ComfyUI IMAGE ``[B, H, W, 3]`` in 0..1 (dark = clean, bright = adversarial)."""
    cmap = _COLORMAP.to(values.device)
    v = values.clamp(0, 1)
    idx = torch.searchsorted(cmap[:, 0].contiguous(), v.contiguous(), right=True).clamp(1, len(cmap) - 1)
    lo, hi = cmap[idx - 1], cmap[idx]
    t = ((v - lo[..., 0]) / (hi[..., 0] - lo[..., 0])).unsqueeze(-1)
    return lo[..., 1:] + t * (hi[..., 1:] - lo[..., 1:])
