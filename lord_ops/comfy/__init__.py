"""The one place that touches ComfyUI internals (model patching, key maps, test models).

Import it only where ComfyUI is importable (inside ComfyUI, or after
``training.comfy_runtime.ensure_comfyui_importable()``).
"""
