#!/usr/bin/env bash
# GPU check: every shipped workflow through the server, the training CLI, the mist-v2 preset on a
# 512 px image (time + peak VRAM) and the benchmarks, on a CUDA machine; writes one JSON
# (default gpu_check_output/gpu_check.json). Fails (exit 2) when no CUDA device is present.
#   bash bench/gpu_check.sh [--out DIR] [--only devices,cli,mist_v2,workflows,bench] [--bench quick|full] [--sd15 CKPT]
# Needs the environment of `make setup` with a CUDA build of PyTorch (or PYTHON=/path/to/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    echo "error: $PY not found: run 'make setup' first (or set PYTHON)" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    "$PY" -c 'import torch; print(f"error: no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no GPU. This check needs an NVIDIA GPU and a CUDA build of PyTorch; the CPU test suite is make test.")' >&2 || echo "error: no CUDA device (PyTorch not importable)" >&2
    exit 2
fi
exec "$PY" -m bench.gpu_check "$@"
