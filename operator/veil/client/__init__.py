"""Verified, encrypted inference from a caller: check the runtime's attestation, then send.

    from veil.client import connect
    scorer = connect("http://fraud-scorer.veil-aci:8080", "fraud-scorer", "fraud-scorer.json")
    scorer.infer({"input": rows})

`connect` verifies the runtime's evidence before it returns (raising `RefusedError`, whose
`check` names what failed); every request is then encrypted to the attested key (HPKE, see
`veil.runtime.channel`). The expectations (issuer, TEE claims) come from a file the model's
owner publishes or from the ConfidentialModel manifest itself (`Expectations`).

Needs only aiohttp, PyJWT and cryptography (and numpy for array inputs): no kopf, Kubernetes or
Azure SDK.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from veil.client.expectations import Expectations
from veil.client.session import AsyncClient, Client, InferenceError, RefusedError, Verified

__all__ = [
    "AsyncClient",
    "Client",
    "Expectations",
    "InferenceError",
    "RefusedError",
    "Verified",
    "connect",
]


def connect(
    url: str,
    model: str,
    expect: Expectations | str | Path,
    *,
    allow_http_loopback_issuer: bool = False,
    **options: Any,
) -> Client:
    """A verified client: the runtime's evidence is checked before this returns. `expect`: the
    expectations, or the file (JSON/YAML, or the ConfidentialModel manifest) holding them.
    `allow_http_loopback_issuer` is for tests against a local authority only."""
    expectations = (
        expect if isinstance(expect, Expectations) else Expectations.from_file(Path(expect))
    )
    if allow_http_loopback_issuer:
        expectations = expectations.with_issuer_loopback(True)
    client = Client(url, model, expectations, **options)
    try:
        client.verify()
    except BaseException:
        client.close()
        raise
    return client
