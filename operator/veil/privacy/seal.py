"""Tamper evidence for a budget's ledger: an HMAC chain only the operator can extend.

Anyone allowed to write `privacybudgets/status` could otherwise replace the ledger with a
consistent-looking one that forgets spent claims. Each ledger the operator writes carries a
`LedgerSeal`: a sequence number, the previous seal's MAC, and HMAC-SHA256 under the
operator's ledger key over the budget's UID, both of those and the canonical ledger. A
forged or edited ledger fails `verify_seal`; a seal copied from another budget fails on the
UID; an older sealed ledger put back is caught by its sequence number against the newest
seal the operator has seen (`SealWatermarks`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from typing import Any

from pydantic import ConfigDict, Field

from veil.api.base import WireModel
from veil.privacy.ledger import Ledger, LedgerError

MAC_HEX_LENGTH = 64


class LedgerTamperedError(LedgerError):
    """The ledger in status is not one the operator wrote."""


class LedgerSeal(WireModel):
    model_config = ConfigDict(frozen=True)

    seq: int = Field(ge=1, description="How many ledgers the operator has sealed for this budget.")
    previous: str = Field(default="", max_length=MAC_HEX_LENGTH)
    mac: str = Field(min_length=MAC_HEX_LENGTH, max_length=MAC_HEX_LENGTH)


def canonical(ledger: Ledger | dict[str, Any]) -> bytes:
    """The ledger as the MAC sees it: its wire form (`Ledger.to_wire()`, or that form already
    made) with sorted keys and no spaces."""
    wire = ledger.to_wire() if isinstance(ledger, Ledger) else ledger
    return json.dumps(wire, sort_keys=True, separators=(",", ":")).encode()


def _mac(
    key: bytes, budget_uid: str, seq: int, previous: str, ledger: Ledger | dict[str, Any]
) -> str:
    message = b"\n".join(
        (b"veil-ledger-v1", budget_uid.encode(), str(seq).encode(), previous.encode())
    )
    return hmac.new(key, message + b"\n" + canonical(ledger), hashlib.sha256).hexdigest()


def seal(
    ledger: Ledger | dict[str, Any], budget_uid: str, key: bytes, previous: LedgerSeal | None
) -> LedgerSeal:
    """The seal of `ledger` (or its wire form), the next link after `previous` (None: the
    first ledger)."""
    seq = 1 if previous is None else previous.seq + 1
    link = "" if previous is None else previous.mac
    return LedgerSeal(seq=seq, previous=link, mac=_mac(key, budget_uid, seq, link, ledger))


def verify_seal(ledger: Ledger, budget_uid: str, key: bytes, found: LedgerSeal) -> None:
    """Raise `LedgerTamperedError` unless the operator sealed exactly this ledger."""
    expected = _mac(key, budget_uid, found.seq, found.previous, ledger)
    if not hmac.compare_digest(expected, found.mac):
        raise LedgerTamperedError(
            "the ledger in status does not match its seal: it was not written by the operator"
        )


class SealWatermarks:
    """Per budget UID in this process: the newest seal number seen (a rollback detector), and
    the last ledger known genuine with its MAC, so an unchanged ledger is not MACed again."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}
        self._known: dict[str, tuple[str, Ledger]] = {}
        self._guard = threading.Lock()

    def known_genuine(self, budget_uid: str, ledger: Ledger, found: LedgerSeal) -> bool:
        with self._guard:
            known = self._known.get(budget_uid)
        # Equal content under the same MAC: verified before (comparing is cheaper than a MAC).
        return known is not None and known[0] == found.mac and known[1] == ledger

    def remember(self, budget_uid: str, ledger: Ledger, genuine: LedgerSeal) -> None:
        with self._guard:
            self._known[budget_uid] = (genuine.mac, ledger)

    def check(self, budget_uid: str, found: LedgerSeal | None) -> None:
        with self._guard:
            newest = self._seen.get(budget_uid, 0)
        seq = 0 if found is None else found.seq
        if seq < newest:
            raise LedgerTamperedError(
                f"the ledger in status is an older one (seal {seq}, the operator wrote {newest}): "
                "it was put back by someone other than the operator"
            )

    def advance(self, budget_uid: str, written: LedgerSeal) -> None:
        with self._guard:
            self._seen[budget_uid] = max(self._seen.get(budget_uid, 0), written.seq)

    def forget(self, budget_uid: str) -> None:
        with self._guard:
            self._seen.pop(budget_uid, None)
            self._known.pop(budget_uid, None)
