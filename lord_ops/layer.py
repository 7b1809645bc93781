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
* **fused** (inference): ``s B A`` is a static weight delta merged into ``W0`` like any LoRA; the
  first gate layer composes with ``s B`` (``W1 (s B u) = (s W1 B) u``) and ``strength * s`` folds
  into ``B'`` at load, so at run time only ``u = A x``, a gate on the rank-r ``u`` and one
  ``B' (lambda u)`` added into the layer output (in place when sampling) are computed.

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
_F32 = torch.float32


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
        up = _as_matrix(self.up).float()
        down = self.down.float()
        if self.is_conv:
            return self.scale * torch.einsum("or,rikl->oikl", up, down)
        return self.scale * up @ down


def _as_matrix(up: torch.Tensor) -> torch.Tensor:
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


def _gate_or_forced(compute: Callable[[], torch.Tensor], like: torch.Tensor, gate_mode: str) -> torch.Tensor:
    if gate_mode == "learned":
        return compute()
    if gate_mode not in FORCED_GATE_VALUE:
        raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
    return torch.full((*like.shape[:-1], 1), FORCED_GATE_VALUE[gate_mode], dtype=like.dtype, device=like.device)


def lora_delta(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float,
               geometry: Optional[ConvGeometry] = None) -> torch.Tensor:
    """A standard LoRA's ``s B (A x)`` in the base output layout, float32 (Stage-2 training)."""
    v = scale * F.linear(_down_project(x, down, geometry), _as_matrix(up))
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
    v = s * F.linear(u, _as_matrix(w.up))
    logit = None
    if gate_mode == "learned" and return_logit:
        logit = gate_logit(v, w.gate_w1, w.gate_b1, w.gate_w2, w.gate_b2, activation)
        lam = torch.sigmoid(logit)
    else:
        lam = _gate_or_forced(lambda: gate_mlp(v, w.gate_w1, w.gate_b1, w.gate_w2, w.gate_b2, activation), v, gate_mode)
    delta = v + lam * (s * F.linear(u, _as_matrix(w.up_defense)))
    out = _features_to_output_layout(delta, w.is_conv), _features_to_output_layout(lam, w.is_conv)
    if return_logit:
        return (*out, None if logit is None else _features_to_output_layout(logit, w.is_conv))
    return out


@dataclasses.dataclass
class FusedLoRD:
    """Run-time part of the fused form (the clean branch lives in the merged weight).

    ``down``: A (``[r, d_in]``, or the conv kernel ``[r, d_in, kh, kw]``); ``gate_w1``: ``s W1 B``
    ``[hidden, r]``; ``defense_up``: ``strength * s * B'`` ``[d_out, r]`` (strength and scale folded in
    once, at load). Gate tensors stay float32; :meth:`to` may give ``down`` / ``defense_up`` the model's
    dtype, so a half-precision model's activations are projected without a full-size float32 copy.
    """

    down: torch.Tensor
    gate_w1: torch.Tensor
    gate_b1: torch.Tensor
    gate_w2: torch.Tensor
    gate_b2: torch.Tensor
    defense_up: torch.Tensor
    is_conv: bool

    def __post_init__(self):
        # contiguous transposes for the no-grad hot path (tiny: rank-r and gate-sized matrices)
        self.down_t = self.down.t().contiguous() if not self.is_conv and self.down.dtype is _F32 else None
        self.gate_w1_t, self.gate_w2_t = self.gate_w1.t().contiguous(), self.gate_w2.t().contiguous()
        self.defense_up_t = self.defense_up.t().contiguous()

    @classmethod
    def from_weights(cls, w: LoRDWeights, strength: float = 1.0) -> "FusedLoRD":
        up = _as_matrix(w.up).float()
        return cls(
            down=w.down.float(),
            gate_w1=w.scale * (w.gate_w1.float() @ up),
            gate_b1=w.gate_b1.float(),
            gate_w2=w.gate_w2.float(),
            gate_b2=w.gate_b2.float(),
            defense_up=(float(strength) * w.scale) * _as_matrix(w.up_defense).float(),
            is_conv=w.is_conv,
        )

    def to(self, device, dtype: torch.dtype = torch.float32) -> "FusedLoRD":
        """A copy on ``device``; ``down`` and ``defense_up`` in ``dtype``, the gate in float32."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        moved = {k: (v.to(device=device, dtype=dtype if k in ("down", "defense_up") else torch.float32)
                     if isinstance(v, torch.Tensor) else v) for k, v in fields.items()}
        return FusedLoRD(**moved)


def _code(x: torch.Tensor, down: torch.Tensor, geometry: Optional[ConvGeometry]) -> tuple[torch.Tensor, tuple[int, ...]]:
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


def _add_rows(output: torch.Tensor, code: torch.Tensor, up: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """``output + up code`` out of place, as one ``addmm`` / ``baddbmm`` (autograd-safe): ``code`` rows
    ``[N, k]``, ``up`` ``[d_out, k]``, in the output's dtype."""
    code, up = code.to(output.dtype), up.to(output.dtype)
    if is_conv:
        b, d_out = output.shape[:2]
        new = torch.baddbmm(output.reshape(b, d_out, -1), up.expand(b, -1, -1), code.reshape(b, -1, code.shape[1]).transpose(1, 2))
        return new.reshape(output.shape)
    return torch.addmm(output.reshape(-1, output.shape[-1]), code, up.t()).reshape(output.shape)


