#!/usr/bin/env bash
# Installs everything Veil's development needs, from nothing: the Python virtualenv with
# the package and its dev tools, the Go-built control plane and real node, the Debian packages
# a real node and a local image build need, and the image itself (all cached; seconds when warm).
set -euo pipefail
cd "$(dirname "$0")/.."

# A real node (containerd, runc, CNI plugins, kube-router's iptables/ipset) and image builds
# (mmdebstrap, buildah), the load generator (wrk) and a software TPM for the node agent's tests
# (swtpm, tpm2-tools) come from Debian.
DEBIAN_PACKAGES=(containerd runc containernetworking-plugins iptables ipset conntrack nftables
  mmdebstrap buildah uidmap gcc wrk swtpm swtpm-tools tpm2-tools)
missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "setup: needs root to apt-get install ${missing[*]}" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
fi

for tool in python3 go; do
  command -v "$tool" >/dev/null || { echo "setup: $tool is required but not installed" >&2; exit 1; }
done
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The dpsgd extra is torch + Opacus for `veil train --family mlp|cnn` (torch from PyPI is the
# CUDA build with its nvidia-* libraries: about 5.4 GB, 1.5 minutes cold here, seconds warm).
.venv/bin/python -m pip install --quiet -e '.[dev,dpsgd]'
# smartnoise-synth without its declared opacus/torch: MST and AIM do not import them.
.venv/bin/python -m pip install --quiet --no-deps smartnoise-synth==1.0.8
bash hack/build-control-plane.sh >/dev/null
bash hack/build-node.sh >/dev/null       # kubelet, kube-proxy, CoreDNS, kube-router, pause
bash hack/build-tools.sh >/dev/null   # helm and kubeconform, for the chart tests
bash hack/azurite.sh >/dev/null       # Azure Blob emulator (npm), for the synthesis tests
bash hack/training-operator-crd.sh >/dev/null  # Kubeflow's PyTorchJob CRD, for workers > 1
bash hack/build-image.sh >/dev/null   # Veil's image from the Dockerfile, for the real node
echo "setup: done (virtualenv .venv, control plane in ${VEIL_CACHE:-$HOME/.cache/veil})"
