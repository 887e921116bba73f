"""Fill: confirmed, exact, idempotent per run, loud on loss."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pika
import pytest

from queuejob.flows.adapters.broker import (
    HEADER_INDEX,
    HEADER_RUN_ID,
    BrokerConfig,
    FillMarker,
    QueueSettings,
    declare_queues,
    fill_queue,
    queue_depths,
    read_fill_marker,
    work_queue_arguments,
)
from queuejob.flows.adapters.broker import fill as broker_adapter
from queuejob.flows.core.errors import (
    BrokerUnavailable,
    FillInProgress,
    ItemError,
    PublishError,
    QueueNotFound,
)
from queuejob.flows.core.items import Item, ItemSource, iter_items

from .support import ROOT, drain_messages, wait_until

pytestmark = pytest.mark.broker


def test_100k_items_leave_exactly_100k_messages(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str
) -> None:
    declare_queues(cfg, qs)
    assert read_fill_marker(cfg, qs) is None
    progress: list[int] = []
    result = fill_queue(
        cfg,
        qs,
        iter_items(ItemSource.int_range(0, 100_000)),
        run_id=run_id,
        on_progress=progress.append,
    )
    assert (result.confirmed, result.skipped) == (100_000, False)
    assert progress and progress[-1] == 100_000 and progress == sorted(progress)
    assert wait_until(lambda: queue_depths(cfg, qs)["work"].ready == 100_000, what="100k ready")
    assert read_fill_marker(cfg, qs) == FillMarker(run_id, done=True, confirmed=100_000)

    # The same run again (a task retry after the fill finished): nothing is published.
    again = fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 100_000)), run_id=run_id)
    assert (again.confirmed, again.skipped) == (100_000, True)
    assert queue_depths(cfg, qs)["work"].ready == 100_000


def test_messages_carry_id_index_run_and_persistence(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    items = iter_items(ItemSource.inline(["alpha", "beta"]))
    assert fill_queue(cfg, qs, items, run_id=run_id, window=1).confirmed == 2
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        ch = conn.channel()
        got = [ch.basic_get(qs.name, auto_ack=True) for _ in range(2)]
    finally:
        conn.close()
    expected = list(iter_items(ItemSource.inline(["alpha", "beta"])))
    for (_method, props, body), item in zip(got, expected, strict=True):
        assert body == item.body
        assert props.message_id == item.id
        assert props.delivery_mode == 2
        assert props.content_type == "application/octet-stream"
        assert props.headers[HEADER_RUN_ID] == run_id
        assert props.headers[HEADER_INDEX] == item.index


def test_large_and_empty_bodies_go_through_pika_in_order(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    """Bodies the hand-built frames leave to pika (over one frame, empty) keep their place."""
    bodies = [b"small", b"L" * 300_000, b"", b"tiny", b"M" * 140_000, b"last"]
    items = [Item(id=f"item-{i}", index=i, body=body) for i, body in enumerate(bodies)]
    declare_queues(cfg, qs)
    assert fill_queue(cfg, qs, items, run_id=run_id).confirmed == 6
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        ch = conn.channel()
        got = [ch.basic_get(qs.name, auto_ack=True) for _ in range(len(items))]
    finally:
        conn.close()
    for (_method, props, body), item in zip(got, items, strict=True):
        assert (props.message_id, props.headers[HEADER_INDEX], body) == (
            item.id,
            item.index,
            item.body,
        )
        assert props.headers[HEADER_RUN_ID] == run_id and props.delivery_mode == 2


@pytest.fixture
def child_fill() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def test_a_fill_killed_half_way_then_rerun_leaves_exactly_n(
    cfg: BrokerConfig,
    qs: QueueSettings,
    run_id: str,
    broker_url: str,
    child_fill: list[subprocess.Popen[str]],
) -> None:
    n = 30_000
    declare_queues(cfg, qs)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.broker.fill_child", qs.name, run_id, str(n)],
        cwd=ROOT,
        env={**os.environ, "QUEUEJOB_TEST_BROKER_URL": broker_url, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    child_fill.append(proc)
    assert proc.stdout is not None
    confirmed = 0
    for line in proc.stdout:  # ends if the child dies; the test's timeout bounds the rest
        if line.startswith("done"):
            pytest.fail(f"the fill finished before it could be killed ({line.strip()})")
        confirmed = int(line)
        if confirmed >= 5_000:
            break
    assert confirmed >= 5_000, "the child fill exited early"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    marker = read_fill_marker(cfg, qs)
    assert marker is not None and marker.run_id == run_id and not marker.done
    partial = queue_depths(cfg, qs)["work"].ready
    assert confirmed <= partial < n

    result = fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, n)), run_id=run_id)
    assert (result.confirmed, result.skipped) == (n, False)
    props = drain_messages(broker_url, qs.name, expect=n)
    ids = [p.message_id for p in props]
    assert len(ids) == n
    assert set(ids) == {str(i) for i in range(n)}  # each item exactly once


def test_a_new_run_replaces_the_marker(cfg: BrokerConfig, qs: QueueSettings) -> None:
    # The flow refuses stale messages before it fills; the fill itself only tracks its marker.
    declare_queues(cfg, qs)
    fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 4)), run_id="run-a")
    second = fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 3)), run_id="run-b")
    assert (second.confirmed, second.skipped) == (3, False)
    assert read_fill_marker(cfg, qs) == FillMarker("run-b", done=True, confirmed=3)
    assert queue_depths(cfg, qs)["work"].ready == 7


def _delete_queue(
    broker_url: str, name: str, *, declare_again: dict[str, object] | None = None
) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        ch = conn.channel()
        ch.queue_delete(name)
        if declare_again is not None:
            ch.queue_declare(name, durable=True, arguments=declare_again)
    finally:
        conn.close()


def test_a_work_queue_deleted_before_the_fill_is_not_found(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    _delete_queue(broker_url, qs.name)
    with pytest.raises(QueueNotFound) as info:
        fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 10)), run_id=run_id)
    assert qs.name in str(info.value)
    marker = read_fill_marker(cfg, qs)
    assert marker is not None and not marker.done


@pytest.mark.parametrize("declare_again", [True, False], ids=["declared-again", "gone"])
def test_a_work_queue_deleted_during_the_fill_is_an_error(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str, declare_again: bool
) -> None:
    """Messages published while the queue is gone come back unroutable, never silently lost.

    A classic queue: RabbitMQ 3.10 never confirms the messages that were on their way into a
    quorum queue when it was deleted (the next test).
    """
    qs = QueueSettings(qs.name, queue_type="classic")
    declare_queues(cfg, qs)
    deleted: list[int] = []

    def on_progress(confirmed: int) -> None:
        if not deleted and confirmed > 0:
            deleted.append(confirmed)
            again = work_queue_arguments(qs) if declare_again else None
            _delete_queue(broker_url, qs.name, declare_again=again)

    items = iter_items(ItemSource.int_range(0, 20_000))
    with pytest.raises(PublishError) as info:
        fill_queue(cfg, qs, items, run_id=run_id, on_progress=on_progress)
    assert deleted, "the queue was never deleted: the test proves nothing"
    message = str(info.value)
    assert qs.name in message and info.value.retryable
    # Either a message came back unroutable, or (declared again between two publishes) the
    # queue's count fell short of the confirmed messages.
    assert "unroutable" in message or "confirmed 20000 messages" in message
    marker = read_fill_marker(cfg, qs)
    assert marker is not None and not marker.done


def test_a_fill_the_queue_does_not_keep_entirely_is_an_error(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    """A queue that drops messages (here a length limit, overflow drop-head, as a policy could
    set) confirms them all the same: the count after the fill says so."""
    declare_queues(cfg, qs)
    limited = {**work_queue_arguments(qs), "x-max-length": 5}
    _delete_queue(broker_url, qs.name, declare_again=limited)
    with pytest.raises(PublishError) as info:
        fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 50)), run_id=run_id)
    message = str(info.value)
    assert "confirmed 50 messages" in message and "gained 5" in message
    assert "length limit" in message and info.value.retryable


def test_another_publisher_during_the_fill_is_an_error(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    published: list[int] = []

    def on_progress(_confirmed: int) -> None:
        if not published:
            published.append(1)
            conn = pika.BlockingConnection(pika.URLParameters(broker_url))
            try:
                ch = conn.channel()
                ch.confirm_delivery()
                ch.basic_publish("", qs.name, b"stray", pika.BasicProperties(delivery_mode=2))
            finally:
                conn.close()

    with pytest.raises(PublishError) as info:
        fill_queue(
            cfg,
            qs,
            iter_items(ItemSource.int_range(0, 2_000)),
            run_id=run_id,
            on_progress=on_progress,
        )
    assert published
    assert "gained 2001" in str(info.value) and "something else published" in str(info.value)


def test_a_quorum_queue_deleted_during_the_fill_ends_it_by_the_confirm_watchdog(
    cfg: BrokerConfig,
    qs: QueueSettings,
    run_id: str,
    broker_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RabbitMQ never confirms the messages that were on their way into a quorum queue when it
    was deleted, nor answers the close of that channel: the watchdog fails the fill and the
    socket is dropped after the grace period, so the fill cannot hang."""
    monkeypatch.setattr(broker_adapter, "_MIN_STALL_S", 2.0)
    monkeypatch.setattr(broker_adapter, "_CLOSE_GRACE_S", 1.0)
    cfg = BrokerConfig(url=broker_url, connect_timeout_s=0.5)
    declare_queues(cfg, qs)
    deleted: list[int] = []

    def on_progress(confirmed: int) -> None:
        if not deleted:
            deleted.append(confirmed)
            _delete_queue(broker_url, qs.name)

    items = iter_items(ItemSource.int_range(0, 20_000))
    start = time.monotonic()
    # The watchdog's PublishError, or the broker closing the connection (541 INTERNAL_ERROR,
    # BrokerUnavailable), or the work queue found missing: an error either way, and soon.
    with pytest.raises((PublishError, BrokerUnavailable, QueueNotFound)):
        fill_queue(cfg, qs, items, run_id=run_id, on_progress=on_progress)
    assert deleted
    assert time.monotonic() - start < 20.0


