"""`fill_queue`: publishing the items, persistent and publisher-confirmed, with a bounded window
of messages and bytes; the fill lock (``<queue>.fill.lock``) and the fill marker that make a
retried fill idempotent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions as pex
from pika.adapters.select_connection import SelectConnection

from queuejob.flows.core.errors import (
    BrokerUnavailable,
    FillInProgress,
    InvalidInput,
    PublishError,
)

if TYPE_CHECKING:  # the worker imports this module: keep pydantic (items.py) out of its start-up
    from queuejob.flows.core.items import Item
from queuejob.flows.adapters.broker.config import (
    PERSISTENT,
    RECORD_CONTENT_TYPE,
    BrokerConfig,
    Endpoint,
    QueueSettings,
)
from queuejob.flows.adapters.broker.connection import (
    cause,
    channel_error,
    connection_params,
    not_found,
    passive,
    ride_out,
    rides_out_node_loss,
    session,
    translate_connect_error,
)
from queuejob.flows.adapters.broker.frames import FillFrames, coalesce_pending_frames

log = logging.getLogger(__name__)


_MAX_BYTES_IN_FLIGHT = 32 * 1024 * 1024  # with the message window, bounds the fill's memory
_MARKER_SCAN_LIMIT = 1000
_MIN_STALL_S = 30.0  # a fill with confirms outstanding and none arriving for this long fails
_CLOSE_GRACE_S = 5.0  # how long a failed fill waits for the broker to confirm the close

# --- fill marker -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FillMarker:
    """Which run last filled the work queue, and whether that fill finished."""

    run_id: str
    done: bool
    confirmed: int

    def to_json(self) -> bytes:
        """The marker message's body."""
        return json.dumps(
            {"run_id": self.run_id, "done": self.done, "confirmed": self.confirmed, "v": 1}
        ).encode()

    @classmethod
    def from_json(cls, body: bytes) -> FillMarker | None:
        """Parse a marker body; None for anything that is not one."""
        try:
            raw = json.loads(body)
            return cls(str(raw["run_id"]), bool(raw["done"]), int(raw["confirmed"]))
        except (ValueError, KeyError, TypeError):
            return None


def _read_marker(conn: Any, cfg: BrokerConfig, qs: QueueSettings) -> FillMarker | None:
    """The newest marker (the last message of the fill queue), read without consuming."""
    ch = conn.channel()
    newest: FillMarker | None = None
    try:
        for _ in range(_MARKER_SCAN_LIMIT):
            method, _props, body = ch.basic_get(qs.fill_name, auto_ack=False)
            if method is None:
                break
            marker = FillMarker.from_json(body)
            if marker is not None:
                newest = marker
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise channel_error(exc, cfg, qs.fill_name) from None
    # Closing the channel returns every message we held to its place in the queue.
    ch.close()
    return newest


def _write_marker(conn: Any, cfg: BrokerConfig, qs: QueueSettings, marker: FillMarker) -> None:
    """Publish the new marker first, then remove older ones: at every moment the queue's last
    message is the newest marker, even if we die half-way."""
    ch = conn.channel()
    ch.confirm_delivery()
    marker_id = uuid.uuid4().hex
    props = pika.BasicProperties(
        delivery_mode=PERSISTENT, content_type=RECORD_CONTENT_TYPE, message_id=marker_id
    )
    try:
        ch.basic_publish("", qs.fill_name, marker.to_json(), props, mandatory=True)
        for _ in range(_MARKER_SCAN_LIMIT):
            method, got, _body = ch.basic_get(qs.fill_name, auto_ack=False)
            if method is None:
                break
            if got.message_id == marker_id:
                ch.basic_reject(method.delivery_tag, requeue=True)
                break
            ch.basic_ack(method.delivery_tag)
    except pex.UnroutableError:
        raise not_found(cfg, qs.fill_name) from None
    except pex.NackError:
        raise PublishError(
            f"the broker at {cfg.describe()} nacked the fill marker for queue {qs.name!r}; "
            "retry the fill"
        ) from None
    except pex.ChannelClosedByBroker as exc:
        raise channel_error(exc, cfg, qs.fill_name) from None
    ch.close()


@rides_out_node_loss
def read_fill_marker(cfg: BrokerConfig, qs: QueueSettings) -> FillMarker | None:
    """The work queue's fill marker: which run filled it and whether that fill finished.
    None when no fill was ever recorded (or the marker queue does not exist)."""
    with session(cfg) as conn:
        return _read_marker(conn, cfg, qs)


# --- fill --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FillResult:
    """The outcome of `fill_queue`."""

    confirmed: int
    skipped: bool  # True when this run's fill had already finished: nothing was published


