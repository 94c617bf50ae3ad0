#!/usr/bin/env bash
# Installs everything Veil's development needs, from nothing: the Python virtualenv with
# the package and its dev tools, and the Go-built control plane (cached; seconds when warm).
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in python3 go; do
  command -v "$tool" >/dev/null || { echo "setup: $tool is required but not installed" >&2; exit 1; }
done
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
# smartnoise-synth without its declared opacus/torch: MST and AIM do not import them.
.venv/bin/python -m pip install --quiet --no-deps smartnoise-synth==1.0.8
bash hack/build-control-plane.sh >/dev/null
bash hack/build-tools.sh >/dev/null   # helm and kubeconform, for the chart tests
bash hack/azurite.sh >/dev/null       # Azure Blob emulator (npm), for the synthesis tests
echo "setup: done (virtualenv .venv, control plane in ${VEIL_CACHE:-$HOME/.cache/veil})"
