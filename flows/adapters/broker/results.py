"""`ResultsConsumer`: the flow's reader of ``<queue>.results``. It takes outcome records in
batches, leaves them unacked until the caller has made them durable, and reconnects once on a
lost connection.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pika.exceptions as pex

from queuejob.flows.core.errors import (
    BrokerUnavailable,
)
from queuejob.flows.core.ledger import OutcomeRecord

if TYPE_CHECKING:  # the worker imports this module: keep pydantic (items.py) out of its start-up
    pass
from queuejob.flows.adapters.broker.config import BrokerConfig, QueueSettings
from queuejob.flows.adapters.broker.connection import (
    cause,
    channel_error,
    close_quietly,
    open_blocking,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ResultBatch:
    """Records taken from the results queue in one `ResultsConsumer.take`, and what to
    acknowledge once they are saved: every delivery up to ``last_tag`` on the channel
    ``channel_gen`` (foreign and malformed messages included)."""

    records: list[OutcomeRecord]
    last_tag: int
    channel_gen: int
    messages: int
    bytes: int = 0  # the deliveries' bodies, all together


class ResultsConsumer:
    """Reads outcome records from ``<name>.results`` while the flow waits for the Job.

    Use as a context manager. Two ways to read:

    - `take` + `ack`: the flow's way. At most ``prefetch`` records are unacknowledged at any
      time (the broker sends no more); the caller saves a batch durably, then acknowledges it
      (one ``basic.ack`` with ``multiple``). A flow run that dies before the ack loses nothing:
      the records go back to the queue and are delivered again, and the ledger counts a record
      it already saved once.
    - `drain`: returns this run's records and leaves them unacknowledged until the consumer
      closes (they go back to the queue); `purge_results` removes them.

    Records of other runs are counted in `foreign` (so an old run's leftovers cannot clog the
    queue), and so are messages that are not outcome records (`malformed`): `drain` acks them
    at once, `take` with its batch. If the connection drops, a read reconnects once; deliveries
    of the lost channel cannot be acknowledged any more (the broker delivers them again).
    """

    def __init__(
        self, cfg: BrokerConfig, qs: QueueSettings, *, run_id: str, prefetch: int = 0
    ) -> None:
        self.cfg = cfg
        self.qs = qs
        self.run_id = run_id
        self.prefetch = max(0, min(prefetch, 65535))  # 0: no limit
        self.foreign = 0
        self.malformed = 0
        self._conn: Any = None
        self._channel: Any = None
        self._buffer: deque[tuple[int, bytes]] = deque()
        self._buffered = 0  # bytes of the bodies in _buffer
        self._gen = 0  # which channel the delivery tags belong to
        self.unacked = 0  # deliveries handed out by `take` and not acknowledged yet
        self.max_unacked_seen = 0

    def __enter__(self) -> ResultsConsumer:
        self._open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _open(self) -> None:
        self._buffer.clear()
        self._buffered = 0
        conn = open_blocking(self.cfg)
        try:
            ch = conn.channel()
            ch.basic_qos(prefetch_count=self.prefetch)
            ch.basic_consume(self.qs.results_name, self._on_message, auto_ack=False)
        except pex.ChannelClosedByBroker as exc:
            close_quietly(conn)
            raise channel_error(exc, self.cfg, self.qs.results_name) from None
        except BaseException:
            close_quietly(conn)
            raise
        self._conn, self._channel = conn, ch
        self._gen += 1
        self.unacked = 0

    def _on_message(self, _ch: Any, method: Any, _props: Any, body: bytes) -> None:
        self._buffer.append((int(method.delivery_tag), body))
        self._buffered += len(body)

    def drain(self, *, max_wait_s: float = 0.5, max_records: int = 10_000) -> list[OutcomeRecord]:
        """This run's records that arrived so far: waits up to ``max_wait_s`` for the first
        one, then takes what is already there, up to ``max_records``."""
        return self._reconnecting(lambda: self._drain(max_wait_s, max_records))

    def take(
        self, *, max_wait_s: float = 0.5, max_records: int = 5_000, max_bytes: int = 0
    ) -> ResultBatch:
        """Up to ``max_records`` deliveries that arrived so far (waiting up to ``max_wait_s``
        for the first one), parsed; this run's records in the batch. With ``max_bytes``, the
        batch also ends once its bodies reach that many bytes (always at least one delivery),
        and no more is read from the connection than that: records carry results, and a batch
        of large ones stays bounded in memory. Acknowledge the batch with `ack` once its
        records are saved."""
        return self._reconnecting(lambda: self._take(max_wait_s, max_records, max_bytes))

    def _reconnecting(self, step: Callable[[], T]) -> T:
        """``step()``; after a lost connection, once more on a new one (the broker delivers the
        unacknowledged records again), then `BrokerUnavailable`."""
        try:
            return step()
        except (pex.AMQPConnectionError, pex.StreamLostError, pex.AMQPChannelError) as first:
            log.warning(
                "results consumer lost its connection (%s); reconnecting", cause(first, self.cfg)
            )
            self.close()
            try:
                self._open()
                return step()
            except (pex.AMQPConnectionError, pex.StreamLostError, pex.AMQPChannelError) as exc:
                self.close()
                raise BrokerUnavailable(
                    f"lost the connection to {self.cfg.describe()} while reading outcome records "
                    f"from {self.qs.results_name!r}: {cause(exc, self.cfg)}; retry later"
                ) from None

    def _take(self, max_wait_s: float, max_records: int, max_bytes: int = 0) -> ResultBatch:
        self._fetch(max_wait_s, max_records, max_bytes)
        records: list[OutcomeRecord] = []
        last_tag = 0
        n = size = 0
        while self._buffer and n < max_records and not (max_bytes and size >= max_bytes):
            tag, body = self._buffer.popleft()
            self._buffered -= len(body)
            size += len(body)
            n += 1
            last_tag = tag
            try:
                record = OutcomeRecord.from_json(body)
            except (ValueError, TypeError):
                self.malformed += 1
                continue
            if record.run_id != self.run_id:
                self.foreign += 1
                continue
            records.append(record)
        # Counted from the tags: this channel's deliveries so far, less those acknowledged.
        self.unacked += n
        self.max_unacked_seen = max(self.max_unacked_seen, self.unacked + len(self._buffer))
        return ResultBatch(
            records=records, last_tag=last_tag, channel_gen=self._gen, messages=n, bytes=size
        )

    def ack(self, batch: ResultBatch) -> bool:
        """Acknowledge every delivery up to the batch's last one. False (nothing done) when the
        batch is empty or came from a channel that has been lost since: the broker has
        already put those messages back."""
        if batch.messages == 0 or batch.channel_gen != self._gen or self._channel is None:
            return False
        try:
            self._channel.basic_ack(batch.last_tag, multiple=True)
        except (pex.AMQPConnectionError, pex.StreamLostError, pex.AMQPChannelError) as exc:
            log.warning(
                "could not acknowledge %d outcome records (%s); the broker delivers them again",
                batch.messages,
                cause(exc, self.cfg),
            )
            self.close()
            return False
        self.unacked = max(0, self.unacked - batch.messages)
        return True

    def _fetch(self, max_wait_s: float, max_records: int, max_bytes: int = 0) -> None:
        if self._conn is None:
            self._open()
        conn = self._conn
        deadline = time.monotonic() + max(0.0, max_wait_s)
        while not self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            conn.process_data_events(time_limit=min(remaining, 0.25))
        # Take what has already arrived without waiting further.
        before = -1
        while (
            len(self._buffer) != before
            and len(self._buffer) < max_records
            and not (max_bytes and self._buffered >= max_bytes)
        ):
            before = len(self._buffer)
            conn.process_data_events(time_limit=0)

    def _drain(self, max_wait_s: float, max_records: int) -> list[OutcomeRecord]:
        self._fetch(max_wait_s, max_records)
        records: list[OutcomeRecord] = []
        taken = 0
        while self._buffer and taken < max_records:
            tag, body = self._buffer.popleft()
            self._buffered -= len(body)
            taken += 1
            try:
                record = OutcomeRecord.from_json(body)
            except (ValueError, TypeError):
                self.malformed += 1
                self._channel.basic_ack(tag)
                continue
            if record.run_id != self.run_id:
                self.foreign += 1
                self._channel.basic_ack(tag)
                continue
            records.append(record)  # left unacknowledged until purge_results
        return records

    def close(self) -> None:
        """Close the connection; unacknowledged records go back to the queue."""
        conn, self._conn, self._channel = self._conn, None, None
        self._buffer.clear()
        self._buffered = 0
        self.unacked = 0
        close_quietly(conn)
