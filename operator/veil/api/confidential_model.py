"""ConfidentialModel: a sealed ONNX model served only inside attested confidential capacity."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import AfterValidator, Field, StringConstraints

from veil.api.base import (
    DNS_LABEL_PATTERN,
    DNS_NAME_PATTERN,
    SHA256_PATTERN,
    ColumnBounds,
    Condition,
    CustomResource,
    LabelSelector,
    ObjectReference,
    ResourceRequirements,
    Rule,
    WireModel,
    conditions_field,
    observed_generation_field,
)
from veil.api.dpsgd import DPSGD_RULES, DpSgdTraining, Family

Isolation = Literal["confidentialVM", "confidentialACI", "coco"]
Platform = Literal["sevsnp", "tdx"]
Channel = Literal["encrypted", "plaintext"]

# Azure confidential VM families: DCasv5/ECasv5 (AMD SEV-SNP), DCesv5/ECesv5 (Intel TDX),
# and their v6 successors, e.g. Standard_DC4as_v5 or Standard_EC8es_v5; and the confidential
# GPU family NCCads H100 v5 (AMD SEV-SNP with an H100 in confidential mode), e.g.
# Standard_NCC40ads_H100_v5.
CONFIDENTIAL_VM_SIZE_PATTERN = r"^Standard_([DE]C[0-9]+(as|ads|es|eds)_v[56]|NCC[0-9]+ads_H100_v5)$"
HTTPS_URL_PATTERN = r"^https://[^\s/$.?#][^\s]*$"


def _check_cidr(value: str) -> str:
    if "/" not in value:
        raise ValueError("must be a CIDR such as 20.0.0.0/24")
    ipaddress.ip_network(value, strict=True)
    return value


Cidr = Annotated[
    str,
    AfterValidator(_check_cidr),
    Field(
        max_length=43,
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "isCIDR(self)", "message": "must be a CIDR such as 20.0.0.0/24"}
            ]
        },
    ),
]


class SealedArtifact(WireModel):
    """Where the sealed model lives and the digest of its sealed bytes."""

    uri: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^(https|file|az)://\S+$",
        description="Where the pods' fetch step downloads the sealed model (`veil seal` "
        "writes it): az://<storage account>/<container>/<blob> (Azure Blob Storage, read "
        "with the model's workload identity), https://<host>/<path> (a plain download), or "
        "file:///<path> (a path inside the fetch container, for development).",
    )
    sha256: str = Field(
        pattern=SHA256_PATTERN,
        description="Hex sha256 of the sealed file: the pods refuse any other bytes, before "
        "a key is released.",
    )
    format: Literal["onnx"] = Field(
        default="onnx", description="The model format inside the seal: onnx (the only one)."
    )


class NodePool(WireModel):
    """An AKS node pool of confidential VMs that Veil ensures before scheduling."""

    subscription_id: str = Field(
        min_length=1, max_length=64, description="Azure subscription of the AKS cluster."
    )
    resource_group: str = Field(
        min_length=1, max_length=90, description="Resource group of the AKS cluster."
    )
    cluster_name: str = Field(
        min_length=1, max_length=63, description="Name of the AKS cluster Veil runs in."
    )
    name: str = Field(
        min_length=1,
        max_length=12,
        pattern=r"^[a-z][a-z0-9]{0,11}$",
        description="AKS pool names: lowercase alphanumerics, at most 12 characters.",
    )
    vm_size: str = Field(
        max_length=64,
        pattern=CONFIDENTIAL_VM_SIZE_PATTERN,
        description="A confidential VM size: DCasv5/ECasv5 (SEV-SNP), DCesv5/ECesv5 (TDX), "
        "or the confidential GPU size NCCads H100 v5 (SEV-SNP, e.g. Standard_NCC40ads_H100_v5).",
    )
    count: int = Field(
        default=1, ge=0, le=1000, description="Nodes in the pool when Veil creates it."
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = ()


def _platform_matches_size(tee: TrustedExecution) -> bool:
    if tee.node_pool is None:
        return True
    # The letter after the core count names the processor: a (AMD SEV-SNP), e (Intel TDX).
    family_letter = "a" if tee.platform == "sevsnp" else "e"
    return re.match(rf"^Standard_N?[DEC]C[0-9]+{family_letter}", tee.node_pool.vm_size) is not None


class TrustedExecution(WireModel):
    """The trusted execution environment the model may be decrypted in."""

    isolation: Isolation = Field(
        description="confidentialVM: AKS confidential VM nodes, attested by Veil's node agent "
        "through the vTPM; confidentialACI: Confidential Azure Container Instances (virtual "
        "nodes), attested per pod by the Secure Key Release sidecar; coco: a Confidential "
        "Containers runtime class (outside AKS)."
    )
    platform: Platform = Field(
        default="sevsnp",
        description="The TEE hardware the release policy demands: sevsnp (AMD SEV-SNP) or "
        "tdx (Intel TDX).",
    )
    node_pool: NodePool | None = Field(
        default=None,
        description="confidentialVM only: an AKS node pool Veil creates (or checks) before "
        "scheduling the model; absent: the cluster already has confidential VM nodes.",
    )
    runtime_class_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
        description="Runtime class for coco isolation, e.g. kata-qemu-snp.",
    )
    cce_policy: str | None = Field(
        default=None,
        max_length=65536,
        pattern=r"^[A-Za-z0-9+/]+={0,2}$",
        description="Base64 confidential-computing enforcement policy for confidentialACI.",
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.isolation != 'coco' || has(self.runtimeClassName)",
            message="isolation coco requires runtimeClassName (e.g. kata-qemu-snp)",
            check=lambda t: t.isolation != "coco" or t.runtime_class_name is not None,
            field_path=".runtimeClassName",
            reason="FieldValueRequired",
        ),
        Rule(
            cel="self.isolation != 'confidentialACI' || has(self.ccePolicy)",
            message="isolation confidentialACI requires ccePolicy (the base64 CCE policy)",
            check=lambda t: t.isolation != "confidentialACI" or t.cce_policy is not None,
            field_path=".ccePolicy",
            reason="FieldValueRequired",
        ),
        Rule(
            cel="self.isolation != 'confidentialACI' || self.platform == 'sevsnp'",
            message="confidentialACI runs on AMD SEV-SNP only: platform must be sevsnp",
            check=lambda t: t.isolation != "confidentialACI" or t.platform == "sevsnp",
            field_path=".platform",
        ),
        Rule(
            cel="!has(self.nodePool) || self.isolation == 'confidentialVM'",
            message="nodePool can only be ensured for isolation confidentialVM",
            check=lambda t: t.node_pool is None or t.isolation == "confidentialVM",
            field_path=".nodePool",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel=(
                "!has(self.nodePool) || (self.platform == 'sevsnp' ? "
                "self.nodePool.vmSize.matches('^Standard_N?[DEC]C[0-9]+a') : "
                "self.nodePool.vmSize.matches('^Standard_N?[DEC]C[0-9]+e'))"
            ),
            message="nodePool.vmSize must match the platform: DCas/ECas and NCCads H100 sizes "
            "for sevsnp, DCes/ECes sizes for tdx",
            check=_platform_matches_size,
            field_path=".nodePool.vmSize",
        ),
    )


class RequiredClaim(WireModel):
    """An extra attestation claim the release policy demands, e.g. a measurement."""

    claim: str = Field(
        min_length=1,
        max_length=256,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="The attestation token claim, e.g. x-ms-sevsnpvm-launchmeasurement.",
    )
    equals: str | bool = Field(description="The value the claim must equal (string or boolean).")


class KeyVaultKey(NamedTuple):
    """Where a Key Vault release goes: the vault, the key, the attestation authority."""

    vault_url: str
    key_name: str
    attestation_authority: str


class KeyRelease(WireModel):
    """The key that wraps the model's data key, and who may have it released: a Key Vault key
    behind a Secure Key Release policy (vaultUrl, keyName, attestationAuthority), or, on
    Confidential Containers, a Trustee KBS resource released through the guest's Confidential
    Data Hub (kbsResource)."""

    vault_url: str | None = Field(
        default=None,
        max_length=512,
        pattern=HTTPS_URL_PATTERN,
        description="The Azure Key Vault (or Managed HSM) URL, e.g. "
        "https://veil-kv.vault.azure.net.",
    )
    key_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=127,
        pattern=r"^[0-9a-zA-Z-]+$",
        description="Name of the Key Vault key Veil creates (exportable, HSM-backed, with an "
        "immutable release policy): letters, digits and dashes.",
    )
    attestation_authority: str | None = Field(
        default=None,
        max_length=512,
        pattern=HTTPS_URL_PATTERN,
        description="The Microsoft Azure Attestation instance whose tokens may release the key.",
    )
    kbs_resource: str | None = Field(
        default=None,
        max_length=512,
        pattern=r"^(kbs:///)?[A-Za-z0-9._-]+/[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$",
        description="coco only: the Trustee KBS resource (kbs:///repository/type/tag) holding "
        "the model's private key, released by the guest's Confidential Data Hub after KBS "
        "attests the TEE. Veil then manages no Key Vault key.",
    )
    required_claims: list[RequiredClaim] = Field(
        default_factory=list,
        max_length=16,
        description="Claims the release policy demands beside those Veil derives from tee "
        "(e.g. a launch measurement).",
    )
    workload_identity_client_id: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$",
        description="Client id of the managed identity the pods use to call Key Vault.",
    )
    deletion_policy: Literal["Retain", "Delete"] = Field(
        default="Retain", description="What happens to the key when the model is deleted."
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.kbsResource) != (has(self.vaultUrl) && has(self.keyName) && "
            "has(self.attestationAuthority))",
            message="name either a Key Vault key (vaultUrl, keyName and attestationAuthority) "
            "or a KBS resource (kbsResource), not both",
            check=lambda k: (
                (k.kbs_resource is not None)
                != (
                    k.vault_url is not None
                    and k.key_name is not None
                    and k.attestation_authority is not None
                )
            ),
            reason="FieldValueRequired",
        ),
    )

    @property
    def in_kbs(self) -> bool:
        return self.kbs_resource is not None

    def key_vault(self) -> KeyVaultKey:
        """The Key Vault key; ValueError for a model whose key is a KBS resource."""
        if self.vault_url is None or self.key_name is None or self.attestation_authority is None:
            raise ValueError("keyRelease names a KBS resource, not a Key Vault key")
        return KeyVaultKey(self.vault_url, self.key_name, self.attestation_authority)


class Serving(WireModel):
    """How the inference runtime is run."""

    replicas: int = Field(default=1, ge=0, le=100, description="Inference pods to run.")
    port: int = Field(
        default=8000,
        ge=1024,
        le=65535,
        description="Port of the Open Inference Protocol (HTTP) on the pods and the Service.",
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description="CPU and memory of the inference runtime container.",
    )
    channel: Channel | None = Field(
        default=None,
        description="How callers' requests travel. encrypted: the runtime makes a key in the "
        "TEE, binds it into its attestation (GET /v2/evidence), and answers only requests "
        "HPKE-encrypted to it, so the host and the network see ciphertext (`veil infer` and "
        "veil.client verify the evidence first); plaintext inference is refused. plaintext: "
        "plain Open Inference Protocol requests are accepted too. Absent: encrypted on "
        "confidentialACI and confidentialVM, plaintext on coco (whose attestation agent gives "
        "no token Veil can bind the key to yet).",
    )

    def channel_for(self, isolation: Isolation) -> Channel:
        """The channel in force: the spec's, else the placement's default."""
        if self.channel is not None:
            return self.channel
        return "plaintext" if isolation == "coco" else "encrypted"


class NetworkPeer(WireModel):
    """Callers allowed in, as a NetworkPolicy peer: pods matching both selectors."""

    namespace_selector: LabelSelector | None = Field(
        default=None,
        description="Namespaces the callers may run in; absent: the model's own namespace.",
    )
    pod_selector: LabelSelector | None = Field(
        default=None,
        description="Pods that may call; absent: every pod of the selected namespaces.",
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.namespaceSelector) || has(self.podSelector)",
            message="a peer needs namespaceSelector, podSelector or both",
            check=lambda p: p.namespace_selector is not None or p.pod_selector is not None,
            reason="FieldValueRequired",
        ),
    )


class Network(WireModel):
    """Who may call the model; everything else is denied."""

    allow_from: list[NetworkPeer] = Field(
        default_factory=list,
        max_length=32,
        description="Who may reach the inference port; empty: no one (the model's "
        "NetworkPolicy denies all other ingress).",
    )
    egress_cidrs: list[Cidr] = Field(
        default_factory=list,
        max_length=32,
        description="CIDRs of the attestation and Key Vault endpoints the sidecar must reach.",
    )
    fqdn_egress: bool = Field(
        default=False,
        description="Also emit a CiliumNetworkPolicy with toFQDNs (needs Cilium).",
    )


# A declared class label: no comma (the Job passes the list comma-separated) and no
# surrounding whitespace (the trainer compares labels exactly).
ClassLabel = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^,\s]([^,]*[^,\s])?$")
]


def _unique_classes(classes: list[str]) -> list[str]:
    if len(set(classes)) != len(classes):
        raise ValueError("classes must not repeat a label")
    return classes


class Training(DpSgdTraining):
    """Train the model with differential privacy instead of bringing a sealed one."""

    # The data's domain is declared here (classes, bounds), never read off the rows. The
    # claim is ε (+ δ as declared) for the fit and, beside it, evaluationEpsilon.

    budget_ref: ObjectReference = Field(
        description="The PrivacyBudget of the training dataset: the fit and the evaluation "
        "are paid from it."
    )
    dataset_uri: str = Field(
        min_length=1,
        max_length=2048,
        description="The training data (file://, az://<account>/<container>/<blob> or "
        "https://): exactly the dataset.uri of the budget named by budgetRef.",
    )
    target_column: str = Field(
        min_length=1, max_length=256, description="The column holding the label to predict."
    )
    classes: Annotated[list[ClassLabel], AfterValidator(_unique_classes)] = Field(
        min_length=2,
        max_length=256,
        description="The label set (public): values of targetColumn, numbers written as "
        "strings. Rows with any other label are dropped.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    family: Family = Field(
        default="logisticRegression",
        description="The DP model family: logisticRegression, gaussianNB or randomForest "
        "(diffprivlib, pure ε-DP), or mlp (a dense network) or cnn (a small convolutional "
        "one), trained by DP-SGD with Opacus at (ε, δ).",
    )
    epsilon: float = Field(
        gt=0, le=100, description="ε of the fit (diffprivlib: pure DP; DP-SGD: at delta)."
    )
    delta: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="δ of the fit: DP-SGD needs one above 0; diffprivlib's models use none, "
        "and it is charged as declared.",
    )
    evaluation_epsilon: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description="ε of a DP accuracy estimate on held-out rows, charged beside epsilon; "
        "0: no held-out rows and no accuracy.",
    )
    test_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="Expected share of rows held out for the evaluation (each row by a "
        "keyed hash of its content); unused when evaluationEpsilon is 0.",
    )
    features: list[str] = Field(
        default_factory=list,
        max_length=512,
        description="The feature columns (numeric), in order; empty: every column but "
        "targetColumn. Each needs its bounds.",
    )
    bounds: list[ColumnBounds] = Field(
        default_factory=list,
        max_length=512,
        description="Public bounds of every feature: reading them off the data would leak.",
    )
    output_uri: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^(file|az)://\S+$",
        description="Where the training Job writes the sealed model; the Deployment serves it.",
    )
    round: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Raise it to train again with the same settings (e.g. the data changed): "
        "every change of spec.training is a new run, with a new claim on the budget.",
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = DPSGD_RULES


class ConfidentialModelSpec(WireModel):
    """The sealed model (or how to train one), where it may run, and who may call it."""

    model: SealedArtifact | None = Field(
        default=None,
        description="A sealed ONNX model to serve; set this or training.",
    )
    tee: TrustedExecution = Field(
        description="The trusted execution environment the model may be decrypted in."
    )
    key_release: KeyRelease = Field(
        description="The key that wraps the model's data key, and the attestation that releases it."
    )
    serving: Serving = Field(
        default_factory=Serving, description="Replicas, port and resources of the runtime."
    )
    network: Network = Field(
        default_factory=Network,
        description="Who may call the model and what the pods may reach; all else is denied.",
    )
    training: Training | None = Field(
        default=None,
        description="Train the model with differential privacy (a Job paid from a "
        "PrivacyBudget) instead of bringing a sealed one; set this or model.",
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.model) || has(self.training)",
            message="set model (a sealed ONNX artifact) or training (a DP training stage)",
            check=lambda s: s.model is not None or s.training is not None,
            reason="FieldValueRequired",
        ),
        Rule(
            cel="!has(self.keyRelease.kbsResource) || self.tee.isolation == 'coco'",
            message="keyRelease.kbsResource needs isolation coco (the guest's Confidential Data "
            "Hub releases it)",
            check=lambda s: s.key_release.kbs_resource is None or s.tee.isolation == "coco",
            field_path=".keyRelease.kbsResource",
        ),
        Rule(
            cel="self.tee.isolation != 'coco' || !has(self.serving) || "
            "!has(self.serving.channel) || self.serving.channel != 'encrypted'",
            message="serving.channel encrypted needs a channel key bound into an attestation "
            "token, which Veil does on confidentialACI and confidentialVM; on coco use plaintext",
            check=lambda s: s.tee.isolation != "coco" or s.serving.channel != "encrypted",
            field_path=".serving.channel",
        ),
        Rule(
            cel="!has(self.keyRelease.kbsResource) || has(self.model)",
            message="a model trained by Veil is sealed to a Key Vault key: keyRelease.kbsResource "
            "needs model",
            check=lambda s: s.key_release.kbs_resource is None or s.model is not None,
            field_path=".keyRelease.kbsResource",
        ),
    )


class ConfidentialModelStatus(WireModel):
    """What Veil made of the spec: written by the operator only."""

    observed_generation: int | None = observed_generation_field()
    conditions: list[Condition] = conditions_field()
    key_id: str | None = Field(
        default=None,
        max_length=1024,
        description="The id (kid URL) of the Key Vault key that wraps the model's data key.",
    )
    key_version: str | None = Field(
        default=None,
        max_length=128,
        description="The key version that carries the release policy in force.",
    )
    sealed_key_version: str | None = Field(
        default=None,
        max_length=128,
        description="The key version the served model is sealed to, read from its header by "
        "the pods' fetch step; it differs from keyVersion until the model is re-sealed.",
    )
    retired_key_versions_for: str | None = Field(
        default=None,
        max_length=128,
        description="The key version for which every other version was disabled, once "
        "nothing served from them.",
    )
    ready_replicas: int | None = Field(
        default=None, ge=0, description="Inference pods that have the model loaded and serve."
    )
    node_pool_state: str | None = Field(
        default=None,
        max_length=64,
        description="Provisioning state of spec.tee.nodePool in AKS (e.g. Succeeded, Creating).",
    )
    service_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_NAME_PATTERN,
        description="The Service in front of the inference pods.",
    )
    trained_model: SealedArtifact | None = Field(
        default=None,
        description="The sealed model the training Job wrote (spec.training), which the pods "
        "serve.",
    )
    claim_state: Literal["Pending", "Granted", "Denied", "Consumed", "Released"] | None = Field(
        default=None,
        description="The training's claim on its PrivacyBudget: Pending, Granted, Denied, "
        "Consumed (the Job ran: the ε is spent) or Released (returned unspent).",
    )
    training_job: str | None = Field(
        default=None, max_length=63, description="The Job that trains the model."
    )
    training_run: str | None = Field(
        default=None, max_length=16, description="Digest of the spec.training that was trained."
    )
    endpoint: str | None = Field(
        default=None, max_length=2048, description="The model's Open Inference Protocol URL."
    )


class ConfidentialModel(CustomResource):
    """A sealed ONNX model, decrypted and served only inside attested confidential capacity:
    Veil creates its key with an attestation-bound release policy, and the Deployment, Service,
    NetworkPolicies and PodDisruptionBudget that serve it."""

    kind_name: ClassVar[str] = "ConfidentialModel"
    plural: ClassVar[str] = "confidentialmodels"
    short_names: ClassVar[tuple[str, ...]] = ("cmodel",)
    key_columns: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "Isolation", "type": "string", "jsonPath": ".spec.tee.isolation"},
        {"name": "Replicas", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint", "priority": 1},
        {"name": "Key-Version", "type": "string", "jsonPath": ".status.keyVersion", "priority": 1},
    )

    kind: Literal["ConfidentialModel"] = "ConfidentialModel"
    spec: ConfidentialModelSpec
    status: ConfidentialModelStatus = Field(default_factory=ConfidentialModelStatus)
