#!/usr/bin/env bash
# Installs Azurite (the Azure Storage emulator, npm package `azurite`) into the Veil cache and
# prints the path of its `azurite-blob` launcher. Idempotent: a cached install is printed at once.
#
#   bash hack/azurite.sh            -> /root/.cache/veil/azurite/3.35.0/node_modules/.bin/azurite-blob
#
# 3.35.0 is the last release whose package.json accepts Node 20 (3.36 needs Node >= 21, 3.37
# Node >= 22); set AZURITE_VERSION to pick another one on a newer Node.
#
# Environment:
#   VEIL_CACHE       cache root (default ~/.cache/veil)
#   AZURITE_VERSION  version to install (default below)
#
# Exit status: 0 and the path on stdout; 3 when Azurite cannot be had (no node/npm, or the npm
# registry refused), with the reason on stderr: the Blob tests then skip, saying so.
set -euo pipefail

VERSION="${AZURITE_VERSION:-3.35.0}"
CACHE="${VEIL_CACHE:-$HOME/.cache/veil}"
PREFIX="$CACHE/azurite/$VERSION"
BIN="$PREFIX/node_modules/.bin/azurite-blob"

if [ -x "$BIN" ] && [ -f "$PREFIX/.complete" ]; then
  echo "$BIN"
  exit 0
fi
for tool in node npm; do
  if ! command -v "$tool" >/dev/null; then
    echo "azurite: $tool is not installed (Azurite $VERSION needs Node.js and npm)" >&2
    exit 3
  fi
done

mkdir -p "$PREFIX"
LOG="$PREFIX/install.log"
# --prefix keeps node_modules and package.json inside the cache; nothing goes to ~/.npm's
# global tree. --no-audit/--no-fund keep the install to the registry fetch alone.
if ! npm install --prefix "$PREFIX" --no-audit --no-fund --no-save --loglevel=error \
  "azurite@$VERSION" >"$LOG" 2>&1; then
  echo "azurite: npm install azurite@$VERSION failed: $(grep -m1 -iE 'err' "$LOG" || echo "see $LOG")" >&2
  exit 3
fi
if [ ! -x "$BIN" ]; then
  echo "azurite: npm reported success but $BIN is missing (see $LOG)" >&2
  exit 3
fi
touch "$PREFIX/.complete"
echo "$BIN"
