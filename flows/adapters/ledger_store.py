"""The run's ledger on disk: an embedded SQLite store, checkpointed to the ledger storage.

`RunLedger` folds outcome records into a SQLite database, batch by batch, so the flow's memory
stays flat whatever the number of items: one row per item (its body, attempts and last record),
one key per record taken (so a record handed over twice counts once). Counts, caveat inputs, the
summary and the final rows are queries over that store; the progress numbers are counters kept
as records arrive. An item's result (`queuejob.flows.core.results`) is kept in its row as JSON
text, from the record its last attempt's details come from (a success wins over a later
failure), so a succeeded item has the result of its success.

Each batch is written to the ledger storage as a checkpoint segment *before* the store commits
it, and the caller acknowledges the batch's records to the broker only after `absorb` returned.
The local database is a cache: `RunLedger.open` always starts it empty and replays the run's
segments from the storage, so a flow run retried in a fresh pod, with an empty disk, goes on
from what earlier attempts saved, and a record delivered again (it was saved but its ack was
lost) is recognised and counted once.

The database lives in ``QUEUEJOB_LEDGER_WORK_DIR`` (default: ``queuejob-ledger-work`` in the
system's temporary directory), one file per run, deleted when the ledger is closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from queuejob.flows.adapters.ledger_storage import LedgerStorage
from queuejob.flows.core.errors import LedgerStorageError
from queuejob.flows.core.items import Item
from queuejob.flows.core.ledger import (
    FATE_DEAD,
    FATE_FAILED,
    FATE_LEFT,
    FATE_SUCCEEDED,
    INTERRUPTED,
    NO_WORK,
    SUCCEEDED,
    LedgerSummary,
    OutcomeRecord,
    record_dict,
)

WORK_DIR_ENV = "QUEUEJOB_LEDGER_WORK_DIR"
ITEM_BATCH = 10_000

_SCHEMA = """
CREATE TABLE items (
    item_id TEXT PRIMARY KEY,
    idx INTEGER,
    body TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    successes INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    interrupted INTEGER NOT NULL DEFAULT 0,
    highest_attempt INTEGER NOT NULL DEFAULT 0,
    dead INTEGER NOT NULL DEFAULT 0,
    last_status TEXT,
    last_pod TEXT,
    last_exit INTEGER,
    last_duration REAL,
    last_tail TEXT,
    last_result TEXT
);
CREATE INDEX items_order ON items (idx, item_id);
CREATE TABLE seen (digest INTEGER PRIMARY KEY);
-- The live numbers, kept by triggers in the same transactions as the rows they count (so a
-- rolled-back batch takes its counts back with it).
CREATE TABLE live (succeeded INTEGER NOT NULL, failed_attempts INTEGER NOT NULL);
INSERT INTO live VALUES (0, 0);
CREATE TRIGGER live_insert AFTER INSERT ON items
WHEN new.successes > 0 OR new.failures > 0
BEGIN
    UPDATE live SET succeeded = succeeded + (new.successes > 0),
                    failed_attempts = failed_attempts + new.failures;
END;
CREATE TRIGGER live_update AFTER UPDATE OF successes, failures ON items
WHEN new.successes != old.successes OR new.failures != old.failures
BEGIN
    UPDATE live SET succeeded = succeeded + (old.successes = 0 AND new.successes > 0),
                    failed_attempts = failed_attempts + new.failures - old.failures;
END;
"""

# One record into its item's row. SET expressions read the row as it was, so `last_*` is replaced
# under the same rule as before: a success wins over later duplicate failures.
_FOLD = """
INSERT INTO items (item_id, idx, attempts, successes, failures, interrupted, highest_attempt,
                   last_status, last_pod, last_exit, last_duration, last_tail, last_result)
VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (item_id) DO UPDATE SET
    idx = coalesce(items.idx, excluded.idx),
    attempts = items.attempts + 1,
    successes = items.successes + excluded.successes,
    failures = items.failures + excluded.failures,
    interrupted = items.interrupted + excluded.interrupted,
    highest_attempt = max(items.highest_attempt, excluded.highest_attempt),
    last_status = CASE WHEN {keep} THEN items.last_status ELSE excluded.last_status END,
    last_pod = CASE WHEN {keep} THEN items.last_pod ELSE excluded.last_pod END,
    last_exit = CASE WHEN {keep} THEN items.last_exit ELSE excluded.last_exit END,
    last_duration = CASE WHEN {keep} THEN items.last_duration ELSE excluded.last_duration END,
    last_tail = CASE WHEN {keep} THEN items.last_tail ELSE excluded.last_tail END,
    last_result = CASE WHEN {keep} THEN items.last_result ELSE excluded.last_result END
