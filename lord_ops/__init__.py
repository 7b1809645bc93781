"""LoRD math, file format and key mapping in plain torch.

Nothing in this package (outside the lazily imported ``lord_ops.comfy`` subpackage) imports
ComfyUI, so it is usable from tests, scripts and other tools.
"""

from pathlib import Path as _Path
import re as _re


def tool_version() -> str:
    """The pack's version (``__version__`` of the pack's top-level ``__init__.py``)."""
    text = (_Path(__file__).resolve().parents[1] / "__init__.py").read_text(encoding="utf-8")
    match = _re.search(r'__version__\s*=\s*"([^"]+)"', text)
    return match.group(1) if match else "unknown"
