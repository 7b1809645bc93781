"""LoRD file format v1 and the kohya LoRA writer. The one owner of on-disk layouts.

A LoRD file is a safetensors file (never a pickle). Tensor keys use kohya names derived from
diffusers block names (the same names Stage-2 LoRA files use, see :mod:`lord_ops.keys`)::

    <name>.lord_down.weight          A   [r, d_in] | [r, d_in, kh, kw]
    <name>.lord_up.weight            B   [d_out, r] | [d_out, r, 1, 1]
    <name>.lord_up_defense.weight    B'  same shape as B
    <name>.lord_gate.0.weight        W1  [hidden, d_out]
    <name>.lord_gate.0.bias          b1  [hidden]
    <name>.lord_gate.2.weight        W2  [1, hidden]
    <name>.lord_gate.2.bias          b2  [1]
    <name>.alpha                     scalar (scale = alpha / r)

e.g. ``<name>`` = ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``.
Tensors are float32, float16 or bfloat16 and must be finite.

Metadata (safetensors string map):

=====================  ======================================================================
``format``             ``"lord"``
``format_version``     ``"1"``
``lord_form``          ``"additive_gate_on_lora_output"``: h = W0 x + v + lambda s B' A x,
                       v = s B A x, lambda = sigmoid(g(v)) per feature
``rank``               int, ``alpha``: float, ``gate_hidden``: int, ``gate_activation``: silu|gelu|relu
``targets``            JSON list of ``<name>``
``base_family``        ``sd1`` | ``sd2`` | ``sdxl`` | ...
``provenance``         JSON object (how the file was made: tool, version, seed, training...)
``context_gate``       optional. ``"off"``: the gates of text-fed layers (cross-attention
                       ``to_k``/``to_v``) are forced to 0 and their ``B'`` is 0 (files trained by
                       this pack now); absent or ``"learned"``: the gate MLP runs there too
                       (older files, kept as they were trained). A v1 reader that ignores the key
                       computes the same output for an ``"off"`` file, since ``B'`` is 0 there.
=====================  ======================================================================

Stage-2 LoRA files are plain kohya LoRAs (``<name>.lora_down.weight``, ``.lora_up.weight``,
``.alpha``) that stock loaders read. A LoRA given to Load LoRD is validated like a LoRD file
(:func:`load_lora_file`, :func:`check_lora_against_model`): the same container checks, finite
values, complete low-rank pairs, shapes that fit the MODEL; whatever stock loaders accept besides
(text-encoder layers, ``dora_scale``, other network types, extra keys) is accepted.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping, Optional

import torch

from .layer import GATE_ACTIVATIONS, LoRDWeights
from .safetensors_file import LoRDFileError, read_safetensors_header

FORMAT_NAME = "lord"
FORMAT_VERSION = "1"
LORD_FORM = "additive_gate_on_lora_output"
CONTEXT_GATE_OFF, CONTEXT_GATE_LEARNED = "off", "learned"

# file suffix -> LoRDWeights field
SUFFIX_TO_FIELD = {
    "lord_down.weight": "down",
    "lord_up.weight": "up",
    "lord_up_defense.weight": "up_defense",
    "lord_gate.0.weight": "gate_w1",
    "lord_gate.0.bias": "gate_b1",
    "lord_gate.2.weight": "gate_w2",
    "lord_gate.2.bias": "gate_b2",
}
FIELD_TO_SUFFIX = {v: k for k, v in SUFFIX_TO_FIELD.items()}
ALLOWED_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


@dataclasses.dataclass
class LoRDFile:
    """A LoRD adapter set: one :class:`LoRDWeights` per target name, plus settings."""

    targets: dict[str, LoRDWeights]
    gate_activation: str = "silu"
    base_family: str = "sd1"
    provenance: dict = dataclasses.field(default_factory=dict)
    path: Optional[str] = None
    context_gate: str = CONTEXT_GATE_LEARNED  # "off": gates of text-fed layers forced to 0 (see the table above)

    @property
    def rank(self) -> int:
        return next(iter(self.targets.values())).rank

    @property
    def alpha(self) -> float:
        return next(iter(self.targets.values())).alpha

    @property
    def gate_hidden(self) -> int:
        return next(iter(self.targets.values())).gate_hidden

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "lord_form": LORD_FORM,
            "rank": str(self.rank),
            "alpha": repr(float(self.alpha)),
            "gate_hidden": str(self.gate_hidden),
            "gate_activation": self.gate_activation,
            "targets": json.dumps(sorted(self.targets)),
            "base_family": self.base_family,
            "provenance": json.dumps(self.provenance, sort_keys=True),
            **({"context_gate": self.context_gate} if self.context_gate != CONTEXT_GATE_LEARNED else {}),
        }

    def with_defense_strength(self, strength: float) -> "LoRDFile":
        """A copy whose defense branch ``B'`` is scaled by ``strength`` alone (``B``, ``A`` and the gate
        unchanged; the gate reads the clean branch, so it is unchanged too). 1 returns ``self``."""
        if strength == 1:
            return self
        targets = {n: dataclasses.replace(w, up_defense=w.up_defense * float(strength)) for n, w in self.targets.items()}
        return dataclasses.replace(self, targets=targets)

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for name, w in self.targets.items():
            for field, t in w.tensors().items():
                sd[f"{name}.{FIELD_TO_SUFFIX[field]}"] = t.detach().contiguous().cpu()
            sd[f"{name}.alpha"] = torch.tensor(float(w.alpha))
        return sd


# ----------------------------------------------------------------------------------------------
# Reading


def _load_tensors(path, kind: str = "LoRD file") -> dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise LoRDFileError(path, f"safetensors could not read the file ({exc}).", "Re-download or re-create it.",
                            kind=kind) from None


def _meta_int(path, meta, key, minimum=1) -> int:
    try:
        value = int(meta[key])
    except (KeyError, ValueError):
        raise LoRDFileError(path, f"metadata '{key}' is missing or not an integer.", "Re-create the file with this pack.") from None
    if value < minimum:
        raise LoRDFileError(path, f"metadata '{key}' must be >= {minimum}, got {value}.", "Re-create the file with this pack.")
    return value


def load_lord_file(path) -> LoRDFile:
    """Read and fully validate a LoRD v1 file (container, metadata, keys, shapes, dtypes, values)."""
    path = Path(path)
    _, meta = read_safetensors_header(path)
    if meta.get("format") != FORMAT_NAME:
        hint = ("It looks like an ordinary LoRA: load it with the stock LoraLoader or the LoRA input of Load LoRD."
                if meta.get("format") is None else "")
        raise LoRDFileError(path, f"metadata 'format' is {meta.get('format')!r}, expected 'lord'; this is not a LoRD file.",
                            hint or "Use a file written by ComfyUI-LoRD.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise LoRDFileError(path, f"format_version {meta.get('format_version')!r} is not supported (this pack reads "
                            f"version {FORMAT_VERSION}).", "Update ComfyUI-LoRD or re-create the file.")
    if meta.get("lord_form") != LORD_FORM:
        raise LoRDFileError(path, f"LoRD form {meta.get('lord_form')!r} is unknown (supported: {LORD_FORM!r}).",
                            "Update ComfyUI-LoRD.")
    activation = meta.get("gate_activation", "")
    if activation not in GATE_ACTIVATIONS:
        raise LoRDFileError(path, f"gate_activation {activation!r} is unknown (supported: {sorted(GATE_ACTIVATIONS)}).",
                            "Re-create the file with this pack.")
    rank = _meta_int(path, meta, "rank")
    hidden = _meta_int(path, meta, "gate_hidden")
    try:
        targets = json.loads(meta["targets"])
        assert isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    except Exception:
        raise LoRDFileError(path, "metadata 'targets' is missing or not a non-empty JSON list of names.",
                            "Re-create the file with this pack.") from None
    try:
        provenance = json.loads(meta.get("provenance", "{}"))
    except ValueError:
        raise LoRDFileError(path, "metadata 'provenance' is not valid JSON.", "Re-create the file with this pack.") from None
    family = meta.get("base_family") or ""
    if not family:
        raise LoRDFileError(path, "metadata 'base_family' is missing.", "Re-create the file with this pack.")
    context_gate = meta.get("context_gate", CONTEXT_GATE_LEARNED)
    if context_gate not in (CONTEXT_GATE_OFF, CONTEXT_GATE_LEARNED):
        raise LoRDFileError(path, f"metadata 'context_gate' is {context_gate!r} (supported: 'off', 'learned').",
                            "Update ComfyUI-LoRD or re-create the file.")

    sd = _load_tensors(path)
    expected = {f"{n}.{s}" for n in targets for s in list(SUFFIX_TO_FIELD) + ["alpha"]}
    unexpected = sorted(set(sd) - expected)
    if unexpected:
        raise LoRDFileError(path, f"unexpected key ({len(unexpected)} in all) not listed in metadata 'targets'.",
                            "The file was edited or is damaged; re-create it.", key=unexpected[0])
    missing = sorted(expected - set(sd))
    if missing:
        raise LoRDFileError(path, f"missing key ({len(missing)} in all).", "The file is incomplete; re-create it.", key=missing[0])

    parsed = {}
    for name in targets:
        for suffix in SUFFIX_TO_FIELD:
            t = sd[f"{name}.{suffix}"]
            if t.dtype not in ALLOWED_DTYPES:
                raise LoRDFileError(path, f"dtype {t.dtype} is not allowed.", "Re-save with float32/float16/bfloat16.",
                                    key=f"{name}.{suffix}")
            if not torch.isfinite(t).all():
                raise LoRDFileError(path, "contains NaN or Inf values.", "The file is corrupt (or training diverged); "
                                    "use an earlier checkpoint.", key=f"{name}.{suffix}")
        alpha_t = sd[f"{name}.alpha"]
        if alpha_t.numel() != 1 or not torch.isfinite(alpha_t.float()).all() or float(alpha_t) <= 0:
            raise LoRDFileError(path, "alpha must be one finite positive number.", "Re-create the file.", key=f"{name}.alpha")
        w = LoRDWeights(**{f: sd[f"{name}.{s}"].float() for s, f in SUFFIX_TO_FIELD.items()}, alpha=float(alpha_t))
        _check_target_shapes(path, name, w, rank, hidden)
        parsed[name] = w
    return LoRDFile(parsed, activation, family, provenance, str(path), context_gate)


def _check_target_shapes(path, name: str, w: LoRDWeights, rank: int, hidden: int) -> None:
    def bad(field, problem):
        raise LoRDFileError(path, problem, "The file is damaged or was written for another layout; re-create it.",
                            key=f"{name}.{FIELD_TO_SUFFIX[field]}")

    if w.down.dim() not in (2, 4) or w.down.shape[0] != rank:
        bad("down", f"shape {tuple(w.down.shape)} is not [rank={rank}, d_in] or [rank, d_in, kh, kw].")
    d_out = w.up.shape[0]
    up_shape = (d_out, rank, 1, 1) if w.is_conv else (d_out, rank)
    if tuple(w.up.shape) != up_shape:
        bad("up", f"shape {tuple(w.up.shape)} does not match {up_shape}.")
    if tuple(w.up_defense.shape) != up_shape:
        bad("up_defense", f"shape {tuple(w.up_defense.shape)} does not match lord_up {up_shape}.")
    for field, shape in (("gate_w1", (hidden, d_out)), ("gate_b1", (hidden,)), ("gate_w2", (1, hidden)), ("gate_b2", (1,))):
        if tuple(getattr(w, field).shape) != shape:
            bad(field, f"shape {tuple(getattr(w, field).shape)} does not match {shape} (gate_hidden={hidden}).")


def check_against_model(lord: LoRDFile, model_family: str, weight_shapes: Mapping[str, tuple]) -> None:
    """Check a LoRD file against a model: family and, per target, the base weight shape.

    ``weight_shapes`` maps every kohya name the model has to its weight shape.
    """
    path = lord.path or "<in memory>"
    if lord.base_family != model_family:
        raise LoRDFileError(path, f"made for a '{lord.base_family}' model, but the MODEL is '{model_family}'.",
                            f"Use a LoRD file trained for {model_family} (or load the matching checkpoint).")
    for name, w in lord.targets.items():
        if name not in weight_shapes:
            raise LoRDFileError(path, f"the MODEL has no layer '{name}'.",
                                "The file targets another architecture; use a LoRD made for this checkpoint.",
                                key=f"{name}.lord_down.weight")
        want = tuple(weight_shapes[name])
        if tuple(w.base_weight_shape()) != want:
            raise LoRDFileError(path, f"adapter expects a base weight of shape {w.base_weight_shape()}, the MODEL's "
                                f"layer has {want}.", "Use a LoRD made for this checkpoint's architecture.",
                                key=f"{name}.lord_down.weight")


# ----------------------------------------------------------------------------------------------
# LoRA files (the Stage-2 output, or any LoRA given to Load LoRD)

LORA_KIND = "LoRA file"
# (up, down, mid) key suffixes of the low-rank pairs ComfyUI's LoRA adapter reads (kohya, diffusers,
# PEFT, ...); the prefix before the suffix names the layer. Longest suffixes first.
LORA_PAIR_SUFFIXES = (
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),
    (".lora_B.default.weight", ".lora_A.default.weight", None),
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),
    ("_lora.up.weight", "_lora.down.weight", None),
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_B.weight", ".lora_A.weight", None),
    (".lora_B", ".lora_A", None),
)
# text-encoder layer prefixes (kohya / diffusers): allowed in a LoRA, not applied by Load LoRD
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1_", "te2_", "lora_clip")
_LORA_FIX = "Re-download the LoRA, or re-train / re-save it (Save LoRA (kohya) writes valid files)."


@dataclasses.dataclass(frozen=True)
class LoRAPair:
    """One low-rank pair of a LoRA file: ``W += alpha / rank * up @ (mid) @ down``."""

    prefix: str
    up_key: str
    down_key: str
    mid_key: Optional[str] = None

    def weight_shape(self, sd: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """``(d_out, d_in * kernel elements)``: the flattened shape of the weight this pair patches."""
        up, down = sd[self.up_key], sd[self.down_key]
        if self.mid_key is not None:
            mid = sd[self.mid_key]
            return up.shape[0], down.shape[1] * math.prod(mid.shape[2:])
        return up.shape[0], math.prod(down.shape[1:])


def lora_pairs(path, sd: Mapping[str, torch.Tensor]) -> dict[str, LoRAPair]:
    """The low-rank pairs of a LoRA state dict, ``{prefix: pair}``; every ``up`` needs its ``down``
    and vice versa, with matching ranks. Other keys (alphas, ``dora_scale``, LoHa/LoKr/diff
    tensors of other network types, anything stock loaders ignore) are left alone."""
    pairs: dict[str, LoRAPair] = {}
    for key in sorted(sd):
        for up_sfx, down_sfx, mid_sfx in LORA_PAIR_SUFFIXES:
            for this, other, role in ((up_sfx, down_sfx, "up"), (down_sfx, up_sfx, "down")):
                if not key.endswith(this):
                    continue
                prefix = key[: -len(this)]
                partner = prefix + other
                if partner not in sd:
                    raise LoRDFileError(path, f"this LoRA {role} tensor has no partner '{partner}' (a half of a "
                                        f"low-rank pair cannot be applied; ComfyUI would skip the layer or fail).",
                                        _LORA_FIX, key=key, kind=LORA_KIND)
                if role == "up":
                    mid = prefix + mid_sfx if mid_sfx and prefix + mid_sfx in sd else None
                    pairs[prefix] = LoRAPair(prefix, key, partner, mid)
                break
            else:
                continue
            break
    for prefix, pair in pairs.items():
        up, down = sd[pair.up_key], sd[pair.down_key]
        if up.dim() < 2 or down.dim() < 2:
            bad = pair.up_key if up.dim() < 2 else pair.down_key
            raise LoRDFileError(path, f"shape {tuple(sd[bad].shape)} is not a matrix or conv kernel.", _LORA_FIX,
                                key=bad, kind=LORA_KIND)
        rank_up = math.prod(up.shape[1:])
        if rank_up != down.shape[0]:
            raise LoRDFileError(path, f"rank mismatch: up {tuple(up.shape)} has rank {rank_up}, down "
                                f"{tuple(down.shape)} has {down.shape[0]}.", _LORA_FIX, key=pair.up_key, kind=LORA_KIND)
        if pair.mid_key is not None:
            mid = sd[pair.mid_key]
            if mid.dim() < 3 or tuple(mid.shape[:2]) != (down.shape[0], down.shape[0]):
                raise LoRDFileError(path, f"shape {tuple(mid.shape)} is not [rank, rank, k...] (rank {down.shape[0]}).",
                                    _LORA_FIX, key=pair.mid_key, kind=LORA_KIND)
    return pairs


def load_lora_file(path) -> tuple[dict[str, torch.Tensor], dict[str, LoRAPair]]:
    """Read and validate a LoRA file the way :func:`load_lord_file` validates LoRD files.

    Container checks as for LoRD files (:func:`lord_ops.safetensors_file.read_safetensors_header`:
    pickles, empty, truncated, garbage or overlapping headers); every floating tensor finite; every
    alpha one finite number; every low-rank pair complete with matching ranks (:func:`lora_pairs`).
    Accepted as stock loaders accept them: extra keys, text-encoder layers, ``dora_scale``, other
    network types and other dtypes. Returns ``(state dict, pairs)``; check the pairs against a MODEL
    with :func:`check_lora_against_model`. Raises :class:`LoRDFileError` (file, key, fix).
    """
    read_safetensors_header(path, kind=LORA_KIND, float_only=False)
    sd = _load_tensors(path, kind=LORA_KIND)
    if not sd:
        raise LoRDFileError(path, "the file holds no tensors.", _LORA_FIX, kind=LORA_KIND)
    for key, t in sd.items():
        if t.is_floating_point() and not torch.isfinite(t if t.dtype in ALLOWED_DTYPES else t.float()).all():
            raise LoRDFileError(path, "contains NaN or Inf values (the LoRA would turn every image into NaN).",
                                "The file is corrupt or its training diverged; use an earlier checkpoint or re-train.",
                                key=key, kind=LORA_KIND)
        if key.endswith(".alpha") and t.numel() != 1:
            raise LoRDFileError(path, f"alpha must be one number, got shape {tuple(t.shape)}.", _LORA_FIX,
                                key=key, kind=LORA_KIND)
    return sd, lora_pairs(path, sd)


def check_lora_against_model(path, sd: Mapping[str, torch.Tensor], pairs: Mapping[str, LoRAPair],
                             weight_shapes: Mapping[str, tuple]) -> list[str]:
    """Check a validated LoRA against a MODEL; returns the prefixes that apply to it.

    ``weight_shapes`` maps every LoRA prefix the MODEL accepts (ComfyUI's key map for its UNet) to
    that layer's weight shape. A pair whose layer exists must fit it exactly (``d_out`` and the
    flattened ``d_in``): ComfyUI would otherwise skip the layer with only a log line. Prefixes the
    MODEL does not have are ignored like stock loaders ignore them, unless no UNet pair applies at
    all while the file has UNet pairs (a LoRA for another architecture).
    """
    applied = []
    for prefix, pair in sorted(pairs.items()):
        want = weight_shapes.get(prefix)
        if want is None:
            continue
        if f"{prefix}.reshape_weight" not in sd:
            d_out, d_in = pair.weight_shape(sd)
            want_in = math.prod(want[1:])
            if (d_out, d_in) != (want[0], want_in):
                raise LoRDFileError(path, f"this pair patches a weight of shape [{d_out}, {d_in}] (d_out, d_in x kernel), "
                                    f"the MODEL's layer has {tuple(want)} = [{want[0]}, {want_in}].",
                                    "Use a LoRA trained for this checkpoint's architecture (or re-train it).",
                                    key=pair.up_key, kind=LORA_KIND)
        applied.append(prefix)
    unet_pairs = [p for p in pairs if not p.startswith(TEXT_ENCODER_PREFIXES)]
    if unet_pairs and not applied:
        raise LoRDFileError(path, f"none of its {len(unet_pairs)} UNet layer(s) exists in this MODEL (e.g. "
                            f"'{sorted(unet_pairs)[0]}'): it was made for another architecture.",
                            "Use a LoRA trained for this checkpoint.", kind=LORA_KIND)
    return applied


# ----------------------------------------------------------------------------------------------
# Writing


def atomic_save_safetensors(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write a safetensors file via a temp file in the same folder + ``os.replace``."""
    import safetensors.torch

    from .atomic import atomic_write

    return atomic_write(path, lambda tmp: safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata)))


