"""Reading and validating a safetensors container without loading it.

:func:`read_safetensors_header` parses the header of a LoRD or LoRA file and checks it against the
file (header length and JSON, dtypes, each tensor's byte range against its shape and dtype, offsets
inside the file, data tiled without overlaps or gaps) and refuses pickles and zip archives
(``.ckpt`` / ``.pt``); no tensor data is read and nothing in the file is ever executed.
:class:`LoRDFileError` is the error of every file check (here and in :mod:`lord_ops.format`, which
reads the tensors and checks the LoRD / LoRA layouts on top of this container check).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

_SAFETENSORS_FLOAT_DTYPES = {"F32", "F16", "BF16"}
# bytes per element of every safetensors dtype (to check an entry's byte range against its shape)
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                         "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 1024 * 1024


class LoRDFileError(ValueError):
    """A LoRD (or LoRA) file that cannot be used; the message names the file, the key and the fix."""

    def __init__(self, path, problem: str, fix: str = "", key: Optional[str] = None, kind: str = "LoRD file"):
        where = f"{kind} '{path}'" + (f", key '{key}'" if key else "")
        message = f"{where}: {problem}"
        if fix:
            message += f" {fix}"
        super().__init__(message)
        self.path, self.key, self.problem, self.fix = str(path), key, problem, fix


def read_safetensors_header(path, kind: str = "LoRD file", float_only: bool = True) -> tuple[dict, dict[str, str]]:
    """Parse and check a safetensors container without reading tensor data.

    ``kind`` names the file in error messages ("LoRD file", "LoRA file"). ``float_only``: refuse
    tensors that are not float32/float16/bfloat16 (``.alpha`` excepted) -- LoRD files; LoRA files
    may hold other dtypes that stock loaders read (e.g. an integer ``reshape_weight``).

    Returns ``(tensor_entries, metadata)``. Rejects empty, truncated, pickle/zip and otherwise
    malformed files (unreadable header, a byte range that does not match its shape and dtype,
    overlapping or non-contiguous tensor data -- everything safetensors itself would refuse with
    a bare ``SafetensorError``) with a :class:`LoRDFileError`; nothing in the file is ever executed.
    """
    path = Path(path)

    def _Err(*a, **k):
        return LoRDFileError(*a, kind=kind, **k)

    if not path.is_file():
        raise _Err(path, "file not found.", "Check the file name and the models/lord folder.")
    size = path.stat().st_size
    if size == 0:
        raise _Err(path, "the file is empty (0 bytes).", "Re-download or re-create it.")
    with open(path, "rb") as fh:
        head = fh.read(9)
        # a safetensors file starts with its header length (u64, little-endian) and then "{"; its
        # first byte may be 0x80 or its first two "PK" by chance, so sniff pickle/zip only otherwise
        plausible = len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8
        if not plausible and (head[:1] == b"\x80" or head[:2] == b"PK"):
            raise _Err(path, "this is a pickle/zip (.ckpt/.pt) file, not safetensors; LoRD never "
                                "loads pickles because they can execute code.",
                                "Convert it to .safetensors with a trusted tool, "
                                "or use the original .safetensors file.")
        head = head[:8]
        fh.seek(8)
        if len(head) < 8:
            raise _Err(path, f"the file is truncated ({size} bytes, shorter than a safetensors header).",
                                "Re-download or re-create it.")
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len <= 0 or header_len > min(_MAX_HEADER, size - 8):
            raise _Err(path, f"not a valid safetensors file (header length {header_len} does not fit "
                                f"a {size}-byte file; truncated or not safetensors).", "Re-download or re-create it.")
        fh.seek(8)
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Err(path, f"not a valid safetensors file (unreadable header: {exc}).",
                            "Re-download or re-create it.") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _Err(path, "not a valid safetensors file (__metadata__ is not a JSON object).",
                   "Re-download or re-create it.")
    data_len = size - 8 - header_len
    ranges = []
    for key, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
            if not (isinstance(start, int) and isinstance(end, int) and isinstance(dtype, str)
                    and isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise _Err(path, "malformed safetensors entry (needs dtype, shape and data_offsets).",
                       "Re-download or re-create it.", key=key) from None
        if not (0 <= start <= end <= data_len):
            raise _Err(path, f"tensor data runs past the end of the file (needs bytes {start}..{end}, "
                                f"file holds {data_len}): the file is truncated.", "Re-download or re-create it.",
                       key=key)
        if float_only and dtype not in _SAFETENSORS_FLOAT_DTYPES and not key.endswith(".alpha"):
            raise _Err(path, f"dtype {dtype} is not allowed (float32, float16 or bfloat16 only).",
                                "Re-save the file with a float dtype.", key=key)
        itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is None:
            raise _Err(path, f"unknown safetensors dtype {dtype!r}.", "Re-download or re-create it.", key=key)
        numel = 1
        for d in shape:
            numel *= d
        if numel * itemsize != end - start:
            raise _Err(path, f"shape {shape} in {dtype} needs {numel * itemsize} bytes but the header gives it "
                       f"{end - start} (bytes {start}..{end}): the header is damaged.", "Re-download or re-create it.",
                       key=key)
        ranges.append((start, end, key))
    # safetensors requires the tensors' byte ranges to tile the data exactly: overlaps first (the
    # more telling fault: a moved range also leaves a gap), then gaps and trailing bytes
    ranges.sort()
    covered, previous = 0, None
    for start, end, key in ranges:
        if start < covered and end > start:
            raise _Err(path, f"tensor data (bytes {start}..{end}) overlaps that of key '{previous}': the header is "
                       f"damaged or was crafted.", "Re-download or re-create it.", key=key)
        if end > covered:
            covered, previous = end, key
    covered = 0
    for start, end, key in ranges:
        if start > covered:
            raise _Err(path, f"{start - covered} bytes before this tensor's data belong to no tensor (a gap in the "
                       f"data): the header is damaged.", "Re-download or re-create it.", key=key)
        covered = max(covered, end)
    if covered != data_len:
        raise _Err(path, f"{data_len - covered} bytes after the last tensor belong to no tensor: the file is damaged "
                   f"(or was appended to).", "Re-download or re-create it.")
    return header, dict(metadata)
