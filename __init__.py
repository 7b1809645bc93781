"""ComfyUI-LoRD: Low-Rank Defense for LoRA fine-tuning of latent diffusion models.

ComfyUI calls :func:`comfy_entrypoint`; importing this package anywhere else has no side effects
and does not import ComfyUI.
"""

__version__ = "0.4.0"


async def comfy_entrypoint():
    from .nodes import LoRDExtension, register_model_folder

    register_model_folder()
    return LoRDExtension()
