"""A rerun takes the earlier run's leftovers out of its work queue: on the real broker.

Exactly the earlier run's messages of the items rerun go (they are queued again from its
ledger); anything else is left, or purged when asked; a queue that cannot pass is not read at
all, and a quorum queue's messages that go back were read as few as possible (each return
counts a delivery against ``x-delivery-limit``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from queuejob.flows.adapters.broker import (
    HEADER_DELIVERY_COUNT,
    HEADER_RUN_ID,
    BrokerConfig,
    QueueSettings,
    declare_queues,
    delete_queues,
    fill_queue,
)
from queuejob.flows.adapters.broker.leftovers import take_leftovers
from queuejob.flows.core.errors import FillInProgress
from queuejob.flows.core.items import ItemSource, iter_items
from queuejob.flows.core.rerun import (
    MORE_THAN_RERUN,
    OTHER_RUN,
    RerunLeftovers,
    fate_statuses,
)

from .support import ready_count

pytestmark = pytest.mark.broker

EARLIER = "run-earlier-0001"
ITEMS = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]


@pytest.fixture(params=["quorum", "classic"])
def wq(request: pytest.FixtureRequest, cfg: BrokerConfig, queue_name: str) -> Iterator[Any]:
    qs = QueueSettings(queue_name, queue_type=request.param)
    declare_queues(cfg, qs)
    yield qs
    with contextlib.suppress(Exception):
        delete_queues(cfg, qs, only_if_empty=False)


def _earlier_run(url: str, cfg: BrokerConfig, qs: QueueSettings) -> list[dict[str, Any]]:
    """The earlier run: 8 items queued, 5 taken and done (completions 5): 3 left in the queue.
    Returns its ledger's rows."""
    items = list(iter_items(ItemSource.inline(ITEMS)))
    fill_queue(cfg, qs, items, run_id=EARLIER)
    _take(url, qs.name, 5)
    return [
        {
            "index": item.index,
            "item_id": item.id,
            "status": "succeeded" if item.index < 5 else "left_in_queue",
            "body": item.body.decode(),
        }
        for item in items
    ]


def _take(url: str, queue: str, n: int) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        for _ in range(n):
            method, _props, _body = ch.basic_get(queue, auto_ack=True)
            assert method is not None
    finally:
        conn.close()


def _messages(url: str, queue: str) -> list[tuple[str | None, str | None, int]]:
    """(run id, item id, delivery count) of every message, read once and left in place."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    out: list[tuple[str | None, str | None, int]] = []
    try:
        ch = conn.channel()
        while True:
            method, props, _body = ch.basic_get(queue, auto_ack=False)
            if method is None:
                break
            headers = props.headers or {}
            run = headers.get(HEADER_RUN_ID)
            out.append((run, props.message_id, int(headers.get(HEADER_DELIVERY_COUNT) or 0)))
    finally:
        conn.close()
    return out


def _lookup(rows: list[dict[str, Any]], *fates: str) -> RerunLeftovers:
    return RerunLeftovers.from_rows(EARLIER, fate_statuses(fates), rows)


def test_the_earlier_runs_left_items_are_taken_and_a_retry_finds_nothing(
    broker_url: str, cfg: BrokerConfig, wq: QueueSettings
) -> None:
    rows = _earlier_run(broker_url, cfg, wq)
    lookup = _lookup(rows, "left")
    scan = take_leftovers(cfg, wq, classify=lookup.classify, most=lookup.items, purge_others=False)
    assert (scan.ready, scan.taken, scan.others, scan.exhaustive) == (3, 3, {}, True)
    assert ready_count(broker_url, wq.name) == 0
    again = take_leftovers(cfg, wq, classify=lookup.classify, most=lookup.items, purge_others=False)
    assert (again.ready, again.taken, again.others) == (0, 0, {})


def test_another_runs_message_stops_it_and_everything_stays(
    broker_url: str, cfg: BrokerConfig, wq: QueueSettings
) -> None:
    rows = _earlier_run(broker_url, cfg, wq)
    # Another run's message behind the earlier run's three, and the rerun has 4 items (one
    # failed item too), so the queue is read.
    fill_queue(cfg, wq, iter_items(ItemSource.inline(["kiwi"])), run_id="run-other")
    rows[4]["status"] = "failed"
    lookup = _lookup(rows, "failed", "left")
    scan = take_leftovers(cfg, wq, classify=lookup.classify, most=lookup.items, purge_others=False)
    assert scan.taken == 0 and scan.others == {OTHER_RUN: 1} and scan.ready == 4
    left = _messages(broker_url, wq.name)
    assert sorted((run, item) for run, item, _ in left) == sorted(
        [(EARLIER, rows[i]["item_id"]) for i in (5, 6, 7)] + [("run-other", left[-1][1])]
    )
    if wq.queue_type == "quorum":
        # Read one by one up to the other run's message: each went back once.
        assert [count for _, _, count in left] == [1, 1, 1, 1]
        assert scan.exhaustive is False
    else:
        assert scan.exhaustive is True


def test_more_messages_than_items_are_not_read_at_all(
    broker_url: str, cfg: BrokerConfig, wq: QueueSettings
) -> None:
    rows = _earlier_run(broker_url, cfg, wq)
    fill_queue(cfg, wq, iter_items(ItemSource.inline(["kiwi", "lime"])), run_id="run-other")
    lookup = _lookup(rows, "left")
    scan = take_leftovers(cfg, wq, classify=lookup.classify, most=lookup.items, purge_others=False)
    assert scan.others == {MORE_THAN_RERUN: 2} and scan.taken == 0 and not scan.exhaustive
    left = _messages(broker_url, wq.name)
    assert len(left) == 5 and all(count == 0 for _, _, count in left), left


def test_purge_takes_the_leftovers_and_removes_the_rest(
    broker_url: str, cfg: BrokerConfig, wq: QueueSettings
) -> None:
    rows = _earlier_run(broker_url, cfg, wq)
    fill_queue(cfg, wq, iter_items(ItemSource.inline(["kiwi", "lime"])), run_id="run-other")
    # The earlier run's item 'date' (index 3) came back too (delivered again after a kill).
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        props = pika.BasicProperties(
            message_id=rows[3]["item_id"],
            headers={HEADER_RUN_ID: EARLIER, "queuejob-index": 3},
            delivery_mode=2,
        )
        conn.channel().basic_publish("", wq.name, b"date", props)
    finally:
        conn.close()
    lookup = _lookup(rows, "left")
    scan = take_leftovers(cfg, wq, classify=lookup.classify, most=lookup.items, purge_others=True)
    assert scan.taken == 3 and scan.purged
    assert scan.others == {OTHER_RUN: 2, "succeeded": 1}
    assert ready_count(broker_url, wq.name) == 0


def test_a_running_fill_or_consumers_keep_it_out(
    broker_url: str, cfg: BrokerConfig, wq: QueueSettings
) -> None:
    rows = _earlier_run(broker_url, cfg, wq)
    lookup = _lookup(rows, "left")
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        conn.channel().queue_declare(wq.lock_name, exclusive=True, auto_delete=True)
        with pytest.raises(FillInProgress):
            take_leftovers(cfg, wq, classify=lookup.classify, most=3, purge_others=True)
    finally:
        conn.close()
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=1)
        ch.basic_consume(wq.name, lambda *_: None)
        scan = take_leftovers(cfg, wq, classify=lookup.classify, most=3, purge_others=True)
        assert scan.consumers == 1 and scan.taken == 0
    finally:
        conn.close()
    assert ready_count(broker_url, wq.name) == 3
