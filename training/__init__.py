"""Standalone entry points (demo, and later attack / stage-1 / stage-2 / evaluation) and the
ComfyUI runtime bootstrap they share. Run them from the repository root: ``python -m training.demo``."""
