"""Builders shared by the privacy tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from veil.privacy import ClaimRequest, ConsumerRef, Mechanism

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def request(key: str, *mechanisms: Mechanism, attempt: int = 0) -> ClaimRequest:
    return ClaimRequest(
        key=key,
        consumer=ConsumerRef(kind="SyntheticDataset", namespace="team-a", name=f"synth-{key}"),
        mechanisms=mechanisms,
        attempt=attempt,
    )
