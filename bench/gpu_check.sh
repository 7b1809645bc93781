#!/usr/bin/env bash
# GPU check: every shipped workflow through the server, the training CLI, the mist-v2 preset on a
# 512 px image (time + peak VRAM) and the benchmarks, on a CUDA machine; writes one JSON
# (default gpu_check_output/gpu_check.json). Fails (exit 2) when no CUDA device is present.
#   bash bench/gpu_check.sh [--out DIR] [--only devices,cli,mist_v2,workflows,bench] [--bench quick|full] [--sd15 CKPT]
# --dry-run: every step on the CPU at tiny sizes (same commands, smaller arguments; no CUDA needed,
# CUDA-only fields null and marked skipped in the JSON), so that CI catches a broken check:
#   bash bench/gpu_check.sh --dry-run [--out DIR]    # about 3.5 CPU-minutes; exit 0 when every step passed
# Needs the environment of `make setup` with a CUDA build of PyTorch (or PYTHON=/path/to/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
    echo "error: $PY not found: run 'make setup' first (or set PYTHON)" >&2
    exit 2
fi
need_cuda=1
for arg in "$@"; do
    case "$arg" in
        --dry-run|-h|--help) need_cuda=0 ;;
    esac
done
if [ "$need_cuda" = 1 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    "$PY" -c 'import torch; print(f"error: no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no GPU. This check needs an NVIDIA GPU and a CUDA build of PyTorch (bash bench/gpu_check.sh --dry-run runs it on the CPU at tiny sizes); the CPU test suite is make test.")' >&2 || echo "error: no CUDA device (PyTorch not importable)" >&2
    exit 2
fi
exec "$PY" -m bench.gpu_check "$@"
