"""Declaration, conflicts, depth, purge, dead-letter peeking and deletion."""

from __future__ import annotations

from typing import Literal

import pika
import pytest

from queuejob.flows.adapters.broker import (
    HEADER_RUN_ID,
    BrokerConfig,
    QueueDepth,
    QueueSettings,
    companion_arguments,
    dead_letter_ids,
    declare_queues,
    delete_queues,
    fill_queue,
    purge_work_queue,
    queue_depths,
    work_queue_arguments,
)
from queuejob.flows.adapters.broker.dead_letters import requeue_dead_letters
from queuejob.flows.core.errors import QueueConflict, QueueNotFound
from queuejob.flows.core.items import ItemSource, iter_items

from .support import wait_until

pytestmark = pytest.mark.broker


def test_declare_is_idempotent_and_queues_start_empty(cfg: BrokerConfig, qs: QueueSettings) -> None:
    declare_queues(cfg, qs)
    declare_queues(cfg, qs)
    depths = queue_depths(cfg, qs)
    assert set(depths) == {"work", "results", "dead"}
    for depth in depths.values():
        assert (depth.ready, depth.unacked, depth.consumers, depth.source) == (0, None, 0, "amqp")


def test_work_queue_arguments() -> None:
    assert work_queue_arguments(QueueSettings("jobs")) == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "jobs.dead",
        "x-delivery-limit": 3,
    }
    assert "x-delivery-limit" not in work_queue_arguments(
        QueueSettings("jobs", delivery_limit=None)
    )
    assert work_queue_arguments(QueueSettings("jobs", queue_type="classic")) == {
        "x-queue-type": "classic",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "jobs.dead",
        # RabbitMQ 3.12+'s classic storage, asked for explicitly on 3.10 and 3.11
        "x-queue-version": 2,
        "x-queue-mode": "lazy",
    }


def test_classic_then_quorum_is_a_conflict_naming_both_argument_sets(
    cfg: BrokerConfig, qs: QueueSettings
) -> None:
    classic = QueueSettings(qs.name, queue_type="classic")
    declare_queues(cfg, classic)
    with pytest.raises(QueueConflict) as info:
        declare_queues(cfg, qs)
    err = info.value
    assert not err.retryable
    assert err.queue == qs.name  # type: ignore[attr-defined]
    assert err.wanted == work_queue_arguments(qs)  # type: ignore[attr-defined]
    existing = err.existing  # type: ignore[attr-defined]
    assert isinstance(existing, dict) and existing
    # What the broker reported differs from what was asked for.
    (arg, value), *_ = existing.items()
    assert work_queue_arguments(qs).get(arg) != value
    message = str(err)
    assert f"queue {qs.name!r}" in message
    assert "'x-queue-type': 'quorum'" in message  # the wanted set
    assert "PRECONDITION_FAILED" in message and arg in message  # the existing side
    assert "delete" in message and "another queue name" in message  # what to do
    # The classic queue is untouched and still usable with its own settings.
    declare_queues(cfg, classic)


def test_a_different_delivery_limit_is_a_conflict(cfg: BrokerConfig, qs: QueueSettings) -> None:
    declare_queues(cfg, qs)
    with pytest.raises(QueueConflict) as info:
        declare_queues(cfg, QueueSettings(qs.name, delivery_limit=5))
    assert info.value.existing == {"x-delivery-limit": "3"}  # type: ignore[attr-defined]
    assert "'x-delivery-limit': 5" in str(info.value)


def test_a_classic_queue_is_redeclared_as_is_and_one_without_its_storage_is_a_conflict(
    cfg: BrokerConfig, qs: QueueSettings, broker_url: str
) -> None:
    classic = QueueSettings(qs.name, queue_type="classic")
    declare_queues(cfg, classic)
    declare_queues(cfg, classic)  # the broker accepts the storage arguments as equivalent
    assert delete_queues(cfg, classic) == {}  # empty: deleted
    # The same classic queue declared without the storage arguments, as before they were asked
    # for: RabbitMQ refuses the re-declare, and the error says what differs.
    older = {
        k: v
        for k, v in work_queue_arguments(classic).items()
        if k not in ("x-queue-version", "x-queue-mode")
    }
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        conn.channel().queue_declare(qs.name, durable=True, arguments=older)
    finally:
        conn.close()
    with pytest.raises(QueueConflict) as info:
        declare_queues(cfg, classic)
    assert info.value.queue == qs.name  # type: ignore[attr-defined]
    assert "x-queue-mode" in str(info.value) or "x-queue-version" in str(info.value)


