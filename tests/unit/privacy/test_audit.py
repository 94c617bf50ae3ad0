from __future__ import annotations

import json

import pytest

from tests.unit.privacy.helpers import at, request
from veil.privacy import (
    AuditTrailError,
    BudgetTerms,
    DpSgdMechanism,
    EpsilonDeltaMechanism,
    FoldedClaimError,
    GaussianMechanism,
    LaplaceMechanism,
    Ledger,
    Mechanism,
    ZcdpMechanism,
    compact,
    decide,
    epsilon_spent,
    mark_consumed,
    parse_audit_batch,
    release,
    replay_audit_trail,
    restore,
    serialize_audit_batch,
    verify_audit_trail,
)
from veil.privacy.audit import AuditBatch, audit_batch_digest

STATUS_LEDGER_LIMIT = 512 * 1024
HUGE = EpsilonDeltaMechanism(epsilon=20.0)  # more than the whole budget: always denied
MIX = (
    GaussianMechanism(noise_multiplier=60.0),
    LaplaceMechanism(scale=400.0),
    DpSgdMechanism(sampling_rate=0.001, noise_multiplier=3.0, steps=20),
    ZcdpMechanism(rho=1e-5),
    EpsilonDeltaMechanism(epsilon=0.002, delta=1e-9),
)


def busy_ledger(
    claims: int, compact_every: int | None = None
) -> tuple[Ledger, list[AuditBatch], list[Mechanism], BudgetTerms]:
    """`claims` claims of every kind: most consumed, some released or denied, a few open.

    Returns the ledger, the audit batches written along the way (compacting every
    `compact_every` claims, as the controller would), and, kept aside, the mechanisms of
    every claim that ended up charged.
    """
    budget = BudgetTerms(epsilon=10.0, delta=1e-5, accountant="rdp")
    ledger, trail, charged = Ledger(), [], []
    for i in range(claims):
        key = f"{i:08d}-4a7e-4c1b-9d7f-0242ac120002"  # UID-shaped keys
        mechanism = HUGE if i % 97 == 0 else MIX[i % len(MIX)]
        ledger, decision = decide(ledger, request(key, mechanism), budget, at(i))
        if decision.state == "Granted":
            if i < claims - 50 and i % 10 == 3:
                ledger = release(ledger, key, at(i))
            else:
                charged.append(mechanism)
                if i < claims - 50:
                    ledger = mark_consumed(ledger, key, at(i))
        if compact_every and i % compact_every == compact_every - 1:
            ledger, batches = compact(ledger, at(i))
            trail.extend(batches)
    return ledger, trail, charged, budget


def status_bytes(ledger: Ledger) -> int:
    return len(json.dumps(ledger.to_wire(), ensure_ascii=False).encode())


@pytest.mark.slow
def test_ten_thousand_claims_compact_under_512_kib_without_losing_epsilon() -> None:
    live, trail, charged, budget = busy_ledger(10_000, compact_every=500)
    compacted, batches = compact(live, at(10_001))
    trail.extend(batches)
    size = status_bytes(compacted)
    # Re-read everything as the controller would: the status and the stored batches.
    reread = Ledger.from_wire(json.loads(json.dumps(compacted.to_wire())))
    stored = [serialize_audit_batch(b) for b in trail]
    full = restore(reread, [parse_audit_batch(text) for text in stored])
    print(
        f"status ledger: {size} bytes compacted ({len(compacted.claims)} claims in detail), "
        f"{status_bytes(full)} uncompacted; {len(trail)} audit batches, "
        f"largest {max(len(t.encode()) for t in stored)} bytes"
    )

    counts = full.counts()
    assert len(full.claims) == 10_000
    assert counts.consumed > 5000
    assert counts.released > 500
    assert counts.denied > 100
    assert 0 < counts.granted <= 50
    assert size < STATUS_LEDGER_LIMIT
    assert all(len(text.encode()) < 1024 * 1024 for text in stored)  # a ConfigMap's limit
    assert compacted.counts() == counts
    assert compacted.totals == full.totals
    assert len(compacted.claims) < 500
    for accountant in ("rdp", "pld"):
        spent = epsilon_spent(charged, budget.delta, accountant)
        assert epsilon_spent(compacted.charged, budget.delta, accountant) == spent
        assert epsilon_spent(full.charged, budget.delta, accountant) == spent
        assert spent <= budget.epsilon


def test_restoring_the_audit_trail_gives_back_the_uncompacted_ledger() -> None:
    full, trail, _, _ = busy_ledger(600)
    assert trail == []
    compacted, batches = compact(full, at(700), keep_terminal=20, batch_size=100)
    assert len(batches) > 2
    stored = [serialize_audit_batch(b) for b in batches]
    assert restore(compacted, [parse_audit_batch(text) for text in stored]) == full


def test_compaction_keeps_open_claims_and_recognises_folded_keys() -> None:
    ledger, _, _, budget = busy_ledger(300)
    compacted, batches = compact(ledger, at(400), keep_terminal=10)
    assert {k for k, c in ledger.claims.items() if c.state in ("Pending", "Granted")} <= set(
        compacted.claims
    )
    folded_key = batches[0].claims[0].key
    with pytest.raises(FoldedClaimError):
        decide(compacted, request(folded_key, MIX[0]), budget, at(401))
    # Compacting again continues the batch numbering; nothing left to fold is a no-op.
    again, more = compact(compacted, at(402), keep_terminal=0)
    assert [b.sequence for b in more] == [len(batches)]
    assert compact(again, at(403), keep_terminal=0) == (again, [])
    verify_audit_trail(again, [*batches, *more])


def test_a_missing_or_altered_batch_is_detected() -> None:
    ledger, _, _, _ = busy_ledger(300)
    compacted, batches = compact(ledger, at(400), keep_terminal=10, batch_size=100)
    assert len(batches) >= 2
    with pytest.raises(AuditTrailError, match="missing"):
        verify_audit_trail(compacted, batches[1:])
    # An altered batch has another digest: the chain no longer reaches it.
    altered = AuditBatch.model_validate(
        {**batches[0].model_dump(), "claims": batches[0].claims[1:]}
    )
    with pytest.raises(AuditTrailError, match="missing"):
        verify_audit_trail(compacted, [altered, *batches[1:]])
    # Even re-chained by someone who rewrites every batch after it, the replay disagrees.
    rechained = [altered]
    for batch in batches[1:]:
        rechained.append(batch.model_copy(update={"previous": audit_batch_digest(rechained[-1])}))
    forged_head = compacted.folded.model_copy(update={"head": audit_batch_digest(rechained[-1])})
    with pytest.raises(AuditTrailError, match="does not match"):
        verify_audit_trail(compacted.model_copy(update={"folded": forged_head}), rechained)
    assert replay_audit_trail(compacted.folded.head, batches) == compacted.folded


def test_a_batch_orphaned_by_a_lost_write_conflict_does_not_break_the_trail() -> None:
    """The writer compacts, writes its batch, loses the status write (409) and retries later:
    the retry folds other claims into another batch with the same number."""
    ledger, _, _, _ = busy_ledger(300)
    _, lost = compact(ledger, at(400), keep_terminal=10, batch_size=100)
    retried, kept = compact(ledger, at(401), keep_terminal=20, batch_size=100)
    assert [b.sequence for b in lost][:1] == [b.sequence for b in kept][:1]
    assert {audit_batch_digest(b) for b in lost}.isdisjoint(audit_batch_digest(b) for b in kept)
    verify_audit_trail(retried, [*lost, *kept])  # the orphans are ignored
    assert restore(retried, [*lost, *kept]) == restore(retried, kept)
