"""Helpers shared by the benchmarks: CPU-contention accounting, a steady allocator, and the
owned-section update of BENCHMARKS.md."""
from __future__ import annotations

import ctypes
import pathlib


def cpu_ticks() -> tuple[int, int]:
    """(busy CPU ticks of the whole machine, CPU ticks of this process); (0, 0) off Linux."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(ticks) - ticks[3] - ticks[4], int(own[11]) + int(own[12])
    except (OSError, IndexError, ValueError):
        return 0, 0


def steady_malloc() -> str:
    """Serve every allocation from a never-trimmed glibc heap (no mmap chunks).

    On CPU, oneDNN scratch buffers and large activations are big allocations that glibc by default
    maps and unmaps on every call, so whether they page-fault afresh depends on the allocation
    history (measured: ~4.6e5 page faults and +0.5 s per step on the SD1.5 UNet for whichever
    variant lands in the unlucky state). Pinning the allocator removes that artefact.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-4, 0) == 1 and libc.mallopt(-1, 2 ** 31 - 1) == 1  # M_MMAP_MAX, M_TRIM_THRESHOLD
        return "glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)" if ok else "stock (mallopt failed)"
    except (OSError, AttributeError):
        return "stock (no glibc)"


def write_section(path: pathlib.Path, start: str, end: str, body: str) -> None:
    """Replace the ``start``..``end`` section of a Markdown file (``body`` includes both markers),
    or append it; other sections are kept."""
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "# Benchmarks\n\n") + body + "\n"
    path.write_text(text)
