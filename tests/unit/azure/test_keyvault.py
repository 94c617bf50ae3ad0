"""ensure_release_key / delete_key_if_policy with the REAL azure-keyvault-keys KeyClient against
a local Key Vault (Lowkey Vault, or the stand-in: see conftest.py), plus failure modes and Secure
Key Release of the keys Veil writes through the stand-in (its refusals: tests/unit/standins)."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.keyvault.keys import KeyClient, KeyReleasePolicy, KeyType
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.unit.azure.conftest import KeyVaultBackend
from tests.unit.azure.test_release_policy import CCE_SHA, aci_token, spec
from veil.azure.credentials import AzureSettings
from veil.azure.keyvault import (
    TAG_POLICY_DIGEST,
    KeyVaultError,
    delete_key_if_policy,
    ensure_release_key,
    key_client,
)
from veil.azure.release_policy import policies_equivalent, release_policy
from veil_standins.jose import rsa_public_jwk
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.maa import MaaStandIn

POLICY_A = release_policy(spec("confidentialVM", "sevsnp")).canonical
POLICY_B = release_policy(spec("confidentialVM", "tdx")).canonical


@pytest.fixture
def client(key_vault: KeyVaultBackend) -> KeyClient:
    return key_client(key_vault.url, key_vault.settings)


@pytest.fixture
def double_client(kv_double: KeyVaultDouble, kv_double_settings: AzureSettings) -> KeyClient:
    no_retries = dataclasses.replace(kv_double_settings, extra_client_kwargs={"retry_total": 0})
    return key_client(kv_double.url, no_retries)


def versions(client: KeyClient, name: str) -> list[str]:
    return [str(p.version) for p in client.list_properties_of_key_versions(name)]


# -- against the Key Vault backend --------------------------------------------------------------


def test_creates_an_exportable_hsm_key_with_the_immutable_policy(
    client: KeyClient, key_name: str
) -> None:
    state = ensure_release_key(client, key_name, POLICY_A)
    assert state.created
    assert state.policy_digest == release_policy(spec("confidentialVM", "sevsnp")).digest
    assert state.kid.endswith(f"/keys/{key_name}/{state.version}")
    key = client.get_key(key_name)
    assert key.key_type == KeyType.rsa_hsm
    assert key.properties.exportable is True
    assert key.properties.version == state.version
    policy = key.properties.release_policy
    assert policy is not None
    assert policy.immutable is True
    assert policy.encoded_policy is not None
    assert policies_equivalent(policy.encoded_policy, POLICY_A)
    assert (key.properties.tags or {}).get(TAG_POLICY_DIGEST) == state.policy_digest


def test_the_same_policy_writes_no_new_version(client: KeyClient, key_name: str) -> None:
    first = ensure_release_key(client, key_name, POLICY_A)
    second = ensure_release_key(client, key_name, POLICY_A)
    assert not second.created
    assert (second.kid, second.version) == (first.kid, first.version)
    assert versions(client, key_name) == [first.version]


def test_a_changed_policy_creates_a_new_version_and_never_edits(
    client: KeyClient, key_name: str
) -> None:
    first = ensure_release_key(client, key_name, POLICY_A)
    second = ensure_release_key(client, key_name, POLICY_B)
    assert second.created
    assert second.version != first.version
    assert second.policy_digest != first.policy_digest
    assert sorted(versions(client, key_name)) == sorted([first.version, second.version])
    old = client.get_key(key_name, first.version).properties.release_policy
    assert old is not None
    assert old.encoded_policy is not None
    assert policies_equivalent(old.encoded_policy, POLICY_A)  # the old version is untouched
    assert not ensure_release_key(client, key_name, POLICY_B).created
    assert ensure_release_key(client, key_name, POLICY_A).created  # back to A: a third version
    assert len(versions(client, key_name)) == 3


def test_before_create_runs_only_when_a_version_is_made_and_can_stop_it(
    client: KeyClient, key_name: str
) -> None:
    """The hook another operator's claim comes through: asked with the policy's digest before a
    creation, never when the key is already right; raising it creates nothing."""

    class ClaimedError(Exception):
        pass

    asked: list[str] = []

    def refuse(digest: str) -> None:
        asked.append(digest)
        raise ClaimedError

    with pytest.raises(ClaimedError):
        ensure_release_key(client, key_name, POLICY_A, before_create=refuse)
    assert asked == [release_policy(spec("confidentialVM", "sevsnp")).digest]
    with pytest.raises(ResourceNotFoundError):
        client.get_key(key_name)  # nothing was made

    made = ensure_release_key(client, key_name, POLICY_A, before_create=asked.append)
    assert made.created
    assert len(asked) == 2
    again = ensure_release_key(client, key_name, POLICY_A, before_create=refuse)
    assert not again.created
    assert len(asked) == 2  # an existing right key asks nobody


def test_a_key_that_cannot_be_released_gets_a_proper_new_version(
    client: KeyClient, key_name: str
) -> None:
    plain = client.create_rsa_key(key_name)  # software, not exportable, no policy
    state = ensure_release_key(client, key_name, POLICY_A)
    assert state.created
    assert state.version != plain.properties.version
    assert client.get_key(key_name).properties.exportable is True


def test_deletion_policy_retain_keeps_the_key(client: KeyClient, key_name: str) -> None:
    state = ensure_release_key(client, key_name, POLICY_A)
    assert delete_key_if_policy(client, key_name, "Retain") is False
    assert client.get_key(key_name).properties.version == state.version


def test_deletion_policy_delete_deletes_the_key(client: KeyClient, key_name: str) -> None:
    ensure_release_key(client, key_name, POLICY_A)
    assert delete_key_if_policy(client, key_name, "Delete") is True
    with pytest.raises(ResourceNotFoundError):
        client.get_key(key_name)
    assert client.get_deleted_key(key_name).name == key_name  # soft-deleted, recoverable
    assert delete_key_if_policy(client, key_name, "Delete") is False  # already gone


def test_unknown_deletion_policy_is_refused(client: KeyClient, key_name: str) -> None:
    with pytest.raises(ValueError, match="Retain or Delete"):
        delete_key_if_policy(client, key_name, "Purge")  # type: ignore[arg-type]


# -- failure modes (the double) -----------------------------------------------------------------


def test_403_says_which_role_is_missing(
    kv_double: KeyVaultDouble, double_client: KeyClient, key_name: str
) -> None:
    kv_double.fail(
        403,
        "Forbidden",
        "Caller is not authorized to perform action on resource.",
        path_contains=key_name,
        inner_code="ForbiddenByRbac",
    )
    with pytest.raises(KeyVaultError) as caught:
        ensure_release_key(double_client, key_name, POLICY_A)
    error = caught.value
    assert str(error).startswith(
        "Key Vault refused: the operator's identity lacks the Key Vault Crypto Officer role"
    )
    assert "ForbiddenByRbac" in str(error)
    assert (error.status, error.retriable) == (403, False)


def test_a_soft_deleted_name_is_explained(double_client: KeyClient, key_name: str) -> None:
    ensure_release_key(double_client, key_name, POLICY_A)
    delete_key_if_policy(double_client, key_name, "Delete")
    with pytest.raises(KeyVaultError, match="soft-delete retention") as caught:
        ensure_release_key(double_client, key_name, POLICY_A)
    assert caught.value.status == 409


def test_a_standard_vault_is_explained(
    kv_double: KeyVaultDouble, double_client: KeyClient, key_name: str
) -> None:
    kv_double.fail(
        400,
        "BadParameter",
        "Keys of type RSA-HSM are not supported in a vault of the standard tier.",
        path_contains=key_name,
    )
    with pytest.raises(KeyVaultError, match="needs a Premium vault or a Managed HSM"):
        ensure_release_key(double_client, key_name, POLICY_A)


def test_throttling_is_retriable(
    kv_double: KeyVaultDouble, double_client: KeyClient, key_name: str
) -> None:
    kv_double.fail(429, "Throttled", "Too many requests.", path_contains=key_name)
    with pytest.raises(KeyVaultError, match=r"^waiting for Key Vault \(throttled\)") as caught:
        ensure_release_key(double_client, key_name, POLICY_A)
    assert caught.value.retriable
    assert caught.value.retry_after is not None


def test_a_rejected_token_is_explained(
    kv_double: KeyVaultDouble, kv_double_settings: AzureSettings, key_name: str
) -> None:
    wrong = AzureSettings.for_emulator(
        "not-the-token", connection_verify=kv_double_settings.connection_verify
    )
    with pytest.raises(KeyVaultError, match="did not accept the operator's credentials"):
        ensure_release_key(key_client(kv_double.url, wrong), key_name, POLICY_A)


def test_an_unreachable_vault_is_explained(key_name: str) -> None:
    settings = dataclasses.replace(
        AzureSettings.for_emulator(), extra_client_kwargs={"retry_total": 0}
    )
    with pytest.raises(KeyVaultError, match="not reachable") as caught:
        ensure_release_key(key_client("https://127.0.0.1:9", settings), key_name, POLICY_A)
    assert caught.value.retriable


def test_tls_is_verified(kv_double: KeyVaultDouble, key_name: str) -> None:
    """Without the test CA the double's certificate is refused: verification is really on."""
    settings = dataclasses.replace(
        AzureSettings.for_emulator(), extra_client_kwargs={"retry_total": 0}
    )
    with pytest.raises(KeyVaultError, match=r"not reachable.*(?i:certificate)"):
        ensure_release_key(key_client(kv_double.url, settings), key_name, POLICY_A)


