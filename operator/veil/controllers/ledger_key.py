"""The operator's ledger key: the HMAC key that seals every budget ledger it writes.

Read from `VEIL_LEDGER_KEY_FILE` when set (a mounted Secret); otherwise kept in the Secret
`VEIL_LEDGER_KEY_SECRET` (default `veil-ledger-key`) in the operator's namespace
(`VEIL_NAMESPACE`, else the in-cluster ServiceAccount's namespace, else `default`), created
with 32 random bytes the first time. The operator creates it rather than the chart, so
`helm template` (Argo CD) never rolls a new key that would make every ledger unverifiable.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from veil import labels

KEY_BYTES = 32
DATA_KEY = "key"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class LedgerKeyError(RuntimeError):
    """The ledger key cannot be read or created."""


def operator_namespace() -> str:
    explicit = os.environ.get("VEIL_NAMESPACE")
    if explicit:
        return explicit
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or "default"
    except OSError:
        return "default"


def _decode(raw: bytes, where: str) -> bytes:
    if len(raw) < KEY_BYTES:
        raise LedgerKeyError(f"the ledger key in {where} is shorter than {KEY_BYTES} bytes")
    return raw


def load_ledger_key(api: client.ApiClient) -> bytes:
    path = os.environ.get("VEIL_LEDGER_KEY_FILE")
    if path:
        try:
            return _decode(Path(path).read_bytes(), path)
        except OSError as failed:
            raise LedgerKeyError(f"cannot read the ledger key file {path}: {failed}") from failed
    core = client.CoreV1Api(api)
    namespace = operator_namespace()
    name = os.environ.get("VEIL_LEDGER_KEY_SECRET", "veil-ledger-key")
    where = f"Secret {namespace}/{name}"
    for _ in range(2):
        try:
            found = core.read_namespaced_secret(name, namespace)
            return _decode(base64.b64decode((found.data or {}).get(DATA_KEY, "")), where)
        except ApiException as failed:
            if failed.status != 404:
                raise LedgerKeyError(
                    f"cannot read the ledger key {where}: {failed.reason}"
                ) from failed
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=name,
                namespace=namespace,
                labels={labels.MANAGED_BY: "veil", labels.COMPONENT: "ledger-key"},
            ),
            immutable=True,
            data={DATA_KEY: base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()},
        )
        try:
            core.create_namespaced_secret(namespace, body)
        except ApiException as failed:
            if failed.status != 409:  # another replica created it first: read theirs
                raise LedgerKeyError(
                    f"cannot create the ledger key {where}: {failed.reason}"
                ) from failed
    raise LedgerKeyError(f"the ledger key {where} keeps disappearing")
