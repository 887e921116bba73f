"""Outcome records and the ledger: round trips, foreign runs, fates, counts and row order."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from typing import Any

import pytest

from queuejob.flows.core.ledger import (
    FAILED,
    FATE_DEAD,
    FATE_FAILED,
    FATE_LEFT,
    FATE_SUCCEEDED,
    INTERRUPTED,
    NO_WORK,
    RECORD_VERSION,
    SUCCEEDED,
    ItemOutcome,
    Ledger,
    LedgerSummary,
    OutcomeRecord,
)

RUN = "run-1"


_clock = itertools.count(1)


def rec(
    item: str | None, status: str = SUCCEEDED, *, index: int | None = None, **kw: Any
) -> OutcomeRecord:
    """A record of its own attempt: a worker stamps each report with the time (``ts``)."""
    kw.setdefault("ts", float(next(_clock)))
    return OutcomeRecord(run_id=RUN, status=status, item_id=item, index=index, **kw)


# --- records ------------------------------------------------------------------------------------


def test_record_round_trips_through_json() -> None:
    record = OutcomeRecord(
        run_id=RUN,
        status=FAILED,
        item_id="frame-7",
        index=7,
        attempt=3,
        pod="queuejob-abc-x1y2z",
        exit_code=2,
        duration_s=1.25,
        stderr_tail="Traceback ...\nValueError ü",
        ts=1700000000.5,
    )
    data = record.to_json()
    assert isinstance(data, bytes)
    assert b'": ' not in data and b'", ' not in data  # compact: one small message per attempt
    assert OutcomeRecord.from_json(data) == record
    assert OutcomeRecord.from_json(data.decode()) == record
    assert json.loads(data)["v"] == RECORD_VERSION


def test_a_record_carries_its_result_and_leaves_none_out() -> None:
    with_result = rec("a", result={"rows": [1, 2], "name": "ü"})
    data = with_result.to_json()
    assert OutcomeRecord.from_json(data) == with_result
    assert json.loads(data)["result"] == {"rows": [1, 2], "name": "ü"}
    hash(with_result)  # a dict result does not make the record unhashable
    # Without a result the record's JSON is what it was before results existed.
    assert "result" not in json.loads(rec("b").to_json())
    assert OutcomeRecord.from_json(rec("b").to_json()).result is None


def test_record_defaults() -> None:
    record = OutcomeRecord.from_json(b'{"run_id": "r", "status": "no_work"}')
    assert record == OutcomeRecord(run_id="r", status=NO_WORK)
    assert (record.attempt, record.item_id, record.exit_code, record.v) == (1, None, None, 1)


def test_unknown_fields_from_newer_workers_are_ignored() -> None:
    raw = {"run_id": RUN, "status": SUCCEEDED, "item_id": "a", "v": 2, "gpu": "A100"}
    record = OutcomeRecord.from_json(json.dumps(raw))
    assert record.item_id == "a"
    assert record.v == 2
    assert not hasattr(record, "gpu")


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'{"status": "succeeded"}', id="no-run-id"),
        pytest.param(b'{"run_id": "r"}', id="no-status"),
        pytest.param(b'["run_id", "status"]', id="list"),
        pytest.param(b'"run_id"', id="string"),
        pytest.param(b"not json", id="not-json"),
    ],
)
def test_not_a_record(data: bytes) -> None:
    with pytest.raises(ValueError):
        OutcomeRecord.from_json(data)


# --- fates ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "dead", "fate"),
    [
        pytest.param([SUCCEEDED], False, FATE_SUCCEEDED, id="succeeded"),
        pytest.param([FAILED, FAILED, SUCCEEDED], False, FATE_SUCCEEDED, id="retried-then-ok"),
        pytest.param([SUCCEEDED, FAILED], False, FATE_SUCCEEDED, id="success-wins"),
        pytest.param([FAILED], False, FATE_FAILED, id="failed"),
        pytest.param([FAILED, FAILED], True, FATE_DEAD, id="dead-lettered"),
        pytest.param([SUCCEEDED], True, FATE_SUCCEEDED, id="success-beats-dead-letter"),
        pytest.param([INTERRUPTED], False, FATE_LEFT, id="interrupted-only"),
        pytest.param([INTERRUPTED, FAILED], False, FATE_FAILED, id="interrupted-then-failed"),
        pytest.param(["weird"], False, FATE_FAILED, id="unknown-status-is-a-failure"),
        pytest.param([], True, FATE_DEAD, id="dead-without-records"),
    ],
)
def test_fates(statuses: list[str], dead: bool, fate: str) -> None:
    ledger = Ledger(RUN)
    ledger.add_all(rec("a", s) for s in statuses)
    if dead:
        ledger.mark_dead_lettered(["a"])
    assert ledger.items["a"].fate == fate


def test_never_reported_item_is_left() -> None:
    assert ItemOutcome("a").fate == FATE_LEFT


def test_attempt_counters() -> None:
    ledger = Ledger(RUN)
    ledger.add_all([rec("a", FAILED), rec("a", INTERRUPTED), rec("a", SUCCEEDED), rec("a")])
    entry = ledger.items["a"]
    assert (entry.attempts, entry.failures, entry.interrupted, entry.successes) == (4, 1, 1, 2)
    assert ledger.records == 4


def test_last_record_is_the_most_informative() -> None:
    ledger = Ledger(RUN)
    ok = rec("a", SUCCEEDED, pod="p2", exit_code=0)
    ledger.add_all([rec("a", FAILED, pod="p1"), ok, rec("a", FAILED, pod="p3", exit_code=9)])
    assert ledger.items["a"].last == ok
    ledger.add(rec("b", FAILED, pod="p1"))
    later = rec("b", FAILED, pod="p4", exit_code=3)
    ledger.add(later)
    assert ledger.items["b"].last == later


def test_a_record_taken_twice_counts_once() -> None:
    """The results queue hands records over again after a reconnect or a retried wait."""
    ledger = Ledger(RUN, expected=2)
    first, second = rec("a", FAILED, pod="p1", exit_code=3), rec("a", pod="p2")
    ledger.add_all([first, second, first, second, replace(first)])
    entry = ledger.items["a"]
    assert (entry.attempts, entry.failures, entry.successes) == (2, 1, 1)
    assert (ledger.records, ledger.duplicate_records) == (2, 3)
    # The same report from another attempt differs at least in its timestamp.
    assert ledger.add(replace(second, ts=second.ts + 0.001)) is not None
    assert ledger.items["a"].successes == 2


# --- foreign records, no-work records ---------------------------------------------------------


def test_records_of_other_runs_are_counted_and_ignored() -> None:
    ledger = Ledger(RUN, expected=1)
    assert ledger.add(replace(rec("a"), run_id="other-run")) is None
    assert ledger.add(replace(rec(None, NO_WORK), run_id="other-run")) is None
    assert ledger.items == {}
    assert ledger.records == 0
    assert ledger.foreign_records == 2
    s = ledger.summary()
    assert (s.foreign_records, s.no_work_pods, s.left) == (2, 0, 1)


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(rec(None, NO_WORK, pod="p"), id="no-work"),
        pytest.param(rec(None, SUCCEEDED, pod="p"), id="no-item-id"),
    ],
)
def test_no_work_records_count_pods_not_items(record: OutcomeRecord) -> None:
    ledger = Ledger(RUN)
    assert ledger.add(record) is None
    assert ledger.items == {}
    assert ledger.no_work_pods == 1
    assert ledger.records == 1


# --- summary ----------------------------------------------------------------------------------


def test_summary_counts() -> None:
    ledger = Ledger(RUN, expected=10)
    ledger.add_all(
        [
            rec("a", index=0),
            rec("b", FAILED, index=1),
            rec("b", index=1),
            rec("c", FAILED, index=2),
            rec("d", FAILED, index=3),
            rec("d", FAILED, index=3),
            rec("e", index=4),
            rec("e", index=4),  # a duplicate success: the ack was lost
            rec("f", INTERRUPTED, index=5),
            rec(None, NO_WORK),
            rec(None, NO_WORK),
            replace(rec("z"), run_id="old-run"),
        ]
    )
    ledger.mark_dead_lettered(["d"])
    s = ledger.summary()
    assert s == LedgerSummary(
        expected=10,
        succeeded=3,  # a, b, e
        failed=1,  # c
        dead_lettered=1,  # d
        left=5,  # f (interrupted) + 4 never reported
        processed_more_than_once=1,  # e
        attempts=9,
        no_work_pods=2,
        foreign_records=1,
    )
    assert s.accounted == 5
    assert s.as_dict() == {
        "expected": 10,
        "succeeded": 3,
        "failed": 1,
        "dead_lettered": 1,
        "left": 5,
        "processed_more_than_once": 1,
        "attempts": 9,
        "no_work_pods": 2,
        "foreign_records": 1,
    }


def test_summary_of_an_empty_ledger_counts_every_item_as_left() -> None:
    s = Ledger(RUN, expected=4).summary()
    assert (s.left, s.succeeded, s.accounted, s.attempts) == (4, 0, 0, 0)


def test_more_items_reported_than_expected_does_not_go_negative() -> None:
    ledger = Ledger(RUN, expected=1)
    ledger.add_all([rec("a"), rec("b")])
    assert ledger.summary().left == 0
    assert ledger.summary().succeeded == 2


def test_dead_lettered_ids_not_seen_before_are_added() -> None:
    ledger = Ledger(RUN, expected=3)
    ledger.add(rec("a", FAILED, index=0))
    ledger.mark_dead_lettered(["a", "zz"])
    assert ledger.items["a"].dead_lettered and ledger.items["zz"].dead_lettered
    assert ledger.items["zz"].attempts == 0
    s = ledger.summary()
    assert (s.dead_lettered, s.failed, s.left) == (2, 0, 1)


# --- rows -------------------------------------------------------------------------------------


def test_rows_follow_item_order_then_unknown_positions_by_id() -> None:
    ledger = Ledger(RUN)
    ledger.add_all([rec("c", index=2), rec("x", index=10), rec("a", index=0), rec("b", index=1)])
    ledger.mark_dead_lettered(["zeta", "alpha"])
    assert [r["item_id"] for r in ledger.rows()] == ["a", "b", "c", "x", "alpha", "zeta"]


def test_row_fields() -> None:
    ledger = Ledger(RUN)
    ledger.add(
        rec("a", FAILED, index=0, pod="p1", exit_code=3, duration_s=1.23456, stderr_tail="boom")
    )
    ledger.add(
        rec("b", index=1, pod="p2", exit_code=0, duration_s=0.5, stderr_tail="warning", result=6)
    )
    ledger.mark_dead_lettered(["c"])
    rows = list(ledger.rows())
    assert rows[0] == {
        "item_id": "a",
        "index": 0,
        "status": FATE_FAILED,
        "attempts": 1,
        "pod": "p1",
        "exit_code": 3,
        "duration_s": 1.235,
        "error_tail": "boom",
        "result": None,
    }
    # A success shows no error tail, even when the worker wrote to stderr.
    assert rows[1]["status"] == FATE_SUCCEEDED
    assert rows[1]["error_tail"] == ""
    assert rows[1]["result"] == 6
    assert rows[2] == {
        "item_id": "c",
        "index": None,
        "status": FATE_DEAD,
        "attempts": 0,
        "pod": "",
        "exit_code": None,
        "duration_s": None,
        "error_tail": "",
        "result": None,
    }
    assert json.loads(json.dumps(rows)) == rows


# --- attempts that left no record -------------------------------------------------------------


def test_an_attempt_number_beyond_the_records_counts_a_lost_attempt() -> None:
    # A pod was SIGKILLed holding the item (no record); the broker counted the delivery, so the
    # next attempt carries attempt=2.
    ledger = Ledger(RUN, expected=2)
    ledger.add_all([rec("a", attempt=2, index=0), rec("b", index=1)])
    a, b = ledger.items["a"], ledger.items["b"]
    assert (a.attempts, a.attempts_made, a.unreported_attempts) == (1, 2, 1)
    assert (b.attempts_made, b.unreported_attempts) == (1, 0)
    assert ledger.items_with_unreported_attempts() == ["a"]
    assert [r["attempts"] for r in ledger.rows()] == [2, 1]
    assert ledger.summary().attempts == 3
    assert ledger.summary().processed_more_than_once == 0


def test_reported_attempts_are_not_lost_ones() -> None:
    ledger = Ledger(RUN)
    ledger.add_all(
        [rec("a", FAILED, attempt=1), rec("a", INTERRUPTED, attempt=2), rec("a", attempt=3)]
    )
    assert ledger.items["a"].unreported_attempts == 0
    assert ledger.items_with_unreported_attempts() == []
