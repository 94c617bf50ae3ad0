"""PrivacyBudget status as a transactional store: read, decide, write with the
resourceVersion precondition, and on a conflict read again.

Every write of a budget's status goes through `transact`, so the ledger, the figures and
the conditions always change together and no writer can overwrite another's claim: the API
server refuses a write based on a stale read with 409, and the decision is taken again on the
fresh object. Claims are keyed by the consumer's UID, so a decision retried after a crash or
a conflict is the same claim, never a second charge.

Writes are group commits, as a database's log does them: changes (claims, consumptions,
releases, refreshes) that arrive while a write of the budget is in flight queue up, and the
next write decides them all, one after the other in arrival order against the same ledger,
each seeing every grant before it, in one resourceVersion-guarded write. Each caller gets
its own answer once that write has succeeded (a caller whose change is refused gets its own
error; the others are unaffected), so an answer is never given for a ledger that was not
written. The budget the last write returned is the basis of the next one (no read): the
precondition proves it current, and a 409 means a fresh read and a fresh decision.

What keeps the budget honest beyond that:

- **Sealed ledger.** Every ledger written carries an HMAC seal (`veil.privacy.seal`) under
  the operator's ledger key; a ledger that fails it (forged, edited, removed, an older one put
  back) stops all granting: the budget goes Stalled with reason `LedgerTampered`.
- **Bound to its dataset.** At its first transaction a budget binds to `spec.dataset.uri`:
  refused while another live budget protects the same dataset, and charged with what deleted
  budgets over it spent (their spending records). A claim for another dataset is refused.
- **Spending outlives the budget.** Deleting a budget (behind the finalizer) writes an
  immutable spending record, not owned by the budget, that the next budget for the dataset
  starts from; audit batches are not owned by the budget either.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from veil import API_GROUP, API_VERSION, events, labels
from veil.api.privacy_budget import PrivacyBudgetSpec, Spender
from veil.conditions import Outcome, Status, apply_outcome, now_rfc3339, set_condition
from veil.controllers.ledger_key import load_ledger_key
from veil.controllers.reconcile import status_patch
from veil.metrics import REGISTRY
from veil.privacy import (
    AuditBatch,
    BudgetSummary,
    BudgetTerms,
    ClaimRequest,
    Decision,
    Ledger,
    PrivacyMetrics,
    compact,
    decide,
    mark_consumed,
    release,
    schedule_pending,
    serialize_audit_batch,
    summarize,
    unlocked_fraction,
)
from veil.privacy.accounting import GUARANTEES
from veil.privacy.audit import audit_batch_digest, parse_audit_batch
from veil.privacy.ledger import Binding, ConsumerRef, bind
from veil.privacy.mechanisms import MECHANISM, merge
from veil.privacy.seal import (
    LedgerSeal,
    LedgerTamperedError,
    SealWatermarks,
    seal,
    verify_seal,
)

log = logging.getLogger(__name__)
PLURAL = "privacybudgets"
MAX_ATTEMPTS = 100
# Fold terminal claims into the audit trail once the status holds this many claims.
COMPACT_ABOVE = 400
PRIVACY_METRICS = PrivacyMetrics(REGISTRY)

T = TypeVar("T")
Change = Callable[[Ledger, BudgetTerms, float, datetime], tuple[Ledger, T]]


class BudgetUnavailableError(Exception):
    """The budget does not exist, or the consumer may not spend it; the message says which."""


class BudgetGoneError(BudgetUnavailableError):
    """The budget does not exist (never created, or deleted)."""


class DatasetMismatchError(BudgetUnavailableError):
    """The consumer would read a dataset that this budget does not protect."""


class BindingRefusedError(BudgetUnavailableError):
    """The budget cannot bind to its dataset (another budget protects it, or its history
    cannot be verified); nothing may be charged to it until that is resolved."""


# The operator marks a budget once it has written a sealed ledger: a status without a
# ledger is then a removed ledger, not a new budget. Only the operator writes it.
LEDGER_ANNOTATION = f"{API_GROUP}/ledger"
DATASET_LABEL = f"{API_GROUP}/dataset-sha256"
BUDGET_UID_LABEL = f"{API_GROUP}/budget-uid"
SPENDING_RECORD = "spending-record"


def dataset_digest(uri: str) -> str:
    """A label value for a dataset URI (labels cannot hold URIs)."""
    return hashlib.sha256(uri.encode()).hexdigest()[:63]


@dataclass(frozen=True)
class BudgetRef:
    namespace: str
    name: str


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def may_spend(spenders: list[Spender], budget_namespace: str, kind: str, namespace: str) -> bool:
    """Empty `spenders`: consumers in the budget's namespace; otherwise any matching entry."""
    if not spenders:
        return namespace == budget_namespace
    return any(
        (s.namespace is None or s.namespace == namespace) and (s.kind is None or s.kind == kind)
        for s in spenders
    )


