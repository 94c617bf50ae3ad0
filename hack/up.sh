#!/usr/bin/env bash
# Veil's main job on this machine: a local control plane with a real node (root), the chart's
# operator as a pod from the locally built image, local Azure stand-ins and Azurite, every
# example applied with real inputs, a real inference request, and their status.
# `hack/down.sh` stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
exec .venv/bin/python -m tests.cluster.mainjob --dir .cache/cluster "$@"