def lord_add_lowrank(output: torch.Tensor, x: torch.Tensor, w: LoRDWeights, activation: str = "silu",
                     gate_mode: str = "learned", geometry: Optional[ConvGeometry] = None):
    """``output + v + lambda * s B' u`` (the plain form's delta added to the layer output), evaluated through
    the rank-r code for training: the gate's first layer composes with ``s B`` (``(s W1 B) u``), and both
    branches leave as one ``addmm`` of ``[u, lambda u]`` with ``s [B | B']``. Same value and gradients as
    :func:`lord_delta_plain` (different association), but no full-size intermediate is made or saved for
    backward. Returns ``(new output, gate logit)``: the logit in the output layout, None for a forced gate."""
    u, lead = _code(x, w.down, geometry)
    up = _as_matrix(w.up).float()
    if gate_mode == "clean":  # lambda = 0: the LoRA branch alone
        return _add_rows(output, u, w.scale * up, w.is_conv), None
    logit = None
    if gate_mode == "learned":
        logit = gate_logit(u, w.scale * (w.gate_w1.float() @ up), w.gate_b1, w.gate_w2, w.gate_b2, activation)
        lam = torch.sigmoid(logit)
    else:
        lam = _gate_or_forced(lambda: None, u, gate_mode)
    code = torch.cat([u, lam * u], dim=1)
    new = _add_rows(output, code, w.scale * torch.cat([up, _as_matrix(w.up_defense).float()], dim=1), w.is_conv)
    return new, (None if logit is None else _rows_to_layout(logit, lead, w.is_conv))


def lora_add(output: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float,
             geometry: Optional[ConvGeometry] = None) -> torch.Tensor:
    """``output + s B (A x)``: a standard LoRA added to the layer output as one ``addmm`` of the rank-r code
    (Stage-2 training, surrogate LoRAs); same value as ``output + lora_delta(...)``."""
    u, _ = _code(x, down, geometry)
    return _add_rows(output, u, scale * _as_matrix(up).float(), down.dim() == 4)


def _rows_to_layout(rows: torch.Tensor, lead: tuple[int, ...], is_conv: bool) -> torch.Tensor:
    """``[N, c]`` rows -> the layer output layout (``[..., c]``, or ``[B, c, H', W']`` for a conv)."""
    return _features_to_output_layout(rows.reshape(*lead, -1), is_conv)


