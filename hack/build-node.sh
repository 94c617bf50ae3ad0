#!/usr/bin/env bash
# Builds what a real node needs beside the control plane, from Go modules and Debian's gcc:
# kubelet and kube-proxy (the control plane's own wrapper module), CoreDNS, kube-router (its
# NetworkPolicy firewall only) and a static pause binary for the sandbox image. Cached under
# $VEIL_CACHE/node/<versions>/bin; a second run only checks that the binaries are there.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBE_VERSION="${KUBE_VERSION:-v1.35.4}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.15.0}"
KUBE_ROUTER_VERSION="${KUBE_ROUTER_VERSION:-v2.1.0}"
CACHE="${VEIL_CACHE:-$HOME/.cache/veil}"
ROOT="$CACHE/node/k8s-$KUBE_VERSION-coredns-$COREDNS_VERSION-kube-router-$KUBE_ROUTER_VERSION"
BIN="$ROOT/bin"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false

wanted=(kubelet kube-proxy coredns kube-router pause)
have_all=1
for b in "${wanted[@]}"; do [ -x "$BIN/$b" ] || have_all=0; done
if [ "$have_all" = 1 ]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$BIN"
log() { echo "[build-node] $*" >&2; }

# kubelet and kube-proxy come from the same wrapper module as the control plane (built first).
build_kubernetes_node() {
  local cp_bin
  cp_bin=$(bash hack/build-control-plane.sh)
  local dir
  dir="$(dirname "$cp_bin")/src/kubernetes"
  cat > "$dir/node_tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  (cd "$dir" && go mod tidy >&2)
  local minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
  local ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for cmd in kubelet kube-proxy; do
    [ -x "$BIN/$cmd" ] && continue
    log "building $cmd"
    (cd "$dir" && go build -tags selinux,notest -trimpath -ldflags "$ldflags" -o "$BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" >&2)
    mv "$BIN/$cmd.tmp" "$BIN/$cmd"
  done
}

build_go_install() {   # name module@version
  [ -x "$BIN/$1" ] && return
  log "installing $2"
  local tmp="$ROOT/gobin"
  mkdir -p "$tmp"
  GOBIN="$tmp" go install -trimpath -ldflags "-s -w" "$2" >&2
  mv "$tmp/$1" "$BIN/$1"
  rmdir "$tmp"
}

# The sandbox ("pause") process: sleeps until told to stop and reaps nothing else.
build_pause() {
  [ -x "$BIN/pause" ] && return
  command -v gcc >/dev/null || { echo "build-node: gcc is required (apt-get install gcc)" >&2; exit 1; }
  log "building pause"
  gcc -static -Os -o "$BIN/pause.tmp" hack/node/pause.c
  strip "$BIN/pause.tmp"
  mv "$BIN/pause.tmp" "$BIN/pause"
}

build_pause
build_kubernetes_node
build_go_install coredns "github.com/coredns/coredns@$COREDNS_VERSION"
build_go_install kube-router "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@$KUBE_ROUTER_VERSION"
echo "$BIN"