""".format(keep=f"(items.last_status = '{SUCCEEDED}' AND excluded.last_status != '{SUCCEEDED}')")

_ROW_COLUMNS = (
    "item_id, idx, body, attempts, successes, failures, highest_attempt, dead, "
    "last_status, last_pod, last_exit, last_duration, last_tail, last_result"
)


def default_work_dir() -> Path:
    """Where the local stores go: ``QUEUEJOB_LEDGER_WORK_DIR``, else a temporary directory."""
    base = os.environ.get(WORK_DIR_ENV)
    return Path(base) if base else Path(tempfile.gettempdir()) / "queuejob-ledger-work"


def record_json(record: OutcomeRecord) -> bytes:
    """The record as one line of compact JSON (as `OutcomeRecord.to_json`, built faster: this
    runs once per record the flow takes)."""
    return json.dumps(record_dict(record), separators=(",", ":")).encode()


def result_text(value: Any) -> str | None:
    """A result as the JSON text the store keeps (None for no result). Text that is not valid
    Unicode (a lone surrogate, which no worker sends) is replaced rather than failing the
    batch: the store and the ledger file are UTF-8."""
    if value is None:
        return None
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def record_digest(record: OutcomeRecord, data: bytes | None = None) -> int:
    """A record's identity: equal in every field (its timestamp included) is the same report.
    ``data``: the record's `record_json`, when the caller has it already."""
    raw = hashlib.blake2b(data if data is not None else record_json(record), digest_size=8)
    return int.from_bytes(raw.digest(), "big", signed=True)


def fate_of(successes: int, dead: int, failures: int) -> str:
    """An item's fate from its counts (as `ItemOutcome.fate`)."""
    if successes:
        return FATE_SUCCEEDED
    if dead:
        return FATE_DEAD
    if failures:
        return FATE_FAILED
    return FATE_LEFT


@dataclass
class _Counters:
    records: int = 0
    duplicate_records: int = 0
    no_work_pods: int = 0


