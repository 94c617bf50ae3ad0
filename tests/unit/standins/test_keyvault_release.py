"""Secure Key Release from the Key Vault stand-in through the REAL KeyClient: what it hands over
(the key's own private half, wrapped to the token's runtime key, in a JWS signed under the CA),
and everything it must refuse as Key Vault does."""

from __future__ import annotations

import base64
import time
from typing import Any

import jwt
import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import KeyClient, KeyExportEncryptionAlgorithm, KeyReleasePolicy
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.unit.azure.test_release_policy import spec
from tests.unit.standins.conftest import release_key, runtime_keys
from tests.unit.standins.test_key_transfer import sidecar_unwrap
from veil.azure.release_policy import release_policy
from veil_standins.jose import b64url_decode
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.maa import MaaStandIn
from veil_standins.tls import TlsFiles
from veil_standins.trust import Trust

EPHEMERAL = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ROGUE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _vm_token(maa: MaaStandIn, **options: Any) -> str:
    """A token of the simulated confidential VM, naming EPHEMERAL as its runtime key."""
    return maa.token(maa.simulated_claims(runtime_keys(EPHEMERAL)), **options)


def _refused(client: KeyClient, name: str, token: str, status: int = 403) -> str:
    with pytest.raises(HttpResponseError) as refused:
        client.release_key(name, token)
    assert refused.value.status_code == status, refused.value.message
    return str(refused.value.message)


