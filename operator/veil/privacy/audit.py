"""Compaction and the audit trail: keep the status small without losing a single claim.

A busy budget sees thousands of claims, but an API object must stay well under ~1.5 MiB.
`compact` keeps every open claim (Pending, Granted) and the newest terminal ones in full
detail, and folds older terminal claims (Denied, Consumed, Released) into
`Ledger.folded`: the composition of their consumption (which stays in `charged`, so the
spent ε is unchanged), counts by state, and digests of their keys (so a repeated key is
still recognised and never charged twice).

The folded claims come back as `AuditBatch`es, numbered without gaps and chained: each
batch names the digest of the one before it, and the ledger's `folded.head` names the
digest of the last. The controller writes each batch (`serialize_audit_batch`) to an
append-only trail *before* it writes the compacted status, under a name that holds its
digest (`audit_batch_digest`): a write that loses a conflict leaves an orphan batch that no
chain reaches, and the retry writes its own batch under its own name, so a batch can never
be replaced by a different one with the same number. `verify_audit_trail` follows the chain
from the ledger's head (orphans are ignored) and checks it against the ledger, and
`restore` rebuilds the uncompacted ledger from both.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field

from veil.api.base import WireModel
from veil.privacy.ledger import (
    TERMINAL_STATES,
    Claim,
    ClaimState,
    Folded,
    Ledger,
    LedgerError,
    decode_digests,
    encode_digests,
    key_digest,
)
from veil.privacy.mechanisms import Mechanism, merge

# Terminal claims kept in full detail in the status (the most recently updated ones).
DEFAULT_KEEP_TERMINAL = 200
# Claims a batch: ~0.4 KB each keeps a batch far below a ConfigMap's 1 MiB.
AUDIT_BATCH_MAX_CLAIMS = 1000


class AuditTrailError(LedgerError):
    """The audit trail and the ledger disagree, or batches are missing."""


class AuditBatch(WireModel):
    model_config = ConfigDict(frozen=True)

    version: Literal[1] = 1
    sequence: int = Field(ge=0)
    previous: str = Field(
        default="", max_length=64, description="Digest of the batch before this one."
    )
    folded_at: datetime
    claims: tuple[Claim, ...]
    consumed: tuple[Mechanism, ...] = Field(
        description="Composition of this batch's Consumed claims."
    )
    counts: dict[ClaimState, int]


def compact(
    ledger: Ledger,
    now: datetime,
    keep_terminal: int = DEFAULT_KEEP_TERMINAL,
    batch_size: int = AUDIT_BATCH_MAX_CLAIMS,
) -> tuple[Ledger, list[AuditBatch]]:
    """Fold all but the newest `keep_terminal` terminal claims; return them as audit batches."""
    terminal = sorted(
        (c for c in ledger.claims.values() if c.state in TERMINAL_STATES),
        key=lambda c: (c.updated_at, c.seq),
    )
    to_fold = terminal[: max(0, len(terminal) - keep_terminal)]
    if not to_fold:
        return ledger, []
    batches: list[AuditBatch] = []
    previous = ledger.folded.head
    for start in range(0, len(to_fold), batch_size):
        sequence = ledger.folded.batches + len(batches)
        batch = _batch(sequence, previous, now, to_fold[start : start + batch_size])
        batches.append(batch)
        previous = audit_batch_digest(batch)
    folded = _fold(ledger.folded, batches)
    gone = {c.key for c in to_fold}
    claims = {k: c for k, c in ledger.claims.items() if k not in gone}
    return ledger.model_copy(update={"claims": claims, "folded": folded}), batches


def serialize_audit_batch(batch: AuditBatch) -> str:
    """The JSON text to store in the audit trail."""
    return batch.model_dump_json(by_alias=True, exclude_none=True)


def parse_audit_batch(text: str | bytes) -> AuditBatch:
    return AuditBatch.model_validate_json(text)


def audit_batch_digest(batch: AuditBatch) -> str:
    """The batch's SHA-256 over its serialized form: its name in the trail and in the chain."""
    return hashlib.sha256(serialize_audit_batch(batch).encode()).hexdigest()


def chain(head: str, batches: Iterable[AuditBatch]) -> list[AuditBatch]:
    """The batches reachable from `head`, oldest first; raise if a link is missing."""
    by_digest = {audit_batch_digest(b): b for b in batches}
    ordered: list[AuditBatch] = []
    digest = head
    while digest:
        batch = by_digest.get(digest)
        if batch is None:
            raise AuditTrailError(
                f"audit batch {digest[:16]}… (after batch {len(ordered)} from the head) is "
                "missing from the trail"
            )
        ordered.append(batch)
        digest = batch.previous
    ordered.reverse()
    if [b.sequence for b in ordered] != list(range(len(ordered))):
        raise AuditTrailError(
            f"audit batches {[b.sequence for b in ordered]} are not 0..{len(ordered) - 1}"
        )
    return ordered


def replay_audit_trail(head: str, batches: Iterable[AuditBatch]) -> Folded:
    """What the ledger's `folded` summary must be, given the chain that ends at `head`."""
    return _fold(Folded(), chain(head, batches))


def verify_audit_trail(ledger: Ledger, batches: Iterable[AuditBatch]) -> None:
    """Raise `AuditTrailError` unless the trail accounts exactly for the folded claims.

    `batches` may hold more than the chain (orphans of lost write conflicts): only the
    chain from `ledger.folded.head` counts.
    """
    replayed = replay_audit_trail(ledger.folded.head, batches)
    if replayed != ledger.folded:
        raise AuditTrailError(
            f"the audit trail ({replayed.batches} batches) does not match the ledger's folded "
            f"summary ({ledger.folded.batches} batches)"
        )


def restore(ledger: Ledger, batches: Sequence[AuditBatch]) -> Ledger:
    """The uncompacted ledger: folded claims back in full detail (for audits and forensics)."""
    verify_audit_trail(ledger, batches)
    claims = {c.key: c for b in chain(ledger.folded.head, batches) for c in b.claims}
    claims.update(ledger.claims)
    return Ledger.model_validate(
        {
            "nextSeq": ledger.next_seq,
            "charged": ledger.charged,
            "claims": sorted(claims.values(), key=lambda c: c.seq),
            "totals": ledger.totals,
        }
    )


def _batch(sequence: int, previous: str, now: datetime, claims: Sequence[Claim]) -> AuditBatch:
    return AuditBatch(
        sequence=sequence,
        previous=previous,
        folded_at=now,
        claims=tuple(claims),
        consumed=merge(*(c.mechanisms for c in claims if c.state == "Consumed")),
        counts=dict(Counter(c.state for c in claims)),
    )


def _fold(folded: Folded, batches: Sequence[AuditBatch]) -> Folded:
    counts = Counter(folded.counts)
    digests = set(decode_digests(folded.key_digests))
    for batch in batches:
        counts.update(batch.counts)
        digests.update(key_digest(c.key) for c in batch.claims)
    return Folded(
        consumed=merge(folded.consumed, *(b.consumed for b in batches)),
        counts=dict(sorted(counts.items())),
        key_digests=encode_digests(frozenset(digests)),
        batches=folded.batches + len(batches),
        head=audit_batch_digest(batches[-1]) if batches else folded.head,
    )
