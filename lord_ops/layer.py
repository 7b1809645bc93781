"""The LoRD layer (DESIGN.md section 1), in plain torch.

For a frozen base layer ``h0 = W0 x`` with a LoRD adapter (down ``A`` r x d_in, clean up ``B``
d_out x r, defense up ``B'`` d_out x r, gate MLP ``g``, scale ``s = alpha / r``)::

    u      = A x                      # rank-r code, per token / per pixel
    v      = s * B u                  # the ordinary LoRA branch
    lambda = sigmoid(g(v))            # one balance value per feature vector (token / pixel)
    h      = W0 x + v + lambda * s * B' u

Layouts: a Linear target sees ``x`` as ``[..., d_in]`` (``[B, T, C]`` in transformer blocks),
giving ``lambda`` as ``[..., 1]``. A Conv2d target sees ``[B, C, H, W]``; ``A`` is a conv with the
base layer's kernel, stride, padding and dilation, ``B``/``B'`` are 1x1, and ``lambda`` is
``[B, 1, H', W']`` (one value per output pixel).

Two evaluation forms give the same result:

* **plain** (training, reference): computes ``v``, the gate on ``v`` and the defense branch.
* **fused** (inference, :mod:`lord_ops.fused`): ``s B A`` is a static weight delta merged into
  ``W0`` like any LoRA; the first gate layer composes with ``s B`` (``W1 (s B u) = (s W1 B) u``) and
  ``strength * s`` folds into ``B'`` at load, so at run time only ``u = A x``, a gate on the rank-r
  ``u`` and one ``B' (lambda u)`` added into the layer output (in place when sampling) are computed.

The plain form and the gate run in float32 whatever the dtype of the base model; results are cast
back to the dtype of the layer output. The fused form projects ``x`` and adds ``B' (lambda u)`` in the
activations' dtype (as a merged LoRA computes), with ``u`` and the gate in float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

GATE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
}

# Gate modes: "learned" uses the MLP, the two forced modes pin lambda for every feature.
GATE_MODES = ("learned", "clean", "defense")
FORCED_GATE_VALUE = {"clean": 0.0, "defense": 1.0}


@dataclasses.dataclass
class ConvGeometry:
    """Stride/padding/dilation of a Conv2d base layer, which ``A`` must share."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @classmethod
    def of(cls, conv: torch.nn.Conv2d) -> "ConvGeometry":
        return cls(tuple(conv.stride), conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                   tuple(conv.dilation))


@dataclasses.dataclass
class LoRDWeights:
    """Tensors of one LoRD target, in the layouts stored in a LoRD file.

    ``down``: ``[r, d_in]`` (Linear) or ``[r, d_in, kh, kw]`` (Conv2d).
    ``up`` / ``up_defense``: ``[d_out, r]`` (Linear) or ``[d_out, r, 1, 1]`` (Conv2d).
    ``gate_w1``: ``[hidden, d_out]``, ``gate_b1``: ``[hidden]``, ``gate_w2``: ``[1, hidden]``,
    ``gate_b2``: ``[1]``. ``alpha`` is the LoRA alpha (scale ``alpha / r``).
    """

    down: torch.Tensor
    up: torch.Tensor
    up_defense: torch.Tensor
    gate_w1: torch.Tensor
    gate_b1: torch.Tensor
    gate_w2: torch.Tensor
    gate_b2: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def gate_hidden(self) -> int:
        return int(self.gate_w1.shape[0])

    def base_weight_shape(self) -> tuple[int, ...]:
        """Shape the base layer's weight must have for this adapter."""
        if self.is_conv:
            return (self.out_features, self.in_features, *self.down.shape[2:])
        return (self.out_features, self.in_features)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "alpha"}

    def to(self, device=None, dtype=torch.float32) -> "LoRDWeights":
        moved = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors().items()}
        return LoRDWeights(**moved, alpha=self.alpha)

    def clean_delta_weight(self) -> torch.Tensor:
        """The static clean-branch delta ``s B A`` in the base weight's layout (float32)."""
        up = as_matrix(self.up).float()
        down = self.down.float()
        if self.is_conv:
            return self.scale * torch.einsum("or,rikl->oikl", up, down)
        return self.scale * up @ down


def as_matrix(up: torch.Tensor) -> torch.Tensor:
    """``[d_out, r, 1, 1]`` -> ``[d_out, r]``; matrices pass through."""
    return up.reshape(up.shape[0], up.shape[1]) if up.dim() == 4 else up


