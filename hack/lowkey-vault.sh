#!/usr/bin/env bash
# Fetches Lowkey Vault (an Azure Key Vault emulator: a Spring Boot jar published by
# com.github.nagyesta.lowkey-vault) into the Veil cache and prints the jar's path. Idempotent:
# a cached jar is printed at once.
#
#   bash hack/lowkey-vault.sh   # prints e.g. ~/.cache/veil/lowkey-vault/lowkey-vault-app-X.jar
#
# Environment:
#   VEIL_CACHE            cache root (default ~/.cache/veil); Maven's repository for this fetch
#                         lives under it too (nothing is written to ~/.m2)
#   LOWKEY_VAULT_VERSION  version to fetch (default below)
#   LOWKEY_VAULT_JAR      use this jar instead of fetching (e.g. one built from source); it is
#                         copied into the cache
#
# Exit status: 0 and the path on stdout; 3 when the jar cannot be had, with the reason on stderr
# (the Azure test fixture then falls back, loudly, to the local Key Vault HTTPS double).
set -euo pipefail

VERSION="${LOWKEY_VAULT_VERSION:-7.1.13}"
CACHE="${VEIL_CACHE:-$HOME/.cache/veil}"
DIR="$CACHE/lowkey-vault"
JAR="$DIR/lowkey-vault-app-$VERSION.jar"
GROUP="com.github.nagyesta.lowkey-vault"
ARTIFACT="lowkey-vault-app"

is_jar() { [ -s "$1" ] && [ "$(head -c 2 "$1")" = "PK" ]; }

if is_jar "$JAR"; then
  echo "$JAR"
  exit 0
fi
mkdir -p "$DIR"

if [ -n "${LOWKEY_VAULT_JAR:-}" ]; then
  if ! is_jar "$LOWKEY_VAULT_JAR"; then
    echo "lowkey-vault: LOWKEY_VAULT_JAR=$LOWKEY_VAULT_JAR is not a jar file" >&2
    exit 3
  fi
  cp "$LOWKEY_VAULT_JAR" "$JAR.part"
  mv "$JAR.part" "$JAR"
  echo "$JAR"
  exit 0
fi

if ! command -v mvn >/dev/null; then
  echo "lowkey-vault: mvn is not installed (apt-get install maven)" >&2
  exit 3
fi

LOG="$DIR/fetch-$VERSION.log"
REPO="$CACHE/m2"
if ! mvn -B -q -Dstyle.color=never -Dmaven.repo.local="$REPO" dependency:get \
  -Dartifact="$GROUP:$ARTIFACT:$VERSION:jar" -Dtransitive=false >"$LOG" 2>&1; then
  reason="$(grep -m1 -E 'ERROR.*(Could not|Couldn|Failed)' "$LOG" | sed -e "s/\x1b\[[0-9;]*m//g" -e "s/^.*\[ERROR\] *//" -e "s/^.*download artifact: //" || true)"
  echo "lowkey-vault: cannot fetch $GROUP:$ARTIFACT:$VERSION from the Maven registry: ${reason:-see $LOG}" >&2
  exit 3
fi

SRC="$REPO/${GROUP//.//}/$ARTIFACT/$VERSION/$ARTIFACT-$VERSION.jar"
if ! is_jar "$SRC"; then
  echo "lowkey-vault: Maven reported success but $SRC is missing or not a jar" >&2
  exit 3
fi
cp "$SRC" "$JAR.part"
mv "$JAR.part" "$JAR"
rm -f "$LOG"
echo "$JAR"
