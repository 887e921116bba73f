"""Per-item outcome records and the ledger built from them.

Workers publish one `OutcomeRecord` per attempt to the run's results queue (JSON, see
`OutcomeRecord.to_json`); the flow folds them into a `Ledger` that knows each item's fate. This
module is imported by the worker, so it stays on the standard library (no pydantic): start-up
time of a pod matters when there is one pod per item.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

# Record statuses written by workers.
SUCCEEDED = "succeeded"
FAILED = "failed"
NO_WORK = "no_work"  # a pod found the queue empty for its idle timeout and exited 0
INTERRUPTED = "interrupted"  # SIGTERM mid-item: left unacked, the broker redelivers it

# Item fates reported by the ledger.
FATE_SUCCEEDED = "succeeded"
FATE_FAILED = "failed"  # last attempt failed and the item is not known to be dead-lettered
FATE_DEAD = "dead_lettered"
FATE_LEFT = "left_in_queue"  # no attempt finished (still queued, or lost in flight)

RECORD_VERSION = 1


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    """What a worker reports about one attempt at one item (or about finding no work)."""

    run_id: str
    status: str
    item_id: str | None = None
    index: int | None = None
    attempt: int = 1
    pod: str = ""
    exit_code: int | None = None
    duration_s: float = 0.0
    stderr_tail: str = ""
    ts: float = 0.0
    v: int = RECORD_VERSION
    # The item's result (a JSON value, see `queuejob.flows.core.results`), on a succeeded
    # attempt only; left out of the JSON when None. Not hashed: it may be a list or a dict.
    result: Any = field(default=None, hash=False)

    def to_json(self) -> bytes:
        """The record as compact JSON bytes (the results queue's message body)."""
        return json.dumps(record_dict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> OutcomeRecord:
        """Parse a record; unknown fields (from newer workers) are ignored."""
        raw = json.loads(data)
        if not isinstance(raw, dict) or "run_id" not in raw or "status" not in raw:
            raise ValueError("not an outcome record: needs at least 'run_id' and 'status'")
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)


RECORD_FIELDS = tuple(OutcomeRecord.__dataclass_fields__)


def record_dict(record: OutcomeRecord) -> dict[str, Any]:
    """The record's fields as a plain dict, without ``result`` when it is None (a record
    without a result has the same JSON as before results existed)."""
    out = {k: getattr(record, k) for k in RECORD_FIELDS}
    if out["result"] is None:
        del out["result"]
    return out


@dataclass(slots=True)
class ItemOutcome:
    """The ledger's view of one item: its attempts and the last one's details."""

    item_id: str
    index: int | None = None
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    interrupted: int = 0
    last: OutcomeRecord | None = None
    dead_lettered: bool = False
    highest_attempt: int = 0  # the largest attempt number a record of this item carried

    @property
    def attempts_made(self) -> int:
        """Attempts known to have been made: the records, or more when a record's attempt
        number (counted by the broker) shows that earlier attempts left no record."""
        return max(self.attempts, self.highest_attempt)

    @property
    def unreported_attempts(self) -> int:
        """Attempts that left no outcome record: a pod died holding the item (killed, OOM,
        node lost), possibly after the work was done and before its ack. The broker's delivery
        count (quorum queues) reveals them in the next attempt's number."""
        return max(0, self.highest_attempt - self.attempts)

    @property
    def fate(self) -> str:
        """succeeded, dead_lettered, failed or left_in_queue."""
        if self.successes:
            return FATE_SUCCEEDED
        if self.dead_lettered:
            return FATE_DEAD
        if self.failures:
            return FATE_FAILED
        return FATE_LEFT

    def row(self) -> dict[str, Any]:
        """A flat row for tables and the JSON Lines ledger."""
        last = self.last
        return {
            "item_id": self.item_id,
            "index": self.index,
            "status": self.fate,
            "attempts": self.attempts_made,
            "pod": last.pod if last else "",
            "exit_code": last.exit_code if last else None,
            "duration_s": round(last.duration_s, 3) if last else None,
            "error_tail": (last.stderr_tail if last and last.status != SUCCEEDED else ""),
            "result": last.result if last and last.status == SUCCEEDED else None,
        }


@dataclass(frozen=True, slots=True)
class LedgerSummary:
    """Counts of item fates and of what the pods reported."""

    expected: int
    succeeded: int
    failed: int
    dead_lettered: int
    left: int
    processed_more_than_once: int
    attempts: int
    no_work_pods: int
    foreign_records: int

    @property
    def accounted(self) -> int:
        """Items with a known fate other than 'left in queue'."""
        return self.succeeded + self.failed + self.dead_lettered

    def as_dict(self) -> dict[str, int]:
        """Plain dict for artifacts and the flow's return value."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Ledger:
    """Folds outcome records of one run into per-item outcomes."""

    run_id: str
    expected: int = 0
    items: dict[str, ItemOutcome] = field(default_factory=dict)
    no_work_pods: int = 0
    foreign_records: int = 0
    records: int = 0
    duplicate_records: int = 0
    # Hashes of the records taken: the results queue hands a record over again after a
    # reconnect or a retried wait (records stay unacknowledged until the ledger is saved), and
    # a worker may publish one twice; a record equal in every field, its timestamp included,
    # is the same report.
    _seen: set[int] = field(default_factory=set, repr=False)

    def add(self, record: OutcomeRecord) -> ItemOutcome | None:
        """Take one record; records of other runs are counted and ignored, and so are
        records already taken."""
        if record.run_id != self.run_id:
            self.foreign_records += 1
            return None
        key = hash(record)
        if key in self._seen:
            self.duplicate_records += 1
            return None
        self._seen.add(key)
        self.records += 1
        if record.status == NO_WORK or record.item_id is None:
            self.no_work_pods += 1
            return None
        entry = self.items.get(record.item_id)
        if entry is None:
            entry = self.items[record.item_id] = ItemOutcome(record.item_id, record.index)
        elif entry.index is None:
            entry.index = record.index
        entry.attempts += 1
        entry.highest_attempt = max(entry.highest_attempt, record.attempt)
        if record.status == SUCCEEDED:
            entry.successes += 1
        elif record.status == INTERRUPTED:
            entry.interrupted += 1
        else:
            entry.failures += 1
        # Keep the most informative record: a success wins over later duplicate failures.
        if entry.last is None or record.status == SUCCEEDED or entry.last.status != SUCCEEDED:
            entry.last = record
        return entry

    def add_all(self, records: Iterable[OutcomeRecord]) -> None:
        """Take many records."""
        for record in records:
            self.add(record)

    def mark_dead_lettered(self, item_ids: Iterable[str]) -> None:
        """Record items found in the dead-letter queue."""
        for item_id in item_ids:
            entry = self.items.get(item_id)
            if entry is None:
                entry = self.items[item_id] = ItemOutcome(item_id)
            entry.dead_lettered = True

    def summary(self) -> LedgerSummary:
        """Counts of fates; items never reported count as left in the queue."""
        fates = {FATE_SUCCEEDED: 0, FATE_FAILED: 0, FATE_DEAD: 0, FATE_LEFT: 0}
        twice = attempts = 0
        for entry in self.items.values():
            fates[entry.fate] += 1
            attempts += entry.attempts_made
            if entry.successes > 1:
                twice += 1
        unseen = max(0, self.expected - len(self.items))
        return LedgerSummary(
            expected=self.expected,
            succeeded=fates[FATE_SUCCEEDED],
            failed=fates[FATE_FAILED],
            dead_lettered=fates[FATE_DEAD],
            left=fates[FATE_LEFT] + unseen,
            processed_more_than_once=twice,
            attempts=attempts,
            no_work_pods=self.no_work_pods,
            foreign_records=self.foreign_records,
        )

    def items_with_unreported_attempts(self) -> list[str]:
        """Ids of items that were delivered again after an attempt that left no record."""
        return [e.item_id for e in self.items.values() if e.unreported_attempts]

    def rows(self) -> Iterator[dict[str, Any]]:
        """One row per item the ledger knows, in item order where known."""
        big = 1 << 62
        for entry in sorted(
            self.items.values(), key=lambda e: (e.index if e.index is not None else big, e.item_id)
        ):
            yield entry.row()
