"""The outcome publisher: a worker's records go to ``<queue>.results`` with pipelined publisher
confirms, and each message is settled (acked, rejected or requeued) only once every publish it
waits for is confirmed, in delivery order, with runs of acks sent as one ``multiple`` ack.

Record before ack: a crash between the two gives a duplicate record, never a lost one. A record
the broker refuses (basic.nack) leaves its message unacked and sets `OutcomePublisher.refused`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
from pika import spec

from queuejob.flows.adapters.broker import PERSISTENT, RECORD_CONTENT_TYPE
from queuejob.flows.adapters.broker.frames import coalesce_pending_frames
from queuejob.flows.core.errors import BrokerUnavailable
from queuejob.flows.core.ledger import OutcomeRecord, record_dict

RECORD_PROPS = pika.BasicProperties(content_type=RECORD_CONTENT_TYPE, delivery_mode=PERSISTENT)


def record_json(rec: OutcomeRecord) -> bytes:
    """``rec.to_json()``: the record's JSON, with its result (if any), without a deep copy (a
    worker writes thousands of records a second)."""
    return json.dumps(record_dict(rec), separators=(",", ":")).encode()


@dataclass
class Settle:
    """What to do with a message once the publish numbered ``seq`` (and every one before it)
    is confirmed: ``ack``, ``requeue`` (reject, the broker redelivers), ``dead`` (reject without
    requeue: to the dead-letter queue) or ``none`` (a record whose action follows)."""

    seq: int
    action: str
    tag: int
    item: str


class OutcomePublisher:
    """Publishes on one confirm-mode channel and settles messages of the work channel.

    Its broker callbacks only take note; `settle` acts, called by the worker's loop (or by the
    keeper thread, which holds the connection while a long ``--call`` runs)."""

    def __init__(
        self, *, conn: Any, results_name: str, records: bool, say: Callable[[str], None]
    ) -> None:
        self.conn = conn
        self.results_name = results_name
        self.records = records  # False: no results queue, records are not published
        self.say = say
        # Publisher confirms, pipelined: publishes not yet confirmed (in order), the ones the
        # broker refused, confirm frames not yet looked at, and messages waiting to be settled.
        self.seq = 0
        self.unconfirmed: dict[int, None] = {}
        self.nacked: set[int] = set()
        self.confirms: deque[tuple[int, bool, bool]] = deque()
        self.settling: deque[Settle] = deque()
        self.refused: str | None = None  # the item whose record the broker refused
        self.channel: Any = None
        self._publish_raw: Callable[..., Any] | None = None

    def confirm_mode(
        self, pub: Any, *, timeout_s: float, io: Callable[[float], None], where: str
    ) -> None:
        """Publisher confirms without waiting for each one: pika's blocking channel only offers
        a confirm per publish, so this talks to the channel underneath it (pika's own
        `Channel`), whose callbacks run inside ``process_data_events``."""
        impl = pub._impl  # pika's asynchronous Channel, which BlockingChannel wraps
        selected: list[bool] = []
        impl.confirm_delivery(self._on_confirm, callback=lambda _frame: selected.append(True))
        impl.add_on_return_callback(self._on_return)
        deadline = time.monotonic() + timeout_s
        while not selected:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"broker at {where} did not turn on publisher confirms")
            io(0.25)
        self.channel = pub  # held here: the publisher owns its channel
        self._publish_raw = impl.basic_publish

    # -- broker callbacks (they only take note; `settle` acts) ----------------------------------

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        self.confirms.append(
            (method.delivery_tag, bool(method.multiple), isinstance(method, spec.Basic.Ack))
        )
        # Ends the wait of process_data_events, which returns early for deliveries only.
        with contextlib.suppress(Exception):  # a closing connection needs no wake-up
            self.conn.add_callback_threadsafe(_noop)

    def _on_return(self, _ch: Any, _method: Any, _props: Any, _body: bytes) -> None:
        if self.records:
            self.records = False
            self.say(f"warning: results queue {self.results_name!r} is gone; records off")

    # -- publishing and settling -----------------------------------------------------------------

    def publish(self, routing_key: str, body: bytes, props: Any) -> int:
        """Publish (confirmed later); return its sequence number."""
        assert self._publish_raw is not None, "confirm_mode first"
        self._publish_raw("", routing_key, body, props, mandatory=True)
        self.seq += 1
        self.unconfirmed[self.seq] = None
        return self.seq

    def publish_record(self, rec: OutcomeRecord) -> int:
        """Publish a record (persistent, confirmed later); return the sequence number that
        must be confirmed before the item's message is settled."""
        if not self.records:
            return self.seq
        return self.publish(self.results_name, record_json(rec), RECORD_PROPS)

    def settle_after(self, seq: int, action: str, tag: int, item: str) -> None:
        """Settle message ``tag`` with ``action`` once publish ``seq`` is confirmed."""
        self.settling.append(Settle(seq, action, tag, item))

    def settle(self, work: Any) -> int:
        """Act on the confirms that arrived: settle on ``work``, in delivery order, each message
        whose publishes are confirmed, acking runs of them with one ``multiple`` ack. Return how
        many messages were settled (a refused record's message stays held, unacked)."""
        coalesce_pending_frames(self.conn._impl)  # an ack sends the records buffered before it
        while self.confirms:
            tag, multiple, ok = self.confirms.popleft()
            done = [tag]
            if multiple:  # every publish up to this one; they are in order
                done = []
                for s in self.unconfirmed:
                    if s > tag:
                        break
                    done.append(s)
            for s in done:
                self.unconfirmed.pop(s, None)
                if not ok:
                    self.nacked.add(s)
        oldest = next(iter(self.unconfirmed), self.seq + 1)
        ack_upto = 0
        settled = 0
        while self.settling and self.settling[0].seq < oldest:
            entry = self.settling.popleft()
            if entry.seq in self.nacked:
                self.nacked.discard(entry.seq)
                if self.refused is None:
                    self.refused = entry.item
                continue  # left unacked: the broker redelivers it
            if entry.action == "none":
                continue
            settled += 1
            if entry.action == "ack" and self.refused is None:
                ack_upto = entry.tag  # every earlier message is settled already
                continue
            if ack_upto:
                work.basic_ack(ack_upto, multiple=True)
                ack_upto = 0
            if entry.action == "ack":
                work.basic_ack(entry.tag)
            else:
                work.basic_reject(entry.tag, requeue=entry.action == "requeue")
        if ack_upto:
            work.basic_ack(ack_upto, multiple=True)
        return settled


def _noop() -> None:
    """Wakes the broker loop (scheduled from another thread)."""
