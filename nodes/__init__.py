"""ComfyUI glue (V3 node API). Thin: the math is in ``lord_ops``, ComfyUI internals in ``lord_ops.comfy``."""
from __future__ import annotations

import os

from comfy_api.latest import ComfyExtension, io

from .attack import LoRDProtect
from .detect import LoRDDetect
from .loaders import LoRDLoader
from .purify import LoRDPurify
from .metrics import LoRDImageMetrics, LoRDImageQuality
from .train import LoRDSave, LoRDSaveLoRA, LoRDTrainStage1, LoRDTrainStage2

LORD_FOLDER = "lord"
NODES = [LoRDLoader, LoRDDetect, LoRDProtect, LoRDTrainStage1, LoRDTrainStage2, LoRDSave, LoRDSaveLoRA,
         LoRDPurify, LoRDImageQuality, LoRDImageMetrics]


def register_model_folder() -> None:
    """Register ``models/lord`` (``.safetensors`` only) and ``models/lord_metrics`` (metric network
    weights) and keep any path that ``extra_model_paths.yaml`` or another pack already added for them."""
    import folder_paths

    from ..lord_ops.comfy.metrics import register_metrics_folder

    folder_paths.add_model_folder_path(LORD_FOLDER, os.path.join(folder_paths.models_dir, LORD_FOLDER), is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[LORD_FOLDER]
    folder_paths.folder_names_and_paths[LORD_FOLDER] = (paths, {".safetensors"})
    register_metrics_folder()


class LoRDExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
