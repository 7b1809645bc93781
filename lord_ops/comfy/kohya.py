"""A trained Stage-2 LoRA as kohya sees it: the ``ss_*`` metadata and applying ``{name: (down, up,
alpha)}`` layers to a MODEL with ComfyUI's own LoRA loader.
"""
from __future__ import annotations

from ..format import kohya_state_dict
from ..train_config import TrainConfig


def kohya_metadata(config: TrainConfig, family: str, report: dict) -> dict[str, str]:
    """kohya ``ss_*`` fields (shown by A1111/Forge) plus the pack's provenance."""
    import json

    base = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(family, family)
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(config.rank),
            "ss_network_alpha": str(float(config.rank if config.alpha is None else config.alpha)),
            "ss_base_model_version": base, "ss_learning_rate": str(config.learning_rate),
            "ss_max_train_steps": str(config.steps), "ss_seed": str(config.seed),
            "lord_stage2_mode": config.mode, "lord_provenance": json.dumps(report.get("provenance", {}), sort_keys=True)}


def apply_lora_layers(model, layers: dict, strength: float = 1.0):
    """A clone of ``model`` with a kohya LoRA (``{name: (down, up, alpha)}``) applied by ComfyUI's own loader."""
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(model, None, kohya_state_dict(layers), strength, 0)
    return patched
