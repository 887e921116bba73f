"""Dead letters on the broker: list ``<queue>.dead`` (`dead_letter_ids`, `list_dead_letters`), and
move its messages back to the queue (`requeue_dead_letters`).

Listing reads without consuming: the messages are fetched unacknowledged and go back to their
places when the channel closes. Beside a quorum work queue ``<queue>.dead`` is a quorum queue
too, which counts each such read as a delivery: it is declared without a delivery limit, so a
dead letter listed any number of times stays (`companion_arguments`).

Requeueing moves each dead letter back to the work queue, publisher-confirmed, and acks the
dead letter only after the confirm, so a requeue killed at any point loses none. It is also
idempotent per item: a requeue killed between a confirm and its ack leaves that dead letter in
``<queue>.dead`` while its copy is already in the work queue, and the next requeue must not
publish it again. Looking for the copy in the work queue is not an option: reading a quorum
queue's messages without consuming them counts a delivery against each (``x-delivery-limit``),
which would dead-letter the very items being requeued, and the copy may already have been
taken by a worker. So each publish also records its dead letter's requeue token
(`queuejob.flows.core.dead_letters.DeadLetter.token`) in ``<queue>.requeued``, in the same publish:
the
message goes to the work queue with a ``BCC`` header naming ``<queue>.requeued`` (RabbitMQ's
sender-selected distribution; the header is removed before delivery). One publish is routed to
both queues or, if the publisher dies before the broker has the whole message, to neither, so a
token is recorded exactly when the item is back in the work queue. A dead letter whose token is
recorded is acked without a publish. Records are removed once their dead letter is gone; when
``<queue>.dead`` ends empty, any left behind by a killed requeue are purged.

A requeue holds ``<queue>.fill.lock`` (exclusive; the broker drops it when the connection
closes), the lock a fill takes: one publisher into the work queue at a time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions as pex

from queuejob.flows.adapters.broker.config import (
    HEADER_FAILURES,
    HEADER_INDEX,
    HEADER_RUN_ID,
    ITEM_CONTENT_TYPE,
    PERSISTENT,
    BrokerConfig,
    QueueSettings,
    companion_arguments,
)
from queuejob.flows.adapters.broker.connection import (
    channel_error,
    not_found,
    passive,
    rides_out_node_loss,
    server_major,
    session,
)
from queuejob.flows.adapters.broker.fill import take_fill_lock
from queuejob.flows.core.dead_letters import (
    HEADER_REQUEUES,
    DeadLetter,
    attempts_from,
    item_id_of,
)
from queuejob.flows.core.errors import PublishError

# Header of a record in <queue>.requeued: the token of the dead letter it stands for.
HEADER_TOKEN = "queuejob-requeue-token"


@rides_out_node_loss
def dead_letter_ids(
    cfg: BrokerConfig, qs: QueueSettings, *, run_id: str, limit: int = 100_000
) -> list[str]:
    """Item ids (message ids) of this run's messages in ``<name>.dead``, oldest first, at most
    ``limit``. Read without consuming: every message stays in the queue."""
    with session(cfg) as conn:
        total = int(passive(conn, cfg, qs.dead_name).message_count)
        if total == 0 or limit <= 0:
            return []
        ch = conn.channel()
        # Every message we read stays unacked until the channel closes; an unbounded prefetch
        # (0) when there are more than the 16-bit maximum.
        ch.basic_qos(prefetch_count=total if total <= 65535 else 0)
        ids: list[str] = []
        seen_ids: set[str] = set()
        deadline = time.monotonic() + max(10.0, cfg.connect_timeout_s)
        deliveries = ch.consume(
            qs.dead_name, auto_ack=False, inactivity_timeout=min(2.0, cfg.connect_timeout_s)
        )
        for seen, (method, props, _body) in enumerate(deliveries, start=1):
            if method is None:  # nothing more arrived within the inactivity timeout
                break
            headers = props.headers or {}
            mid = props.message_id
            if header_str(headers.get(HEADER_RUN_ID)) == run_id and mid and mid not in seen_ids:
                seen_ids.add(mid)
                ids.append(mid)
            if seen >= total or len(ids) >= limit or time.monotonic() > deadline:
                break
        # Closing the channel hands every message back to the queue, in its place.
        ch.close()
        return ids


def header_str(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def read_dead_letter(message_id: str | None, headers: dict[str, Any], body: bytes) -> DeadLetter:
    """A `DeadLetter` from a message's id, headers and body."""
    index = headers.get(HEADER_INDEX)
    failures = headers.get(HEADER_FAILURES)
    requeues = headers.get(HEADER_REQUEUES)
    return DeadLetter(
        item_id=item_id_of(message_id, body),
        run_id=header_str(headers.get(HEADER_RUN_ID)),
        index=index if isinstance(index, int) and not isinstance(index, bool) else None,
        reason=header_str(headers.get("x-first-death-reason")),
        attempts=attempts_from(
            reason=header_str(headers.get("x-first-death-reason")),
            failures=failures if isinstance(failures, int) and failures > 0 else 0,
            delivery_limit=None,
        ),
        requeues=requeues if isinstance(requeues, int) and requeues > 0 else 0,
        size=len(body),
    )


