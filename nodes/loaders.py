"""Load LoRD: apply a LoRD file (and optionally the Stage-2 LoRA) to a MODEL (paper Eq. 10)."""
from __future__ import annotations

import os

from comfy_api.latest import io

from ..lord_ops.format import LoRDFile, load_lord_file
from ..lord_ops.layer import GATE_MODES

NO_LORA = "None"
_cache: dict[str, tuple[tuple, LoRDFile]] = {}


def load_lord_cached(path: str) -> LoRDFile:
    """Validated LoRD file, re-read only when the file changes (size or mtime)."""
    st = os.stat(path)
    stamp = (st.st_size, st.st_mtime_ns)
    hit = _cache.get(path)
    if hit and hit[0] == stamp:
        return hit[1]
    lord = load_lord_file(path)
    _cache.clear()
    _cache[path] = (stamp, lord)
    return lord


class LoRDLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="LoRDLoader",
            display_name="Load LoRD",
            category="loaders/LoRD",
            description="Apply a Low-Rank Defense (LoRD) file to a MODEL, optionally together with the "
                        "Stage-2 LoRA trained with it. Returns a patched copy; the input MODEL is unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to defend."),
                io.Combo.Input("lord_name", options=folder_paths.get_filename_list("lord"),
                               tooltip="A LoRD file from models/lord."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scales the whole LoRD delta (clean and defense branch)."),
                io.Combo.Input("gate_mode", options=list(GATE_MODES), default="learned",
                               tooltip="learned: the gate decides per token/pixel; clean: gate forced to 0 "
                                       "(plain LoRA branch only); defense: gate forced to 1 (defense branch fully on)."),
                io.Combo.Input("implementation", options=["fused", "plain"], default="fused",
                               tooltip="fused: clean branch merged into the weights, rank-r gate at run time "
                                       "(fast); plain: the reference computation. Same result."),
                io.Combo.Input("lora_name", options=[NO_LORA] + folder_paths.get_filename_list("loras"),
                               default=NO_LORA, tooltip="Optional Stage-2 LoRA from models/loras, checked like "
                                                        "a LoRD file and applied with ComfyUI's own LoRA loader "
                                                        "(UNet layers only; text-encoder layers are ignored)."),
                io.Float.Input("lora_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the optional LoRA."),
                io.Float.Input("defense_strength", default=1.0, min=0.0, max=10.0, step=0.05, optional=True,
                               tooltip="Scales the defense branch B' alone (1: as trained; 0: the gate still "
                                       "runs but adds nothing, like gate_mode clean). For sweeps of how much "
                                       "of B' to keep at sampling."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A patched copy of the input MODEL with the LoRD "
                                                                     "(and the LoRA) applied.")],
        )

    @classmethod
    def fingerprint_inputs(cls, lord_name, lora_name=NO_LORA, **_):
        """Re-run when a chosen file changes on disk (ComfyUI otherwise caches by file name)."""
        import folder_paths

        def stamp(folder, name):
            path = folder_paths.get_full_path(folder, name) if name and name != NO_LORA else None
            if not path or not os.path.exists(path):
                return None
            st = os.stat(path)
            return (path, st.st_size, st.st_mtime_ns)

        return (stamp("lord", lord_name), stamp("loras", lora_name))

    @classmethod
    def execute(cls, model, lord_name, strength, gate_mode, implementation, lora_name=NO_LORA, lora_strength=1.0,
                defense_strength=1.0):
        import comfy.sd
        import folder_paths

        from ..lord_ops.comfy.patch import apply_lord, load_lora_for_model

        lord_path = folder_paths.get_full_path_or_raise("lord", lord_name)
        patched = apply_lord(model, load_lord_cached(lord_path), strength, gate_mode, implementation,
                             defense_strength=float(defense_strength))
        if lora_name and lora_name != NO_LORA and lora_strength != 0:
            lora_path = folder_paths.get_full_path_or_raise("loras", lora_name)
            # validated like a LoRD file (never a pickle; finite; complete pairs; shapes fit the MODEL)
            lora = load_lora_for_model(patched, lora_path)
            patched, _ = comfy.sd.load_lora_for_models(patched, None, lora, lora_strength, 0)
        return io.NodeOutput(patched)