@pytest.mark.parametrize(
    "algorithm",
    [
        KeyExportEncryptionAlgorithm.ckm_rsa_aes_key_wrap,
        KeyExportEncryptionAlgorithm.rsa_aes_key_wrap_256,
        KeyExportEncryptionAlgorithm.rsa_aes_key_wrap_384,
    ],
)
def test_release_hands_over_the_keys_own_private_half(
    client: KeyClient,
    vault: KeyVaultDouble,
    maa: MaaStandIn,
    *,
    tls: TlsFiles,
    key_name: str,
    algorithm: KeyExportEncryptionAlgorithm,
) -> None:
    state = release_key(client, key_name, maa.issuer)

    released = client.release_key(
        key_name, _vm_token(maa), version=state.version, algorithm=algorithm, nonce="n-1"
    )

    # Signed by a certificate for the vault's host under the CA, as the sidecar checks.
    header = jwt.get_unverified_header(released.value)
    chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in header["x5c"]]
    Trust.from_files([tls.ca_file]).verify_chain(chain, "127.0.0.1")
    leaf_key = chain[0].public_key()
    assert isinstance(leaf_key, rsa.RSAPublicKey)
    payload = jwt.decode(released.value, leaf_key, algorithms=["RS256"])
    assert payload["request"]["enc"] == algorithm.value
    assert payload["request"]["kid"] == state.kid
    assert payload["request"]["nonce"] == "n-1"
    key = payload["response"]["key"]["key"]
    assert key["kid"] == state.kid

    pkcs8 = sidecar_unwrap(key["key_hsm"], algorithm.value, EPHEMERAL)
    private = serialization.load_der_private_key(pkcs8, password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    assert private.private_numbers() == vault.private_key(key_name).private_numbers()
    numbers = private.public_key().public_numbers()
    assert int.from_bytes(b64url_decode(key["n"]), "big") == numbers.n
    public = client.get_key(key_name).key
    assert int.from_bytes(bytes(public.n or b""), "big") == numbers.n


def test_every_key_has_key_material_of_its_own(
    client: KeyClient, maa: MaaStandIn, key_name: str
) -> None:
    first = release_key(client, key_name, maa.issuer)
    second = release_key(client, f"{key_name}-2", maa.issuer)
    third = release_key(client, key_name, maa.issuer, "tdx")  # a new version of the first
    moduli = {
        bytes(client.get_key(name, version).key.n or b"")
        for name, version in (
            (key_name, first.version),
            (f"{key_name}-2", second.version),
            (key_name, third.version),
        )
    }
    assert len(moduli) == 3


# -- refusals -----------------------------------------------------------------------------------


def test_a_token_signed_with_another_key_is_refused(
    client: KeyClient, maa: MaaStandIn, rogue_maa: MaaStandIn, key_name: str
) -> None:
    """The genuine authority's kid and issuer, an attacker's key, and a jku pointing at the
    attacker's published keys: Key Vault fetches keys from the policy's authority only."""
    release_key(client, key_name, maa.issuer)
    forged = _vm_token(maa, signing_key=ROGUE_KEY, headers={"jku": f"{rogue_maa.issuer}/certs"})
    assert "does not verify" in _refused(client, key_name, forged)


def test_a_token_from_another_authority_is_refused(
    client: KeyClient, maa: MaaStandIn, rogue_maa: MaaStandIn, key_name: str
) -> None:
    release_key(client, key_name, maa.issuer)
    message = _refused(client, key_name, _vm_token(rogue_maa))
    assert "not by an authority of the key's release policy" in message


def test_a_token_claiming_the_authority_under_an_unknown_kid_is_refused(
    client: KeyClient, maa: MaaStandIn, rogue_maa: MaaStandIn, key_name: str
) -> None:
    release_key(client, key_name, maa.issuer)
    claims = {**rogue_maa.simulated_claims(runtime_keys(EPHEMERAL)), "iss": maa.issuer}
    forged = rogue_maa.token(claims, kid="rogue-key", signing_key=ROGUE_KEY)
    assert "publishes no signing key 'rogue-key'" in _refused(client, key_name, forged)


def test_an_expired_token_is_refused(client: KeyClient, maa: MaaStandIn, key_name: str) -> None:
    release_key(client, key_name, maa.issuer)
    assert "expired" in _refused(client, key_name, _vm_token(maa, lifetime=-600))


def test_a_token_not_yet_valid_is_refused(
    client: KeyClient, maa: MaaStandIn, key_name: str
) -> None:
    release_key(client, key_name, maa.issuer)
    claims = {**maa.simulated_claims(runtime_keys(EPHEMERAL)), "nbf": int(time.time()) + 3600}
    assert "not yet valid" in _refused(client, key_name, maa.token(claims))


def test_an_unsigned_token_is_refused(client: KeyClient, maa: MaaStandIn, key_name: str) -> None:
    release_key(client, key_name, maa.issuer)
    claims = {**maa.simulated_claims(runtime_keys(EPHEMERAL)), "iss": maa.issuer}
    unsigned = jwt.encode(claims, None, algorithm="none")
    assert "not RS256-signed" in _refused(client, key_name, unsigned)


def test_a_policy_the_vm_does_not_satisfy_is_refused(
    client: KeyClient, maa: MaaStandIn, key_name: str
) -> None:
    release_key(client, key_name, maa.issuer, "tdx")  # the simulated VM is an SEV-SNP one
    message = _refused(client, key_name, _vm_token(maa))
    assert "release policy is not satisfied" in message


def test_a_key_that_is_not_exportable_is_refused(
    client: KeyClient, maa: MaaStandIn, key_name: str
) -> None:
    client.create_rsa_key(key_name, hardware_protected=True)
    assert "not exportable" in _refused(client, key_name, _vm_token(maa))


def test_a_disabled_key_is_refused(client: KeyClient, maa: MaaStandIn, key_name: str) -> None:
    policy = release_policy(spec("confidentialVM", authority=maa.issuer)).canonical
    client.create_rsa_key(
        key_name,
        hardware_protected=True,
        exportable=True,
        enabled=False,
        release_policy=KeyReleasePolicy(policy, immutable=True),
    )
    assert "disabled key" in _refused(client, key_name, _vm_token(maa))


def test_malformed_requests_are_refused(client: KeyClient, maa: MaaStandIn, key_name: str) -> None:
    release_key(client, key_name, maa.issuer)
    assert "not a JWT" in _refused(client, key_name, "not-a-token", status=400)
    no_runtime_key = maa.token(maa.simulated_claims({}))
    assert "x-ms-runtime.keys" in _refused(client, key_name, no_runtime_key, status=400)
    with pytest.raises(HttpResponseError, match="not a key export algorithm"):
        client.release_key(key_name, _vm_token(maa), algorithm="A256KW")


def test_an_unreachable_authority_is_not_a_refusal(client: KeyClient, key_name: str) -> None:
    nowhere = MaaStandIn(issuer="https://127.0.0.1:9")
    release_key(client, key_name, nowhere.issuer)
    message = _refused(client, key_name, _vm_token(nowhere), status=503)
    assert "cannot GET https://127.0.0.1:9/.well-known/openid-configuration" in message