@dataclass(frozen=True)
class DeadLetterListing:
    """The first dead letters of ``<queue>.dead`` and how many the queue holds."""

    total: int
    letters: list[DeadLetter]


@rides_out_node_loss
def list_dead_letters(cfg: BrokerConfig, qs: QueueSettings, *, limit: int) -> DeadLetterListing:
    """The first ``limit`` messages of ``<queue>.dead``, oldest first, read without consuming.

    Raises `QueueNotFound` when the dead-letter queue does not exist.
    """
    with session(cfg) as conn:
        total = int(passive(conn, cfg, qs.dead_name).message_count)
        letters: list[DeadLetter] = []
        ch = conn.channel()
        try:
            while len(letters) < min(limit, total):
                method, props, body = ch.basic_get(qs.dead_name, auto_ack=False)
                if method is None:
                    break
                letters.append(read_dead_letter(props.message_id, dict(props.headers or {}), body))
        except pex.ChannelClosedByBroker as exc:
            raise channel_error(exc, cfg, qs.dead_name) from None
        # Closing the channel hands every message back to the queue, in its place.
        with contextlib.suppress(Exception):
            ch.close()
        return DeadLetterListing(total=total, letters=letters)


@dataclass(frozen=True)
class RequeueResult:
    """What a requeue did."""

    requeued: int  # published to the work queue (confirmed) and acked from <queue>.dead
    already_requeued: int  # acked without a publish: an earlier requeue had published them
    remaining: int  # messages left in <queue>.dead (over the limit, or newly dead-lettered)


@rides_out_node_loss
def requeue_dead_letters(
    cfg: BrokerConfig,
    qs: QueueSettings,
    *,
    limit: int | None = None,
    on_requeued: Callable[[DeadLetter, bool], None] | None = None,
    after_confirm: Callable[[int], None] | None = None,
) -> RequeueResult:
    """Move up to ``limit`` (None: all) dead letters back to the work queue, oldest first.

    Each is published persistent and confirmed with its body, message id, run and index
    headers, without the broker's ``x-`` headers and the worker's failure count (so it gets a
    full set of attempts again), and with ``queuejob-requeues`` raised by one; then the dead
    letter is acked. ``on_requeued(letter, published)`` is called after each ack (published is
    False for one an earlier, interrupted requeue had published). ``after_confirm(n)`` is called
    after the n-th confirm, before its ack (tests kill the process there).

    Raises `QueueNotFound` when the work queue or its dead-letter queue does not exist, and
    `FillInProgress` when a fill or another requeue of the queue is running.
    """
    record_queue = qs.requeued_name
    requeued = already = 0
    with session(cfg) as conn:
        take_fill_lock(conn, cfg, qs)
        passive(conn, cfg, qs.name)  # QueueNotFound: nowhere to put them back
        total = int(passive(conn, cfg, qs.dead_name).message_count)
        _declare_records(conn, cfg, qs, record_queue)

        # The records of earlier requeues, held unacked on their own channel until the end.
        records = conn.channel()
        recorded = _read_records(records, cfg, record_queue)
        done_tokens: set[str] = set()

        dead = conn.channel()
        pub = conn.channel()
        pub.confirm_delivery()
        budget = total if limit is None else min(limit, total)
        try:
            while requeued + already < budget:
                method, props, body = dead.basic_get(qs.dead_name, auto_ack=False)
                if method is None:
                    break
                headers = dict(props.headers or {})
                letter = read_dead_letter(props.message_id, headers, body)
                token = letter.token
                published = token not in recorded and token not in done_tokens
                if published:
                    _publish_back(pub, cfg, qs, record_queue, props, headers, body, letter, token)
                    requeued += 1
                    if after_confirm is not None:
                        after_confirm(requeued)
                else:
                    already += 1
                dead.basic_ack(method.delivery_tag)
                done_tokens.add(token)
                if on_requeued is not None:
                    on_requeued(letter, published)
        except pex.ChannelClosedByBroker as exc:
            raise channel_error(exc, cfg, qs.dead_name) from None

        # The records whose dead letter is gone have served: this run's, and earlier ones'.
        _ack_records(records, cfg, record_queue, recorded, done_tokens)
        with contextlib.suppress(Exception):
            records.close()  # records of dead letters still queued go back, unacked
        remaining = int(passive(conn, cfg, qs.dead_name).message_count)
        if remaining == 0:
            # No dead letter left to guard: drop records a killed requeue could not remove.
            purge = conn.channel()
            purge.queue_purge(record_queue)
            purge.close()
    return RequeueResult(requeued=requeued, already_requeued=already, remaining=remaining)