def init_lora(in_features: int, out_features: int, rank: int, kernel_size: Optional[Sequence[int]] = None,
              generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A new LoRA pair ``(down, up)``: ``A ~ N(0, (1/r)^2)`` (mist-v2's / diffusers' init) drawn from
    ``generator``, ``B = 0`` (the untrained LoRA is a no-op). Shapes ``[r, d_in]`` / ``[d_out, r]``, or
    ``[r, d_in, kh, kw]`` / ``[d_out, r, 1, 1]`` with ``kernel_size`` (Conv2d)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    down_shape = (rank, in_features, *kernel_size) if kernel_size else (rank, in_features)
    up_shape = (out_features, rank, 1, 1) if kernel_size else (out_features, rank)
    return torch.randn(down_shape, generator=generator) / rank, torch.zeros(up_shape)


def init_lord_weights(
    in_features: int,
    out_features: int,
    rank: int = 4,
    alpha: Optional[float] = None,
    gate_hidden: int = 32,
    kernel_size: Optional[Sequence[int]] = None,
    generator: Optional[torch.Generator] = None,
    random_up: float = 0.0,
) -> LoRDWeights:
    """New LoRD weights with DESIGN.md's defaults.

    ``A ~ N(0, (1/r)^2)`` (mist-v2's LoRA init), ``B = B' = 0`` unless ``random_up > 0`` (then both
    ~ N(0, random_up^2): an untrained but visibly active adapter for demos and tests), the gate's
    weights use PyTorch's Linear init and its biases are 0, so an untrained gate on ``v = 0`` says 0.5.
    ``kernel_size`` makes a Conv2d adapter.
    """
    alpha = float(rank if alpha is None else alpha)
    g = generator
    down, up = init_lora(in_features, out_features, rank, kernel_size, g)
    if random_up > 0:
        up = torch.randn(up.shape, generator=g) * random_up
        up_defense = torch.randn(up.shape, generator=g) * random_up
    else:
        up_defense = torch.zeros(up.shape)
    bound1 = 1.0 / math.sqrt(out_features)
    bound2 = 1.0 / math.sqrt(gate_hidden)
    gate_w1 = (torch.rand((gate_hidden, out_features), generator=g) * 2 - 1) * bound1
    gate_b1 = torch.zeros(gate_hidden)
    gate_w2 = (torch.rand((1, gate_hidden), generator=g) * 2 - 1) * bound2
    gate_b2 = torch.zeros(1)
    return LoRDWeights(down, up, up_defense, gate_w1, gate_b1, gate_w2, gate_b2, alpha)


# ----------------------------------------------------------------------------------------------
# Evaluation. ``x`` is the base layer's input; results are float32 in the base output layout.


def _down_project(x: torch.Tensor, down: torch.Tensor, geometry: Optional[ConvGeometry]) -> torch.Tensor:
    """``u = A x`` with features last: ``[..., r]`` (Linear) or ``[B, H', W', r]`` (Conv2d)."""
    x = x.float()
    if down.dim() == 4:
        geo = geometry or ConvGeometry()
        u = F.conv2d(x, down, None, geo.stride, geo.padding, geo.dilation)
        return u.permute(0, 2, 3, 1)
    return F.linear(x, down)


def _features_to_output_layout(t: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """Features-last tensor -> the base layer's output layout (channels first for convs)."""
    return t.permute(0, 3, 1, 2) if is_conv else t


def gate_logit(features: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The gate before its sigmoid, ``W2 act(W1 f + b1) + b2``: ``[..., C] -> [..., 1]`` (training's BCE
    takes these logits)."""
    hidden = GATE_ACTIVATIONS[activation](F.linear(features, w1, b1))
    return F.linear(hidden, w2, b2)


def gate_mlp(features: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
             b2: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``sigmoid(W2 act(W1 f + b1) + b2)`` over the last dim: ``[..., C] -> [..., 1]``."""
    return torch.sigmoid(gate_logit(features, w1, b1, w2, b2, activation))


def gate_or_forced(compute: Callable[[], torch.Tensor], like: torch.Tensor, gate_mode: str) -> torch.Tensor:
    if gate_mode == "learned":
        return compute()
    if gate_mode not in FORCED_GATE_VALUE:
        raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
    return torch.full((*like.shape[:-1], 1), FORCED_GATE_VALUE[gate_mode], dtype=like.dtype, device=like.device)


def lora_delta(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float,
               geometry: Optional[ConvGeometry] = None) -> torch.Tensor:
    """A standard LoRA's ``s B (A x)`` in the base output layout, float32 (Stage-2 training)."""
    v = scale * F.linear(_down_project(x, down, geometry), as_matrix(up))
    return _features_to_output_layout(v, down.dim() == 4)


def lord_delta_plain(x: torch.Tensor, w: LoRDWeights, activation: str = "silu", gate_mode: str = "learned",
                     geometry: Optional[ConvGeometry] = None, return_logit: bool = False):
    """Plain form: returns ``(v + lambda * s B' u, lambda)`` in the base output layout, float32.

    ``lambda`` is ``[..., 1]`` for Linear and ``[B, 1, H', W']`` for Conv2d targets. With
    ``return_logit`` a third value is the gate's logit (``lambda = sigmoid(logit)``, same layout;
    None for a forced gate), for a numerically stable BCE in training.
    """
    u = _down_project(x, w.down, geometry)
    s = w.scale
    v = s * F.linear(u, as_matrix(w.up))
    logit = None
    if gate_mode == "learned" and return_logit:
        logit = gate_logit(v, w.gate_w1, w.gate_b1, w.gate_w2, w.gate_b2, activation)
        lam = torch.sigmoid(logit)
    else:
        lam = gate_or_forced(lambda: gate_mlp(v, w.gate_w1, w.gate_b1, w.gate_w2, w.gate_b2, activation), v, gate_mode)
    delta = v + lam * (s * F.linear(u, as_matrix(w.up_defense)))
    out = _features_to_output_layout(delta, w.is_conv), _features_to_output_layout(lam, w.is_conv)
    if return_logit:
        return (*out, None if logit is None else _features_to_output_layout(logit, w.is_conv))
    return out


def code_rows(x: torch.Tensor, down: torch.Tensor,
              geometry: Optional[ConvGeometry]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``u = A x`` as float32 rows ``[N, r]`` (one row per token / output pixel), computed in ``down``'s
    dtype, and the leading shape the rows unflatten to (``x.shape[:-1]``, or ``(B, H', W')`` for a conv)."""
    if down.dim() == 4:
        geo = geometry or ConvGeometry()
        u = F.conv2d(x.to(down.dtype), down, None, geo.stride, geo.padding, geo.dilation).permute(0, 2, 3, 1)
        lead = tuple(u.shape[:3])
    else:
        u = F.linear(x.to(down.dtype), down)
        lead = tuple(x.shape[:-1])
    return u.reshape(-1, down.shape[0]).float(), lead


def add_rows(output: torch.Tensor, code: torch.Tensor, up: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """``output + up code`` out of place, as one ``addmm`` / ``baddbmm`` (autograd-safe): ``code`` rows
    ``[N, k]``, ``up`` ``[d_out, k]``, in the output's dtype."""
    code, up = code.to(output.dtype), up.to(output.dtype)
    if is_conv:
        b, d_out = output.shape[:2]
        new = torch.baddbmm(output.reshape(b, d_out, -1), up.expand(b, -1, -1),
                            code.reshape(b, -1, code.shape[1]).transpose(1, 2))
        return new.reshape(output.shape)
    return torch.addmm(output.reshape(-1, output.shape[-1]), code, up.t()).reshape(output.shape)


def lord_add_lowrank(output: torch.Tensor, x: torch.Tensor, w: LoRDWeights, activation: str = "silu",
                     gate_mode: str = "learned", geometry: Optional[ConvGeometry] = None):
    """``output + v + lambda * s B' u`` (the plain form's delta added to the layer output), evaluated through
    the rank-r code for training: the gate's first layer composes with ``s B`` (``(s W1 B) u``), and both
    branches leave as one ``addmm`` of ``[u, lambda u]`` with ``s [B | B']``. Same value and gradients as
    :func:`lord_delta_plain` (different association), but no full-size intermediate is made or saved for
    backward. Returns ``(new output, gate logit)``: the logit in the output layout, None for a forced gate."""
    u, lead = code_rows(x, w.down, geometry)
    up = as_matrix(w.up).float()
    if gate_mode == "clean":  # lambda = 0: the LoRA branch alone
        return add_rows(output, u, w.scale * up, w.is_conv), None
    logit = None
    if gate_mode == "learned":
        logit = gate_logit(u, w.scale * (w.gate_w1.float() @ up), w.gate_b1, w.gate_w2, w.gate_b2, activation)
        lam = torch.sigmoid(logit)
    else:
        lam = gate_or_forced(lambda: None, u, gate_mode)
    code = torch.cat([u, lam * u], dim=1)
    new = add_rows(output, code, w.scale * torch.cat([up, as_matrix(w.up_defense).float()], dim=1), w.is_conv)
    return new, (None if logit is None else rows_to_layout(logit, lead, w.is_conv))


def lora_add(output: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float,
             geometry: Optional[ConvGeometry] = None) -> torch.Tensor:
    """``output + s B (A x)``: a standard LoRA added to the layer output as one ``addmm`` of the rank-r code
    (Stage-2 training, surrogate LoRAs); same value as ``output + lora_delta(...)``."""
    u, _ = code_rows(x, down, geometry)
    return add_rows(output, u, scale * as_matrix(up).float(), down.dim() == 4)


def rows_to_layout(rows: torch.Tensor, lead: tuple[int, ...], is_conv: bool) -> torch.Tensor:
    """``[N, c]`` rows -> the layer output layout (``[..., c]``, or ``[B, c, H', W']`` for a conv)."""
    return _features_to_output_layout(rows.reshape(*lead, -1), is_conv)