def fill_queue(
    cfg: BrokerConfig,
    qs: QueueSettings,
    items: Iterable[Item] | Callable[[], Iterable[Item]],
    *,
    run_id: str,
    window: int = 1000,
    on_progress: Callable[[int], None] | None = None,
) -> FillResult:
    """Publish one persistent message per item to the work queue; return the confirmed count.

    Messages: ``message_id`` = item id, headers ``queuejob-run-id`` and ``queuejob-index``,
    delivery mode 2. Publisher confirms are pipelined: up to ``window`` messages (and 32 MiB)
    are unconfirmed at once, so memory stays flat whatever the number of items. Nothing is
    silently lost: a nack or an unroutable return raises `PublishError`, and so does a work
    queue that does not hold exactly the confirmed messages more after the fill than before it
    (a length limit or TTL policy dropped some, or a consumer took some). A work queue deleted
    before the fill raises `QueueNotFound`.

    Idempotent per run, through the marker in ``<name>.fill``: if this run's fill already
    finished, nothing is published (``skipped=True``); if this run's fill stopped half-way (a
    crash, a retry), the work queue is purged and filled again from the start, so each item
    ends up in the queue exactly once. A fill for a new run writes its marker first and marks
    it done with the confirmed count at the end. Callers must not fill a queue that workers
    are consuming (the flow creates the Job only after the fill). ``on_progress(confirmed)``
    is called as confirms arrive. A second concurrent fill of the same queue raises
    `FillInProgress`. The queues must have been declared (`declare_queues`).

    ``items`` may be a function that returns them: then a lost node or connection is ridden
    out for ``cfg.reconnect_s`` (the fill starts again on a new connection, its marker
    making that idempotent, with the items read anew); a list is read again the same way; a
    one-shot iterator gets one attempt.
    """
    if not run_id:
        raise InvalidInput("run_id must be a non-empty string (the flow run id)")
    if not 1 <= window <= 100_000:
        raise InvalidInput(f"window must be between 1 and 100000 (got {window})")
    if callable(items):
        factory: Callable[[], Iterable[Item]] = items
    elif iter(items) is items:
        # A one-shot iterator cannot be read again: no riding out (the caller retries).
        return _fill(cfg, qs, items, run_id, window, on_progress)
    else:
        factory = lambda: items  # noqa: E731 - a list or another re-iterable
    return ride_out(
        cfg, "fill_queue", lambda: _fill(cfg, qs, factory(), run_id, window, on_progress)
    )


def _fill(
    cfg: BrokerConfig,
    qs: QueueSettings,
    items: Iterable[Item],
    run_id: str,
    window: int,
    on_progress: Callable[[int], None] | None,
) -> FillResult:
    with session(cfg) as conn:
        take_fill_lock(conn, cfg, qs)
        marker = _read_marker(conn, cfg, qs)
        if marker is not None and marker.run_id == run_id and marker.done:
            log.info(
                "fill of %r for run %s already done (%d items)", qs.name, run_id, marker.confirmed
            )
            return FillResult(confirmed=marker.confirmed, skipped=True)
        if marker is not None and marker.run_id == run_id:
            ch = conn.channel()
            try:
                purged = ch.queue_purge(qs.name).method.message_count
            except pex.ChannelClosedByBroker as exc:
                raise channel_error(exc, cfg, qs.name) from None
            ch.close()
            log.warning(
                "fill of %r for run %s stopped half-way earlier: purged %d messages, refilling",
                qs.name,
                run_id,
                purged,
            )
        else:
            _write_marker(conn, cfg, qs, FillMarker(run_id, done=False, confirmed=0))

        def keepalive() -> None:
            # The lock lives on this connection: service its heartbeats during the fill.
            conn.process_data_events(time_limit=0)

        before = int(passive(conn, cfg, qs.name).message_count)
        publisher = _Publisher(cfg, qs, items, run_id, window, on_progress, keepalive)
        # The publishing connection goes to the node the session reached.
        publisher.endpoint = getattr(conn, "queuejob_endpoint", None)
        confirmed = publisher.run()
        _check_filled(conn, cfg, qs, before, confirmed)
        _write_marker(conn, cfg, qs, FillMarker(run_id, done=True, confirmed=confirmed))
    return FillResult(confirmed=confirmed, skipped=False)


def _check_filled(
    conn: Any, cfg: BrokerConfig, qs: QueueSettings, before: int, confirmed: int
) -> None:
    """The work queue must hold exactly the confirmed messages more than before the fill."""
    ok = passive(conn, cfg, qs.name)  # QueueNotFound if it was deleted during the fill
    added = int(ok.message_count) - before
    if added == confirmed:
        return
    consumers = int(ok.consumer_count)
    if added > confirmed:
        why = "something else published into it during the fill: stop it and retry the fill"
    elif consumers:
        why = (
            f"{consumers} consumer(s) are attached to it and may have taken messages: stop "
            "them (an earlier run's pods?) and retry the fill"
        )
    else:
        why = (
            "the queue was deleted and declared again during the fill, or a length limit or "
            "message TTL policy dropped messages: check the queue's policies and retry the fill"
        )
    raise PublishError(
        f"the broker at {cfg.describe()} confirmed {confirmed} messages of the fill of queue "
        f"{qs.name!r}, but the queue gained {added} (it held {before} before the fill); {why}"
    )


