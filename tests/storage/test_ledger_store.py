"""The on-disk ledger: the same fates and counts as the in-memory reference `Ledger`, rebuilt
from its checkpoints in a fresh store, and nothing taken when a checkpoint cannot be written."""

from __future__ import annotations

import random
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest

from queuejob.flows.adapters.ledger_storage import LedgerStorage
from queuejob.flows.adapters.ledger_store import RunLedger
from queuejob.flows.core.errors import LedgerStorageError
from queuejob.flows.core.items import Item
from queuejob.flows.core.ledger import (
    FAILED,
    INTERRUPTED,
    NO_WORK,
    SUCCEEDED,
    Ledger,
    OutcomeRecord,
)

RUN = "run-1"


def _storage(tmp_path: Path) -> LedgerStorage:
    return LedgerStorage(fsspec.filesystem("file"), str(tmp_path / "st"), local=True, source="t")


def _random_records(n_items: int, seed: int) -> list[OutcomeRecord]:
    rnd = random.Random(seed)
    out: list[OutcomeRecord] = []
    for i in range(n_items):
        for attempt in range(1, rnd.randint(0, 4) + 1):
            status = rnd.choice([SUCCEEDED, SUCCEEDED, FAILED, INTERRUPTED])
            if rnd.random() < 0.1:
                attempt += 1  # an attempt that left no record
            out.append(
                OutcomeRecord(
                    run_id=RUN,
                    status=status,
                    item_id=f"i{i}",
                    index=i,
                    attempt=attempt,
                    pod=f"p{rnd.randint(0, 3)}",
                    exit_code=0 if status == SUCCEEDED else 1,
                    duration_s=rnd.random(),
                    stderr_tail="" if status == SUCCEEDED else "boom",
                    ts=float(len(out)),
                    result=_result(len(out), i) if status == SUCCEEDED else None,
                )
            )
    out.append(OutcomeRecord(run_id=RUN, status=NO_WORK, pod="p9", ts=-1.0))
    rnd.shuffle(out)
    return out


def _result(k: int, i: int) -> Any:
    """A result of some kind, or none: what --call functions and commands return (chosen
    without drawing from the records' random sequence)."""
    return [None, i, f"text {i} ü\n", {"i": i, "parts": [1, None]}, [i, "x"], True][k % 6]


def _reference(records: list[OutcomeRecord], n_items: int, dead: list[str]) -> Ledger:
    ledger = Ledger(RUN, expected=n_items)
    ledger.add_all(records)
    ledger.mark_dead_lettered(dead)
    return ledger


def _strip_body(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "body"} for r in rows]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_fates_and_counts_as_the_reference(tmp_path: Path, seed: int) -> None:
    n = 300
    records = _random_records(n, seed)
    dead = ["i5", "i7"]
    with RunLedger.open(_storage(tmp_path), RUN, expected=n, work_dir=tmp_path / "w") as ledger:
        ledger.load_items(Item(id=f"i{i}", index=i, body=f"body {i}".encode()) for i in range(n))
        for start in range(0, len(records), 97):
            batch = records[start : start + 97]
            ledger.absorb(batch + batch[:5])  # some handed over twice
        ledger.mark_dead_lettered(dead)
        ref = _reference(records, n, dead)
        assert ledger.summary() == ref.summary()
        rows = list(ledger.rows())
        # Every item has a row, in order; those without a record are left in the queue.
        known = {r["item_id"]: r for r in ref.rows()}
        left = {"status": "left_in_queue", "attempts": 0, "pod": "", "exit_code": None}
        left |= {"duration_s": None, "error_tail": "", "result": None}
        expected_rows = [
            known.get(f"i{i}", {"item_id": f"i{i}", "index": i, **left}) for i in range(n)
        ]
        assert _strip_body(rows) == expected_rows
        assert [r["body"] for r in rows] == [f"body {i}" for i in range(n)]
        assert sorted(ledger.items_with_unreported_attempts()) == sorted(
            ref.items_with_unreported_attempts()
        )
        assert ledger.unreported_attempts() == len(ref.items_with_unreported_attempts())
        assert ledger.succeeded == ref.summary().succeeded
        assert ledger.failed_attempts == sum(e.failures for e in ref.items.values())
        assert ledger.records == len(records)
        assert list(ledger.rows(limit=7)) == rows[:7]
        assert ledger.result_count() == sum(r["result"] is not None for r in rows) > 0


