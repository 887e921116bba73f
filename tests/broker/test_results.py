"""The results consumer the flow reads outcome records with."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import fsspec
import pika
import pytest

from queuejob.flows.adapters.broker import (
    BrokerConfig,
    QueueSettings,
    ResultsConsumer,
    declare_queues,
    purge_results,
)
from queuejob.flows.adapters.ledger_storage import LedgerStorage
from queuejob.flows.adapters.ledger_store import RunLedger
from queuejob.flows.core.items import Item
from queuejob.flows.core.ledger import FAILED, SUCCEEDED, Ledger, OutcomeRecord
from queuejob.flows.monitor import RunMonitor

from .support import ready_count

pytestmark = pytest.mark.broker


def _publish(url: str, queue: str, bodies: list[bytes]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for body in bodies:
            ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
    finally:
        conn.close()


def _take(consumer: ResultsConsumer, n: int, timeout_s: float = 10.0) -> list[OutcomeRecord]:
    """Drain until `n` records have come (or the deadline passed); return them."""
    got: list[OutcomeRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += consumer.drain(max_wait_s=0.5)
    return got


def test_drain_returns_this_runs_records_and_counts_the_rest(
    cfg: BrokerConfig, qs: QueueSettings, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    mine = [
        OutcomeRecord(run_id="run-1", status=SUCCEEDED, item_id="a", attempt=1, pod="p1"),
        OutcomeRecord(run_id="run-1", status=FAILED, item_id="b", exit_code=7, stderr_tail="x"),
        OutcomeRecord(run_id="run-1", status=SUCCEEDED, item_id="b", attempt=2),
    ]
    other = OutcomeRecord(run_id="run-0", status=SUCCEEDED, item_id="z")
    bodies = [
        mine[0].to_json(),
        other.to_json(),
        b"not json",
        mine[1].to_json(),
        other.to_json(),
        mine[2].to_json(),
    ]
    _publish(broker_url, qs.results_name, bodies)
    with ResultsConsumer(cfg, qs, run_id="run-1") as consumer:
        assert _take(consumer, 3) == mine
        assert (consumer.foreign, consumer.malformed) == (2, 1)
    # Other runs' records and malformed messages were acknowledged; this run's records go back
    # to the queue until the flow has saved its ledger and purges them.
    assert ready_count(broker_url, qs.results_name) == 3
    with ResultsConsumer(cfg, qs, run_id="run-1") as consumer:
        assert sorted(_take(consumer, 3), key=repr) == sorted(mine, key=repr)
        assert (consumer.foreign, consumer.malformed) == (0, 0)
    assert purge_results(cfg, qs) == 3
    assert ready_count(broker_url, qs.results_name) == 0


def test_a_reconnect_hands_records_over_again_and_the_ledger_takes_each_once(
    cfg: BrokerConfig, qs: QueueSettings, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    records = [OutcomeRecord(run_id="run-1", status=SUCCEEDED, item_id=str(i)) for i in range(5)]
    _publish(broker_url, qs.results_name, [r.to_json() for r in records])
    ledger = Ledger(run_id="run-1", expected=5)
    with ResultsConsumer(cfg, qs, run_id="run-1") as consumer:
        ledger.add_all(consumer.drain(max_wait_s=5))
        consumer.close()  # as a dropped connection would: drain reconnects
        deadline = time.monotonic() + 10
        while ledger.duplicate_records < 5 and time.monotonic() < deadline:
            ledger.add_all(consumer.drain(max_wait_s=0.5))
    assert ledger.records == 5 and ledger.duplicate_records == 5
    summary = ledger.summary()
    assert (summary.succeeded, summary.attempts, summary.processed_more_than_once) == (5, 5, 0)


def test_drain_waits_at_most_max_wait_and_respects_max_records(
    cfg: BrokerConfig, qs: QueueSettings, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    with ResultsConsumer(cfg, qs, run_id="run-1") as consumer:
        start = time.monotonic()
        assert consumer.drain(max_wait_s=0.3) == []
        assert 0.25 <= time.monotonic() - start < 2.0
        records = [
            OutcomeRecord(run_id="run-1", status=SUCCEEDED, item_id=str(i)) for i in range(5)
        ]
        _publish(broker_url, qs.results_name, [r.to_json() for r in records])
        first = consumer.drain(max_wait_s=5, max_records=2)
        assert first == records[:2]
        assert _take(consumer, 3) == records[2:]


def test_every_record_is_redelivered_after_close(
    cfg: BrokerConfig, qs: QueueSettings, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    records = [OutcomeRecord(run_id="run-1", status=SUCCEEDED, item_id=str(i)) for i in range(4)]
    _publish(broker_url, qs.results_name, [r.to_json() for r in records])
    with ResultsConsumer(cfg, qs, run_id="run-1") as consumer:
        assert consumer.drain(max_wait_s=5, max_records=1) == records[:1]
    # The one returned and the three prefetched but never returned are all back in the queue:
    # a flow that dies before saving its ledger loses none.
    with ResultsConsumer(cfg, qs, run_id="run-1") as consumer:
        got = _take(consumer, 4)
    assert sorted(got, key=repr) == records


def test_take_holds_at_most_the_prefetch_and_acks_a_batch_at_once(
    cfg: BrokerConfig, qs: QueueSettings, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    records = [OutcomeRecord(run_id="run-1", status=SUCCEEDED, item_id=str(i)) for i in range(250)]
    other = OutcomeRecord(run_id="run-0", status=SUCCEEDED, item_id="z")
    _publish(
        broker_url, qs.results_name, [other.to_json(), b"junk"] + [r.to_json() for r in records]
    )
    got: list[OutcomeRecord] = []
    with ResultsConsumer(cfg, qs, run_id="run-1", prefetch=40) as consumer:
        deadline = time.monotonic() + 20
        while len(got) < len(records) and time.monotonic() < deadline:
            batch = consumer.take(max_wait_s=0.5, max_records=20)
            assert batch.messages <= 20
            assert consumer.unacked <= 40
            got += batch.records
            assert consumer.ack(batch) or batch.messages == 0
        assert 20 <= consumer.max_unacked_seen <= 40
        assert (consumer.foreign, consumer.malformed) == (1, 1)
    assert got == records
    # Acknowledged: nothing goes back to the queue when the consumer closes.
    assert ready_count(broker_url, qs.results_name) == 0


def test_a_batch_of_a_lost_channel_is_not_acked_and_comes_again(
    cfg: BrokerConfig, qs: QueueSettings, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    records = [OutcomeRecord(run_id="run-1", status=SUCCEEDED, item_id=str(i)) for i in range(5)]
    _publish(broker_url, qs.results_name, [r.to_json() for r in records])
    with ResultsConsumer(cfg, qs, run_id="run-1", prefetch=10) as consumer:
        batches = _batches(consumer, len(records))
        assert [r for b in batches for r in b.records] == records
        consumer.close()  # the connection is lost before the batches are saved
        assert [consumer.ack(b) for b in batches] == [False] * len(batches)
        again = _batches(consumer, len(records))
        assert [r for b in again for r in b.records] == records
        assert all(consumer.ack(b) for b in again)
    assert ready_count(broker_url, qs.results_name) == 0


def _batches(consumer: ResultsConsumer, count: int, timeout_s: float = 10.0) -> list[Any]:
    """Batches taken until they hold ``count`` records (deliveries arrive in any grouping)."""
    batches: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while sum(len(b.records) for b in batches) < count and time.monotonic() < deadline:
        batch = consumer.take(max_wait_s=0.5)
        if batch.messages:
            batches.append(batch)
    return batches


def test_after_the_job_a_backlog_of_records_is_drained_whole(
    cfg: BrokerConfig, qs: QueueSettings, broker_url: str, tmp_path: Path
) -> None:
    """Fast pods can end the Job with many records still queued for the flow. The drain after
    the Job takes them all, however long that takes, before the ledger is final (records left
    in the queue would be counted as items lost, then purged with the results)."""
    declare_queues(cfg, qs)
    n = 3000
    records = [
        OutcomeRecord(run_id="run-1", status=SUCCEEDED, item_id=f"i{i}", index=i) for i in range(n)
    ]
    _publish(broker_url, qs.results_name, [r.to_json() for r in records])
    storage = LedgerStorage(fsspec.filesystem("file"), str(tmp_path / "st"), local=True, source="t")
    with RunLedger.open(storage, "run-1", expected=n, work_dir=tmp_path / "w") as ledger:
        ledger.load_items(Item(id=f"i{i}", index=i, body=b"x") for i in range(n))
        monitor = RunMonitor(
            cfg=cfg,
            qs=qs,
            ledger=ledger,
            mode="fine",
            idle_timeout_s=1.0,
            logger=logging.getLogger("test"),
            max_unacked=2,  # 3000 batches of one, each checkpointed before its ack
        )
        with monitor:
            # A cap far shorter than the backlog takes: only a wait with no record ends it.
            monitor.drain_until_quiet(quiet_s=0.2, cap_s=0.3)
        assert ledger.succeeded == n
    assert ready_count(broker_url, qs.results_name) == 0
