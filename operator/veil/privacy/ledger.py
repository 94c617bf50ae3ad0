"""The ledger a PrivacyBudget keeps in its status: every claim, and what it has spent.

Claim states and the only legal transitions:

    Pending  -> Granted   the budget admits the claim (the charge starts here)
    Pending  -> Denied    it does not fit, breaks a cap, or the budget is exhausted
    Pending  -> Released  the consumer withdrew before a decision (nothing was charged)
    Granted  -> Consumed  the consumer could read the dataset (terminal, charge is final)
    Granted  -> Released  refund: the consumer never could read the dataset
    Denied   -> Pending   only on a re-request with a higher `attempt`
    Consumed, Released    terminal

"Read" is defined conservatively as *could read*: the controller records Consumed (writes
the budget status) before it creates anything that can read the dataset under the grant,
i.e. before the Job or pod that mounts or downloads it, or the key release that decrypts
it. A grant is refundable only while no such object has ever existed, so a Release after
Consumed is refused: once data could have been read, its privacy cost is spent for good.

Granted and Consumed claims are *charged*: `Ledger.charged` is their running composition
(plus the folded part, see `veil.privacy.audit`, and what deleted budgets over the same
dataset spent, `Ledger.binding.carried`), kept up to date on every transition so
admission never recomposes thousands of claims. Every function returns a new ledger and
leaves its input untouched; when nothing changes it returns the same object.

On the wire `claims` is a list (a JSON merge patch replaces lists whole, so a compacted
ledger drops folded claims instead of merging with the old ones): write the ledger whole.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Literal, get_args

from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    field_serializer,
    field_validator,
    model_validator,
)

from veil.api.base import WireModel
from veil.api.privacy_budget import ClaimCounts
from veil.privacy.mechanisms import Composition, Mechanism, merge, subtract

ClaimState = Literal["Pending", "Granted", "Denied", "Consumed", "Released"]
CLAIM_STATES: tuple[ClaimState, ...] = get_args(ClaimState)
CHARGED_STATES: frozenset[ClaimState] = frozenset({"Granted", "Consumed"})
OPEN_STATES: frozenset[ClaimState] = frozenset({"Pending", "Granted"})
TERMINAL_STATES: frozenset[ClaimState] = frozenset({"Denied", "Consumed", "Released"})

TRANSITIONS: dict[ClaimState, frozenset[ClaimState]] = {
    "Pending": frozenset({"Granted", "Denied", "Released"}),
    "Granted": frozenset({"Consumed", "Released"}),
    "Denied": frozenset({"Pending"}),
    "Consumed": frozenset(),
    "Released": frozenset(),
}

# Folded claim keys are kept as truncated SHA-256 digests: 8 bytes make a collision among
# 10^5 keys about 3e-10 likely, and a collision could only refuse a claim, never charge twice.
KEY_DIGEST_BYTES = 8


class LedgerError(Exception):
    """A request the ledger cannot honour; the message says why in plain words."""


class IllegalTransitionError(LedgerError):
    pass


class ClaimConflictError(LedgerError):
    """The same idempotency key came back with different mechanisms."""


class UnknownClaimError(LedgerError):
    pass


class FoldedClaimError(LedgerError):
    """The key belongs to a claim decided long ago and moved to the audit trail."""


class ConsumerRef(WireModel):
    model_config = ConfigDict(frozen=True)

    kind: str = Field(min_length=1, max_length=63)
    namespace: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=253)


class Claim(WireModel):
    model_config = ConfigDict(frozen=True)

    key: str = Field(min_length=1, max_length=128, description="Idempotency key: the consumer UID.")
    consumer: ConsumerRef
    mechanisms: tuple[Mechanism, ...] = Field(min_length=1)
    state: ClaimState
    seq: int = Field(ge=0, description="Arrival order within the budget.")
    attempt: int = Field(default=0, ge=0)
    requested_at: datetime
    updated_at: datetime
    decided_at: datetime | None = None
    reason: str = ""
    epsilon: float = Field(ge=0, description="The claim's own ε at the budget's δ.")
    epsilon_left_at_decision: float | None = Field(
        default=None,
        description="ε left right after the decision, by the bound that decided it "
        "(RDP's when RDP alone admitted the claim: conservative).",
    )


class Totals(WireModel):
    """Monotonic outcome counters (they back the claims_total metric)."""

    model_config = ConfigDict(frozen=True)

    requested: int = 0
    granted: int = 0
    denied: int = 0
    consumed: int = 0
    released: int = 0

    def bump(self, outcome: str) -> Totals:
        return self.model_copy(update={outcome: getattr(self, outcome) + 1})


class Folded(WireModel):
    """Terminal claims moved to the audit trail, summarised without loss of ε."""

    model_config = ConfigDict(frozen=True)

    consumed: tuple[Mechanism, ...] = Field(
        default=(), description="Composition of folded Consumed claims."
    )
    counts: dict[ClaimState, int] = Field(
        default_factory=dict, description="Folded claims by state."
    )
    key_digests: str = Field(default="", description="base64 of sorted 8-byte SHA-256 key digests.")
    batches: int = Field(default=0, ge=0, description="Audit batches written so far.")
    head: str = Field(
        default="", max_length=64, description="Digest of the last audit batch (the chain's head)."
    )

    @field_validator("key_digests")
    @classmethod
    def _whole_digests(cls, encoded: str) -> str:
        if len(base64.b64decode(encoded, validate=True)) % KEY_DIGEST_BYTES:
            raise ValueError(f"keyDigests must hold whole {KEY_DIGEST_BYTES}-byte digests")
        return encoded

    def holds(self, key: str) -> bool:
        return key_digest(key) in decode_digests(self.key_digests)


class Binding(WireModel):
    """The dataset a ledger pays for, and what earlier budgets already spent on it.

    Set once, at the budget's first transaction: a budget deleted with spent claims leaves a
    record behind (see `veil.controllers.budget_store`), and a later budget for the same
    dataset starts from that spending instead of from zero.
    """

    model_config = ConfigDict(frozen=True)

    dataset: str = Field(min_length=1, max_length=2048)
    carried: tuple[Mechanism, ...] = Field(
        default=(), description="Composition spent on this dataset by deleted budgets."
    )
    carried_from: tuple[str, ...] = Field(
        default=(), description="The spending records of those budgets (namespace/name)."
    )


@dataclass(frozen=True)
class _Index:
    """What admission asks of the claims on every decision, kept in step with them: the
    Pending keys and the count of claims in each state. Never on the wire."""

    claims: Mapping[str, Claim]  # the very dict this index describes
    pending: frozenset[str]
    counts: Mapping[ClaimState, int]

    @classmethod
    def of(cls, claims: Mapping[str, Claim]) -> _Index:
        counts = dict.fromkeys(CLAIM_STATES, 0)
        for claim in claims.values():
            counts[claim.state] += 1
        pending = frozenset(k for k, c in claims.items() if c.state == "Pending")
        return cls(claims, pending, MappingProxyType(counts))

    def moved(
        self, claims: Mapping[str, Claim], key: str, was: ClaimState | None, to: ClaimState
    ) -> _Index:
        """The index of `claims`: these claims with `key` moved from `was` (None: new) to `to`."""
        counts = dict(self.counts)
        pending = self.pending
        if was is not None:
            counts[was] -= 1
            if was == "Pending":
                pending = pending - {key}
        counts[to] += 1
        if to == "Pending":
            pending = pending | {key}
        return _Index(claims, pending, MappingProxyType(counts))


class Ledger(WireModel):
    model_config = ConfigDict(frozen=True)

    version: Literal[1] = 1
    binding: Binding | None = None
    next_seq: int = Field(default=0, ge=0)
    charged: tuple[Mechanism, ...] = Field(
        default=(), description="Running composition of Granted + Consumed, folded included."
    )
    claims: dict[str, Claim] = Field(default_factory=dict)
    folded: Folded = Field(default_factory=Folded)
    totals: Totals = Field(default_factory=Totals)
    # Derived from `claims`, so admission never scans thousands of them; rebuilt whenever
    # `claims` is not the dict it was made for (a ledger read from the wire, or copied
    # with other claims), kept in step by `transition` and `add_claim` otherwise.
    _index: _Index | None = PrivateAttr(default=None)

    @field_validator("claims", mode="before")
    @classmethod
    def _claims_from_list(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        by_key: dict[str, Any] = {}
        for item in value:
            key = (
                item.key
                if isinstance(item, Claim)
                else (item.get("key") if isinstance(item, dict) else None)
            )
            if not isinstance(key, str):
                raise ValueError("every claim needs a string key")
            if key in by_key:
                raise ValueError(f"claim {key!r} appears twice")
            by_key[key] = item
        return by_key

    @field_serializer("claims")
    def _claims_as_list(self, claims: dict[str, Claim]) -> list[Claim]:
        return list(claims.values())

    @model_validator(mode="after")
    def _charged_matches_claims(self) -> Ledger:
        for key, claim in self.claims.items():
            if key != claim.key:
                raise ValueError(f"claim stored under {key!r} has key {claim.key!r}")
        if merge(self.charged) != recompute_charged(self):
            raise ValueError("ledger.charged does not match its claims: the status was edited")
        return self

    @classmethod
    def from_wire(cls, data: dict[str, Any] | None) -> Ledger:
        """Read `status.ledger` (None: a budget with no claims yet)."""
        return cls() if data is None else cls.model_validate(data)

    def __eq__(self, other: object) -> bool:
        # The index is a cache: ledgers with equal fields are equal whatever it holds.
        if not isinstance(other, Ledger):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # it holds a dict: never hashable

    def index(self) -> _Index:
        index = self._index
        if index is None or index.claims is not self.claims:
            index = self._index = _Index.of(self.claims)
        return index

    def _with_claims(self, claims: dict[str, Claim], index: _Index, **update: Any) -> Ledger:
        after = self.model_copy(update={"claims": claims, **update})
        after._index = index
        return after

    def pending_keys(self) -> frozenset[str]:
        """The keys of the Pending claims."""
        return self.index().pending

    def counts(self) -> ClaimCounts:
        by_state = dict(self.index().counts)
        for state, n in self.folded.counts.items():
            by_state[state] += n
        return ClaimCounts(**{state.lower(): n for state, n in by_state.items()})

    def open_claims(self) -> int:
        counts = self.index().counts
        return sum(counts[state] for state in OPEN_STATES)

    def has_more_open_claims_than(self, limit: int) -> bool:
        return len(self.claims) > limit and self.open_claims() > limit


def recompute_charged(ledger: Ledger) -> Composition:
    """The charged composition from scratch: carried and folded consumption, charged claims."""
    return merge(
        ledger.binding.carried if ledger.binding else (),
        ledger.folded.consumed,
        *(c.mechanisms for c in ledger.claims.values() if c.state in CHARGED_STATES),
    )


def bind(ledger: Ledger, binding: Binding) -> Ledger:
    """Bind a ledger that has none yet to its dataset, charging what was carried over."""
    if ledger.binding is not None:
        raise LedgerError("the ledger is already bound to a dataset")
    return ledger.model_copy(
        update={"binding": binding, "charged": merge(ledger.charged, binding.carried)}
    )


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()[:KEY_DIGEST_BYTES]


@lru_cache(maxsize=8)
def decode_digests(encoded: str) -> frozenset[bytes]:
    raw = base64.b64decode(encoded)
    return frozenset(raw[i : i + KEY_DIGEST_BYTES] for i in range(0, len(raw), KEY_DIGEST_BYTES))


def encode_digests(digests: frozenset[bytes]) -> str:
    return base64.b64encode(b"".join(sorted(digests))).decode()


def get_claim(ledger: Ledger, key: str) -> Claim:
    try:
        return ledger.claims[key]
    except KeyError:
        if ledger.folded.holds(key):
            raise FoldedClaimError(
                f"claim {key!r} was decided long ago and moved to the audit trail"
            ) from None
        raise UnknownClaimError(f"no claim {key!r} in this budget") from None


def transition(
    ledger: Ledger, key: str, to: ClaimState, now: datetime, reason: str, **changes: Any
) -> Ledger:
    """Move one claim to state `to`, keeping `charged` and `totals` in step. Raises if illegal."""
    claim = get_claim(ledger, key)
    if to not in TRANSITIONS[claim.state]:
        raise IllegalTransitionError(
            f"claim {key!r} of {claim.consumer.kind} {claim.consumer.namespace}/"
            f"{claim.consumer.name} cannot go from {claim.state} to {to}"
            + _why_not(claim.state, to)
        )
    updated = claim.model_copy(update={"state": to, "updated_at": now, "reason": reason, **changes})
    was_charged, is_charged = claim.state in CHARGED_STATES, to in CHARGED_STATES
    charged = ledger.charged
    if is_charged and not was_charged:
        charged = merge(charged, updated.mechanisms)
    elif was_charged and not is_charged:
        charged = subtract(charged, claim.mechanisms)
    outcome = "requested" if to == "Pending" else to.lower()
    claims = {**ledger.claims, key: updated}
    return ledger._with_claims(
        claims,
        ledger.index().moved(claims, key, claim.state, to),
        charged=charged,
        totals=ledger.totals.bump(outcome),
    )


def _why_not(state: ClaimState, to: ClaimState) -> str:
    if state == "Consumed" and to == "Released":
        return ": the consumer could already read the data, so its privacy cost is spent for good"
    if state in TERMINAL_STATES:
        return f": {state} is final"
    if to == "Consumed":
        return ": only a granted claim may be read"
    return ""


def add_claim(ledger: Ledger, claim: Claim) -> Ledger:
    """Record a new Pending claim (admission fills in seq and its own ε)."""
    if claim.key in ledger.claims or ledger.folded.holds(claim.key):
        raise ClaimConflictError(f"claim {claim.key!r} already exists")
    if claim.state != "Pending":
        raise IllegalTransitionError("a new claim starts Pending")
    claims = {**ledger.claims, claim.key: claim}
    return ledger._with_claims(
        claims,
        ledger.index().moved(claims, claim.key, None, "Pending"),
        next_seq=max(ledger.next_seq, claim.seq + 1),
        totals=ledger.totals.bump("requested"),
    )


def mark_consumed(ledger: Ledger, key: str, now: datetime) -> Ledger:
    """Granted -> Consumed: call (and persist) before the consumer can read the data."""
    if get_claim(ledger, key).state == "Consumed":
        return ledger
    return transition(ledger, key, "Consumed", now, "the consumer could read the dataset")


def release(
    ledger: Ledger, key: str, now: datetime, reason: str = "released by the consumer"
) -> Ledger:
    """Refund a Granted claim, or withdraw a Pending one. Refused once Consumed."""
    if get_claim(ledger, key).state == "Released":
        return ledger
    return transition(ledger, key, "Released", now, reason)
