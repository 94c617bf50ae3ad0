#!/usr/bin/env bash
# Stops what hack/up.sh started.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m tests.cluster.localcluster down --dir .cache/cluster
