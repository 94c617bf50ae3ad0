#!/usr/bin/env bash
# Builds a real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler) and kubectl, etcd and kwok from their Go modules, with no container engine.
# The binaries are cached under $VEIL_CACHE/control-plane/<versions>/bin, so a
# second run only checks that they are there.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-v0.7.0}"
CACHE="${VEIL_CACHE:-$HOME/.cache/veil}"
ROOT="$CACHE/control-plane/k8s-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
BIN="$ROOT/bin"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-buildvcs=false

wanted=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok)
have_all=1
for b in "${wanted[@]}"; do [ -x "$BIN/$b" ] || have_all=0; done
if [ "$have_all" = 1 ]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$BIN"
log() { echo "[build-control-plane] $*" >&2; }

# --- Kubernetes: a wrapper module that pins every staging module to its published tag.
build_kubernetes() {
  local dir="$ROOT/src/kubernetes" staging="v0.${KUBE_VERSION#v1.}"
  mkdir -p "$dir"
  local kmod
  kmod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module veil.dev/controlplane"
    echo
    grep -E '^go [0-9]' "$kmod"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    # Every `k8s.io/<m> => ./staging/src/k8s.io/<m>` of upstream becomes the published module.
    grep -oE 'k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/[a-z0-9-]+' "$kmod" | awk '{print $1}' | sort -u |
      while read -r m; do echo "replace $m => $m $staging"; done
  } > "$dir/go.mod"
  cat > "$dir/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  log "resolving Kubernetes $KUBE_VERSION modules"
  (cd "$dir" && go mod tidy >&2)
  local minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
  local ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    [ -x "$BIN/$cmd" ] && continue
    log "building $cmd"
    (cd "$dir" && go build -tags selinux,notest -trimpath -ldflags "$ldflags" -o "$BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" >&2)
    mv "$BIN/$cmd.tmp" "$BIN/$cmd"
  done
}

# --- etcd: the server module has replace lines too, so it gets a wrapper of its own.
build_etcd() {
  [ -x "$BIN/etcd" ] && return
  local dir="$ROOT/src/etcd"
  mkdir -p "$dir"
  cat > "$dir/go.mod" <<GOMOD
module veil.dev/etcdbuild

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  cat > "$dir/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  log "resolving etcd $ETCD_VERSION"
  (cd "$dir" && go mod tidy >&2)
  log "building etcd"
  (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3 >&2)
  mv "$BIN/etcd.tmp" "$BIN/etcd"
}

build_kwok() {
  [ -x "$BIN/kwok" ] && return
  log "installing kwok $KWOK_VERSION"
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" >&2
}

build_etcd
build_kwok
build_kubernetes
echo "$BIN"
