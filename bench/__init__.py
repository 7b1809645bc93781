"""Benchmarks and the GPU check (``BENCHMARKS.md``); run each as ``python -m bench.<name>`` from the repository root."""
