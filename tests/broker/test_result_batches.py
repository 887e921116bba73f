"""Records that carry large results: the flow takes them in batches bounded in bytes, reads no
further ahead of the connection than that, and keeps every result."""

from __future__ import annotations

import logging
from pathlib import Path

import fsspec
import pika
import pytest

from queuejob.flows.adapters.broker import (
    BrokerConfig,
    QueueSettings,
    ResultsConsumer,
    declare_queues,
)
from queuejob.flows.adapters.ledger_storage import LedgerStorage
from queuejob.flows.adapters.ledger_store import RunLedger
from queuejob.flows.core.items import Item
from queuejob.flows.core.ledger import SUCCEEDED, OutcomeRecord
from queuejob.flows.monitor import RunMonitor

from .support import ready_count, wait_until

pytestmark = pytest.mark.broker

RESULT = 60_000  # bytes per result, near the default limit
N = 40


def _publish_records(url: str, queue: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for i in range(N):
            rec = OutcomeRecord(run_id="run-1", status=SUCCEEDED, item_id=f"i{i}", index=i,
                                result=f"{i}:" + "r" * RESULT)  # fmt: skip
            ch.basic_publish("", queue, rec.to_json(), pika.BasicProperties(delivery_mode=2))
    finally:
        conn.close()


def test_a_batch_ends_at_its_bytes_and_reads_no_further_ahead(
    cfg: BrokerConfig, qs: QueueSettings, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    _publish_records(broker_url, qs.results_name)
    cap = 4 * RESULT
    taken = 0
    with ResultsConsumer(cfg, qs, run_id="run-1", prefetch=1000) as consumer:
        while taken < N:
            batch = consumer.take(max_wait_s=2.0, max_records=1000, max_bytes=cap)
            assert 1 <= batch.messages <= 4, "cut at its bytes, not at its count"
            assert batch.bytes <= cap + RESULT + 1000  # the last record may pass the cap
            # What waits in the consumer beyond the batch: at most the cap and one read.
            assert consumer._buffered <= cap + 200_000
            assert all(r.result.startswith(f"{r.index}:") for r in batch.records)
            taken += batch.messages
            assert consumer.ack(batch)
    assert taken == N
    wait_until(lambda: ready_count(broker_url, qs.results_name) == 0, what="all acked")


def test_the_monitor_keeps_every_result_through_byte_bounded_batches(
    cfg: BrokerConfig, qs: QueueSettings, broker_url: str, tmp_path: Path
) -> None:
    declare_queues(cfg, qs)
    _publish_records(broker_url, qs.results_name)
    storage = LedgerStorage(fsspec.filesystem("file"), str(tmp_path / "st"), local=True, source="t")
    with RunLedger.open(storage, "run-1", expected=N, work_dir=tmp_path / "w") as ledger:
        ledger.load_items(Item(id=f"i{i}", index=i, body=b"x") for i in range(N))
        monitor = RunMonitor(cfg=cfg, qs=qs, ledger=ledger, mode="fine", idle_timeout_s=1.0,
                             logger=logging.getLogger("test"), max_unacked=1000)  # fmt: skip
        monitor.batch_bytes = 5 * RESULT
        with monitor:
            monitor.drain_until_quiet(quiet_s=0.3, cap_s=5.0)
        assert ledger.succeeded == N and ledger.result_count() == N
        assert ledger.segments >= N // 5, "one checkpoint per batch of at most 5 records"
        rows = list(ledger.rows())
        assert [r["result"] for r in rows] == [f"{i}:" + "r" * RESULT for i in range(N)]
