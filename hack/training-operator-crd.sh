#!/usr/bin/env bash
# Fetches the PyTorchJob CRD (kubeflow.org/v1) of Kubeflow's training operator from its Go module,
# for the tests that have the API server accept Veil's PyTorchJob of `workers` > 1. Cached in
# $VEIL_CACHE/crds/training-operator-<version>/; prints the CRD file's path last.
#
#   kubectl apply --server-side -f "$(bash hack/training-operator-crd.sh)"
set -euo pipefail

VERSION="${TRAINING_OPERATOR_VERSION:-v1.8.1}"
CACHE="${VEIL_CACHE:-$HOME/.cache/veil}"
DIR="$CACHE/crds/training-operator-$VERSION"
CRD="$DIR/kubeflow.org_pytorchjobs.yaml"

if [ ! -s "$CRD" ]; then
  command -v go >/dev/null || { echo "training-operator-crd: go is required" >&2; exit 1; }
  module="$(GOFLAGS=-mod=mod go mod download -json "github.com/kubeflow/training-operator@$VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  [ -n "$module" ] || { echo "training-operator-crd: no module directory" >&2; exit 1; }
  mkdir -p "$DIR"
  cp "$module/manifests/base/crds/kubeflow.org_pytorchjobs.yaml" "$CRD.partial"
  chmod 0644 "$CRD.partial"
  mv "$CRD.partial" "$CRD"
fi
echo "$CRD"
