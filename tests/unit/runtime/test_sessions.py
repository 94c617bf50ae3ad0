"""The runtime's table of channel sessions: what ends a session, and what a session opens."""

from __future__ import annotations

import pytest

from veil.runtime.channel import ChannelError, ChannelPrivateKey, seal_request
from veil.runtime.sessions import (
    SESSION_UNKNOWN,
    CallerSession,
    SessionTable,
    offer_session,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _open(table: SessionTable, key: ChannelPrivateKey) -> CallerSession:
    offer = offer_session(key.public)
    return offer.confirm(table.open_session(offer.body))


def test_a_request_opens_to_its_plaintext_and_its_answer_to_the_caller() -> None:
    key = ChannelPrivateKey()
    table = SessionTable(lambda: key)
    session = _open(table, key)
    header = b'{"inputs":[]}'
    sealed = session.seal(header + b"\x00\x01", len(header))
    opened = table.open_request(sealed.body)
    assert (opened.body, opened.header_length) == (header + b"\x00\x01", len(header))
    assert sealed.open_response(opened.seal_response(200, b"answer", 3)) == (200, 3, b"answer")
    assert b"inputs" not in sealed.body


def test_a_session_ends_with_its_lifetime() -> None:
    key, clock = ChannelPrivateKey(), Clock()
    table = SessionTable(lambda: key, lifetime_seconds=60, clock=clock)
    session = _open(table, key)
    table.open_request(session.seal(b"{}").body)
    clock.now += 60
    with pytest.raises(ChannelError, match=SESSION_UNKNOWN):
        table.open_request(session.seal(b"{}").body)
    assert len(table) == 0


def test_a_session_ends_after_its_uses_and_the_caller_knows_it() -> None:
    key = ChannelPrivateKey()
    table = SessionTable(lambda: key, max_uses=2)
    session = _open(table, key)
    for _ in range(2):
        table.open_request(session.seal(b"{}").body)
    assert not session.usable()  # the caller was told the terms and stops first
    with pytest.raises(ChannelError, match=SESSION_UNKNOWN):
        table.open_request(session.seal(b"{}").body)


def test_a_full_table_forgets_its_oldest_session() -> None:
    key = ChannelPrivateKey()
    table = SessionTable(lambda: key, capacity=2)
    oldest, middle, newest = (_open(table, key) for _ in range(3))
    assert len(table) == 2
    with pytest.raises(ChannelError, match=SESSION_UNKNOWN):
        table.open_request(oldest.seal(b"{}").body)
    for kept in (middle, newest):
        assert table.open_request(kept.seal(b"{}").body).body == b"{}"


def test_no_session_outlives_a_change_of_the_runtime_key() -> None:
    keys = [ChannelPrivateKey()]
    table = SessionTable(lambda: keys[-1])
    session = _open(table, keys[0])
    keys.append(ChannelPrivateKey())
    with pytest.raises(ChannelError, match=SESSION_UNKNOWN):
        table.open_request(session.seal(b"{}").body)


def test_a_session_request_is_not_an_hpke_request_nor_the_reverse() -> None:
    """Each sealed message opens only as what it was made for (distinct HPKE info)."""
    key = ChannelPrivateKey()
    table = SessionTable(lambda: key)
    offer = offer_session(key.public)
    with pytest.raises(ChannelError, match="does not open"):
        key.open_request(offer.body)
    with pytest.raises(ChannelError, match="does not open"):
        table.open_session(seal_request(key.public, b"\x00" * 32).body)


def test_a_binary_header_longer_than_the_body_is_refused() -> None:
    key = ChannelPrivateKey()
    session = _open(SessionTable(lambda: key), key)
    with pytest.raises(ChannelError, match="header length"):
        session.seal(b"{}", 3)