def save_lord_file(path, lord: LoRDFile, dtype: torch.dtype = torch.float32) -> Path:
    """Validate-then-write a LoRD v1 file atomically."""
    if not lord.targets:
        raise ValueError("a LoRD file needs at least one target")
    if lord.gate_activation not in GATE_ACTIVATIONS:
        raise ValueError(f"gate_activation must be one of {sorted(GATE_ACTIVATIONS)}")
    ranks = {w.rank for w in lord.targets.values()}
    hiddens = {w.gate_hidden for w in lord.targets.values()}
    if len(ranks) != 1 or len(hiddens) != 1:
        raise ValueError(f"all targets must share rank and gate width (got ranks {ranks}, widths {hiddens})")
    for name, w in lord.targets.items():
        _check_target_shapes(path, name, w, w.rank, w.gate_hidden)
        for t in w.tensors().values():
            if not torch.isfinite(t).all():
                raise ValueError(f"refusing to write non-finite values for target {name}")
    sd = {k: (v.to(dtype) if not k.endswith(".alpha") else v.float()) for k, v in lord.state_dict().items()}
    return atomic_save_safetensors(path, sd, lord.metadata())


def kohya_state_dict(layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, Optional[float]]],
                     dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """A kohya LoRA state dict from ``{name: (down [r, d_in(,k,k)], up [d_out, r(,1,1)], alpha)}``:
    ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and ``<name>.alpha`` (left out where alpha is
    None: loaders then use scale 1). ``dtype``: cast the matrices (detached, on the CPU) for a file;
    None keeps the tensors as given."""
    sd = {}
    for name, (down, up, alpha) in layers.items():
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"{name}: rank mismatch between down {tuple(down.shape)} and up {tuple(up.shape)}")
        if dtype is not None:
            down, up = down.detach().cpu().to(dtype), up.detach().cpu().to(dtype)
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def save_kohya_lora(path, layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
                    metadata: Optional[Mapping[str, str]] = None, dtype: torch.dtype = torch.float16) -> Path:
    """Write a standard kohya LoRA: ``{name: (down [r, d_in(,k,k)], up [d_out, r(,1,1)], alpha)}``."""
    sd = kohya_state_dict(layers, dtype)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(next(iter(layers.values()))[0].shape[0])}
    meta.update(metadata or {})
    return atomic_save_safetensors(path, sd, meta)
