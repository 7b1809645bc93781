#!/usr/bin/env bash
# comfy-cli (the Comfy Registry's own validate/pack tool) in its own venv, .cache/comfy-cli, pinned by
# tools/registry-tools.txt; tests/test_registry.py runs `comfy node validate` and `comfy node pack`
# with it (offline, telemetry off). A venv of its own so that its dependencies never move the test
# venv's pins. tools/setup_env.sh calls this on every run.
# Idempotent and offline once installed: a stamp records the pins; delete .cache/comfy-cli to redo it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.cache/comfy-cli
STAMP=$VENV/.lord-setup-done

want="$(cat tools/registry-tools.txt tools/setup_registry_tools.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/comfy" ]; then
  exit 0
fi
echo "[setup] installing comfy-cli into $VENV (tools/registry-tools.txt)"
[ -x "$VENV/bin/python" ] || $PY -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r tools/registry-tools.txt
echo "$want" > "$STAMP"
