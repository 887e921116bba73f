"""An earlier run's leftovers in its work queue, taken out before a rerun queues them again.

A run that ends with items in its queue (completions too few, the Job failed with items put
back, dead letters requeued) leaves messages that carry its run id (``queuejob-run-id``), its
index of the item (``queuejob-index``) and the item's id (``message_id``). A rerun of those
items queues them again from the earlier run's ledger, so it must first take those very
messages out, or each such item would run twice, and must leave alone anything it does not
queue again: the stale-message policy decides about those.

`take_leftovers` reads the work queue's ready messages once, without returning any it takes,
and classifies each with the caller's function. What it does not take is stale to the rerun:
with ``purge_others`` it is removed too, otherwise every message read goes back and the caller
stops the run. Reading is consuming: there is no way to look at a quorum queue's messages
without a delivery, and each message that goes back counts one against its
``x-delivery-limit`` (a message returned too often is dead-lettered). So:

* messages are acknowledged, never returned, when the rerun proceeds: the taken ones (their
  items are in the rerun's fill) and, under ``purge_others``, the others;
* when the rerun will stop (others found, no purge), a quorum queue is read one message at a
  time (``basic.get``) and reading stops at the first other one, and nothing is read at all
  when the queue holds more messages than the rerun has items: only the messages read before
  the stop go back, each with one delivery more. A classic queue counts no deliveries: it is
  read through a consumer, all of it, for an exact count;
* the scan holds ``<queue>.fill.lock``, the lock of the fill and of a dead-letter requeue, so
  no queuejob publisher adds messages while it reads; a queue with consumers is not read at
  all (another run's pods are working on it: the caller's stale check says so).

Idempotent: a scan that dies before its acknowledgements returns what it held (and a retry
reads it again); after them, the messages are gone and a retry finds nothing of the earlier
run's. Nothing taken is lost: each taken message's item is in the rerun's items, read from the
earlier run's ledger, which the caller fills after the scan; a rerun that stops before its fill
can be started again from the same ledger. Acknowledgements are settled before this returns
(the channel's close waits for the broker, which handles a channel's frames in order).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika.exceptions as pex

from queuejob.flows.adapters.broker.config import (
    HEADER_INDEX,
    HEADER_RUN_ID,
    BrokerConfig,
    QueueSettings,
)
from queuejob.flows.adapters.broker.connection import channel_error, passive, session
from queuejob.flows.adapters.broker.fill import take_fill_lock
from queuejob.flows.core.rerun import MORE_THAN_RERUN

# The caller's verdict on one message, from its run id, item id and index headers: None to take
# it out, else a reason (counted in `LeftoverScan.others`).
Classifier = Callable[[str | None, str | None, int | None], str | None]

# The reason counted when the queue holds more messages than the rerun has items, unread.
MORE_THAN_ITEMS = MORE_THAN_RERUN


@dataclass(frozen=True)
class LeftoverScan:
    """What `take_leftovers` found and did."""

    ready: int  # ready messages in the work queue when the scan began
    consumers: int  # consumers attached then (a queue with consumers is not read)
    taken: int  # messages taken out: items the caller queues again
    others: dict[str, int] = field(default_factory=dict)  # not taken, by reason
    purged: bool = False  # the others were removed too
    exhaustive: bool = True  # False: the counts are a lower bound (the scan stopped early)


def take_leftovers(
    cfg: BrokerConfig,
    qs: QueueSettings,
    *,
    classify: Classifier,
    most: int,
    purge_others: bool,
    read_timeout_s: float = 5.0,
) -> LeftoverScan:
    """Take out of the work queue the messages ``classify`` accepts (returns None for); with
    ``purge_others`` remove the rest too, otherwise, when there is any other, take nothing.

    ``most`` is how many messages the caller can take at most (its items): a queue holding more
    is not read unless ``purge_others`` (the extra ones are stale whatever they are). Raises
    `QueueNotFound` when the work queue does not exist, `FillInProgress` when a fill or a
    dead-letter requeue of it is running.
    """
    with session(cfg) as conn:
        take_fill_lock(conn, cfg, qs)
        ok = passive(conn, cfg, qs.name)
        ready, consumers = int(ok.message_count), int(ok.consumer_count)
        if ready == 0 or consumers:
            return LeftoverScan(ready=ready, consumers=consumers, taken=0)
        if not purge_others and ready > most:
            return LeftoverScan(
                ready=ready,
                consumers=0,
                taken=0,
                others={MORE_THAN_ITEMS: ready - most},
                exhaustive=False,
            )
        ch = conn.channel()
        try:
            if purge_others or qs.queue_type == "classic":
                last, taken, others = _read_consuming(ch, qs.name, ready, classify, read_timeout_s)
                exhaustive = True
            else:
                last, taken, others = _read_one_by_one(ch, qs.name, ready, classify)
                exhaustive = not others  # stopped at the first other one
            if others and not purge_others:
                # The caller stops the run: everything read goes back (closing the channel).
                ch.close()
                return LeftoverScan(
                    ready=ready,
                    consumers=0,
                    taken=0,
                    others=others,
                    exhaustive=exhaustive,
                )
            if last:
                ch.basic_ack(last, multiple=True)
            ch.close()  # waits for the broker: the acknowledgements are settled
        except pex.ChannelClosedByBroker as exc:
            raise channel_error(exc, cfg, qs.name) from None
        finally:
            with contextlib.suppress(Exception):
                if ch.is_open:
                    ch.close()
    return LeftoverScan(
        ready=ready,
        consumers=0,
        taken=taken,
        others=others,
        purged=bool(others),
        exhaustive=True,
    )


def _verdict(classify: Classifier, props: Any) -> str | None:
    headers = props.headers or {}
    index = headers.get(HEADER_INDEX)
    return classify(
        _text(headers.get(HEADER_RUN_ID)),
        props.message_id,
        index if isinstance(index, int) and not isinstance(index, bool) else None,
    )


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _read_one_by_one(
    ch: Any, queue: str, ready: int, classify: Classifier
) -> tuple[int, int, dict[str, int]]:
    """Up to ``ready`` messages by ``basic.get``, held unacknowledged, stopping after the first
    one not taken. Returns (last delivery tag, taken, others)."""
    last = taken = 0
    for _ in range(ready):
        method, props, _body = ch.basic_get(queue, auto_ack=False)
        if method is None:
            break
        last = int(method.delivery_tag)
        reason = _verdict(classify, props)
        if reason is not None:
            return last, taken, {reason: 1}
        taken += 1
    return last, taken, {}


def _read_consuming(
    ch: Any, queue: str, ready: int, classify: Classifier, read_timeout_s: float
) -> tuple[int, int, dict[str, int]]:
    """The first ``ready`` messages through a consumer, held unacknowledged. Returns (last
    delivery tag, taken, others by reason)."""
    # Every message read stays unacknowledged until the decision: a prefetch of all of them
    # (unbounded past the 16-bit maximum). pika reads the socket only as the loop asks for
    # more, so the client holds a socket buffer's worth, not the queue.
    ch.basic_qos(prefetch_count=ready if ready <= 65535 else 0)
    last = taken = 0
    others: dict[str, int] = {}
    deliveries = ch.consume(queue, auto_ack=False, inactivity_timeout=read_timeout_s)
    for seen, (method, props, _body) in enumerate(deliveries, start=1):
        if method is None:  # nothing more arrived (another consumer took some?)
            break
        last = int(method.delivery_tag)
        reason = _verdict(classify, props)
        if reason is None:
            taken += 1
        else:
            others[reason] = others.get(reason, 0) + 1
        if seen >= ready:
            break
    # Stop deliveries: messages delivered past the count (a publisher that ignores the lock)
    # are rejected back; the ones read stay unacknowledged for the caller's decision.
    ch.cancel()
    return last, taken, others
