"""The worker's loop: connect, consume with a window of messages, run each item, publish its
record and settle its message through the `OutcomePublisher`; stop on idle, on a failure, on a
refused record or on a signal. `main` is ``python -m queuejob.flows.worker``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions as pex

from queuejob.flows.adapters.broker import (
    CA_FILE_ENV,
    HEADER_FAILURES,
    ITEM_CONTENT_TYPE,
    PERSISTENT,
    BrokerConfig,
    QueueSettings,
    connect,
)
from queuejob.flows.adapters.broker.frames import coalesce_pending_frames
from queuejob.flows.core.errors import BrokerAuthError, BrokerUnavailable, QueueJobError
from queuejob.flows.core.ledger import FAILED, INTERRUPTED, NO_WORK, SUCCEEDED, OutcomeRecord
from queuejob.flows.core.results import RESULT_FILE_ENV
from queuejob.flows.worker.options import (
    EXIT_BROKER,
    EXIT_ITEM_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_TIMED_OUT,
    EXIT_USAGE,
    Options,
    Usage,
    load_callable,
    parse_args,
)
from queuejob.flows.worker.outcomes import OutcomePublisher
from queuejob.flows.worker.runner import Executor, Item, Result, call_item, timeout_note

_TICK_S = 0.25  # how often the loop looks at signals while it waits
_KEEP_AFTER_S = 1.0  # a call running longer than this has the keeper serve the connection
_POLL_EVERY = 32  # items between looks at the connection while messages are held
_DRAIN_S = 30.0  # at the end, how long to wait for the last confirms
_SIGNAL_DRAIN_S = 5.0  # the same after a signal or a refused record
_QUIET_S = 0.25  # after a failure, no delivery for this long: the broker sent what it had

# What a lost connection raises, whichever call meets it first (a node died or restarted, a
# balancer dropped the connection): the worker connects again (`Worker._recover`).
LOST = (
    pex.AMQPConnectionError,
    pex.ConnectionWrongStateError,
    pex.ChannelWrongStateError,
    pex.StreamLostError,
    ConnectionError,
)


class Worker:
    def __init__(
        self,
        *,
        cfg: BrokerConfig,
        qs: QueueSettings,
        run_id: str,
        pod: str,
        opts: Options,
        call: Callable[[bytes], Any] | None,
    ) -> None:
        self.cfg = cfg
        self.qs = qs
        self.run_id = run_id
        self.pod = pod
        self.opts = opts
        self.call = call
        self.executor = (
            Executor(
                argv=opts.command,
                max_result_bytes=opts.max_result_bytes,
                timeout_s=opts.item_timeout_s,
                grace_s=opts.grace_s,
            )
            if call is None
            else None
        )
        # A command's result file: one per item, in a directory of this worker's own.
        self.result_dir: str | None = None
        self.result_files = 0
        # A --call function runs on the main thread, which then lets go of the connection: a
        # keeper thread serves it (heartbeats, and a signal) while a call takes long.
        self.io = threading.Lock()
        self.io.acquire()
        self.calling: tuple[Item, float] | None = None
        self.call_delivery: tuple[Any, Any, bytes] | None = None  # the message being called
        self.prefetch = 1 if opts.mode == "coarse" else opts.prefetch
        self.chatty = opts.mode == "coarse" or opts.call is None  # a log line per item
        self.signal: int | None = None
        self.deliveries: deque[tuple[Any, Any, bytes]] = deque()
        self.conn: Any = None
        self.work: Any = None
        self.consumer_tag: str | None = None
        self.out: OutcomePublisher  # set once connected (see _serve)
        self.failed = 0
        self.processed = 0
        self.held = 0  # messages delivered and not yet acked or rejected
        self.gen = 0  # the connection the deliveries held belong to (one more per reconnect)
        self.lost: BaseException | None = None  # noted by the keeper thread mid-call
        self.lost_items = 0  # items done whose message went back with a lost connection
        # A command's environment: the pod's, minus the broker URL (a function gets the body only).
        self.env = {k: v for k, v in os.environ.items() if k != "BROKER_URL"}

    def say(self, message: str) -> None:
        print(f"[queuejob worker {self.pod}] {message}", file=sys.stderr, flush=True)

    def on_signal(self, signum: int, _frame: Any) -> None:
        if self.signal is None:
            self.signal = signum

    # -- setup -----------------------------------------------------------------------------------

    def _make_result_dir(self) -> None:
        """The directory of the commands' result files; without one, commands get none."""
        base = os.environ.get("TMPDIR") or "/tmp"
        path = os.path.join(base, f"queuejob-results-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            os.mkdir(path, 0o700)
        except OSError as exc:
            self.say(
                f"warning: cannot create a directory for result files in {base} "
                f"({exc.strerror or exc}): commands get no $QUEUEJOB_RESULT_FILE; set TMPDIR to "
                "a writable directory (an emptyDir volume on a read-only root file system)"
            )
            return
        self.result_dir = path

    def _remove_result_dir(self) -> None:
        path, self.result_dir = self.result_dir, None
        if path is None:
            return
        with contextlib.suppress(OSError):
            for name in os.listdir(path):  # a file left by a stopped command
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(path, name))
            os.rmdir(path)

    def run(self) -> int:
        if self.executor is not None:
            self._make_result_dir()
        try:
            return self._run()
        finally:
            self._remove_result_dir()

    def _run(self) -> int:
        try:
            self.conn = connect(self.cfg, deadline_s=self.opts.connect_timeout_s)
            self._note_node()
        except BrokerAuthError as exc:
            self.say(f"error: {exc}")
            return EXIT_USAGE
        except BrokerUnavailable as exc:
            self.say(f"error: {exc}")
            return EXIT_BROKER
        # Handlers only now: while connecting we hold nothing, and the default SIGTERM action
        # (exit at once) is what a pod that is being stopped should do.
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self.on_signal)
        try:
            return self._serve()
        except Usage as exc:
            self.say(f"error: {exc}")
            return EXIT_USAGE
        except pex.ChannelClosedByBroker as exc:
            hint = ""
            if exc.reply_code == 406:
                hint = (
                    "; an item that runs longer than the broker's consumer_timeout (30 min by "
                    "default) loses its delivery: raise consumer_timeout"
                )
            self.say(
                f"error: the broker closed the channel ({exc.reply_code} {exc.reply_text}){hint}"
            )
            return EXIT_BROKER
        except (pex.AMQPError, OSError, QueueJobError) as exc:
            self.say(
                f"error: lost the connection to the broker at {self.cfg.describe()} "
                f"({type(exc).__name__}: {exc}); the items it held unacked will be redelivered"
            )
            return EXIT_BROKER
        finally:
            with contextlib.suppress(Exception):
                if self.conn.is_open:
                    self.conn.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _note_node(self) -> None:
        if len(self.cfg.endpoints) > 1:
            self.say(f"connected to {getattr(self.conn, 'queuejob_endpoint', '?')}")

    def _serve(self) -> int:
        self._setup()
        if self.call is not None:
            threading.Thread(target=self._keep, name="queuejob-keeper", daemon=True).start()
        return self._loop()

    def _setup(self) -> None:
        """Open the publisher's and the work channel on the connection and start consuming
        (unless a failure already stopped that)."""
        conn = self.conn
        pub = conn.channel()
        records = True
        try:
            pub.queue_declare(self.qs.results_name, passive=True)
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            records = False
            self.say(
                f"warning: no results queue {self.qs.results_name!r}: outcome records are not "
                "published (queuejob declares it; a plain work queue works without it)"
            )
            pub = conn.channel()
        self.out = OutcomePublisher(
            conn=conn, results_name=self.qs.results_name, records=records, say=self.say
        )
        self.out.confirm_mode(
            pub,
            timeout_s=max(10.0, self.opts.connect_timeout_s),
            io=self._io,
            where=self.cfg.describe(),
        )
        work = conn.channel()
        try:
            work.queue_declare(self.qs.name, passive=True)
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise Usage(
                    f"queue {self.qs.name!r} does not exist on {self.cfg.describe()}; check QUEUE "
                    "(the flow declares the queue before it creates the Job)"
                ) from None
            raise
        work.basic_qos(prefetch_count=self.prefetch)
        self.work = work
        if self.gen and (self.failed or (self.opts.mode == "coarse" and self.processed)):
            # Stopping after a failure, or a coarse worker that had its one item: take no new
            # messages on the new connection.
            return
        self.consumer_tag = work.basic_consume(self.qs.name, self._on_delivery, auto_ack=False)

    def _recover(self, exc: BaseException) -> None:
        """A lost connection: forget what the dead one held (the broker delivers those messages
        again), connect again within ``--reconnect-timeout`` and set up as at the start. Raises
        the error when the window is 0 and `BrokerUnavailable` when no node answered in it."""
        if self.opts.reconnect_timeout_s <= 0:
            raise exc
        held = self.held
        self.say(
            f"lost the connection to the broker ({type(exc).__name__}: {exc}); the "
            f"{held} message(s) held unacked go back to the queue and come again as a further "
            f"attempt; connecting again for up to {self.opts.reconnect_timeout_s:g} s"
        )
        with contextlib.suppress(Exception):
            self.conn.close()
        self.deliveries.clear()
        self.held = 0
        self.consumer_tag = None
        self.lost = None
        self.gen += 1
        self.conn = connect(self.cfg, deadline_s=self.opts.reconnect_timeout_s)
        self._setup()
        self.say(
            f"connected again to {getattr(self.conn, 'queuejob_endpoint', self.cfg.describe())}"
        )

    def _keep(self) -> None:
        """While a ``--call`` function runs on the main thread for longer than a moment, serve
        the connection in its place: heartbeats, deliveries, confirms and the acks they allow.
        On a signal mid-call, do what the main thread would: record the item ``interrupted``,
        settle what is done, and end the process (a Python function cannot be stopped). Past
        the item timeout, the same with the item recorded ``failed`` and rejected for
        redelivery, and exit 1."""
        timeout = self.opts.item_timeout_s
        while True:
            time.sleep(_TICK_S)
            calling = self.calling
            if calling is None:
                continue
            elapsed = time.monotonic() - calling[1]
            late = timeout is not None and elapsed >= timeout
            if self.signal is None and not late and elapsed < _KEEP_AFTER_S:
                continue
            if not self.io.acquire(blocking=False):
                continue  # the call just ended
            try:
                if self.calling is None:
                    continue
                if self.signal is not None or late:
                    if self.signal is not None:
                        code = self._stop_on_signal(self.calling)
                    else:
                        code = self._stop_on_call_timeout(self.calling)
                    with contextlib.suppress(Exception):
                        self.conn.close()
                    for stream in (sys.stdout, sys.stderr):
                        with contextlib.suppress(Exception):
                            stream.flush()
                    os._exit(code)
                if self.lost is None:
                    self._io(time_limit=0)
                    self._settle()
            except LOST as exc:  # the main thread connects again once the call is over
                self.lost = exc
            except Exception as exc:  # the main thread meets the same error after the call
                self.say(f"warning: serving the connection during a call: {exc!r}")
                return
            finally:
                self.io.release()

    # -- the broker's deliveries (noted here; the loop acts) -------------------------------------

    def _on_delivery(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.deliveries.append((method, props, body))
        self.held += 1

    def _cancel(self) -> None:
        """Take no more messages. pika rejects (requeues) deliveries not yet handed to us."""
        if self.consumer_tag is not None:
            tag, self.consumer_tag = self.consumer_tag, None
            if self.lost is None:
                self.work.basic_cancel(tag)

    # -- the connection and settling -------------------------------------------------------------

    def _io(self, time_limit: float) -> None:
        """Send what is buffered and take what arrived (callbacks run), for up to ``time_limit``."""
        # pika writes each frame with its own send(), three per record: join them first.
        coalesce_pending_frames(self.conn._impl)
        self.conn.process_data_events(time_limit=time_limit)

    def _settle(self) -> None:
        """Settle the messages whose records are confirmed (see `OutcomePublisher.settle`).

        After a failed item, while the consumer still runs, nothing is settled: an ack would
        let the broker send more, and a message in flight when the consumer is cancelled goes
        back to the queue with its delivery count raised, though no one started it."""
        if self.failed and self.consumer_tag is not None:
            return
        self.held -= self.out.settle(self.work)

    def _drain(self, timeout_s: float = _DRAIN_S) -> None:
        """Wait until every publish is confirmed and its message settled (or the time is up:
        what is left stays unacked and is redelivered)."""
        deadline = time.monotonic() + timeout_s
        self._settle()
        while self.out.settling and time.monotonic() < deadline:
            try:
                self._io(time_limit=_TICK_S)
                self._settle()
            except LOST as exc:
                # The records not confirmed may be lost with the connection: their messages
                # were not acked, and come again. Publish nothing more on a dead connection.
                self.say(f"warning: lost the connection while settling ({exc!r})")
                self.lost_items += len(self.out.settling)
                self.out.settling.clear()
                break
        if self.out.settling:
            self.say(
                f"warning: {len(self.out.settling)} outcome record(s) not confirmed within "
                f"{timeout_s:g} s; their items stay unacked and will be redelivered"
            )

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> int:
        idle_since = time.monotonic()
        since_poll = 0
        while True:
            try:
                if self.signal is not None:
                    return self._stop_on_signal(None)
                if self.out.refused is not None:
                    return self._stop_refused()
                if self.deliveries:
                    delivery = self.deliveries.popleft()
                    if self.opts.mode == "coarse":
                        self._cancel()
                    code = self._handle(*delivery)
                    if code is not None:
                        return code
                    if self.opts.mode == "coarse":
                        return self._finish()
                    idle_since = time.monotonic()
                    since_poll += 1
                    # Confirms and deliveries are read between items: always when the window we
                    # hold is used up, else now and then, so acks keep the window moving.
                    if not self.deliveries or since_poll >= _POLL_EVERY:
                        since_poll = 0
                        self._io(time_limit=0)
                        self._settle()
                    continue
                if self.failed and self.consumer_tag is not None:
                    # After a failure: do the messages the broker already sent, then stop. With
                    # nothing acked since, it sends no more once the window is full; short of that,
                    # a quiet moment means the queue has no more for us.
                    if self.held < self.prefetch:
                        self._io(time_limit=_QUIET_S)
                        if self.deliveries:
                            continue
                    self._cancel()
                if self.failed or self.consumer_tag is None:
                    return self._finish()
                if (
                    self.out.settling
                ):  # records in flight: wait for their confirms, not for the idle time
                    self._io(time_limit=_TICK_S)
                    self._settle()
                    idle_since = time.monotonic()
                    continue
                remaining = self.opts.idle_timeout_s - (time.monotonic() - idle_since)
                if remaining <= 0:
                    self._cancel()
                    return self._idle_exit(time.monotonic() - idle_since)
                self._io(time_limit=min(remaining, _TICK_S))
                self._settle()
            except LOST as exc:
                self._recover(exc)
                idle_since = time.monotonic()

    def _finish(self) -> int:
        """Every item taken is done: settle them all and say how it went."""
        self._drain()
        if self.out.refused is not None:
            return self._stop_refused()
        if self.opts.mode == "coarse" and self.lost_items:
            self.say(
                "error: the message of this pod's item went back to the queue with the lost "
                "connection (it comes again, to another pod): exiting 3 so that the Job starts "
                "a pod for it"
            )
            return EXIT_BROKER
        if self.opts.mode == "fine":
            self.say(
                f"done: {self.processed} item(s), {self.failed} failed; a failed item stops the "
                "worker once the items it holds are done"
            )
        return EXIT_ITEM_FAILED if self.failed else EXIT_OK

    def _idle_exit(self, idle_s: float) -> int:
        if self.processed == 0:
            self.out.publish_record(
                OutcomeRecord(
                    run_id=self.run_id,
                    status=NO_WORK,
                    attempt=0,
                    pod=self.pod,
                    exit_code=EXIT_OK,
                    duration_s=round(idle_s, 3),
                    ts=time.time(),
                )
            )
            self._drain()
            self.say(
                f"no work: queue {self.qs.name!r} stayed empty for {self.opts.idle_timeout_s:g} s"
            )
        else:
            self._drain()
            self.say(
                f"done: {self.processed} item(s); the queue stayed empty for "
                f"{self.opts.idle_timeout_s:g} s"
            )
        return self._stop_refused() if self.out.refused is not None else EXIT_OK

    def _stop_refused(self) -> int:
        self._cancel()
        self.say(
            f"error: the broker refused the outcome record of item {self.out.refused!r} "
            f"(basic.nack: is {self.qs.results_name!r} at a max-length with overflow "
            "reject-publish?); that item and the ones after it that were not settled stay "
            "unacked and will be redelivered"
        )
        self._drain(_SIGNAL_DRAIN_S)
        return EXIT_BROKER

    def _stop_on_signal(self, current: tuple[Item, float] | None) -> int:
        """SIGTERM/SIGINT: stop the running item, record it and every message held but not
        started as ``interrupted`` and leave them unacked; settle what is done; exit."""
        assert self.signal is not None
        with contextlib.suppress(Exception):
            self._io(time_limit=0)  # hand over what already arrived
        self._cancel()
        held = list(self.deliveries)
        self.deliveries.clear()
        where = f"item {current[0].item_id!r}" if current else "between items"
        self.say(
            f"stopping on signal {self.signal} ({where}); {len(held)} more message(s) held "
            "unstarted: all stay unacked and will be redelivered"
        )
        if current is not None:
            item, started = current
            res = None
            if self.executor is not None:  # a stopped command's exit code and stderr
                self.executor.stop(self.opts.grace_s)
                res = self.executor.result(1.0)
        if self.lost is not None:
            return _signal_exit(self.signal)  # no connection: everything held comes again
        with contextlib.suppress(*LOST):
            if current is not None:
                self.out.publish_record(item.record(INTERRUPTED, res, time.monotonic() - started))
            for method, props, body in held:
                del method
                item = Item.of(props, body, self.run_id, self.pod)
                note = f"not started: the worker stopped on signal {self.signal}\n"
                self.out.publish_record(item.record(INTERRUPTED, None, 0.0, note))
        self._drain(_SIGNAL_DRAIN_S)
        return _signal_exit(self.signal)

    def _stop_on_call_timeout(self, current: tuple[Item, float]) -> int:
        """A ``--call`` past the item timeout (it cannot be stopped): record it ``failed`` and
        reject it for redelivery, record every message held but not started ``interrupted``
        and leave them unacked, settle what is done; the caller then ends the process."""
        assert self.call_delivery is not None and self.opts.item_timeout_s is not None
        item, started = current
        method, props, body = self.call_delivery
        with contextlib.suppress(Exception):
            self._io(time_limit=0)
        self._cancel()
        held = list(self.deliveries)
        self.deliveries.clear()
        note = timeout_note(
            self.opts.item_timeout_s,
            "a --call function cannot be stopped: the worker exits so that the pod ends and "
            "the Job replaces it",
        )
        sys.stderr.write(note)
        self.processed += 1
        self.failed += 1
        res = Result(EXIT_TIMED_OUT, note, timed_out=True)
        self._reject_failed(item, method, props, body, res, time.monotonic() - started)
        for _method, h_props, h_body in held:
            other = Item.of(h_props, h_body, self.run_id, self.pod)
            why = "not started: the worker stopped after a --call timed out\n"
            self.out.publish_record(other.record(INTERRUPTED, None, 0.0, why))
        self._drain(_SIGNAL_DRAIN_S)
        return EXIT_ITEM_FAILED

    def _handle(self, method: Any, props: Any, body: bytes) -> int | None:
        item = Item.of(props, body, self.run_id, self.pod)
        env: dict[str, str] = {}
        result_file: str | None = None
        if self.opts.call is None:
            env = dict(self.env)
            env.update(
                QUEUEJOB_ITEM_ID=item.item_id,
                QUEUEJOB_ITEM_INDEX="" if item.index is None else str(item.index),
                QUEUEJOB_ATTEMPT=str(item.attempt),
            )
            if self.result_dir is not None:
                self.result_files += 1
                result_file = os.path.join(self.result_dir, f"result-{self.result_files}")
                with contextlib.suppress(OSError):  # the command may still create it
                    os.close(os.open(result_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
                env[RESULT_FILE_ENV] = result_file
        if self.chatty:
            self.say(f"item {item.item_id!r} attempt {item.attempt}: started")
        started = time.monotonic()
        gen = self.gen
        if self.call is not None:
            self.calling = (item, started)
            self.call_delivery = (method, props, body)
            self.io.release()
            try:
                res: Result | None = call_item(self.call, body, self.opts.max_result_bytes)
            finally:
                self.io.acquire()
                self.calling = self.call_delivery = None
        else:
            assert self.executor is not None
            self.executor.submit(body, env, result_file)
            res = self.executor.result(_TICK_S)
            while res is None:
                if self.signal is not None:
                    return self._stop_on_signal((item, started))
                if self.lost is None:
                    try:
                        self._io(time_limit=0)
                        self._settle()
                    except LOST as exc:  # the item goes on; connect again once it is done
                        self.lost = exc
                res = self.executor.result(_TICK_S)
        assert res is not None
        duration = time.monotonic() - started
        self.processed += 1
        if self.lost is not None:
            self._recover(self.lost)
        if gen != self.gen:
            return self._orphaned(item, res, duration)
        if res.exit_code == 0:
            seq = self.out.publish_record(item.record(SUCCEEDED, res, duration))
            self.out.settle_after(seq, "ack", method.delivery_tag, item.item_id)
            if self.chatty:
                self.say(
                    f"item {item.item_id!r} attempt {item.attempt}: succeeded in {duration:.2f} s"
                )
            return None

        self.failed += 1
        self._reject_failed(item, method, props, body, res, duration)
        return None

    def _reject_failed(
        self, item: Item, method: Any, props: Any, body: bytes, res: Result, duration: float
    ) -> None:
        """Record a failed item, then reject it for redelivery once the record is confirmed
        (or count the failure in a copy, or dead-letter it, with ``--delivery-limit``)."""
        seq = self.out.publish_record(item.record(FAILED, res, duration))
        limit = self.opts.delivery_limit
        if limit is not None and item.attempt > limit:
            self.out.settle_after(seq, "dead", method.delivery_tag, item.item_id)
            fate = f"dead-lettered to {self.qs.dead_name!r} (limit {limit})"
        elif limit is not None:
            # Classic queues do not count deliveries: carry the count in a header on a fresh
            # copy, confirmed before the old copy is acked (a crash between gives a duplicate).
            headers = {k: v for k, v in item.headers.items() if not k.startswith("x-")}
            headers[HEADER_FAILURES] = item.failures + 1
            copy = pika.BasicProperties(
                content_type=props.content_type or ITEM_CONTENT_TYPE,
                delivery_mode=PERSISTENT,
                message_id=props.message_id,
                headers=headers,
            )
            self.out.settle_after(seq, "none", method.delivery_tag, item.item_id)
            seq = self.out.publish(self.qs.name, body, copy)
            self.out.settle_after(seq, "ack", method.delivery_tag, item.item_id)
            fate = "requeued for another attempt"
        else:
            self.out.settle_after(seq, "requeue", method.delivery_tag, item.item_id)
            fate = "rejected: the broker redelivers it, or dead-letters it past its delivery limit"
        how = (
            f"timed out after {self.opts.item_timeout_s:g} s"
            if res.timed_out
            else f"failed with exit code {res.exit_code} in {duration:.2f} s"
        )
        self.say(f"item {item.item_id!r} attempt {item.attempt}: {how}; {fate}")

    def _orphaned(self, item: Item, res: Result, duration: float) -> int | None:
        """An item whose message went back with a lost connection: record what it did on the
        new connection (the ledger shows this attempt and the next), settle nothing."""
        self.lost_items += 1
        status = SUCCEEDED if res.exit_code == 0 else FAILED
        self.out.publish_record(item.record(status, res, duration))
        if res.exit_code != 0:
            self.failed += 1
        self.say(
            f"item {item.item_id!r} attempt {item.attempt}: {status} in {duration:.2f} s, "
            "after its message went back with the lost connection: it comes again"
        )
        return None


def _signal_exit(signum: int) -> int:
    return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM


def main(argv: list[str] | None = None) -> int:
    """Run the worker with these arguments (``sys.argv[1:]`` when None); return the exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    pod = os.environ.get("POD_NAME") or socket.gethostname()
    try:
        opts = parse_args(args)
        url = os.environ.get("BROKER_URL", "").strip()
        name = os.environ.get("QUEUE", "").strip()
        if not url or not name:
            missing = [n for n, v in (("BROKER_URL", url), ("QUEUE", name)) if not v]
            raise Usage(f"set {' and '.join(missing)} in the environment (the Job sets both)")
        try:
            # A CA mounted by the Job (its template names a Secret or ConfigMap) wins over the
            # one the URL names.
            cfg = BrokerConfig(url, ca_file=os.environ.get(CA_FILE_ENV) or None)
            qs = QueueSettings(name)
        except QueueJobError as exc:
            raise Usage(str(exc)) from None
        fn = load_callable(opts.call) if opts.call else None
    except Usage as exc:
        print(f"[queuejob worker {pod}] error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except SystemExit as exc:  # argparse: --help (0) or a bad option (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    worker = Worker(
        cfg=cfg,
        qs=qs,
        run_id=os.environ.get("QUEUEJOB_RUN_ID", ""),
        pod=pod,
        opts=opts,
        call=fn,
    )
    return worker.run()
