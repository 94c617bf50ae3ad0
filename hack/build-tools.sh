#!/usr/bin/env bash
# Builds the chart tools from their Go modules, with no prebuilt downloads: helm (the chart's
# lint and template) and kubeconform (schema validation of every rendered object).
# Each lands in $VEIL_CACHE/tools/<name>-<version>/, and a bin directory of symlinks to the
# pinned versions is printed last, so a second run only checks that they are there.
#
#   PATH="$(bash hack/build-tools.sh):$PATH" helm version
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
KUBECONFORM_VERSION="${KUBECONFORM_VERSION:-v0.7.0}"
CACHE="${VEIL_CACHE:-$HOME/.cache/veil}"
TOOLS="$CACHE/tools"
BIN="$TOOLS/bin-helm-$HELM_VERSION-kubeconform-$KUBECONFORM_VERSION"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false

log() { echo "[build-tools] $*" >&2; }

# install NAME VERSION PACKAGE [LDFLAGS]: `go install PACKAGE@VERSION` into tools/NAME-VERSION/.
install() {
  local name="$1" version="$2" package="$3" ldflags="${4:-}"
  local dir="$TOOLS/$name-$version"
  if [ ! -x "$dir/$name" ]; then
    command -v go >/dev/null || { echo "build-tools: go is required to build $name" >&2; exit 1; }
    log "building $name $version"
    mkdir -p "$dir"
    GOBIN="$dir/.partial" go install -trimpath -ldflags "-s -w $ldflags" "$package@$version" >&2
    mv "$dir/.partial/$name" "$dir/$name"
    rmdir "$dir/.partial"
  fi
  mkdir -p "$BIN"
  ln -sfn "$dir/$name" "$BIN/$name"
}

# helm prints its version from these variables; `go install` leaves them at their defaults.
install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
install kubeconform "$KUBECONFORM_VERSION" github.com/yannh/kubeconform/cmd/kubeconform \
  "-X main.version=$KUBECONFORM_VERSION"
echo "$BIN"
