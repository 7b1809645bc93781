"""The fused LoRD form: the sampling hot path, in plain torch.

The caller merges the static clean branch ``s B A`` into the base weight as a weight patch (the
ComfyUI glue hands it to ComfyUI's own LoRA loader); at run time only the gated defense branch
``lambda * strength * s B' (A x)`` is computed, with the gate on the rank-r code ``u = A x``
(:class:`FusedLoRD`: ``s W1 B`` and ``strength * s * B'`` folded once, at load).
:func:`add_fused_defense` adds it into the layer output in place with reusable :class:`Workspace`
buffers; a self-attention's ``to_q`` / ``to_k`` / ``to_v`` share one projection and one
block-diagonal gate (:class:`FusedGroup`, :func:`gated_group_codes`, :func:`add_gated_code_`); the
defense output of text-fed layers is cached per context (:class:`ContextCache`).
:func:`lord_defense_fused` and :func:`fused_gate` are the out-of-place forms.

Reference: :func:`lord_ops.layer.lord_delta_plain` (the plain form; layouts and dtypes are
described in :mod:`lord_ops.layer`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .layer import (ConvGeometry, LoRDWeights, add_rows, as_matrix, code_rows, gate_mlp, gate_or_forced,
                    rows_to_layout)

_F32 = torch.float32


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
        up = as_matrix(w.up).float()
        return cls(
            down=w.down.float(),
            gate_w1=w.scale * (w.gate_w1.float() @ up),
            gate_b1=w.gate_b1.float(),
            gate_w2=w.gate_w2.float(),
            gate_b2=w.gate_b2.float(),
            defense_up=(float(strength) * w.scale) * as_matrix(w.up_defense).float(),
            is_conv=w.is_conv,
        )

    def to(self, device, dtype: torch.dtype = torch.float32) -> "FusedLoRD":
        """A copy on ``device``; ``down`` and ``defense_up`` in ``dtype``, the gate in float32."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        moved = {k: (v.to(device=device, dtype=dtype if k in ("down", "defense_up") else torch.float32)
                     if isinstance(v, torch.Tensor) else v) for k, v in fields.items()}
        return FusedLoRD(**moved)


def gate_rows_to_layout(lam: torch.Tensor, output: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """Gate rows ``[N, 1]`` (from :func:`add_fused_defense`) -> the layout of the layer's ``output``."""
    if is_conv:
        b, _, h, w = output.shape
        return lam.reshape(b, h, w, 1).permute(0, 3, 1, 2)
    return lam.reshape(*output.shape[:-1], 1)


def fused_gate(x: torch.Tensor, f: FusedLoRD, activation: str = "silu",
               geometry: Optional[ConvGeometry] = None) -> torch.Tensor:
    """The learned gate alone: ``lambda`` in the output layout (``[..., 1]`` / ``[B, 1, H', W']``)."""
    u, lead = code_rows(x, f.down, geometry)
    return rows_to_layout(gate_mlp(u, f.gate_w1, f.gate_b1, f.gate_w2, f.gate_b2, activation), lead, f.is_conv)


def lord_defense_fused(x: torch.Tensor, f: FusedLoRD, activation: str = "silu", gate_mode: str = "learned",
                       geometry: Optional[ConvGeometry] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused form, out of place: returns ``(lambda * strength * s B' u, lambda)`` in float32; add it to a
    layer whose weight already holds ``W0 + s B A``. Same layouts as
    :func:`lord_ops.layer.lord_delta_plain`. The gate scales the rank-r code, ``B' (lambda u)``, so only
    one full-size tensor is made."""
    u, lead = code_rows(x, f.down, geometry)
    lam = gate_or_forced(lambda: gate_mlp(u, f.gate_w1, f.gate_b1, f.gate_w2, f.gate_b2, activation), u, gate_mode)
    extra = F.linear(u * lam, f.defense_up.float())
    return rows_to_layout(extra, lead, f.is_conv), rows_to_layout(lam, lead, f.is_conv)


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
        u, _ = code_rows(x, f.down, geometry)
        lam = gate_mlp(u, f.gate_w1, f.gate_b1, f.gate_w2, f.gate_b2, activation)
        return add_rows(output, u * lam, f.defense_up, f.is_conv), lam
    fp32 = f.down_t is not None and x.dtype is _F32 and output.dtype is _F32  # Linear, float32 throughout
    if fp32:
        x2 = x.reshape(-1, x.shape[-1])
        u, hidden, lam = workspace.rows(x2.shape[0], f.down_t.shape[1], f.gate_w1_t.shape[1], x.device)
        torch.mm(x2, f.down_t, out=u)
    else:
        u, _ = code_rows(x, f.down, geometry)  # [N, r] float32: rank-r temporaries only
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