def budget_outcome(summary: BudgetSummary) -> tuple[Outcome, tuple[Status, str, str]]:
    """Ready and Exhausted as a person reads them."""
    if summary.exhausted:
        message = f"ε {summary.epsilon_spent:.4g} of {summary.epsilon_total:g} spent"
        return Outcome.done("Exhausted", message), ("True", "BudgetSpent", message)
    message = (
        f"ε {summary.epsilon_remaining:.4g} of {summary.epsilon_total:g} left at "
        f"δ {summary.delta:g} ({summary.epsilon_unlocked:.4g} unlocked); "
        f"{summary.claims.pending} pending"
    )
    return Outcome.done("BudgetAvailable", message), ("False", "BudgetAvailable", message)


# Changes decided together in one write at most (a write holds the whole ledger anyway).
MAX_BATCH = 256


@dataclass(eq=False)
class _Waiting:
    """One caller's change, waiting for its budget's next group commit."""

    change: Change[Any]
    new_claim: bool = False
    admit: Callable[[PrivacyBudgetSpec], None] | None = None
    done: bool = False
    result: Any = None
    error: Exception | None = None
    budget: Mapping[str, Any] | None = None  # the budget it was decided on

    def fail(self, error: Exception) -> None:
        if not self.done:
            self.error, self.done = error, True


@dataclass(eq=False)
class _Group:
    """A budget's queue of changes and whether one of its callers is committing."""

    turn: threading.Condition = field(default_factory=threading.Condition)
    queue: list[_Waiting] = field(default_factory=list)
    committing: bool = False


@dataclass(frozen=True)
class _Known:
    """The budget as this store last wrote it: the object the API server returned, and the
    ledger, seal and ledger wire form in it."""

    budget: dict[str, Any]
    ledger: Ledger
    seal: LedgerSeal
    wire: dict[str, Any]


def _deliver(
    outcomes: list[tuple[_Waiting, Any, Exception | None]], budget: Mapping[str, Any]
) -> None:
    for waiting, result, error in outcomes:
        if error is not None:
            waiting.fail(error)
        else:
            waiting.result, waiting.budget, waiting.done = result, budget, True


def _admitted(
    ref: BudgetRef, batch: list[_Waiting], budget: Mapping[str, Any], spec: PrivacyBudgetSpec
) -> tuple[list[_Waiting], list[tuple[_Waiting, BudgetUnavailableError]]]:
    """The changes of `batch` still to decide, and those this budget refuses outright."""
    deleting = bool(budget["metadata"].get("deletionTimestamp"))
    live: list[_Waiting] = []
    refusals: list[tuple[_Waiting, BudgetUnavailableError]] = []
    for waiting in batch:
        if waiting.done:
            continue
        try:
            if waiting.admit is not None:
                waiting.admit(spec)
            if waiting.new_claim and deleting:
                raise BudgetGoneError(f"PrivacyBudget {ref.namespace}/{ref.name} is being deleted")
        except BudgetUnavailableError as refused:
            refusals.append((waiting, refused))
        else:
            live.append(waiting)
    return live, refusals


