"""Apply a LoRD file to a ComfyUI MODEL (``ModelPatcher``) without mutating it.

``apply_lord`` returns a clone that carries

* for the **fused** form: the static clean branch ``s B A`` as an ordinary LoRA weight patch
  (built and applied by ComfyUI's own LoRA loader, so it composes with stock LoRAs and lowvram
  loading), plus forward hooks adding ``lambda * s B' A x`` (gate learned) -- with a forced gate
  the whole LoRD is a static patch and no hook is registered;
* for the **plain** form: forward hooks computing the whole LoRD delta (reference / training).

Hooks are registered through a keyed ``PatcherInjection``: ``inject`` resolves the target modules
from ``patcher.model`` when ComfyUI loads the model, ``eject`` removes them; both are idempotent.
LoRD tensors live on the injection object (float32), never in ``model_options``.
"""
from __future__ import annotations

import contextlib
import re
import uuid
import weakref
from typing import Optional

import torch

from ..datasets import model_fingerprint
from ..format import LoRDFile, check_against_model, kohya_state_dict
from ..fused import (ContextCache, FusedGroup, FusedLoRD, Workspace, add_fused_defense, add_gated_code_, fused_gate,
                     gate_rows_to_layout, gated_group_codes, tensor_version)
from ..keys import CONTEXT_FED, unet_name_map
from ..layer import GATE_MODES, ConvGeometry, LoRDWeights, lord_delta_plain

INJECTION_PREFIX = "lord:"
# targets that read the same input tensor in ComfyUI's CrossAttention: a self-attention's q, k and v
SAME_INPUT = re.compile(r"^(?P<block>.*_attn1)_to_(q|k|v)$")
IMPLEMENTATIONS = ("fused", "plain")


