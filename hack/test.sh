#!/usr/bin/env bash
# The test command: set up (idempotent), lint, type-check, then every test tier.
# Unit tests need no cluster; integration tests start a real control plane themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
.venv/bin/ruff check operator tests
.venv/bin/ruff format --check operator tests
.venv/bin/mypy
exec .venv/bin/pytest -p no:cacheprovider "$@"
