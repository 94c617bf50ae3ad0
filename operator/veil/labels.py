"""Label, annotation, taint and node-selector names Veil writes and reads."""

from __future__ import annotations

from veil import API_GROUP

FIELD_MANAGER = "veil"
MANAGED_BY = "app.kubernetes.io/managed-by"
NAME = "app.kubernetes.io/name"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
PART_OF = "app.kubernetes.io/part-of"
OWNER_KIND = f"{API_GROUP}/owner-kind"
MODEL_DIGEST = f"{API_GROUP}/model-sha256"

# Azure confidential VM node pools carry this label; Veil's pools also carry its taint.
CVM_SECURITY_TYPE_LABEL = "kubernetes.azure.com/security-type"
CVM_SECURITY_TYPE = "ConfidentialVM"
CONFIDENTIAL_TAINT_KEY = f"{API_GROUP}/confidential"

# Confidential ACI virtual nodes.
ACI_NODE_SELECTOR = {"virtualization": "virtualnode2"}
ACI_TOLERATION_KEY = "virtual-kubelet.io/provider"
ACI_CCE_POLICY_ANNOTATION = "microsoft.containerinstance.virtualnode.ccepolicy"

# Azure workload identity.
WORKLOAD_IDENTITY_USE = "azure.workload.identity/use"
WORKLOAD_IDENTITY_CLIENT_ID = "azure.workload.identity/client-id"

# Confidential GPU nodes (Azure NCCads H100 v5): AKS labels GPU nodes with their accelerator;
# the NVIDIA device plugin serves the GPU resource, whose name Veil's GPU pools are tainted with.
GPU_RESOURCE = "nvidia.com/gpu"
GPU_ACCELERATOR_LABEL = "kubernetes.azure.com/accelerator"
GPU_ACCELERATOR = "nvidia"