def take_fill_lock(conn: Any, cfg: BrokerConfig, qs: QueueSettings) -> None:
    """Hold the queue's publisher lock on ``conn`` (an exclusive queue, gone with the
    connection): one fill or dead-letter requeue publishes into a work queue at a time."""
    ch = conn.channel()
    try:
        ch.queue_declare(qs.lock_name, exclusive=True, auto_delete=True)
    except pex.ChannelClosedByBroker as exc:
        if exc.reply_code == 405:  # RESOURCE_LOCKED: another connection holds it
            raise FillInProgress(
                f"a fill or a dead-letter requeue of queue {qs.name!r} on {cfg.describe()} is "
                f"running (it holds {qs.lock_name!r}); retry once it has finished or been stopped"
            ) from None
        raise channel_error(exc, cfg, qs.lock_name) from None


class _Publisher:
    """Pipelined, confirmed publishing on a SelectConnection (one ioloop, no threads)."""

    def __init__(
        self,
        cfg: BrokerConfig,
        qs: QueueSettings,
        items: Iterable[Item],
        run_id: str,
        window: int,
        on_progress: Callable[[int], None] | None,
        keepalive: Callable[[], None] | None,
    ) -> None:
        self.cfg = cfg
        self.qs = qs
        self.items = iter(items)
        self.run_id = run_id
        self.window = window
        self.on_progress = on_progress
        self.keepalive = keepalive
        self.stall_s = max(_MIN_STALL_S, 3 * cfg.connect_timeout_s)
        self.endpoint: Endpoint | None = None
        self.conn: Any = None
        self.channel: Any = None
        self.frames: FillFrames | None = None  # None: every message goes through pika
        self.published = 0
        self.confirmed = 0
        self.bytes_in_flight = 0
        # (delivery tag, item id, size) of unconfirmed messages, in publish order: <= window.
        self.outstanding: deque[tuple[int, str, int]] = deque()
        self.acked_out_of_order: set[int] = set()
        self.exhausted = False
        self.finished = False
        self.error: BaseException | None = None
        self.last_progress_at = time.monotonic()
        self.progress_reported_at = 0.0

    def run(self) -> int:
        params = connection_params(self.cfg, self.cfg.connect_timeout_s, self.endpoint)
        self.conn = SelectConnection(
            params,
            on_open_callback=self._guard(self._on_open),
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )
        try:
            self.conn.ioloop.start()
        finally:
            if self.conn.is_open:  # an exception escaped the loop: do not leak the socket
                with contextlib.suppress(Exception):
                    self.conn.close()
                    self.conn.ioloop.start()
        if self.error is not None:
            raise self.error
        if not self.finished:
            raise BrokerUnavailable(
                f"the fill of queue {self.qs.name!r} stopped before all items were confirmed "
                f"({self.confirmed} confirmed); retry the fill"
            )
        return self.confirmed

    # -- plumbing ------------------------------------------------------------------------------

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        def wrapped(*args: Any) -> None:
            try:
                fn(*args)
            except BaseException as exc:  # re-raised by run() after cleanup
                self._fail(exc)

        return wrapped

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self.conn.is_open:
            self.conn.close()
            # A broker whose channel is stuck (waiting on a quorum queue deleted under it, say)
            # never answers the close: drop the socket after a grace period.
            self.conn.ioloop.call_later(_CLOSE_GRACE_S, self._abort)
        elif not self.conn.is_closing:
            self.conn.ioloop.stop()

    def _abort(self) -> None:
        if self.conn.is_closed:
            return
        disconnect = getattr(self.conn, "_adapter_disconnect_stream", None)
        if callable(disconnect):  # pika 1.x: abort the transport; the close callback follows
            with contextlib.suppress(Exception):
                disconnect()
                return
        self.conn.ioloop.stop()

    def _on_open_error(self, _conn: Any, exc: BaseException) -> None:
        if self.error is None:
            self.error = translate_connect_error(
                exc, self.cfg, self.cfg.connect_timeout_s, self.endpoint
            )
        self.conn.ioloop.stop()

    def _on_closed(self, _conn: Any, reason: BaseException) -> None:
        if not self.finished and self.error is None:
            self.error = BrokerUnavailable(
                f"lost the connection to the broker at {self.cfg.describe()} during the fill "
                f"of queue {self.qs.name!r} after {self.confirmed} confirmed messages "
                f"({cause(reason, self.cfg)}); retry the fill (it restarts from scratch)"
            )
        self.conn.ioloop.stop()

    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._guard(self._on_channel))
        self._schedule_watchdog()

    def _on_channel(self, channel: Any) -> None:
        self.channel = channel
        # Build frames ourselves only where pika's internals are as expected (pika 1.x).
        body_max = getattr(self.conn, "_body_max_length", None)
        if callable(getattr(self.conn, "_output_marshaled_frames", None)) and isinstance(
            body_max, int
        ):
            self.frames = FillFrames(channel.channel_number, self.qs.name, self.run_id, body_max)
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._guard(self._on_return))
        channel.confirm_delivery(
            self._guard(self._on_confirm), callback=self._guard(lambda _frame: self._pump())
        )

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        if self.finished:
            return
        if isinstance(reason, pex.ChannelClosedByBroker):
            err: BaseException = channel_error(reason, self.cfg, self.qs.name)
        else:
            err = BrokerUnavailable(
                f"the publishing channel to {self.cfg.describe()} closed during the fill of "
                f"queue {self.qs.name!r}: {cause(reason, self.cfg)}; retry the fill"
            )
        self._fail(err)

    def _schedule_watchdog(self) -> None:
        self.conn.ioloop.call_later(min(5.0, self.stall_s / 3), self._guard(self._watchdog))

    def _watchdog(self) -> None:
        if self.finished or self.error is not None:
            return
        if self.keepalive is not None:
            self.keepalive()
        if self.outstanding and time.monotonic() - self.last_progress_at > self.stall_s:
            raise PublishError(
                f"no publisher confirm from {self.cfg.describe()} for {self.stall_s:g} s during "
                f"the fill of queue {self.qs.name!r} ({self.confirmed} confirmed, "
                f"{len(self.outstanding)} waiting); the broker may be overloaded or under a "
                "resource alarm; retry the fill"
            )
        self._schedule_watchdog()

    # -- publishing ----------------------------------------------------------------------------

    def _pump(self) -> None:
        channel = self.channel
        if not channel.is_open:
            return  # the channel's close callback ends the fill
        frames = self.frames
        pending: list[bytes] = []
        while (
            not self.exhausted
            and len(self.outstanding) < self.window
            and self.bytes_in_flight < _MAX_BYTES_IN_FLIGHT
        ):
            try:
                item = next(self.items)
            except StopIteration:
                self.exhausted = True
                break
            data = None if frames is None else frames.encode(item.id, item.index, item.body)
            if data is not None:
                pending.append(data)
            else:  # through pika, after what is pending: the delivery tags follow publish order
                self._emit(pending)
                props = FillFrames.properties(item.id, item.index, self.run_id)
                channel.basic_publish("", self.qs.name, item.body, props, mandatory=True)
            self.published += 1
            size = len(item.body)
            self.outstanding.append((self.published, item.id, size))
            self.bytes_in_flight += size
        self._emit(pending)
        coalesce_pending_frames(self.conn)
        if self.exhausted and not self.outstanding:
            self._finish()

    def _emit(self, pending: list[bytes]) -> None:
        """Hand frames built by `FillFrames` to the connection, as one write."""
        if pending:
            self.conn._output_marshaled_frames([b"".join(pending)])
            pending.clear()

    def _on_return(self, _channel: Any, method: Any, props: Any, _body: bytes) -> None:
        raise PublishError(
            f"item {props.message_id!r} was returned unroutable by {self.cfg.describe()} "
            f"({method.reply_code} {method.reply_text}): queue {self.qs.name!r} does not exist "
            "(deleted during the fill?); declare the queues again and retry the fill"
        )

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = int(method.delivery_tag)
        if isinstance(method, pika.spec.Basic.Nack):
            item = next((i for t, i, _ in self.outstanding if t == tag), "?")
            raise PublishError(
                f"the broker at {self.cfg.describe()} nacked message {tag} (item {item!r}) "
                f"of the fill of queue {self.qs.name!r}; retry the fill"
            )
        if method.multiple:
            while self.outstanding and self.outstanding[0][0] <= tag:
                self._confirm_head()
        else:
            self.acked_out_of_order.add(tag)
        while self.outstanding and self.outstanding[0][0] in self.acked_out_of_order:
            self.acked_out_of_order.discard(self.outstanding[0][0])
            self._confirm_head()
        now = time.monotonic()
        self.last_progress_at = now
        if self.on_progress is not None and now - self.progress_reported_at >= 0.2:
            self.progress_reported_at = now
            self.on_progress(self.confirmed)
        self._pump()

    def _confirm_head(self) -> None:
        _tag, _item, size = self.outstanding.popleft()
        self.bytes_in_flight -= size
        self.confirmed += 1

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.on_progress is not None:
            self.on_progress(self.confirmed)
        self.conn.close()
