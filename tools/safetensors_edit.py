"""Test tooling: damage a safetensors container by editing its JSON header in place."""
import json
import struct


def rewrite_header(path, mutate) -> None:
    """Apply ``mutate(header_dict)`` to the safetensors file at ``path``; tensor bytes stay as they are."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
