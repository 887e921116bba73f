"""A work queue's queues on the broker: declaring them (and explaining an argument conflict),
their depths (AMQP, and the management API when it answers), purging and deleting them.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pika.exceptions as pex

from queuejob.flows.core.errors import (
    QueueConflict,
    QueueNotFound,
)

if TYPE_CHECKING:  # the worker imports this module: keep pydantic (items.py) out of its start-up
    pass
from queuejob.flows.adapters.broker.config import (
    BrokerConfig,
    QueueSettings,
    companion_arguments,
    work_queue_arguments,
)
from queuejob.flows.adapters.broker.connection import (
    channel_error,
    passive,
    rides_out_node_loss,
    server_major,
    session,
)

log = logging.getLogger(__name__)


# --- declaration -------------------------------------------------------------------------------

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for queue .*?: received (?P<got>.+?) but current is "
    r"(?P<cur>.+)$"
)


def _reported_value(text: str) -> str | None:
    text = text.strip()
    if text == "none":
        return None
    m = re.match(r"^(?:the value )?'(?P<v>.*?)'(?: of type '[^']*')?$", text)
    return m.group("v") if m else text


def _declare_one(
    conn: Any,
    cfg: BrokerConfig,
    queue: str,
    arguments: dict[str, Any],
    qs: QueueSettings | None = None,
) -> Any:
    ch = conn.channel()
    try:
        ch.queue_declare(queue, durable=True, arguments=arguments)
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            raise _conflict(cfg, queue, arguments, exc.reply_text, qs) from None
        raise channel_error(exc, cfg, queue) from None
    return ch


def _old_companion_advice(queue: str, reply: str, qs: QueueSettings | None) -> str | None:
    """What to do about a run's companion queue that an earlier queuejob declared classic,
    now that it is a quorum queue beside a quorum work queue (RabbitMQ refuses to change a
    queue's type: 406 PRECONDITION_FAILED)."""
    if qs is None or queue == qs.name or "'x-queue-type'" not in reply:
        return None
    if qs.queue_type != "quorum" or "current is 'classic'" not in reply:
        return None
    if queue == qs.dead_name:
        what = (
            f"first move its dead letters back (queuejob dead-letters {qs.name} --requeue) or "
            "save them, then delete it"
        )
    elif queue == qs.results_name:
        what = "delete it once no run of this queue is running (its records are in the ledgers)"
    else:
        what = "delete it once no fill or requeue of this queue is running"
    return (
        f"queue {queue!r} was declared as a classic queue by an earlier queuejob; with a quorum "
        f"work queue every queue of a run is now a quorum queue, replicated so that losing one "
        f"node loses none of them, and RabbitMQ cannot change the type of an existing queue. "
        f"{what[0].upper()}{what[1:]} (rabbitmqctl delete_queue {queue}) and run again; or "
        f"use another queue name"
    )


def _conflict(
    cfg: BrokerConfig,
    queue: str,
    wanted: dict[str, Any],
    reply: str,
    qs: QueueSettings | None = None,
) -> QueueConflict:
    advice = _old_companion_advice(queue, reply, qs)
    if advice is not None:
        err = QueueConflict(f"{advice}. Broker on {cfg.describe()}: {reply}")
        err.queue = queue  # type: ignore[attr-defined]
        err.wanted = dict(wanted)  # type: ignore[attr-defined]
        err.existing = {"x-queue-type": "classic"}  # type: ignore[attr-defined]
        return err
    existing: dict[str, Any] | None = None
    source = "the broker's reply (it names only the first argument that differs)"
    mgmt = _management_queue(cfg, queue)
    if mgmt is not None:
        existing = dict(mgmt.get("arguments") or {})
        if not mgmt.get("durable", True):
            existing["durable"] = False
        source = "the management API"
    else:
        m = _INEQUIVALENT.search(reply)
        if m:
            existing = {m.group("arg"): _reported_value(m.group("cur"))}
    shown = (
        "unknown"
        if existing is None
        else "{"
        + ", ".join(f"{k!r}: {'(not set)' if v is None else repr(v)}" for k, v in existing.items())
        + "}"
    )
    err = QueueConflict(
        f"queue {queue!r} on {cfg.describe()} already exists with different arguments. "
        f"Asked for {wanted!r}; existing (from {source}): {shown}. Broker: {reply}. "
        f"Either use the existing queue's settings (queue_type, delivery_limit), choose another "
        f"queue name, or delete the queue once nothing needs its messages "
        f"(rabbitmqctl delete_queue {queue}, or queuejob's cleanup)"
    )
    err.queue = queue  # type: ignore[attr-defined]
    err.wanted = dict(wanted)  # type: ignore[attr-defined]
    err.existing = existing  # type: ignore[attr-defined]
    return err


@rides_out_node_loss
def declare_queues(cfg: BrokerConfig, qs: QueueSettings) -> None:
    """Declare (idempotently) the dead-letter, results and fill-marker queues and the work queue.

    All are durable; with a quorum work queue all are quorum queues (`companion_arguments`).
    Raises `QueueConflict` when one exists with other arguments (the message names the queue,
    both argument sets as far as they are known, and what to do).
    """
    with session(cfg) as conn:
        major = server_major(conn)
        aux = companion_arguments(qs, broker_major=major)
        work_args = work_queue_arguments(qs, broker_major=major)
        # Dead-letter queue first: the work queue dead-letters into it from its first message.
        for name in (qs.dead_name, qs.results_name, qs.fill_name):
            try:
                _declare_one(conn, cfg, name, aux, qs).close()
            except QueueConflict as companion:
                # A work queue of the other type explains both: report the work queue.
                try:
                    _declare_one(conn, cfg, qs.name, work_args, qs).close()
                except QueueConflict as work:
                    raise work from None
                raise companion from None
        _declare_one(conn, cfg, qs.name, work_args, qs).close()


@rides_out_node_loss
def delete_queues(
    cfg: BrokerConfig, qs: QueueSettings, *, only_if_empty: bool = True
) -> dict[str, int]:
    """Delete the run's queues; return the queues kept, with the messages each still holds.

    The results, fill-marker and requeue-record queues are the run's bookkeeping and go (the
    requeue records stay while the dead-letter queue does: they keep a requeue idempotent). The
    work and dead-letter queues hold items: with ``only_if_empty`` (the default) each is deleted
    only when it holds no message and has no consumer, and is otherwise kept and returned, so
    that no item is lost with its queue. ``only_if_empty=False`` deletes them with whatever they
    hold. Queues
    that do not exist are skipped.
    """
    kept: dict[str, int] = {}
    with session(cfg) as conn:
        for name in (qs.name, qs.dead_name, qs.results_name, qs.fill_name, qs.requeued_name):
            if name == qs.requeued_name and qs.dead_name in kept:
                continue
            guarded = only_if_empty and name in (qs.name, qs.dead_name)
            if guarded:
                try:
                    ok = passive(conn, cfg, name)
                except QueueNotFound:
                    continue
                if ok.message_count or ok.consumer_count:
                    kept[name] = int(ok.message_count)
                    continue
            # Quorum queues refuse queue.delete with if-empty (the broker closes the connection
            # with 540 NOT_IMPLEMENTED); classic ones take it, closing the window between the
            # count above and the delete. A run's queues are all quorum or all classic.
            if_empty = guarded and qs.queue_type == "classic"
            ch = conn.channel()
            try:
                ch.queue_delete(name, if_empty=if_empty)
            except pex.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:
                    continue
                if exc.reply_code != 406 or not if_empty:
                    raise channel_error(exc, cfg, name) from None
                kept[name] = int(passive(conn, cfg, name).message_count)  # filled meanwhile
                continue
            ch.close()
    return kept


# --- depth -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueDepth:
    """Messages in one queue.

    ``ready`` and ``consumers`` come from an AMQP passive declare, exact within milliseconds.
    ``unacked`` (delivered, not yet acknowledged: items in flight) is only known through the
    management API (``source == "management"``; its statistics lag by up to the broker's
    stats interval, 5 s by default). Over plain AMQP (``source == "amqp"``) it is None: derive
    in-flight work from the run's own numbers instead (confirmed items minus ready messages
    minus items with a final outcome record), and use ``consumers`` as the count of live
    workers.
    """

    ready: int
    unacked: int | None
    consumers: int
    source: Literal["amqp", "management"]


@rides_out_node_loss
def queue_depths(cfg: BrokerConfig, qs: QueueSettings) -> dict[str, QueueDepth]:
    """Depths of the ``work``, ``results`` and ``dead`` queues (keys of the returned dict).

    Raises `QueueNotFound` if one of them does not exist.
    """
    out: dict[str, QueueDepth] = {}
    with session(cfg) as conn:
        for key, name in (("work", qs.name), ("results", qs.results_name), ("dead", qs.dead_name)):
            ok = passive(conn, cfg, name)
            unacked: int | None = None
            source: Literal["amqp", "management"] = "amqp"
            mgmt = _management_queue(cfg, name)
            if mgmt is not None and "messages_unacknowledged" in mgmt:
                unacked = int(mgmt["messages_unacknowledged"])
                source = "management"
            out[key] = QueueDepth(
                ready=int(ok.message_count),
                unacked=unacked,
                consumers=int(ok.consumer_count),
                source=source,
            )
    return out


def _management_queue(cfg: BrokerConfig, queue: str) -> dict[str, Any] | None:
    """The management API's view of a queue, or None (not configured, unreachable, missing)."""
    if not cfg.management_url:
        return None
    import base64
    import urllib.error
    import urllib.request

    base = cfg.management_url.rstrip("/")
    url = (
        f"{base}/api/queues/{urllib.parse.quote(cfg.vhost, safe='')}/"
        f"{urllib.parse.quote(queue, safe='')}"
    )
    token = base64.b64encode(f"{cfg.username}:{cfg._password()}".encode()).decode()
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    context = None
    if base.startswith("https"):
        import ssl

        context = ssl.create_default_context(cafile=cfg.ca_file)
    try:
        with urllib.request.urlopen(req, timeout=cfg.connect_timeout_s, context=context) as resp:
            data = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning(
            "management API at %s did not answer for queue %r (%s); using AMQP counts only",
            base,
            queue,
            cfg.scrub(str(exc)),
        )
        return None
    return data if isinstance(data, dict) else None


@rides_out_node_loss
def purge_work_queue(cfg: BrokerConfig, qs: QueueSettings) -> int:
    """Remove the work queue's ready messages (unacked ones stay); return how many."""
    return _purge(cfg, qs.name)


@rides_out_node_loss
def purge_results(cfg: BrokerConfig, qs: QueueSettings) -> int:
    """Remove the outcome records from ``<name>.results`` once a run's ledger is saved."""
    return _purge(cfg, qs.results_name)


def _purge(cfg: BrokerConfig, queue: str) -> int:
    with session(cfg) as conn:
        ch = conn.channel()
        try:
            return int(ch.queue_purge(queue).method.message_count)
        except pex.ChannelClosedByBroker as exc:
            raise channel_error(exc, cfg, queue) from None
