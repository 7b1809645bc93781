"""ComfyUI-LoRD: Low-Rank Defense for LoRA fine-tuning of latent diffusion models.

ComfyUI calls :func:`comfy_entrypoint` and reads ``WEB_DIRECTORY`` (the node help pages in
``web/docs/``); importing this package anywhere else has no side effects and does not import ComfyUI.
"""

__version__ = "0.4.0"

# ComfyUI serves this folder at /extensions/<folder name of the pack>/; the frontend's node-help
# panel reads web/docs/<NodeId>.md from there. A plain string: importing the package stays free of
# side effects.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import LoRDExtension, register_model_folder

    register_model_folder()
    return LoRDExtension()