def model_family(model_patcher) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` / ``sdxl_refiner``, else the config class name in lower case."""
    import comfy.supported_models as sm

    cfg = model_patcher.model.model_config
    for cls_name, family in (("SDXLRefiner", "sdxl_refiner"), ("SDXL", "sdxl"), ("SD20", "sd2"), ("SD15", "sd1")):
        cls = getattr(sm, cls_name, None)
        if cls is not None and isinstance(cfg, cls):
            return family
    return type(cfg).__name__.lower()


def prediction_type(model_patcher) -> str:
    """The MODEL's training target from its (possibly patched) ``model_sampling``: ``"eps"``,
    ``"v"`` (SD 2.x 768-v, or any model put on v by ComfyUI's ModelSamplingDiscrete node) or
    ``"x0"``; the native loss weighting of :func:`lord_ops.diffusion.denoising_loss`.

    Raises ``ValueError`` for samplings the pack's DDPM-timestep gradient paths do not handle
    (EDM, flow/CONST, ...).
    """
    import comfy.model_sampling as ms

    sampling = model_patcher.get_model_object("model_sampling")
    # order matters: EDM derives from V_PREDICTION, V_PREDICTION and X0 from EPS
    supported = isinstance(sampling, ms.ModelSamplingDiscrete) and not isinstance(sampling, (ms.EDM, ms.IMG_TO_IMG))
    for cls, name in ((ms.V_PREDICTION, "v"), (ms.X0, "x0"), (ms.EPS, "eps")):
        if supported and isinstance(sampling, cls):
            return name
    raise ValueError(f"the MODEL's sampling ({type(sampling).__name__}) is not a discrete eps/v/x0 schedule; "
                     "training and attacks need an SD1.x/SD2.x/SDXL-style model (use one, or remove a "
                     "ModelSampling node that changed it).")


def unet_names(model_patcher) -> dict[str, str]:
    """``{kohya name: module path inside diffusion_model}`` for this MODEL (ComfyUI's own key map)."""
    import comfy.lora

    return unet_name_map(comfy.lora.model_lora_keys_unet(model_patcher.model, {}))


def module_at(model_patcher, path: str) -> torch.nn.Module:
    """The module at ``path`` (a module path inside ``diffusion_model``, see :func:`unet_names`)."""
    import comfy.utils

    return comfy.utils.get_attr(model_patcher.model.diffusion_model, path)


def target_modules(model_patcher, names) -> dict[str, torch.nn.Module]:
    """``{kohya name: module}`` of this MODEL's UNet for the given kohya target names."""
    paths = unet_names(model_patcher)
    return {n: module_at(model_patcher, paths[n]) for n in names}


def layer_shape(module: torch.nn.Module) -> tuple[int, int, Optional[tuple]]:
    """``(in_features, out_features, kernel_size or None)`` of a Linear or Conv2d target layer."""
    kernel = tuple(module.kernel_size) if isinstance(module, torch.nn.Conv2d) else None
    if kernel:
        return module.in_channels, module.out_channels, kernel
    return module.in_features, module.out_features, None


def target_shapes(model_patcher, names) -> dict[str, tuple[int, int, Optional[tuple]]]:
    """:func:`layer_shape` of each named target of this MODEL's UNet (what adapters are created from)."""
    return {n: layer_shape(m) for n, m in target_modules(model_patcher, names).items()}


def unet_weight_shapes(model_patcher, names: dict[str, str]) -> dict[str, tuple]:
    return {n: tuple(module_at(model_patcher, p).weight.shape) for n, p in names.items()}


def lora_weight_shapes(model_patcher) -> dict[str, tuple]:
    """``{LoRA key prefix: weight shape}`` for every prefix ComfyUI's LoRA loader maps onto this
    MODEL's UNet (kohya, diffusers, ... names: ComfyUI's own key map)."""
    import comfy.lora

    shapes = {k: tuple(v.shape) for k, v in model_patcher.model.state_dict().items()}
    out = {}
    for prefix, target in comfy.lora.model_lora_keys_unet(model_patcher.model, {}).items():
        if isinstance(target, str) and target in shapes:  # tuples: slices of fused weights, not checked
            out[prefix] = shapes[target]
    return out


def load_lora_for_model(model_patcher, path) -> dict[str, torch.Tensor]:
    """A LoRA file's state dict, validated as a file (:func:`lord_ops.format.load_lora_file`) and
    against this MODEL's layer shapes; raises :class:`lord_ops.safetensors_file.LoRDFileError` naming the
    file, the key and the fix."""
    from ..format import check_lora_against_model, load_lora_file, lora_pairs

    sd, pairs = load_lora_file(path)
    shapes_of = sd
    try:  # stock loaders rename some formats (Flux/Wan/...) before mapping keys: check what they apply
        import comfy.lora_convert

        converted = comfy.lora_convert.convert_lora(dict(sd))
        if set(converted) != set(sd):
            shapes_of, pairs = converted, lora_pairs(path, converted)
    except ImportError:
        pass
    check_lora_against_model(path, shapes_of, pairs, lora_weight_shapes(model_patcher))
    return sd


class LoRDInjection:
    """Forward hooks for one applied LoRD file. Shared by clones of the patcher that made it."""

    def __init__(self, lord: LoRDFile, modules: dict[str, str], implementation: str, gate_mode: str,
                 strength: float, recorder: Optional[list] = None):
        self.lord = lord
        self.modules = modules
        self.implementation = implementation
        self.gate_mode = gate_mode
        self.strength = float(strength)
        self.recorder = recorder
        self.spatial = {n for n in modules if not CONTEXT_FED.search(n)}
        # context_gate "off": the gates of text-fed layers are forced to 0 (format.py, "context_gate")
        self.gate_off = set(modules) - self.spatial if getattr(lord, "context_gate", "learned") == "off" else set()
        # Normal (not inference-mode) float32 copies: Load LoRD runs under the server's
        # inference_mode, and gradients through the hooks (Stage-2 training, attacks on a defended
        # model) need tensors autograd may save.
        with torch.inference_mode(False):
            weights = {n: LoRDWeights(**{k: v.detach().float().clone() for k, v in w.tensors().items()}, alpha=w.alpha)
                       for n, w in lord.targets.items()}
            if implementation == "fused":  # strength and scale folded into B' once, here
                self._runtime = {n: FusedLoRD.from_weights(w, strength) for n, w in weights.items()}
            else:
                self._runtime = weights
        self._on_device: dict[tuple, object] = {}
        # fused, learned gate: same-input targets computed together (name -> (group, index)); see hook_for
        self._groups: dict[str, tuple[tuple[str, ...], int]] = {}
        if implementation == "fused" and gate_mode == "learned":
            blocks: dict[str, list[str]] = {}
            for n in sorted(self._runtime):
                m = SAME_INPUT.match(n)
                if m and n not in self.gate_off:
                    blocks.setdefault(m["block"], []).append(n)
            for members in blocks.values():
                if FusedGroup.fits([self._runtime[n] for n in members]):
                    self._groups.update({n: (tuple(members), i) for i, n in enumerate(members)})
        self._group_state: dict[tuple[str, ...], dict] = {}
        self._workspace = Workspace()
        self._contexts = ContextCache()
        self._handles: dict[int, list] = {}

    @property
    def needs_hooks(self) -> bool:
        """Fused + forced gate is a pure weight patch, unless gates are being recorded."""
        return self.implementation == "plain" or self.gate_mode == "learned" or self.recorder is not None

    def with_recorder(self, recorder: list) -> "LoRDInjection":
        """A copy that appends ``(name, lambda)`` for every hooked call (used by LoRD Detect)."""
        twin = LoRDInjection.__new__(LoRDInjection)
        twin.__dict__.update(self.__dict__)
        twin.recorder, twin._handles = recorder, {}
        return twin

    def runtime_on(self, name: str, device: torch.device, dtype: torch.dtype = torch.float32):
        """The adapter's run-time tensors on ``device``, copied there on first use (fused: projections
        in ``dtype``, the activations' dtype; gate float32. Plain: all float32).

        These copies are not counted by ComfyUI's memory management (they are small: the LoRD
        adapters, not the base weights), so they live only while the hooks are injected:
        :meth:`eject` -- which ComfyUI calls whenever it unpatches, detaches, partially unloads or
        re-patches the model -- drops them, and the next hooked forward copies them again.
        """
        key = (name, device, dtype)
        rt = self._on_device.get(key)
        if rt is None:
            rt = self._runtime[name]
            rt = self._on_device[key] = rt.to(device, dtype) if isinstance(rt, FusedLoRD) else rt.to(device)
        return rt

    def group_on(self, members: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> FusedGroup:
        """The :class:`FusedGroup` of ``members`` on ``device`` (released with the per-device copies)."""
        key = (members, device, dtype)
        g = self._on_device.get(key)
        if g is None:
            g = self._on_device[key] = FusedGroup([self.runtime_on(n, device, dtype) for n in members])
        return g

    def hook_for(self, name: str, geometry: Optional[ConvGeometry]):
        """The forward hook of target ``name``: adds ``strength * delta`` to the layer's output (and
        records the gate when a recorder is set).

        Fused with the learned gate, the hook adds only the gated defense branch: sampling (gradients
        off) writes it into the layer's output in place through the shared :class:`Workspace`, so a
        Linear target allocates nothing per step; with gradients on it runs out of place.
        """
        activation = self.lord.gate_activation
        recorder = self.recorder
        gate_off = name in self.gate_off
        if self.implementation == "fused":
            adds = self.gate_mode == "learned" and not gate_off  # forced gates live in the weight patch
            text_fed = name not in self.spatial
            members, index = self._groups.get(name, (None, 0))
            rank = self._runtime[name].down.shape[0]

            def hook(module, args, output):
                x = args[0]
                rt = self.runtime_on(name, x.device, x.dtype)
                if adds:
                    if members is not None and not torch.is_grad_enabled() and output.is_contiguous():
                        # q, k, v read the same x: the first of them computes all gated codes (one
                        # projection, one block-diagonal gate), the others reuse them for this same x
                        state = self._group_state.setdefault(members, {})
                        ref = state.get("x")
                        if ref is None or ref() is not x or state["version"] != tensor_version(x):
                            code, lam = gated_group_codes(x, self.group_on(members, x.device, x.dtype), activation,
                                                          self._workspace, owner=members)
                            state.update(x=weakref.ref(x), version=tensor_version(x), code=code, lam=lam)
                        output = add_gated_code_(output, state["code"][:, index * rank:(index + 1) * rank], rt)
                        lam = state["lam"][:, index:index + 1]
                    elif text_fed and not torch.is_grad_enabled() and output.is_contiguous():
                        # the same text context every step: its defense output is computed once
                        cached = self._contexts.entry(x)["deltas"]
                        hit = cached.get(name)
                        if hit is None:
                            delta, lam = add_fused_defense(torch.zeros_like(output), x, rt, activation, geometry,
                                                           self._workspace)
                            hit = cached[name] = (delta, lam.clone())
                        output.add_(hit[0])
                        lam = hit[1]
                    else:
                        output, lam = add_fused_defense(output, x, rt, activation, geometry, self._workspace)
                    if recorder is not None:
                        recorder.append((name, gate_rows_to_layout(lam, output, rt.is_conv).clone()))
                    return output
                if recorder is not None:  # a recorder always sees the learned gate (0 where gated off)
                    lam = fused_gate(x, rt, activation, geometry)
                    recorder.append((name, torch.zeros_like(lam) if gate_off else lam))
                return output

            return hook

        def hook(module, args, output):
            x = args[0]
            rt = self.runtime_on(name, x.device)
            extra, lam = lord_delta_plain(x, rt, activation, "clean" if gate_off else self.gate_mode, geometry)
            if recorder is not None:
                if self.gate_mode != "learned":  # a recorder always sees the learned gate
                    _, lam = lord_delta_plain(x, rt, activation, "learned", geometry)
                # detached unless the recorder differentiates through the gate (a gate-evasion attack)
                recorder.append((name, lam if getattr(recorder, "keeps_graph", False) else lam.detach()))
            return output + (self.strength * extra).to(output.dtype)

        return hook

    def inject(self, patcher) -> None:
        key = id(patcher.model)
        if key in self._handles or not self.needs_hooks:
            return
        handles = []
        for name, path in self.modules.items():
            module = module_at(patcher, path)
            geometry = ConvGeometry.of(module) if isinstance(module, torch.nn.Conv2d) else None
            handles.append(module.register_forward_hook(self.hook_for(name, geometry)))
        self._handles[key] = handles

    def eject(self, patcher) -> None:
        for h in self._handles.pop(id(patcher.model), []):
            h.remove()
        self.release_device_copies()

    def release_device_copies(self) -> None:
        """Forget the per-device copies made by :meth:`runtime_on` (kept: the float32 originals).

        The dict is shared with :meth:`with_recorder` twins, so their copies go too; every copy
        is rebuilt on demand."""
        self._on_device.clear()
        self._workspace.clear()
        self._contexts.clear()
        self._group_state.clear()


def _static_lora_state_dict(lord: LoRDFile, gate_mode: str) -> dict[str, torch.Tensor]:
    """The static part of a fused LoRD as a kohya LoRA state dict with ``s`` folded into ``up``.

    Gate learned or clean: ``s B A``. Gate defense: ``s (B + B') A`` (rank 2r: ``[B | B'] [A; A]``).
    """
    layers = {}
    for name, w in lord.targets.items():
        up = w.scale * w.up.float()
        down = w.down.float()
        if gate_mode == "defense" and not (lord.context_gate == "off" and CONTEXT_FED.search(name)):
            up = torch.cat([up, w.scale * w.up_defense.float()], dim=1)
            down = torch.cat([down, down], dim=0)
        layers[name] = (down, up, None)  # s folded into up: no alpha key (scale 1)
    return kohya_state_dict(layers)


def apply_lord(model_patcher, lord: LoRDFile, strength: float = 1.0, gate_mode: str = "learned",
               implementation: str = "fused", defense_strength: float = 1.0):
    """Return a clone of ``model_patcher`` with ``lord`` applied; the input is never modified.

    ``strength`` scales the whole LoRD delta (both branches); ``defense_strength`` scales the defense
    branch ``B'`` alone (0: the gate still runs but adds nothing); the gate always reads the unscaled
    clean branch. Raises :class:`lord_ops.safetensors_file.LoRDFileError` when the file does not fit.
    """
    import comfy.lora

    if gate_mode not in GATE_MODES:
        raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    lord = lord.with_defense_strength(defense_strength)
    names = unet_names(model_patcher)
    present = {n: names[n] for n in lord.targets if n in names}
    check_against_model(lord, model_family(model_patcher), unet_weight_shapes(model_patcher, present))
    modules = {n: names[n] for n in sorted(lord.targets)}

    patched = model_patcher.clone()
    if strength == 0:
        return patched
    if implementation == "fused":
        key_map = {n: f"diffusion_model.{p}.weight" for n, p in modules.items()}
        patches = comfy.lora.load_lora(_static_lora_state_dict(lord, gate_mode), key_map, log_missing=True)
        patched.add_patches(patches, strength)
    injection = LoRDInjection(lord, modules, implementation, gate_mode, strength)
    patched.set_injections(f"{INJECTION_PREFIX}{uuid.uuid4().hex[:12]}", [injection])
    return patched


def lord_injections(model_patcher) -> list[tuple[str, LoRDInjection]]:
    """The LoRD injections a MODEL carries, in application order."""
    return [(k, inj) for k, injs in model_patcher.injections.items() if k.startswith(INJECTION_PREFIX)
            for inj in injs if isinstance(inj, LoRDInjection)]


@contextlib.contextmanager
def recording_gates(model_patcher, records=None):
    """Yield ``(clone, records)``: a clone whose LoRD hooks append ``(name, lambda)`` to ``records``
    (a new list, or any object with ``append``; one whose ``keeps_graph`` is true gets the gates
    with their autograd graph).

    Raises ``ValueError`` when the MODEL carries no LoRD.
    """
    found = lord_injections(model_patcher)
    if not found:
        raise ValueError("the MODEL has no LoRD applied: connect it through a Load LoRD node first.")
    records = [] if records is None else records
    clone = model_patcher.clone()
    for key, inj in found:
        clone.set_injections(key, [inj.with_recorder(records)])
    try:
        yield clone, records
    finally:
        clone.eject_model()


def init_lord_for_model(model_patcher, preset: str = "attn", rank: int = 4, alpha: Optional[float] = None,
                        gate_hidden: int = 32, gate_activation: str = "silu", seed: int = 0,
                        random_up: float = 0.0, provenance: Optional[dict] = None) -> LoRDFile:
    """New LoRD weights for every target of ``preset`` in this MODEL (see ``layer.init_lord_weights``)."""
    from ..keys import select_targets
    from ..layer import init_lord_weights

    names = unet_names(model_patcher)
    targets = select_targets(names, preset)
    if not targets:
        raise ValueError(f"the MODEL has no layer matching target preset {preset!r}")
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (d_in, d_out, kernel) in target_shapes(model_patcher, targets).items():
        weights[name] = init_lord_weights(d_in, d_out, rank, alpha, gate_hidden, kernel, g, random_up)
    return LoRDFile(weights, gate_activation, model_family(model_patcher), dict(provenance or {}))


def weights_fingerprint(model_patcher, vae=None) -> str:
    """Identity of the UNet weights (+ VAE when given) and the number of weight patches on the MODEL."""
    state = dict(model_patcher.model.diffusion_model.state_dict())
    if vae is not None:
        state.update({f"vae.{k}": v for k, v in vae.first_stage_model.state_dict().items()})
    patches = sorted(model_patcher.patches.keys()) if getattr(model_patcher, "patches", None) else []
    return model_fingerprint(state) + f":{len(patches)}"


def lord_fingerprint(model_patcher) -> str:
    """Identity of the LoRDs applied to a MODEL (weights, strength, gate mode, implementation)."""
    parts = [f"{model_fingerprint(inj.lord.state_dict())}:{inj.strength}:{inj.gate_mode}:{inj.implementation}"
             for _, inj in lord_injections(model_patcher)]
    return ";".join(parts) or "none"
