"""Workers killed with SIGKILL mid-item: the docs' race (after the work, before the ack) and a
kill before the work. The local backend runs the pods (coarse mode, parallelism 2); the command
kills its own worker (its parent) the first time it sees one chosen item, and appends every item
it processes to a side-effect file, from which the lost and duplicated items are counted."""

from __future__ import annotations

import pytest

from queuejob.flows.work_queue import run_work_queue
from tests.reliability.conftest import RelEnv
from tests.reliability.support import (
    DOCS_ITEMS,
    Witness,
    finding_codes,
    ledger_rows,
    local_kwargs,
    record,
)

pytestmark = [pytest.mark.reliability, pytest.mark.broker, pytest.mark.prefect]


def test_killed_after_the_work_before_the_ack_is_redelivered_and_flagged(
    rel_env: RelEnv, queue: str, witness: Witness
) -> None:
    fx = rel_env.effects
    report = run_work_queue(**local_kwargs(queue, fx.kill_after_work("cherry")))
    witness.add("report", report)
    witness.add_run(report["run_id"])

    assert fx.marker.exists(), "the fault was injected"
    lost, twice = fx.lost_and_twice(DOCS_ITEMS)
    assert lost == []
    assert twice == ["cherry"], "the work ran again on the redelivery: at-least-once"
    s = report["summary"]
    assert (s["succeeded"], s["failed"], s["dead_lettered"], s["left"]) == (8, 0, 0, 0)
    assert report["job_phase"] == "Succeeded"
    rows = ledger_rows(report, DOCS_ITEMS)
    assert rows["cherry"]["attempts"] == 2, "the lost attempt shows in the ledger"
    assert all(rows[i]["attempts"] == 1 for i in DOCS_ITEMS if i != "cherry")
    found = finding_codes(report)
    assert "redelivered-after-lost-attempt" in found
    finding = found["redelivered-after-lost-attempt"]
    assert finding["numbers"]["items"] == 1
    assert "at-least-once" in finding["advice"] and "idempotent" in finding["advice"]
    assert "may have run twice" in finding["message"]
    record(
        "worker SIGKILLed after the work, before the ack (the docs' race)",
        faults="1 SIGKILL",
        items=8,
        lost=len(lost),
        twice_expected="1 (flagged)",
        twice_observed=len(twice),
    )


def test_killed_before_the_work_is_redelivered_and_nothing_is_lost(
    rel_env: RelEnv, queue: str, witness: Witness
) -> None:
    fx = rel_env.effects
    report = run_work_queue(**local_kwargs(queue, fx.kill_before_work("fig")))
    witness.add("report", report)
    witness.add_run(report["run_id"])

    assert fx.marker.exists(), "the fault was injected"
    lost, twice = fx.lost_and_twice(DOCS_ITEMS)
    assert (lost, twice) == ([], [])
    s = report["summary"]
    assert (s["succeeded"], s["failed"], s["dead_lettered"], s["left"]) == (8, 0, 0, 0)
    assert s["processed_more_than_once"] == 0
    assert ledger_rows(report, DOCS_ITEMS)["fig"]["attempts"] == 2
    # The ledger cannot tell how far the lost attempt got, so it still warns.
    assert "redelivered-after-lost-attempt" in finding_codes(report)
    record(
        "worker SIGKILLed before the work",
        faults="1 SIGKILL",
        items=8,
        lost=len(lost),
        twice_expected="0",
        twice_observed=len(twice),
    )
