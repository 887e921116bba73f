"""Fine mode's window: many messages held at once, outcome records confirmed in a pipeline, each
message acked only after its record is confirmed. Real workers against the real broker."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pika
import pytest

from queuejob.flows.adapters.broker import (
    BrokerConfig,
    QueueSettings,
    dead_letter_ids,
    declare_queues,
    delete_queues,
    fill_queue,
    queue_depths,
)
from queuejob.flows.core.items import ItemSource, iter_items
from queuejob.flows.core.ledger import FAILED, INTERRUPTED, SUCCEEDED, Ledger
from queuejob.flows.worker import EXIT_BROKER, EXIT_ITEM_FAILED, EXIT_SIGTERM

from .support import (
    collect_records,
    ready_count,
    run_worker,
    started_worker,
    wait_until,
    worker_env,
)

pytestmark = pytest.mark.broker

IDLE = ["--idle-timeout", "0.4"]
FINE = ["--mode", "fine", *IDLE]


def _fill(cfg: BrokerConfig, qs: QueueSettings, values: list[str], run_id: str) -> dict[str, str]:
    """Declare and fill; return item id by value."""
    declare_queues(cfg, qs)
    fill_queue(cfg, qs, iter_items(ItemSource.inline(values)), run_id=run_id)
    return {item.body.decode(): item.id for item in iter_items(ItemSource.inline(values))}


def test_sigterm_mid_window_returns_every_unacked_message_and_loses_none(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str, tmp_path: Path
) -> None:
    values = [f"v{i}" for i in range(5)] + ["slow"] + [f"w{i}" for i in range(24)]
    ids = _fill(cfg, qs, values, run_id)
    mark = tmp_path / "slow.started"
    env = worker_env(broker_url, qs.name, run_id, "pod-w", MARK=str(mark))
    call = ["--call", "tests.broker.worker_calls:slow_item"]
    with started_worker([*FINE, "--prefetch", "10", *call], env) as proc:
        wait_until(mark.exists, timeout=15, what="the slow item to start")
        # The 5 items before it are acked and the window is full again: the slow item and the
        # 9 after it are held unacked, 15 wait in the queue.
        wait_until(lambda: ready_count(broker_url, qs.name) == 15, what="a full window")
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    assert proc.returncode == EXIT_SIGTERM, err
    assert "9 more message(s) held unstarted" in err
    wait_until(lambda: ready_count(broker_url, qs.name) == 25, what="the window to go back")

    first = collect_records(cfg, qs, run_id, count=15)
    by_status = Counter(r.status for r in first)
    assert by_status == {SUCCEEDED: 5, INTERRUPTED: 10}, first
    slow = [r for r in first if r.item_id == ids["slow"]]
    assert [(r.status, r.attempt) for r in slow] == [(INTERRUPTED, 1)]
    unstarted = [r for r in first if r.status == INTERRUPTED and r.item_id != ids["slow"]]
    assert all("not started" in r.stderr_tail and r.exit_code is None for r in unstarted)

    # The next pod does the rest: every item succeeds once, and each returned message's
    # redelivery (the quorum queue counted the return) matches the interrupted record.
    again = run_worker([*FINE, "--call", "tests.broker.worker_calls:process"], env)
    assert again.returncode == 0, again.stderr
    assert ready_count(broker_url, qs.name) == 0
    rest = collect_records(cfg, qs, run_id, count=25)
    ledger = Ledger(run_id=run_id, expected=len(values))
    ledger.add_all(first + rest)
    summary = ledger.summary()
    assert (summary.succeeded, summary.left, summary.processed_more_than_once) == (30, 0, 0)
    assert ledger.items_with_unreported_attempts() == []
    assert {r.item_id for r in rest if r.status == SUCCEEDED and r.attempt == 2} == {
        r.item_id for r in first if r.status == INTERRUPTED
    }


def test_a_failed_item_inside_a_window_is_rejected_alone(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    values = [f"a{i}" for i in range(5)] + ["poison"] + [f"b{i}" for i in range(5)]
    ids = _fill(cfg, qs, values, run_id)
    env = worker_env(broker_url, qs.name, run_id, "pod-n")
    call = ["--call", "tests.broker.worker_calls:process", "--prefetch", "20"]

    done = run_worker([*FINE, *call], env)
    # The failure stops the worker, but only after the items it already held: they are acked
    # around the rejected one, and only the poison item goes back to the queue.
    assert done.returncode == EXIT_ITEM_FAILED, done.stderr
    assert "done: 11 item(s), 1 failed" in done.stderr
    wait_until(lambda: ready_count(broker_url, qs.name) == 1, what="the poison item back")
    records = collect_records(cfg, qs, run_id, count=11)
    assert Counter(r.status for r in records) == {SUCCEEDED: 10, FAILED: 1}
    assert [r.item_id for r in records if r.status == FAILED] == [ids["poison"]]

    # More pods, until the delivery limit (3) dead-letters the poison item after 4 attempts;
    # no other item is ever attempted again.
    codes = [done.returncode]
    for _ in range(8):
        pod = run_worker([*FINE, *call], env)
        codes.append(pod.returncode)
        if "no work" in pod.stderr:
            break
    assert codes == [EXIT_ITEM_FAILED] * 4 + [0], codes
    wait_until(lambda: queue_depths(cfg, qs)["dead"].ready == 1, what="the dead letter")
    assert dead_letter_ids(cfg, qs, run_id=run_id) == [ids["poison"]]
    # The results queue hands the first records over again: 11, 3 more failures, 1 no work.
    records = collect_records(cfg, qs, run_id, count=15)
    assert len(records) == 15
    attempts = Counter(r.item_id for r in records if r.item_id)
    assert attempts[ids["poison"]] == 4
    assert all(attempts[ids[v]] == 1 for v in values if v != "poison")


def test_a_refused_record_leaves_its_message_unacked(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    _fill(cfg, qs, [f"r{i}" for i in range(10)], run_id)
    # A results queue that takes 3 records and refuses the rest (basic.nack).
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        ch = conn.channel()
        ch.queue_delete(qs.results_name)
        ch.queue_declare(
            qs.results_name,
            durable=True,
            arguments={"x-max-length": 3, "x-overflow": "reject-publish"},
        )
    finally:
        conn.close()
    env = worker_env(broker_url, qs.name, run_id, "pod-r")
    done = run_worker([*FINE, "--prefetch", "10", "--call", "bench.trivial:noop"], env)
    assert done.returncode == EXIT_BROKER, done.stderr
    assert "refused the outcome record" in done.stderr and qs.results_name in done.stderr
    # Record before ack: 3 items have a record and are acked; the other 7 have none and are
    # back in the queue. Nothing is lost.
    wait_until(lambda: ready_count(broker_url, qs.name) == 7, what="7 items back in the queue")
    assert ready_count(broker_url, qs.results_name) == 3


def test_the_worker_writes_records_exactly_as_the_ledger_reads_them() -> None:
    from queuejob.flows.core.ledger import OutcomeRecord
    from queuejob.flows.worker.outcomes import record_json as _record_json

    rec = OutcomeRecord(
        run_id="r", status=FAILED, item_id="i-1", index=3, attempt=2, pod="p", exit_code=7,
        duration_s=0.25, stderr_tail="boom \u00e9\n", ts=1.5,
    )  # fmt: skip
    assert _record_json(rec) == rec.to_json()
    assert OutcomeRecord.from_json(_record_json(rec)) == rec


def test_classic_queue_failure_counting_holds_in_fine_mode(
    cfg: BrokerConfig, queue_name: str, run_id: str, broker_url: str
) -> None:
    qs = QueueSettings(queue_name, queue_type="classic")
    values = ["ok0", "poison", "ok1", "ok2"]
    try:
        ids = _fill(cfg, qs, values, run_id)
        env = worker_env(broker_url, qs.name, run_id, "pod-cf", QUEUEJOB_DELIVERY_LIMIT="1")
        call = [*FINE, "--call", "tests.broker.worker_calls:process"]
        codes = []
        for _ in range(6):
            pod = run_worker(call, env)
            codes.append(pod.returncode)
            if "no work" in pod.stderr:
                break
        assert codes[-1] == 0 and set(codes[:-1]) == {EXIT_ITEM_FAILED}, codes
        wait_until(lambda: queue_depths(cfg, qs)["dead"].ready == 1, what="the dead letter")
        assert dead_letter_ids(cfg, qs, run_id=run_id) == [ids["poison"]]
        assert ready_count(broker_url, qs.name) == 0
        records = collect_records(cfg, qs, run_id, count=6)
        assert len(records) == 6  # 3 successes, 2 failures, 1 no work
        poison = sorted(r.attempt for r in records if r.item_id == ids["poison"])
        assert poison == [1, 2]
        ok = Counter(r.item_id for r in records if r.status == SUCCEEDED)
        assert ok == {ids[v]: 1 for v in values if v != "poison"}
    finally:
        delete_queues(cfg, qs)
