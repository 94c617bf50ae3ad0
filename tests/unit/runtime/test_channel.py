"""The HPKE envelope (runtime/channel.py) on its own: round trips and every refusal."""

from __future__ import annotations

import pytest

from veil.runtime.channel import (
    ENC_BYTES,
    ChannelError,
    ChannelPrivateKey,
    ChannelPublicKey,
    seal_request,
)


def test_request_and_response_round_trip() -> None:
    key = ChannelPrivateKey()
    public = ChannelPublicKey.from_jwk(key.public.jwk())
    sealed = seal_request(public, b'{"inputs": []}')
    opened = key.open_request(sealed.body)
    assert (opened.body, opened.header_length) == (b'{"inputs": []}', None)
    answer = opened.seal_response(400, b'{"error": "no"}')
    assert sealed.open_response(answer) == (400, None, b'{"error": "no"}')


def test_binary_header_length_travels_inside() -> None:
    key = ChannelPrivateKey()
    sealed = seal_request(key.public, b'{"h":1}tensor', 7)
    opened = key.open_request(sealed.body)
    assert (opened.body, opened.header_length) == (b'{"h":1}tensor', 7)
    assert sealed.open_response(opened.seal_response(200, b"{}xx", 2)) == (200, 2, b"{}xx")
    with pytest.raises(ChannelError, match="header length"):
        seal_request(key.public, b"short", 9)


def test_a_request_to_another_key_is_named_as_such() -> None:
    ours, theirs = ChannelPrivateKey(), ChannelPrivateKey()
    sealed = seal_request(theirs.public, b"{}")
    with pytest.raises(ChannelError, match="not to this runtime's key"):
        ours.open_request(sealed.body)


@pytest.mark.parametrize("offset", [8 + 6, 8 + 6 + ENC_BYTES, -1])
def test_any_altered_byte_is_refused(offset: int) -> None:
    key = ChannelPrivateKey()
    body = bytearray(seal_request(key.public, b'{"inputs": [1, 2, 3]}').body)
    body[offset] ^= 0x01
    with pytest.raises(ChannelError, match="does not open"):
        key.open_request(bytes(body))


def test_an_altered_suite_is_refused() -> None:
    key = ChannelPrivateKey()
    body = bytearray(seal_request(key.public, b"{}").body)
    body[13] ^= 0x02  # the AEAD id
    with pytest.raises(ChannelError, match="accepts only DHKEM"):
        key.open_request(bytes(body))


def test_short_or_foreign_messages_are_refused() -> None:
    key = ChannelPrivateKey()
    with pytest.raises(ChannelError, match="too short"):
        key.open_request(b"x" * 20)
    sealed = seal_request(key.public, b"{}")
    with pytest.raises(ChannelError, match="too short"):
        sealed.open_response(b"x" * 10)


def test_an_answer_to_another_request_does_not_open() -> None:
    key = ChannelPrivateKey()
    first, second = seal_request(key.public, b"{}"), seal_request(key.public, b"{}")
    answer = key.open_request(first.body).seal_response(200, b"secret")
    with pytest.raises(ChannelError, match="not the answer to this request"):
        second.open_response(answer)
    tampered = bytearray(answer)
    tampered[-1] ^= 1
    with pytest.raises(ChannelError):
        first.open_response(bytes(tampered))


def test_jwk_round_trip_and_refusals() -> None:
    key = ChannelPrivateKey()
    jwk = key.public.jwk()
    assert jwk["kid"] == key.public.key_id.hex()
    assert ChannelPublicKey.from_jwk(jwk).same_as(key.public)
    for bad in ({"kty": "RSA"}, {"kty": "OKP", "crv": "X25519"}, {**jwk, "x": jwk["x"][:-4]}):
        with pytest.raises(ChannelError):
            ChannelPublicKey.from_jwk(bad)