def _queue_type(url: str, queue: str) -> str:
    """A queue's type, found the way AMQP allows: the broker accepts a re-declare with the
    same x-queue-type and refuses (406) the other."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        for kind in ("quorum", "classic"):
            try:
                args = {"x-queue-type": kind}
                conn.channel().queue_declare(queue, durable=True, arguments=args)
            except pika.exceptions.ChannelClosedByBroker as exc:
                assert exc.reply_code == 406, exc
                if "'x-queue-type'" not in exc.reply_text:
                    return kind  # the type matched; another argument differs (4.x: -1 limit)
                continue
            return kind
    finally:
        conn.close()
    raise AssertionError(f"{queue} is neither quorum nor classic")


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_every_queue_of_a_run_has_the_work_queue_type(
    cfg: BrokerConfig, queue_name: str, broker_url: str, queue_type: Literal["quorum", "classic"]
) -> None:
    qs = QueueSettings(queue_name, queue_type=queue_type)
    try:
        declare_queues(cfg, qs)
        # The requeue records' queue is declared by the first requeue.
        requeue_dead_letters(cfg, qs)
        for name in (qs.dead_name, qs.results_name, qs.fill_name, qs.requeued_name):
            assert _queue_type(broker_url, name) == queue_type, name
    finally:
        delete_queues(cfg, qs, only_if_empty=False)


def test_companion_arguments_follow_the_work_queue_and_the_broker_version() -> None:
    quorum, classic = QueueSettings("jobs"), QueueSettings("jobs", queue_type="classic")
    assert companion_arguments(quorum) == {"x-queue-type": "quorum"}
    # RabbitMQ 4 drops a message returned 20 times unless the queue says -1 (no limit).
    assert companion_arguments(quorum, broker_major=4) == {
        "x-queue-type": "quorum",
        "x-delivery-limit": -1,
    }
    assert companion_arguments(classic) == companion_arguments(classic, broker_major=4)
    assert companion_arguments(classic) == {"x-queue-type": "classic"}
    unlimited = QueueSettings("jobs", delivery_limit=None)
    assert "x-delivery-limit" not in work_queue_arguments(unlimited)  # 3.x: -1 would mean 0
    assert work_queue_arguments(unlimited, broker_major=4)["x-delivery-limit"] == -1
    assert work_queue_arguments(quorum, broker_major=4)["x-delivery-limit"] == 3


def test_a_companion_queue_declared_the_old_way_says_what_to_do(
    cfg: BrokerConfig, qs: QueueSettings, broker_url: str
) -> None:
    # An earlier queuejob declared <name>.results as a classic queue beside a quorum work queue.
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        conn.channel().queue_declare(
            qs.results_name, durable=True, arguments={"x-queue-type": "classic"}
        )
    finally:
        conn.close()
    with pytest.raises(QueueConflict) as info:
        declare_queues(cfg, qs)
    err = info.value
    assert not err.retryable
    assert err.queue == qs.results_name  # type: ignore[attr-defined]
    message = str(err)
    assert f"queue {qs.results_name!r} was declared as a classic queue" in message
    assert "cannot change the type of an existing queue" in message
    assert f"rabbitmqctl delete_queue {qs.results_name}" in message
    assert "PRECONDITION_FAILED" in message


def test_depth_purge_and_consumers(cfg: BrokerConfig, qs: QueueSettings, broker_url: str) -> None:
    declare_queues(cfg, qs)
    fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 7)), run_id="run-depth")
    assert queue_depths(cfg, qs)["work"].ready == 7
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        ch = conn.channel()
        ch.basic_consume(qs.results_name, lambda *_: None)

        def with_consumer() -> dict[str, QueueDepth] | None:
            depths = queue_depths(cfg, qs)
            return depths if depths["results"].consumers == 1 else None

        depths = wait_until(with_consumer, what="the consumer to show")
        assert depths is not None
        assert depths["work"].consumers == 0 and depths["dead"].consumers == 0
    finally:
        conn.close()
    assert purge_work_queue(cfg, qs) == 7
    assert queue_depths(cfg, qs)["work"].ready == 0


def test_management_api_that_does_not_answer_falls_back_to_amqp(
    broker_url: str, qs: QueueSettings
) -> None:
    cfg = BrokerConfig(broker_url, management_url="http://127.0.0.1:1", connect_timeout_s=2)
    declare_queues(cfg, qs)
    depth = queue_depths(cfg, qs)["work"]
    assert (depth.unacked, depth.source) == (None, "amqp")


def test_missing_queues(cfg: BrokerConfig, qs: QueueSettings) -> None:
    with pytest.raises(QueueNotFound) as info:
        queue_depths(cfg, qs)
    assert qs.name in str(info.value) and "declare" in str(info.value)
    with pytest.raises(QueueNotFound):
        purge_work_queue(cfg, qs)
    with pytest.raises(QueueNotFound):
        dead_letter_ids(cfg, qs, run_id="r")


def test_delete_is_complete_and_idempotent(cfg: BrokerConfig, qs: QueueSettings) -> None:
    declare_queues(cfg, qs)
    fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 3)), run_id="run-del")
    assert delete_queues(cfg, qs, only_if_empty=False) == {}
    assert delete_queues(cfg, qs, only_if_empty=False) == {}
    with pytest.raises(QueueNotFound):
        queue_depths(cfg, qs)
    # The fill marker went with them: a fresh declare starts without one.
    declare_queues(cfg, qs)
    assert (
        fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 3)), run_id="run-del").skipped
        is False
    )


def test_dead_letter_ids_peek_without_consuming(
    cfg: BrokerConfig, qs: QueueSettings, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        ch = conn.channel()
        for mid, run in [("a", "run-1"), ("b", "run-2"), ("c", "run-1"), ("a", "run-1")]:
            props = pika.BasicProperties(message_id=mid, headers={HEADER_RUN_ID: run})
            ch.basic_publish("", qs.dead_name, b"x", props)
        ch.basic_publish("", qs.dead_name, b"no headers")
    finally:
        conn.close()
    wait_until(lambda: queue_depths(cfg, qs)["dead"].ready == 5, what="5 dead letters")
    assert dead_letter_ids(cfg, qs, run_id="run-1") == ["a", "c"]
    assert dead_letter_ids(cfg, qs, run_id="run-2") == ["b"]
    assert dead_letter_ids(cfg, qs, run_id="run-1", limit=1) == ["a"]
    assert dead_letter_ids(cfg, qs, run_id="run-3") == []
    assert queue_depths(cfg, qs)["dead"].ready == 5  # nothing was consumed


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_delete_keeps_a_work_queue_that_holds_items_and_drops_the_bookkeeping(
    cfg: BrokerConfig, queue_name: str, queue_type: Literal["quorum", "classic"]
) -> None:
    qs = QueueSettings(queue_name, queue_type=queue_type)
    declare_queues(cfg, qs)
    try:
        fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, 3)), run_id="run-keep")
        assert delete_queues(cfg, qs) == {qs.name: 3}
        depths = queue_depths_of(cfg, qs.name, qs.dead_name)
        assert depths == {qs.name: 3, qs.dead_name: None}  # the empty dead-letter queue went
        assert delete_queues(cfg, qs) == {qs.name: 3}  # and again: still kept, nothing lost
    finally:
        delete_queues(cfg, qs, only_if_empty=False)


def test_delete_keeps_a_dead_letter_queue_that_holds_dead_letters(
    cfg: BrokerConfig, qs: QueueSettings, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        conn.channel().basic_publish("", qs.dead_name, b"poison")
    finally:
        conn.close()
    wait_until(lambda: queue_depths(cfg, qs)["dead"].ready == 1, what="the dead letter")
    assert delete_queues(cfg, qs) == {qs.dead_name: 1}
    assert queue_depths_of(cfg, qs.name, qs.dead_name) == {qs.name: None, qs.dead_name: 1}


def queue_depths_of(cfg: BrokerConfig, *names: str) -> dict[str, int | None]:
    """Ready messages per queue, None for a queue that does not exist."""
    out: dict[str, int | None] = {}
    conn = pika.BlockingConnection(pika.URLParameters(cfg.url))
    try:
        for name in names:
            ch = conn.channel()
            try:
                out[name] = ch.queue_declare(name, passive=True).method.message_count
                ch.close()
            except pika.exceptions.ChannelClosedByBroker:
                out[name] = None
    finally:
        conn.close()
    return out