def test_a_fresh_store_is_rebuilt_from_the_checkpoints(tmp_path: Path) -> None:
    n = 200
    records = _random_records(n, 7)
    storage = _storage(tmp_path)
    first = RunLedger.open(storage, RUN, expected=n, work_dir=tmp_path / "pod1")
    half = len(records) // 2
    first.absorb(records[:half])
    first.close()  # the pod is gone, and its disk with it
    assert not list((tmp_path / "pod1").iterdir())

    second = RunLedger.open(storage, RUN, expected=n, work_dir=tmp_path / "pod2")
    assert second.records == half
    # The broker hands the unacknowledged tail over again, and part of the saved half too.
    assert second.absorb(records[half - 10 :]) == len(records) - half
    ref = _reference(records, n, [])
    assert second.summary() == ref.summary()
    assert second.duplicate_records == 10
    # The results came back from the checkpoints, and from the records taken since.
    got = [(r["item_id"], r["result"]) for r in second.rows() if r["status"] == "succeeded"]
    want = [(r["item_id"], r["result"]) for r in ref.rows() if r["status"] == "succeeded"]
    assert got == want and any(result is not None for _, result in got)
    second.close()


def test_a_checkpoint_that_fails_takes_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    broken = LedgerStorage(fsspec.filesystem("file"), str(blocker / "st"), local=True, source="t")
    records = _random_records(20, 3)
    with RunLedger.open(_storage(tmp_path), RUN, expected=20, work_dir=tmp_path / "w") as ledger:
        good, ledger.storage = ledger.storage, broken
        with pytest.raises(LedgerStorageError, match="cannot write ledger checkpoint"):
            ledger.absorb(records)
        assert ledger.records == 0
        assert ledger.summary().left == 20
        # Once the storage works again the same records are taken (the broker redelivers).
        ledger.storage = good
        assert ledger.absorb(records) == len(records)


def test_remote_filesystem_checkpoints(tmp_path: Path) -> None:
    base = f"memory://queuejob-{uuid.uuid4().hex[:8]}/ledgers"
    storage = LedgerStorage(fsspec.filesystem("memory"), base, local=False, source="t")
    records = _random_records(50, 5)
    with RunLedger.open(storage, RUN, expected=50, work_dir=tmp_path / "a") as a:
        a.absorb(records[:30])
    with RunLedger.open(storage, RUN, expected=50, work_dir=tmp_path / "b") as b:
        b.absorb(records)
        assert b.summary() == _reference(records, 50, []).summary()
        assert storage.segment_numbers(RUN) == [1, 2]


def test_records_of_other_runs_are_counted_and_ignored(tmp_path: Path) -> None:
    with RunLedger.open(_storage(tmp_path), RUN, expected=1, work_dir=tmp_path / "w") as ledger:
        other = OutcomeRecord(run_id="other", status=SUCCEEDED, item_id="a", index=0)
        assert ledger.absorb([other]) == 0
        assert ledger.summary().foreign_records == 1
        assert ledger.summary().succeeded == 0


def test_two_attempts_writing_at_once_keep_both_checkpoints(tmp_path: Path) -> None:
    # A pod thought lost still runs while the retry starts: both number their next segment
    # alike, and neither may overwrite the other's (its records are acknowledged).
    storage = _storage(tmp_path)
    records = _random_records(40, 11)
    a = RunLedger.open(storage, RUN, expected=40, work_dir=tmp_path / "a")
    b = RunLedger.open(storage, RUN, expected=40, work_dir=tmp_path / "b")
    a.absorb(records[:20])
    b.absorb(records[20:])
    a.close()
    b.close()
    assert storage.segment_numbers(RUN) == [1]
    with RunLedger.open(storage, RUN, expected=40, work_dir=tmp_path / "c") as c:
        assert c.records == len(records)
        assert c.summary() == _reference(records, 40, []).summary()