def gate_rows_to_layout(lam: torch.Tensor, output: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """Gate rows ``[N, 1]`` (from :func:`add_fused_defense`) -> the layout of the layer's ``output``."""
    if is_conv:
        b, _, h, w = output.shape
        return lam.reshape(b, h, w, 1).permute(0, 3, 1, 2)
    return lam.reshape(*output.shape[:-1], 1)


def fused_gate(x: torch.Tensor, f: FusedLoRD, activation: str = "silu",
               geometry: Optional[ConvGeometry] = None) -> torch.Tensor:
    """The learned gate alone: ``lambda`` in the output layout (``[..., 1]`` / ``[B, 1, H', W']``)."""
    u, lead = _code(x, f.down, geometry)
    return _rows_to_layout(gate_mlp(u, f.gate_w1, f.gate_b1, f.gate_w2, f.gate_b2, activation), lead, f.is_conv)


def lord_defense_fused(x: torch.Tensor, f: FusedLoRD, activation: str = "silu", gate_mode: str = "learned",
                       geometry: Optional[ConvGeometry] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused form, out of place: returns ``(lambda * strength * s B' u, lambda)`` in float32; add it to a
    layer whose weight already holds ``W0 + s B A``. Same layouts as :func:`lord_delta_plain`. The gate
    scales the rank-r code, ``B' (lambda u)``, so only one full-size tensor is made."""
    u, lead = _code(x, f.down, geometry)
    lam = _gate_or_forced(lambda: gate_mlp(u, f.gate_w1, f.gate_b1, f.gate_w2, f.gate_b2, activation), u, gate_mode)
    extra = F.linear(u * lam, f.defense_up.float())
    return _rows_to_layout(extra, lead, f.is_conv), _rows_to_layout(lam, lead, f.is_conv)


_INPLACE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": lambda h: F.silu(h, inplace=True),
    "gelu": torch.ops.aten.gelu_,
    "relu": torch.relu_,
}


class Workspace:
    """Scratch matrices reused by :func:`add_fused_defense` across calls, so the no-grad hot path allocates
    nothing once warm: for each row count (tokens x batch) and adapter size, one ``u`` ``[N, r]``, gate
    hidden ``[N, hidden]`` and ``lambda`` ``[N, 1]`` (float32) per device and inference mode, shared by
    every target of that size. Only sequential use is safe (one forward at a time, as ComfyUI samples)."""

    def __init__(self):
        self._rows: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def rows(self, n: int, rank: int, hidden: int, device: torch.device, gates: int = 1,
             owner=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(u [n, rank], hidden [n, hidden], lambda [n, gates])`` float32 buffers; ``owner`` keeps a
        caller's buffers apart from everyone else's (a group's codes must survive other targets' calls)."""
        key = (n, rank, hidden, gates, owner, device, torch.is_inference_mode_enabled())
        bufs = self._rows.get(key)
        if bufs is None:
            bufs = self._rows[key] = tuple(torch.empty((n, c), device=device) for c in (rank, hidden, gates))
        return bufs

    def clear(self) -> None:
        self._rows.clear()


class FusedGroup:
    """Fused LoRDs of Linear targets that read the same input (a self-attention's ``to_q``, ``to_k``,
    ``to_v``): one down projection ``[A_1; ...; A_G]`` and one block-diagonal gate compute every member's
    gated code in a handful of ops (:func:`gated_group_codes`); each member then adds its own
    ``B'_i (lambda_i u_i)``. Members share ``d_in``, rank and gate width (:meth:`fits`)."""

    def __init__(self, members: Sequence[FusedLoRD]):
        self.members = list(members)
        self.rank = int(members[0].down.shape[0])
        self.down_t = torch.cat([m.down.t() for m in members], dim=1).contiguous()  # [d_in, G r], members' dtype
        self.gate_w1_t = torch.block_diag(*[m.gate_w1_t for m in members])  # [G r, G hidden]
        self.gate_b1 = torch.cat([m.gate_b1 for m in members])
        self.gate_w2_t = torch.block_diag(*[m.gate_w2_t for m in members])  # [G hidden, G]
        self.gate_b2 = torch.cat([m.gate_b2 for m in members])

    @staticmethod
    def fits(members: Sequence[FusedLoRD]) -> bool:
        first = members[0]
        return len(members) > 1 and all(
            not m.is_conv and m.down.shape == first.down.shape and m.down.dtype == first.down.dtype
            and m.gate_w1.shape == first.gate_w1.shape for m in members)


def gated_group_codes(x: torch.Tensor, g: FusedGroup, activation: str, workspace: Workspace,
                      owner=None) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad: every member's gated code ``lambda_i u_i`` as columns ``[i r, (i + 1) r)`` of ``[N, G r]``
    and the gates ``[N, G]``, both float32 workspace buffers of ``owner`` (valid until its next call)."""
    x2 = x.reshape(-1, x.shape[-1])
    n, members = x2.shape[0], len(g.members)
    u, hidden, lam = workspace.rows(n, members * g.rank, g.gate_w1_t.shape[1], x.device, members, owner)
    if x2.dtype is _F32 and g.down_t.dtype is _F32:
        torch.mm(x2, g.down_t, out=u)
    else:
        u.copy_(torch.mm(x2.to(g.down_t.dtype), g.down_t))
    torch.addmm(g.gate_b1, u, g.gate_w1_t, out=hidden)
    _INPLACE_ACTIVATIONS[activation](hidden)
    torch.addmm(g.gate_b2, hidden, g.gate_w2_t, out=lam).sigmoid_()
    u.view(n, members, g.rank).mul_(lam.unsqueeze(2))
    return u, lam


def add_gated_code_(output: torch.Tensor, code: torch.Tensor, f: FusedLoRD) -> torch.Tensor:
    """No-grad, in place: ``output += B'_folded code`` for a Linear target (``code`` ``[N, r]`` float32)."""
    out2 = output.view(-1, output.shape[-1])
    if output.dtype is _F32:
        out2.addmm_(code, f.defense_up_t)
    else:
        out2.addmm_(code.to(output.dtype), f.defense_up_t.to(output.dtype))
    return output


def add_fused_defense(output: torch.Tensor, x: torch.Tensor, f: FusedLoRD, activation: str = "silu",
                      geometry: Optional[ConvGeometry] = None,
                      workspace: Optional[Workspace] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``output + lambda * strength * s B' (A x)`` for a layer whose weight holds ``W0 + s B A``, with the
    learned gate; returns ``(new output, lambda rows [N, 1] float32)`` (:func:`gate_rows_to_layout`
    gives the layer layout).

    With gradients off (sampling) and a ``workspace``, the sum is written **into** ``output`` (one
    ``addmm_`` / ``baddbmm_`` of the gated rank-r code) and, for a float32 Linear target, every
    intermediate (``u``, the gate's hidden layer, ``lambda``) lives in ``workspace``: such a call
    allocates nothing once warm (Conv2d and half-precision targets still make rank-r sized temporaries).
    ``lambda`` then is a workspace view, valid until the next call: copy it to keep it. With gradients
    on, the same arithmetic runs out of place (autograd-safe).
    """
    if workspace is None or torch.is_grad_enabled() or not output.is_contiguous():
        u, _ = _code(x, f.down, geometry)
        lam = gate_mlp(u, f.gate_w1, f.gate_b1, f.gate_w2, f.gate_b2, activation)
        return _add_rows(output, u * lam, f.defense_up, f.is_conv), lam
    fp32 = f.down_t is not None and x.dtype is _F32 and output.dtype is _F32  # Linear, float32 throughout
    if fp32:
        x2 = x.reshape(-1, x.shape[-1])
        u, hidden, lam = workspace.rows(x2.shape[0], f.down_t.shape[1], f.gate_w1_t.shape[1], x.device)
        torch.mm(x2, f.down_t, out=u)
    else:
        u, _ = _code(x, f.down, geometry)  # [N, r] float32: rank-r temporaries only
        _, hidden, lam = workspace.rows(u.shape[0], u.shape[1], f.gate_w1_t.shape[1], u.device)
    torch.addmm(f.gate_b1, u, f.gate_w1_t, out=hidden)
    _INPLACE_ACTIVATIONS[activation](hidden)
    torch.addmm(f.gate_b2, hidden, f.gate_w2_t, out=lam).sigmoid_()
    code = u.mul_(lam)
    if fp32:
        output.view(-1, output.shape[-1]).addmm_(code, f.defense_up_t)
        return output, lam
    code = code.to(output.dtype)
    up_t = f.defense_up_t.to(output.dtype)
    if f.is_conv:
        b, d_out = output.shape[:2]
        output.view(b, d_out, -1).baddbmm_(up_t.t().expand(b, -1, -1), code.view(b, -1, code.shape[1]).transpose(1, 2))
    else:
        output.view(-1, output.shape[-1]).addmm_(code, up_t)
    return output, lam


def tensor_version(x: torch.Tensor) -> Optional[int]:
    """Autograd's in-place edit counter, None for inference tensors (which have none)."""
    return None if x.is_inference() else x._version


class ContextCache:
    """The defense branch of text-fed targets (cross-attention ``to_k`` / ``to_v``), per context tensor.

    The text context does not change between sampling steps (cond and uncond are two contexts), so the
    gated defense output of a layer fed by it is the same at every step. :meth:`entry` finds the cache
    entry of a context: by identity (the same tensor object at the same version, as every cross-attention
    layer of one step sees) or else by value (``torch.equal`` with a stored copy: ComfyUI concatenates
    cond and uncond anew each step), so each new context object costs one comparison (one device sync on
    a GPU) per step. Inference tensors (ComfyUI samples under ``inference_mode``) have no version
    counter: for them the identity match assumes the context is not edited in place between the layers
    of one forward (ComfyUI's attention patches return new tensors). The ``capacity`` most recently
    used contexts are kept. Entries map a
    target name to ``(delta, lambda rows)``. Only for gradient-free use (sampling).
    """

    def __init__(self, capacity: int = 4):
        self.capacity = capacity  # contexts kept (cond, uncond, and a few more for area / regional prompts)
        self._entries: list[dict] = []  # most recent first: {"key", "obj", "version", "deltas"}

    def entry(self, x: torch.Tensor) -> dict:
        version = tensor_version(x)
        for e in self._entries:
            if e["obj"] is x and e["version"] == version:
                return e
        for i, e in enumerate(self._entries):
            k = e["key"]
            if k.shape == x.shape and k.dtype == x.dtype and k.device == x.device and torch.equal(k, x):
                e["obj"], e["version"] = x, version
                self._entries.insert(0, self._entries.pop(i))
                return e
        e = {"key": x.clone(), "obj": x, "version": version, "deltas": {}}
        self._entries.insert(0, e)
        del self._entries[self.capacity:]
        return e

    def clear(self) -> None:
        self._entries.clear()
