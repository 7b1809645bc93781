"""Developer tooling, not part of the node pack's runtime: random test models (``tiny``), the test
harness's ComfyUI server (``comfy_server``), the UI->API workflow converter (``workflow_api``), inputs
for the shipped workflows (``example_inputs``, ``mini_experiment``), synthetic experiment results for
the report tests (``report_results``) and the scripts that make the documentation's pictures. Imported
as ``tools.<module>`` with the repository root on ``sys.path`` (``python -m`` from the root, pytest);
never imports ``lab`` or ``bench`` (which sit above it)."""
