#!/usr/bin/env bash
# Veil's main job on this machine: a local control plane, the CRDs, the operator, the
# examples (against local Azure stand-ins), and their status. `hack/down.sh` stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
STATE=.cache/cluster
bash hack/down.sh >/dev/null 2>&1 || true
rm -rf "$STATE"   # a fresh cluster each time: examples may have changed immutable fields
KUBECONFIG=$(.venv/bin/python -m tests.cluster.localcluster up --dir "$STATE")
export KUBECONFIG
KUBECTL="$(bash hack/build-control-plane.sh)/kubectl"

"$KUBECTL" apply --server-side --field-manager=veil-up -f crds/
"$KUBECTL" wait --for=condition=Established crd -l app.kubernetes.io/part-of=veil --timeout=60s

# No Azure here: local HTTPS stand-ins for Key Vault and ARM (the doubles the tests use) take
# their place, and the operator is pointed at them. See "What is real here" in the README.
rm -f "$STATE/azure/azure.env"
.venv/bin/python -m tests.unit.azure.standins --dir "$STATE/azure" \
  --cluster 00000000-0000-0000-0000-000000000000/veil-rg/veil-aks > .cache/azure-standins.log 2>&1 &
echo $! > "$STATE/pids/azure-standins"
for _ in $(seq 100); do [ -s "$STATE/azure/azure.env" ] && break; sleep 0.1; done
set -a; . "$STATE/azure/azure.env"; set +a

.venv/bin/veil run --standalone --metrics-port=8080 --health-port=8081 > .cache/operator.log 2>&1 &
echo $! > "$STATE/pids/veil-operator"
for scenario in examples/*/; do
  [ "$scenario" = examples/gitops/ ] && continue   # Flux and Argo CD objects, not for this cluster
  for manifest in "$scenario"*.yaml; do
    # The examples name real vaults; here they use the local Key Vault stand-in.
    sed -E "s#vaultUrl: https://[^ ]+#vaultUrl: $VEIL_DEMO_VAULT_URL#" "$manifest" \
      | "$KUBECTL" apply -f -
  done
done
for kind in privacybudgets syntheticdatasets confidentialmodels; do
  "$KUBECTL" wait "$kind" --all -A --for=jsonpath='{.status.observedGeneration}'=1 --timeout=60s >/dev/null
done
"$KUBECTL" get veil -A
echo
echo "KUBECONFIG=$KUBECONFIG  kubectl: $KUBECTL"
echo "operator log: .cache/operator.log   metrics: http://127.0.0.1:8080/metrics   stop: hack/down.sh"