def _declare_records(conn: Any, cfg: BrokerConfig, qs: QueueSettings, queue: str) -> None:
    """Declare the requeue records' queue like the run's other queues; one that exists with
    another type (an earlier queuejob's, or the caller's QueueSettings guessed the work queue's
    type wrong) is used as it is: it only holds bookkeeping."""
    aux = conn.channel()
    try:
        aux.queue_declare(
            queue, durable=True, arguments=companion_arguments(qs, broker_major=server_major(conn))
        )
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise channel_error(exc, cfg, queue) from None
        passive(conn, cfg, queue)
        return
    aux.close()


def _take_records(ch: Any, cfg: BrokerConfig, queue: str) -> Iterator[tuple[str, int]]:
    """(token, delivery tag) of each record in ``queue``, fetched and left unacked, until the
    queue has no more."""
    try:
        while True:
            method, props, _body = ch.basic_get(queue, auto_ack=False)
            if method is None:
                return
            yield header_str((props.headers or {}).get(HEADER_TOKEN)) or "", method.delivery_tag
    except pex.ChannelClosedByBroker as exc:
        raise channel_error(exc, cfg, queue) from None


def _read_records(ch: Any, cfg: BrokerConfig, queue: str) -> dict[str, list[int]]:
    """token -> delivery tags of the records in ``queue``, fetched and left unacked."""
    out: dict[str, list[int]] = {}
    for token, tag in _take_records(ch, cfg, queue):
        out.setdefault(token, []).append(tag)
    return out


def _ack_records(
    ch: Any,
    cfg: BrokerConfig,
    queue: str,
    recorded: dict[str, list[int]],
    done: set[str],
) -> None:
    for token, tags in recorded.items():
        if token in done or not token:
            for tag in tags:
                ch.basic_ack(tag)
    # The records published by this requeue follow the ones read at the start.
    for token, tag in _take_records(ch, cfg, queue):
        if token in done or not token:
            ch.basic_ack(tag)


def _publish_back(
    ch: Any,
    cfg: BrokerConfig,
    qs: QueueSettings,
    record_queue: str,
    props: Any,
    headers: dict[str, Any],
    body: bytes,
    letter: DeadLetter,
    token: str,
) -> None:
    """Publish the dead letter to the work queue and its record to ``record_queue``, in one
    confirmed publish (BCC)."""
    fresh = {k: v for k, v in headers.items() if not k.startswith("x-") and k != HEADER_FAILURES}
    fresh[HEADER_REQUEUES] = letter.requeues + 1
    fresh[HEADER_TOKEN] = token
    fresh["BCC"] = [record_queue]
    out = pika.BasicProperties(
        content_type=props.content_type or ITEM_CONTENT_TYPE,
        delivery_mode=PERSISTENT,
        message_id=props.message_id,
        headers=fresh,
    )
    try:
        ch.basic_publish("", qs.name, body, out, mandatory=True)
    except pex.UnroutableError:
        raise not_found(cfg, qs.name) from None
    except pex.NackError:
        raise PublishError(
            f"the broker at {cfg.describe()} nacked the requeue of item {letter.item_id!r} "
            f"into queue {qs.name!r}; run the requeue again (it skips what is already back)"
        ) from None
    except pex.ChannelClosedByBroker as exc:
        raise channel_error(exc, cfg, qs.name) from None


__all__ = [
    "HEADER_TOKEN",
    "DeadLetterListing",
    "RequeueResult",
    "list_dead_letters",
    "read_dead_letter",
    "requeue_dead_letters",
]
