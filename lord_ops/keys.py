"""Kohya layer names <-> UNet module paths. The one key map for LoRD and Stage-2 LoRA files.

Names are kohya names derived from diffusers block names (``lora_unet_down_blocks_0_attentions_0_
transformer_blocks_0_attn1_to_q``), which the stock ComfyUI LoraLoader, A1111/Forge and diffusers
all read. The map is built from the one ComfyUI produces (``comfy.lora.model_lora_keys_unet``)
so it always matches the loaded architecture; this module only filters and inverts it.
"""
from __future__ import annotations

import re
from typing import Mapping

KOHYA_UNET_PREFIX = "lora_unet_"
_DIFFUSION_PREFIX = "diffusion_model."

# Target presets over kohya names.
TARGET_PRESETS = {
    # every attention projection of attn1/attn2 in the UNet's transformer blocks (diffusers' LoRA recipe)
    "attn": re.compile(r"attentions_\d+_transformer_blocks_\d+_attn[12]_to_(q|k|v|out_0)$"),
    # the above plus the transformer blocks' proj_in / proj_out (1x1 convs in SD1.x, Linear in SD2/SDXL)
    "attn+proj": re.compile(r"attentions_\d+_(transformer_blocks_\d+_attn[12]_to_(q|k|v|out_0)|proj_in|proj_out)$"),
}

# Cross-attention key/value projections read the text context, not image features.
CONTEXT_FED = re.compile(r"attn2_to_(k|v)$")


def unet_name_map(comfy_key_map: Mapping[str, object]) -> dict[str, str]:
    """``{kohya name: module path inside diffusion_model}`` for every UNet weight.

    ComfyUI's map holds two kohya names for most weights: one from the diffusers block names and
    one from the original (sgm/ldm) module path. The diffusers-derived name wins; weights without
    a diffusers counterpart keep the module-path name.
    """
    by_module: dict[str, str] = {}
    for name, target in comfy_key_map.items():
        if not (name.startswith(KOHYA_UNET_PREFIX) and isinstance(target, str)):
            continue
        if not (target.startswith(_DIFFUSION_PREFIX) and target.endswith(".weight")):
            continue
        module = target[len(_DIFFUSION_PREFIX):-len(".weight")]
        module_style = KOHYA_UNET_PREFIX + module.replace(".", "_")
        if module not in by_module or by_module[module] == module_style:
            by_module[module] = name
    return {name: module for module, name in by_module.items()}


def select_targets(names, preset: str = "attn") -> list[str]:
    """The names matching a target preset, sorted."""
    try:
        pattern = TARGET_PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown target preset {preset!r}; choose one of {sorted(TARGET_PRESETS)}") from None
    return sorted(n for n in names if pattern.search(n))
