"""The one place that touches ComfyUI internals (model patching, gradients, attacks and training on
ComfyUI models; see the map in docs/design.md).

Import it only where ComfyUI is importable (inside ComfyUI, or after
``training.comfy_runtime.ensure_comfyui_importable()``).
"""
