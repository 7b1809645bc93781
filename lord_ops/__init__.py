"""LoRD math, file format and key mapping in plain torch.

Nothing in this package (outside the lazily imported ``lord_ops.comfy`` subpackage) imports
ComfyUI, so it is usable from tests, scripts and other tools.
"""
