"""Fill: confirmed, exact, idempotent per run, loud on loss."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pika
import pytest

from flows.adapters.broker import (
    HEADER_INDEX,
    HEADER_RUN_ID,
    BrokerConfig,
    FillMarker,
    QueueSettings,
    declare_queues,
    fill_queue,
    queue_depths,
    read_fill_marker,
)
from flows.core.errors import FillInProgress, ItemError, PublishError
from flows.core.items import Item, ItemSource, iter_items

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


def test_an_unroutable_publish_is_an_error(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        conn.channel().queue_delete(qs.name)
    finally:
        conn.close()
    with pytest.raises(PublishError) as info:
        fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 10)), run_id=run_id)
    assert "unroutable" in str(info.value) and qs.name in str(info.value)
    assert info.value.retryable
    marker = read_fill_marker(cfg, qs)
    assert marker is not None and not marker.done


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