def _applied(
    live: list[_Waiting], ledger: Ledger, terms: BudgetTerms, unlocked: float, now: datetime
) -> tuple[Ledger, list[tuple[_Waiting, Any, Exception | None]]]:
    """Each change in turn on the ledger the one before it left; one that raises is left out
    (the ledger functions are pure) and its caller gets the error."""
    outcomes: list[tuple[_Waiting, Any, Exception | None]] = []
    for waiting in live:
        try:
            ledger, result = waiting.change(ledger, terms, unlocked, now)
        except Exception as refused:
            outcomes.append((waiting, None, refused))
        else:
            outcomes.append((waiting, result, None))
    return ledger, outcomes


class BudgetStore:
    def __init__(self, api: client.ApiClient, ledger_key: bytes | None = None) -> None:
        self.api = api
        self.objects = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self._groups: dict[BudgetRef, _Group] = {}
        self._known: dict[BudgetRef, _Known] = {}
        self._guard = threading.Lock()
        self._given_key = ledger_key
        self.watermarks = SealWatermarks()

    @functools.cached_property
    def ledger_key(self) -> bytes:
        return self._given_key or load_ledger_key(self.api)

    def get(self, ref: BudgetRef) -> dict[str, Any]:
        try:
            found = self.objects.get_namespaced_custom_object(
                API_GROUP, API_VERSION, ref.namespace, PLURAL, ref.name
            )
        except ApiException as failed:
            if failed.status == 404:
                raise BudgetGoneError(
                    f"PrivacyBudget {ref.namespace}/{ref.name} does not exist"
                ) from failed
            raise
        return cast(dict[str, Any], found)

    def _group(self, ref: BudgetRef) -> _Group:
        with self._guard:
            return self._groups.setdefault(ref, _Group())

    def transact(self, ref: BudgetRef, change: Change[T], *, new_claim: bool = False) -> T:
        """Apply `change` to the ledger and write the whole status atomically.

        Group commit: changes that arrive while a write of the same budget is in flight are
        applied together, one after the other in arrival order, to the same ledger and
        written in one resourceVersion-guarded write; each caller gets its own result (or its
        own error, and its change is left out). `new_claim` changes are refused once the
        budget is being deleted (its spending record is being written).
        """
        return cast(T, self._submit(ref, _Waiting(change, new_claim)).result)

    def _submit(self, ref: BudgetRef, waiting: _Waiting) -> _Waiting:
        """Queue `waiting` behind the budget's write in flight; the first caller to find no
        write in flight commits everything queued (its own change included) and hands over.

        No thread, pool or loop of its own: the callers' threads (kopf's `asyncio.to_thread`
        workers in the operator) take turns, so it adds no scheduler beside kopf's.
        """
        group = self._group(ref)
        with group.turn:
            group.queue.append(waiting)
            while not waiting.done:
                if group.committing:
                    group.turn.wait()
                    continue
                group.committing = True
                batch, group.queue = group.queue[:MAX_BATCH], group.queue[MAX_BATCH:]
                group.turn.release()
                try:
                    self._commit(ref, batch)
                finally:
                    group.turn.acquire()
                    group.committing = False
                    group.turn.notify_all()
        if waiting.error is not None:
            raise waiting.error
        return waiting

    def _commit(self, ref: BudgetRef, batch: list[_Waiting]) -> None:
        """Decide `batch` and write it; every member is done afterwards, whatever happens."""
        try:
            self._decide_and_write(ref, batch)
        except Exception as failed:  # handed to each caller, raised in its own thread
            for waiting in batch:
                waiting.fail(failed)
        finally:
            for waiting in batch:
                if not waiting.done:
                    waiting.fail(RuntimeError("the change was neither written nor refused"))

    def _decide_and_write(self, ref: BudgetRef, batch: list[_Waiting]) -> None:
        # The budget as this store last wrote it saves a read: the write's resourceVersion
        # precondition proves it is still current, and a conflict falls back to a fresh read.
        known = self._known.get(ref)
        trusted = known is not None
        for attempt in range(MAX_ATTEMPTS):
            budget = known.budget if known is not None and trusted else self.get(ref)
            spec = PrivacyBudgetSpec.model_validate(budget["spec"])
            live, refusals = _admitted(ref, batch, budget, spec)
            if refusals and trusted:
                # A refusal is never written, so no precondition vouches for the remembered
                # budget (its spec may have changed since): refuse on a fresh read only.
                trusted = False
                continue
            for waiting, refused in refusals:
                waiting.fail(refused)
            if not live:
                return
            found_seal: LedgerSeal | None
            try:
                ledger, found_seal = (
                    (known.ledger, known.seal)
                    if known is not None and trusted
                    else self._bound_ledger(budget, spec)
                )
            except (LedgerTamperedError, BindingRefusedError) as refused:
                for waiting in live:
                    waiting.fail(refused)
                return
            terms = BudgetTerms.from_spec(spec)
            now = datetime.now(UTC)
            created = _parse_time(budget["metadata"]["creationTimestamp"])
            unlocked = unlocked_fraction(spec.unlock, created, now)
            after, outcomes = _applied(live, ledger, terms, unlocked, now)
            batches: list[AuditBatch] = []
            if len(after.claims) > COMPACT_ABOVE:
                after, batches = compact(after, now)
            wire = after.to_wire()
            # Reseal only a changed ledger (the ledger functions return the very same object
            # when nothing changes): a settled budget's resync writes nothing.
            next_seal = (
                seal(wire, budget["metadata"]["uid"], self.ledger_key, found_seal)
                if found_seal is None or after is not ledger
                else found_seal
            )
            summary = summarize(after, terms, unlocked)
            desired = self._desired_status(budget, wire, summary, next_seal, terms)
            patch = status_patch(budget.get("status") or {}, desired)
            if not patch and trusted:
                # Nothing to write, so no precondition vouches for the remembered budget:
                # answer from a fresh read.
                trusted = False
                continue
            if patch:
                self._write_audit(budget, batches)
                if not self._write(ref, budget, patch, _Known(budget, after, next_seal, wire)):
                    # Someone else wrote (or the budget went): decide again on a fresh read.
                    # Losing on the remembered budget is expected; back off only after losing
                    # on a fresh read.
                    if not trusted:
                        time.sleep(random.uniform(0, min(1.0, 0.01 * 2**attempt)))
                    trusted = False
                    continue
            PRIVACY_METRICS.update(ref.namespace, ref.name, summary)
            _deliver(outcomes, budget)
            return
        raise RuntimeError(f"PrivacyBudget {ref.namespace}/{ref.name}: too many write conflicts")

    def _bound_ledger(
        self, budget: Mapping[str, Any], spec: PrivacyBudgetSpec
    ) -> tuple[Ledger, LedgerSeal | None]:
        """The verified ledger of a freshly read budget, bound to its dataset; a tampered
        ledger or a refused binding stalls the budget (and raises)."""
        try:
            ledger, found_seal = self.verified_ledger(budget)
            if ledger.binding is None:
                ledger = self._bind(budget, spec, ledger)
        except (LedgerTamperedError, BindingRefusedError) as refused:
            self._stall(budget, refused)
            raise
        return ledger, found_seal

    def _write(
        self, ref: BudgetRef, budget: Mapping[str, Any], patch: dict[str, Any], basis: _Known
    ) -> bool:
        """Write `patch` if the budget is still at the version read, and remember the budget
        written (`basis`, with what the API server returned) as the basis of the next write;
        False when another write came first (409) or the budget is gone (404)."""
        try:
            written = self.objects.patch_namespaced_custom_object_status(
                API_GROUP,
                API_VERSION,
                ref.namespace,
                PLURAL,
                ref.name,
                {
                    "metadata": {"resourceVersion": budget["metadata"]["resourceVersion"]},
                    "status": patch,
                },
            )
        except ApiException as failed:
            if failed.status in (404, 409):
                return False
            raise
        uid = budget["metadata"]["uid"]
        self.watermarks.advance(uid, basis.seal)
        self.watermarks.remember(uid, basis.ledger, basis.seal)
        written = self._mark_sealed(cast(dict[str, Any], written))
        with self._guard:
            self._known[ref] = dataclasses.replace(basis, budget=written)
        return True

    def _forget_known(self, ref: BudgetRef) -> None:
        with self._guard:
            self._known.pop(ref, None)

    def _remembered(self, budget: Mapping[str, Any]) -> Ledger | None:
        """The ledger this store last wrote, when `budget` still holds exactly that ledger
        under exactly that seal: known genuine without parsing or MACing it again."""
        meta = budget["metadata"]
        known = self._known.get(BudgetRef(meta["namespace"], meta["name"]))
        status = budget.get("status") or {}
        if (
            known is None
            or known.budget["metadata"]["uid"] != meta["uid"]
            or (status.get("ledgerSeal") or {}).get("mac") != known.seal.mac
            or status.get("ledger") != known.wire
        ):
            return None
        return known.ledger

    # --- the sealed ledger --------------------------------------------------------

    def verified_ledger(self, budget: Mapping[str, Any]) -> tuple[Ledger, LedgerSeal | None]:
        """The ledger in the budget's status, if the operator wrote it; else raise.

        A ledger with neither seal nor binding on a budget never marked sealed is one written
        by an older Veil: it is adopted (bound and sealed on this transaction).
        """
        meta = budget["metadata"]
        status = budget.get("status") or {}
        data, seal_data = status.get("ledger"), status.get("ledgerSeal")
        marked = (meta.get("annotations") or {}).get(LEDGER_ANNOTATION) == "sealed"
        if data is None:
            if marked or seal_data is not None:
                raise LedgerTamperedError(
                    "the ledger was removed from status after the operator had written one"
                )
            self.watermarks.check(meta["uid"], None)
            return Ledger(), None
        remembered = self._remembered(budget)
        if remembered is not None:
            known_seal = LedgerSeal.model_validate(seal_data)
            self.watermarks.check(meta["uid"], known_seal)
            return remembered, known_seal
        try:
            ledger = Ledger.from_wire(data)
            found = None if seal_data is None else LedgerSeal.model_validate(seal_data)
        except ValidationError as bad:
            raise LedgerTamperedError(
                f"the ledger in status is not one the operator writes: {_first_error(bad)}"
            ) from bad
        if found is None:
            if marked or ledger.binding is not None:
                raise LedgerTamperedError("the ledger in status has no seal")
            return ledger, None
        if not self.watermarks.known_genuine(meta["uid"], ledger, found):
            verify_seal(ledger, meta["uid"], self.ledger_key, found)
            self.watermarks.remember(meta["uid"], ledger, found)
        self.watermarks.check(meta["uid"], found)
        return ledger, found

    def _mark_sealed(self, budget: dict[str, Any]) -> dict[str, Any]:
        """Mark the budget sealed (once); the budget as it is afterwards."""
        meta = budget["metadata"]
        if (meta.get("annotations") or {}).get(LEDGER_ANNOTATION) == "sealed":
            return budget
        try:
            marked = self.objects.patch_namespaced_custom_object(
                API_GROUP,
                API_VERSION,
                meta["namespace"],
                PLURAL,
                meta["name"],
                {"metadata": {"annotations": {LEDGER_ANNOTATION: "sealed"}}},
            )
        except ApiException as failed:
            if failed.status != 404:
                raise
            return budget
        return cast(dict[str, Any], marked)

    def _stall(self, budget: Mapping[str, Any], refused: Exception) -> None:
        """Say why nothing is granted, in conditions only: the ledger is left as found."""
        reason = "LedgerTampered" if isinstance(refused, LedgerTamperedError) else "BindingRefused"
        action = (
            "restore the status the operator wrote, or re-create the budget after an audit"
            if reason == "LedgerTampered"
            else "resolve it; the operator retries"
        )
        current = budget.get("status") or {}
        generation = int(budget["metadata"].get("generation", 0))
        outcome = Outcome.stalled_with(reason, f"{refused}; no claim is granted: {action}")
        conditions = apply_outcome(
            current.get("conditions", []), outcome, generation, now_rfc3339()
        )
        patch = status_patch(current, {**current, "conditions": conditions})
        if not patch:
            return
        log.warning(
            "PrivacyBudget %s/%s: %s",
            budget["metadata"]["namespace"],
            budget["metadata"]["name"],
            refused,
        )
        try:
            self.objects.patch_namespaced_custom_object_status(
                API_GROUP,
                API_VERSION,
                budget["metadata"]["namespace"],
                PLURAL,
                budget["metadata"]["name"],
                {"status": {"conditions": conditions}},
            )
        except ApiException as failed:
            if failed.status not in (404, 409):
                raise

    # --- binding to the dataset and spending records ---------------------------------

    def _bind(self, budget: Mapping[str, Any], spec: PrivacyBudgetSpec, ledger: Ledger) -> Ledger:
        meta = budget["metadata"]
        uri = spec.dataset.uri
        mine = (meta["creationTimestamp"], meta["uid"])
        listed = cast(
            dict[str, Any], self.objects.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)
        )
        for other in listed.get("items", []):
            other_meta = other["metadata"]
            other_uri = ((other.get("spec") or {}).get("dataset") or {}).get("uri")
            if other_meta["uid"] == meta["uid"] or other_uri != uri:
                continue
            # A budget already bound keeps its dataset; between unbound ones, the older wins
            # (creation times have one-second resolution: the UID breaks ties the same way
            # for both).
            other_bound = bool(((other.get("status") or {}).get("ledger") or {}).get("binding"))
            if other_bound or (other_meta["creationTimestamp"], other_meta["uid"]) < mine:
                raise BindingRefusedError(
                    f"PrivacyBudget {other_meta['namespace']}/{other_meta['name']} already "
                    f"protects dataset {uri}: one budget per dataset (delete one of them)"
                )
        records = self.spending_records(uri)
        superseded = {name for record in records for name in record.get("supersedes", [])}
        carried: list[Any] = []
        names: list[str] = []
        for record in records:
            name = record["name"]
            if name in superseded:
                continue
            if not record.get("verified"):
                raise BindingRefusedError(
                    f"the spending record {name} of a deleted budget for {uri} could not be "
                    "verified (its ledger had been tampered with)"
                )
            carried.extend(MECHANISM.validate_python(m) for m in record.get("charged", []))
            names.append(name)
        binding = Binding(dataset=uri, carried=merge(carried), carried_from=tuple(sorted(names)))
        return bind(ledger, binding)

    def spending_records(self, uri: str) -> list[dict[str, Any]]:
        """The spending records of deleted budgets over `uri`, in any namespace."""
        found = self.core.list_config_map_for_all_namespaces(
            label_selector=f"{labels.COMPONENT}={SPENDING_RECORD},{DATASET_LABEL}={dataset_digest(uri)}"
        )
        records: list[dict[str, Any]] = []
        for item in found.items:
            try:
                record = json.loads((item.data or {}).get("record.json", ""))
            except ValueError:
                record = {"dataset": uri, "verified": False}
            if record.get("dataset") != uri:
                continue
            where = item.metadata or client.V1ObjectMeta()
            records.append({**record, "name": f"{where.namespace}/{where.name}"})
        return records

    def record_spending(self, budget: Mapping[str, Any]) -> dict[str, Any] | None:
        """Before a budget goes: keep what it spent in an immutable record it does not own.

        Returns the record (None when nothing was ever charged and the ledger verifies).
        """
        meta = budget["metadata"]
        spec = PrivacyBudgetSpec.model_validate(budget["spec"])
        try:
            ledger, _ = self.verified_ledger(budget)
            verified = True
        except LedgerTamperedError:
            ledger, verified = Ledger(), False
        if verified and not ledger.charged:
            return None
        terms = BudgetTerms.from_spec(spec)
        record = {
            "dataset": spec.dataset.uri,
            "budget": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
            "verified": verified,
            "charged": [m.model_dump(mode="json", by_alias=True) for m in ledger.charged],
            "supersedes": list(ledger.binding.carried_from) if ledger.binding else [],
            "epsilonSpent": summarize(ledger, terms).epsilon_spent if verified else None,
            "delta": spec.delta,
            "recordedAt": now_rfc3339(),
        }
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": f"{meta['name'][:200]}-spent-{meta['uid'][:8]}",
                "namespace": meta["namespace"],
                "labels": {
                    labels.MANAGED_BY: "veil",
                    labels.OWNER_KIND: "PrivacyBudget",
                    labels.INSTANCE: meta["name"][:63],
                    labels.COMPONENT: SPENDING_RECORD,
                    DATASET_LABEL: dataset_digest(spec.dataset.uri),
                    BUDGET_UID_LABEL: meta["uid"],
                },
            },
            "immutable": True,
            "data": {"record.json": json.dumps(record, sort_keys=True)},
        }
        try:
            self.core.create_namespaced_config_map(meta["namespace"], body)  # type: ignore[arg-type]
        except ApiException as failed:
            if failed.status != 409:  # written by an earlier try of this deletion
                raise
        self.watermarks.forget(meta["uid"])
        self._forget_known(BudgetRef(meta["namespace"], meta["name"]))
        return record

    def _desired_status(
        self,
        budget: Mapping[str, Any],
        ledger_wire: dict[str, Any],
        summary: BudgetSummary,
        ledger_seal: LedgerSeal,
        terms: BudgetTerms,
    ) -> dict[str, Any]:
        current = budget.get("status") or {}
        generation = int(budget["metadata"].get("generation", 0))
        now = now_rfc3339()
        ready, (exhausted, reason, message) = budget_outcome(summary)
        conditions = apply_outcome(current.get("conditions", []), ready, generation, now)
        conditions = set_condition(
            conditions,
            "Exhausted",
            status=exhausted,
            reason=reason,
            message=message,
            generation=generation,
            now=now,
        )
        return {
            "ledger": ledger_wire,
            "ledgerSeal": ledger_seal.to_wire(),
            **summary.status_fields(),
            "guarantee": GUARANTEES[terms.accountant],
            "conditions": conditions,
            "observedGeneration": generation,
        }

    def _write_audit(self, budget: Mapping[str, Any], batches: list[AuditBatch]) -> None:
        """Folded claims go to ConfigMaps named by their digest before the status forgets them.

        Not owned by the budget: the trail outlives it. A batch written before a lost
        conflict stays as an orphan no chain reaches; the retry's batch has its own name.
        """
        meta = budget["metadata"]
        for batch in batches:
            digest = audit_batch_digest(batch)
            body: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": f"{meta['name'][:200]}-audit-{batch.sequence:06d}-{digest[:16]}",
                    "namespace": meta["namespace"],
                    "labels": {
                        labels.MANAGED_BY: "veil",
                        labels.OWNER_KIND: "PrivacyBudget",
                        labels.INSTANCE: meta["name"][:63],
                        labels.COMPONENT: "audit",
                        BUDGET_UID_LABEL: meta["uid"],
                    },
                },
                "immutable": True,
                "data": {"batch.json": serialize_audit_batch(batch)},
            }
            try:
                self.core.create_namespaced_config_map(meta["namespace"], body)  # type: ignore[arg-type]
            except ApiException as failed:
                # Same name, same digest: the same batch, written before a crash.
                if failed.status != 409:
                    raise

    def audit_batches(self, budget: Mapping[str, Any]) -> list[AuditBatch]:
        """Every audit batch written for this budget, orphans included."""
        meta = budget["metadata"]
        found = self.core.list_namespaced_config_map(
            meta["namespace"],
            label_selector=f"{labels.COMPONENT}=audit,{BUDGET_UID_LABEL}={meta['uid']}",
        )
        return [parse_audit_batch((item.data or {})["batch.json"]) for item in found.items]

    # --- what consumers and the budget's own handler call ----------------------------

    def claim(self, ref: BudgetRef, request: ClaimRequest, *, consume: bool = False) -> Decision:
        """Admit, queue or deny `request`, decided in the budget's next group commit.

        `consume`: a grant is recorded Consumed in the same write (for a consumer that reads
        the data as soon as it may), so paying takes one write, not two.
        """
        consumer = request.consumer

        def admit(spec: PrivacyBudgetSpec) -> None:
            if not may_spend(spec.spenders, ref.namespace, consumer.kind, consumer.namespace):
                raise BudgetUnavailableError(
                    f"{consumer.kind} {consumer.namespace}/{consumer.name} may not spend "
                    f"PrivacyBudget {ref.namespace}/{ref.name} (see its spec.spenders)"
                )
            if request.dataset != spec.dataset.uri:
                raise DatasetMismatchError(
                    f"{consumer.kind} {consumer.namespace}/{consumer.name} would read "
                    f"{request.dataset or 'an unnamed dataset'}, but PrivacyBudget "
                    f"{ref.namespace}/{ref.name} pays only for {spec.dataset.uri}: use the "
                    "budget of that dataset"
                )

        def change(
            ledger: Ledger, terms: BudgetTerms, unlocked: float, now: datetime
        ) -> tuple[Ledger, Decision]:
            after, decision = decide(ledger, request, terms, now, unlocked)
            if consume and decision.state == "Granted":
                after = mark_consumed(after, request.key, now)
            return after, decision

        done = self._submit(ref, _Waiting(change, new_claim=True, admit=admit))
        decision = cast(Decision, done.result)
        if decision.changed and done.budget is not None:
            _event(done.budget, decision, consumer)
        return decision

    def consume(self, ref: BudgetRef, key: str) -> None:
        def change(ledger: Ledger, *_: Any) -> tuple[Ledger, None]:
            claim = ledger.claims.get(key)
            if claim is not None and claim.state == "Consumed":
                return ledger, None
            return mark_consumed(ledger, key, datetime.now(UTC)), None

        self.transact(ref, change)

    def release(self, ref: BudgetRef, key: str, reason: str) -> None:
        def change(ledger: Ledger, *_: Any) -> tuple[Ledger, None]:
            claim = ledger.claims.get(key)
            if claim is None or claim.state in ("Released", "Denied"):
                return ledger, None
            return release(ledger, key, datetime.now(UTC), reason=reason), None

        self.transact(ref, change)

    def refresh(self, ref: BudgetRef) -> None:
        """Grant what the unlocked budget now admits; refresh figures and conditions."""

        def change(
            ledger: Ledger, terms: BudgetTerms, unlocked: float, now: datetime
        ) -> tuple[Ledger, None]:
            return schedule_pending(ledger, terms, now, unlocked), None

        self.transact(ref, change)


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    return str(first.get("msg", error))


def _event(budget: Mapping[str, Any], decision: Decision, consumer: ConsumerRef) -> None:
    """The decision as an Event on the budget (posted by the claimant's own thread, after the
    commit; repeats of a reason fold into one series)."""
    events.claim_decided(
        budget,
        events.ClaimDecision(
            decision.state,
            decision.reason,
            f"{consumer.kind} {consumer.namespace}/{consumer.name}",
            epsilon=decision.epsilon,
        ),
    )