def test_a_consumer_taking_messages_during_the_fill_is_an_error(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        ch = conn.channel()
        ch.basic_consume(qs.name, lambda *_: None, auto_ack=True)
        with pytest.raises(PublishError) as info:
            fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 100)), run_id=run_id)
    finally:
        conn.close()
    assert "1 consumer(s)" in str(info.value)


def test_a_bad_item_stops_the_fill_and_is_reported(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str
) -> None:
    declare_queues(cfg, qs)

    def items() -> Iterator[Item]:
        yield from iter_items(ItemSource.int_range(0, 5))
        raise ItemError("items.txt:6: not valid UTF-8")

    with pytest.raises(ItemError, match=r"items\.txt:6"):
        fill_queue(cfg, qs, items(), run_id=run_id, window=2)
    marker = read_fill_marker(cfg, qs)
    assert marker is not None and marker.run_id == run_id and not marker.done
    # The retry of the same run starts over: exactly the items, once each.
    fixed = fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 6)), run_id=run_id)
    assert fixed.confirmed == 6 and queue_depths(cfg, qs)["work"].ready == 6


def test_a_concurrent_fill_is_refused(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        conn.channel().queue_declare(qs.lock_name, exclusive=True, auto_delete=True)
        with pytest.raises(FillInProgress) as info:
            fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 3)), run_id=run_id)
        assert info.value.retryable and qs.name in str(info.value)
    finally:
        conn.close()
    assert fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 3)), run_id=run_id).confirmed == 3