# -- Secure Key Release (the stand-in verifies the token and evaluates the policy) ------------

WRAPPING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _attested(maa: MaaStandIn, claims: dict[str, Any]) -> str:
    """A token `maa` signed with `claims` (their `iss` aside: the token's is maa's), carrying a
    runtime key to wrap the released key to."""
    runtime = {"keys": [{**rsa_public_jwk(WRAPPING_KEY.public_key()), "kid": "wrapping"}]}
    body = {k: v for k, v in claims.items() if k != "iss"}
    return maa.token({**body, "x-ms-runtime": runtime})


def test_release_honours_the_policy_veil_wrote(
    double_client: KeyClient, maa: MaaStandIn, key_name: str
) -> None:
    policy = release_policy(spec("confidentialACI", authority=maa.issuer))
    state = ensure_release_key(double_client, key_name, policy.canonical)

    released = double_client.release_key(
        key_name, _attested(maa, aci_token()), version=state.version
    )
    payload = json.loads(base64.urlsafe_b64decode(released.value.split(".")[1] + "=="))
    assert payload["response"]["key"]["key"]["kid"] == state.kid

    for claims in (aci_token(hostdata="0" * 64), aci_token(debuggable=True)):
        with pytest.raises(HttpResponseError, match="release policy is not satisfied") as refused:
            double_client.release_key(key_name, _attested(maa, claims), version=state.version)
        assert refused.value.status_code == 403
    assert CCE_SHA in policy.canonical.decode()
    assert maa.issuer in policy.canonical.decode()


def test_the_double_refuses_what_key_vault_refuses(double_client: KeyClient, key_name: str) -> None:
    with pytest.raises(HttpResponseError, match="require a release policy"):
        double_client.create_rsa_key(key_name, hardware_protected=True, exportable=True)
    with pytest.raises(HttpResponseError, match="Invalid release policy"):
        double_client.create_rsa_key(
            key_name,
            hardware_protected=True,
            exportable=True,
            release_policy=KeyReleasePolicy(b'{"version":"1.0.0","anyOf":[]}', immutable=True),
        )
