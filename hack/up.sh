#!/usr/bin/env bash
# Veil's main job on this machine: a local control plane, the CRDs, the operator, the
# examples, and their status. `hack/down.sh` stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
STATE=.cache/cluster
bash hack/down.sh >/dev/null 2>&1 || true
KUBECONFIG=$(.venv/bin/python -m tests.cluster.localcluster up --dir "$STATE")
export KUBECONFIG
KUBECTL="$(bash hack/build-control-plane.sh)/kubectl"

"$KUBECTL" apply --server-side --field-manager=veil-up -f crds/
"$KUBECTL" wait --for=condition=Established crd -l app.kubernetes.io/part-of=veil --timeout=60s
.venv/bin/veil run --standalone --metrics-port=8080 --health-port=8081 > .cache/operator.log 2>&1 &
echo $! > "$STATE/pids/veil-operator"
for scenario in examples/*/; do
  [ "$scenario" = examples/gitops/ ] && continue   # Flux and Argo CD objects, not for this cluster
  "$KUBECTL" apply -R -f "$scenario"
done
for kind in privacybudgets syntheticdatasets confidentialmodels; do
  "$KUBECTL" wait "$kind" --all -A --for=jsonpath='{.status.observedGeneration}'=1 --timeout=60s >/dev/null
done
"$KUBECTL" get veil -A
echo
echo "KUBECONFIG=$KUBECONFIG  kubectl: $KUBECTL"
echo "operator log: .cache/operator.log   metrics: http://127.0.0.1:8080/metrics   stop: hack/down.sh"