class RunLedger:
    """One run's ledger: a local SQLite store fed in batches and checkpointed to storage.

    Build it with `RunLedger.open`. Not thread-safe; the flow uses it from one thread at a time.
    """

    def __init__(self, storage: LedgerStorage, run_id: str, expected: int, db_path: Path) -> None:
        self.storage = storage
        self.run_id = run_id
        self.expected = expected
        self.db_path = db_path
        self.foreign_records = 0
        self.segments = 0  # checkpoint segments written or replayed
        self.next_seq = 1
        self.items_loaded = False
        self.writer = uuid.uuid4().hex[:8]  # this attempt's segments never overwrite another's
        self._c = _Counters()
        self._succeeded = 0
        self._failed_attempts = 0
        self._db: sqlite3.Connection | None = None

    # --- life cycle ------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        storage: LedgerStorage,
        run_id: str,
        *,
        expected: int = 0,
        work_dir: Path | None = None,
    ) -> RunLedger:
        """A ledger for the run, rebuilt from the checkpoints already in storage."""
        base = work_dir if work_dir is not None else default_work_dir()
        ledger = cls(storage, run_id, expected, base / f"{run_id}.sqlite")
        ledger._create()
        ledger._replay()
        return ledger

    def _create(self) -> None:
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            for suffix in ("", "-journal", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{self.db_path}{suffix}").unlink()
            db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerStorageError(
                f"cannot create the ledger's local store {self.db_path}: {exc}; set "
                f"{WORK_DIR_ENV} to a writable directory"
            ) from exc
        # A cache rebuilt from the storage on every start: no fsync, the rollback journal in
        # memory (a batch whose checkpoint fails is rolled back); a small page cache keeps
        # memory flat.
        db.execute("PRAGMA journal_mode = MEMORY")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -16000")
        db.execute("PRAGMA temp_store = FILE")
        db.executescript(_SCHEMA)
        self._db = db

    def _replay(self) -> None:
        db = self._conn()
        numbers = self.storage.segment_numbers(self.run_id)
        if numbers:
            self.next_seq = numbers[-1] + 1
        for _seq, lines in self.storage.iter_segments(self.run_id):
            records = []
            for line in lines:
                try:
                    records.append(OutcomeRecord.from_json(line))
                except (ValueError, TypeError):
                    continue
            db.execute("BEGIN")
            _new, delta = self._fold(records)
            db.execute("COMMIT")
            self._apply(delta)
            self.segments += 1
        self._read_live()

    def close(self) -> None:
        """Close and delete the local store (the storage keeps the checkpoints)."""
        db, self._db = self._db, None
        if db is not None:
            db.close()
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                Path(f"{self.db_path}{suffix}").unlink()

    def __enter__(self) -> RunLedger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __reduce__(self) -> Any:  # pragma: no cover - a live store is never copied
        raise TypeError("a RunLedger holds a live database and cannot be pickled or copied")

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise LedgerStorageError(f"the ledger of run {self.run_id} is closed")
        return self._db

    # --- input -----------------------------------------------------------------------------

    def load_items(self, items: Iterable[Item]) -> int:
        """Learn the run's items (id, position, body) from the item source, streamed in
        batches; an item already known (from a record) gets its position and body."""
        db = self._conn()
        sql = (
            "INSERT INTO items (item_id, idx, body) VALUES (?, ?, ?) ON CONFLICT (item_id) "
            "DO UPDATE SET idx = excluded.idx, body = excluded.body"
        )
        n = 0
        batch: list[tuple[str, int, str]] = []
        for item in items:
            batch.append((item.id, item.index, item.body.decode("utf-8", errors="replace")))
            if len(batch) >= ITEM_BATCH:
                db.execute("BEGIN")
                db.executemany(sql, batch)
                db.execute("COMMIT")
                n += len(batch)
                batch.clear()
        if batch:
            db.execute("BEGIN")
            db.executemany(sql, batch)
            db.execute("COMMIT")
            n += len(batch)
        self.items_loaded = True
        return n

    def absorb(self, records: list[OutcomeRecord]) -> int:
        """Take a batch of this run's records: the new ones (not taken before) are written to
        a checkpoint segment in the storage, then committed to the store. Return how many
        were new. Once this returns, the batch may be acknowledged to the broker; if it
        raises (the storage cannot be written), nothing of the batch was taken."""
        db = self._conn()
        mine = [r for r in records if r.run_id == self.run_id]
        self.foreign_records += len(records) - len(mine)
        if not mine:
            return 0
        db.execute("BEGIN")
        try:
            new, delta = self._fold(mine)
            if new:
                self.storage.write_segment(self.run_id, self.next_seq, new, writer=self.writer)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        if new:
            self.next_seq += 1
            self.segments += 1
        self._apply(delta)
        self._read_live()
        return len(new)

    def _fold(self, records: list[OutcomeRecord]) -> tuple[list[bytes], _Counters]:
        """Fold records into the store inside the caller's transaction; return the new ones (as
        JSON lines) and what the counters gain (applied once the transaction commits)."""
        db = self._conn()
        delta = _Counters()
        new: list[bytes] = []
        rows = []
        seen = "INSERT OR IGNORE INTO seen (digest) VALUES (?)"
        for record in records:
            data = record_json(record)
            if db.execute(seen, (record_digest(record, data),)).rowcount == 0:
                delta.duplicate_records += 1
                continue
            new.append(data)
            delta.records += 1
            if record.status == NO_WORK or record.item_id is None:
                delta.no_work_pods += 1
                continue
            ok = record.status == SUCCEEDED
            interrupted = record.status == INTERRUPTED
            rows.append(
                (
                    record.item_id,
                    record.index,
                    int(ok),
                    int(not ok and not interrupted),
                    int(interrupted),
                    record.attempt,
                    record.status,
                    record.pod,
                    record.exit_code,
                    record.duration_s,
                    record.stderr_tail,
                    result_text(record.result) if ok else None,
                )
            )
        # In the records' order: an item's later record sees the row its earlier one left.
        db.executemany(_FOLD, rows)
        return new, delta

    def _apply(self, delta: _Counters) -> None:
        c = self._c
        c.records += delta.records
        c.duplicate_records += delta.duplicate_records
        c.no_work_pods += delta.no_work_pods

    def _read_live(self) -> None:
        self._succeeded, self._failed_attempts = (
            self._conn().execute("SELECT succeeded, failed_attempts FROM live").fetchone()
        )

    def mark_dead_lettered(self, item_ids: Iterable[str]) -> None:
        """Record items found in the dead-letter queue."""
        db = self._conn()
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO items (item_id, dead) VALUES (?, 1) "
            "ON CONFLICT (item_id) DO UPDATE SET dead = 1",
            ((i,) for i in item_ids),
        )
        db.execute("COMMIT")
        self._read_live()

    # --- live numbers ----------------------------------------------------------------------

    @property
    def succeeded(self) -> int:
        """Items with at least one success (live)."""
        return self._succeeded

    @property
    def failed_attempts(self) -> int:
        """Failed attempts reported so far (live)."""
        return self._failed_attempts

    @property
    def records(self) -> int:
        """Distinct records taken."""
        return self._c.records

    @property
    def duplicate_records(self) -> int:
        """Records handed over again and counted once."""
        return self._c.duplicate_records

    @property
    def no_work_pods(self) -> int:
        """Pods that reported finding no work."""
        return self._c.no_work_pods

    # --- queries ---------------------------------------------------------------------------

    def summary(self) -> LedgerSummary:
        """Counts of fates, from the store; items never reported count as left in the queue."""
        row = (
            self._conn()
            .execute(
                """
            SELECT count(*),
                   coalesce(sum(successes > 0), 0),
                   coalesce(sum(successes = 0 AND dead != 0), 0),
                   coalesce(sum(successes = 0 AND dead = 0 AND failures > 0), 0),
                   coalesce(sum(successes = 0 AND dead = 0 AND failures = 0), 0),
                   coalesce(sum(successes > 1), 0),
                   coalesce(sum(max(attempts, highest_attempt)), 0)
            FROM items
            """
            )
            .fetchone()
        )
        known, succeeded, dead, failed, left, twice, attempts = row
        return LedgerSummary(
            expected=self.expected,
            succeeded=succeeded,
            failed=failed,
            dead_lettered=dead,
            left=left + max(0, self.expected - known),
            processed_more_than_once=twice,
            attempts=attempts,
            no_work_pods=self._c.no_work_pods,
            foreign_records=self.foreign_records,
        )

    def result_count(self) -> int:
        """Items that have a result."""
        (n,) = (
            self._conn()
            .execute("SELECT count(*) FROM items WHERE last_result IS NOT NULL")
            .fetchone()
        )
        return int(n)

    def unreported_attempts(self) -> int:
        """Items delivered again after an attempt that left no record."""
        (n,) = (
            self._conn()
            .execute("SELECT count(*) FROM items WHERE highest_attempt > attempts")
            .fetchone()
        )
        return int(n)

    def items_with_unreported_attempts(self, limit: int = 1000) -> list[str]:
        """Ids of (at most `limit`) items delivered again after an attempt that left no record."""
        cur = self._conn().execute(
            "SELECT item_id FROM items WHERE highest_attempt > attempts "
            "ORDER BY idx, item_id LIMIT ?",
            (limit,),
        )
        return [r[0] for r in cur]

    def rows(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """One row per item, in item order (items known only from records last), streamed."""
        queries = (
            # Both use the (idx, item_id) index: no sort of the whole table.
            f"SELECT {_ROW_COLUMNS} FROM items WHERE idx IS NOT NULL ORDER BY idx, item_id",
            f"SELECT {_ROW_COLUMNS} FROM items WHERE idx IS NULL ORDER BY item_id",
        )
        left = limit
        for sql in queries:
            if left is not None and left <= 0:
                return
            # A cursor of its own: rows stream in chunks.
            cur = self._conn().cursor()
            cur.arraysize = 1000
            if left is None:
                cur.execute(sql)
            else:
                cur.execute(sql + " LIMIT ?", (left,))
            while True:
                chunk = cur.fetchmany()
                if not chunk:
                    break
                for r in chunk:
                    if left is not None:
                        left -= 1
                    yield _row(r)


def _row(r: tuple[Any, ...]) -> dict[str, Any]:
    (item_id, idx, body, attempts, successes, failures, highest, dead) = r[:8]
    last_status, pod, exit_code, duration, tail, result = r[8:]
    has_last = last_status is not None
    return {
        "item_id": item_id,
        "index": idx,
        "status": fate_of(successes, dead, failures),
        "attempts": max(attempts, highest),
        "pod": pod or "",
        "exit_code": exit_code,
        "duration_s": round(duration, 3) if has_last and duration is not None else None,
        "error_tail": tail if has_last and last_status != SUCCEEDED and tail else "",
        "body": body,
        "result": None if result is None else json.loads(result),
    }


__all__ = ["WORK_DIR_ENV", "RunLedger", "default_work_dir", "fate_of", "record_digest"]
