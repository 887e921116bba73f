"""The pod worker: ``python -m flows.worker`` (also ``queuejob worker``).

Takes work items from a RabbitMQ queue and runs a command on each, with the item's body on stdin
(the ``amqp-consume`` contract), or calls a Python function with the body::

    python -m flows.worker [--mode coarse|fine] [--idle-timeout S] [--delivery-limit N]
                           [--prefetch N] [--call module:function] [-- CMD ARGS...]

Environment: ``BROKER_URL`` (amqp://user:password@host:port/vhost) and ``QUEUE`` (the work queue)
are required, as in the Kubernetes docs' work-queue Job. ``QUEUEJOB_RUN_ID`` tags the outcome
records, ``POD_NAME`` (else the host name) names the pod in them, and
``QUEUEJOB_DELIVERY_LIMIT`` is the default of ``--delivery-limit``. The command runs with the
pod's environment minus ``BROKER_URL``, plus ``QUEUEJOB_ITEM_ID``, ``QUEUEJOB_ITEM_INDEX`` and
``QUEUEJOB_ATTEMPT``; its stdout and stderr go to the pod's log.

Per item:

* coarse mode (default): take one message (prefetch 1) and exit; fine mode: keep taking
  messages until the queue has been empty for the idle timeout, holding a window of up to
  ``--prefetch`` of them (default 100 with ``--call``, 2 with a command).
* A ``--call`` function is called on the worker's main thread; while a call lasts longer
  than a second, a keeper thread (one for the worker's life) serves the connection:
  heartbeats, acks, and a signal. A command runs as one process per item, fed and read by one
  long-lived thread while the main thread serves the connection. Nothing else is started per
  item.
* success (exit 0, or the function returns): publish a ``succeeded`` record to
  ``<queue>.results`` (persistent) and ack the message only once the broker confirmed the
  record. Records are pipelined (publisher confirms are not awaited one by one) and acks are
  batched (``multiple``) in delivery order. A crash in between gives a duplicate record, never
  a lost one. A record the broker refuses (basic.nack: a full results queue with
  ``x-overflow: reject-publish``) leaves its message unacked: the worker stops and exits 3,
  and the broker redelivers that item.
* failure: publish a ``failed`` record (with the exit code and the end of stderr), then reject
  the message so the broker redelivers it, and exit 1 so the Job's backoffLimit sees the
  failure. In fine mode the worker first finishes the messages it already holds (so none goes
  back with a raised delivery count), then exits 1.
  A quorum queue's ``x-delivery-limit`` dead-letters an item returned more than that many
  times. Classic queues have no such limit: with ``--delivery-limit N`` the worker counts
  failures itself (it republishes the message with a ``queuejob-failures`` header and acks the
  old copy) and rejects the message without requeue, into ``<queue>.dead``, once it failed
  N + 1 times. That count only sees failures a worker reports: a pod killed mid-item is
  bounded by quorum queues alone, which is why they are the default.
* the queue stays empty for the idle timeout: publish a ``no_work`` record (only if this
  worker processed nothing) and exit 0. A pod never blocks forever.
* SIGTERM (or SIGINT): stop taking messages, stop the command (SIGTERM to its process group,
  SIGKILL after ``--grace`` seconds; a Python function cannot be stopped and is abandoned),
  publish an ``interrupted`` record for it and for every message held but not started (a
  quorum queue counts their return as a delivery, so the ledger sees each attempt), ack the
  items already done once their records are confirmed, close the connection without acking
  the rest (the broker redelivers them) and exit 143 (130).

Records carry the item id (the message id), its index, the attempt (1 + the quorum queue's
``x-delivery-count`` + the worker's ``queuejob-failures``), the pod, the exit code, the
duration and the last lines of stderr.

Exit codes:

* 0: the item (coarse) or every item taken (fine) succeeded, or there was no work;
* 1: an item failed; it was rejected for redelivery, or dead-lettered at its limit;
* 2: usage or configuration error: bad arguments, ``BROKER_URL``/``QUEUE`` missing or
  invalid, credentials or vhost refused, the queue does not exist, ``--call`` not importable;
* 3: the broker could not be reached within ``--connect-timeout``, the connection was lost
  mid-item, or the broker refused an outcome record (the unacked items are redelivered);
* 130 / 143: stopped by SIGINT / SIGTERM; the items held were left unacked.

This package imports neither prefect, kubernetes nor pydantic: a pod's start-up time counts once
per item in coarse mode.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import queue
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions as pex
from pika import spec

from flows.adapters.broker import (
    HEADER_DELIVERY_COUNT,
    HEADER_FAILURES,
    HEADER_INDEX,
    HEADER_RUN_ID,
    ITEM_CONTENT_TYPE,
    PERSISTENT,
    RECORD_CONTENT_TYPE,
    BrokerConfig,
    QueueSettings,
    connect,
)
from flows.adapters.broker.frames import coalesce_pending_frames
from flows.core.errors import BrokerAuthError, BrokerUnavailable, QueueJobError
from flows.core.ledger import FAILED, INTERRUPTED, NO_WORK, SUCCEEDED, OutcomeRecord

EXIT_OK = 0
EXIT_ITEM_FAILED = 1
EXIT_USAGE = 2
EXIT_BROKER = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

TAIL_LINES = 20
TAIL_CHARS = 2000
_TICK_S = 0.25  # how often the loop looks at signals while it waits
# Fine mode's window (prefetch): enough messages to cover a publisher confirm's round trip.
DEFAULT_PREFETCH_CALL = 100  # a --call item may take microseconds
DEFAULT_PREFETCH_COMMAND = 2  # a command costs at least a process start: one more is enough
_KEEP_AFTER_S = 1.0  # a call running longer than this has the keeper serve the connection
_POLL_EVERY = 32  # items between looks at the connection while messages are held
_DRAIN_S = 30.0  # at the end, how long to wait for the last confirms
_SIGNAL_DRAIN_S = 5.0  # the same after a signal or a refused record
_QUIET_S = 0.25  # after a failure, no delivery for this long: the broker sent what it had
_PIPE_CHUNK = 65536
_ORPHAN_PIPE_S = 2.0  # after the command exits, how long a grandchild may hold its pipes


class _Usage(Exception):
    """A usage or configuration problem: exit 2 with this message."""


@dataclass(frozen=True)
class _Options:
    mode: str
    idle_timeout_s: float
    call: str | None
    command: list[str]
    delivery_limit: int | None
    connect_timeout_s: float
    grace_s: float
    prefetch: int


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--mode",
        choices=("coarse", "fine"),
        default="coarse",
        help="coarse: one item, then exit; fine: items until idle (default: coarse)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="exit 0 after the queue stayed empty this long (default: 10)",
    )
    parser.add_argument(
        "--call", metavar="MODULE:FUNCTION", help="call this function with the body (bytes)"
    )
    parser.add_argument(
        "--delivery-limit",
        type=int,
        default=None,
        metavar="N",
        help="dead-letter an item after N+1 failed attempts, counted by the worker (for classic "
        "queues; default: $QUEUEJOB_DELIVERY_LIMIT, else leave it to the broker)",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=None,
        metavar="N",
        help="fine mode: messages a worker holds at a time, the window its acks and outcome "
        f"records are pipelined in (default: {DEFAULT_PREFETCH_CALL} with --call, "
        f"{DEFAULT_PREFETCH_COMMAND} with a command; coarse mode always takes 1)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the broker at start-up (default: 30)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="after SIGTERM, time the command gets before SIGKILL (default: 10)",
    )
    return parser


def _parse(argv: list[str]) -> _Options:
    if "--" in argv:
        cut = argv.index("--")
        own, command = argv[:cut], argv[cut + 1 :]
    else:
        own, command = argv, []
    parser = _parser()
    ns, extra = parser.parse_known_args(own)
    if extra:
        raise _Usage(
            f"unexpected arguments {extra!r}; put the command after '--', e.g. "
            "python -m flows.worker -- ./process.sh"
        )
    if bool(ns.call) == bool(command):
        raise _Usage("give exactly one of --call MODULE:FUNCTION and a command after '--'")
    if not ns.idle_timeout > 0:
        raise _Usage(f"--idle-timeout must be positive (got {ns.idle_timeout})")
    limit = ns.delivery_limit
    if limit is None and os.environ.get("QUEUEJOB_DELIVERY_LIMIT", "").strip():
        raw = os.environ["QUEUEJOB_DELIVERY_LIMIT"].strip()
        try:
            limit = int(raw)
        except ValueError:
            raise _Usage(f"QUEUEJOB_DELIVERY_LIMIT must be an integer (got {raw!r})") from None
    if limit is not None and limit < 0:
        raise _Usage(f"--delivery-limit must be 0 or more (got {limit})")
    prefetch = ns.prefetch
    if prefetch is None:
        prefetch = DEFAULT_PREFETCH_CALL if ns.call else DEFAULT_PREFETCH_COMMAND
    if not 1 <= prefetch <= 65535:
        raise _Usage(f"--prefetch must be between 1 and 65535 (got {prefetch})")
    return _Options(
        mode=ns.mode,
        idle_timeout_s=ns.idle_timeout,
        call=ns.call,
        command=command,
        delivery_limit=limit,
        connect_timeout_s=max(0.0, ns.connect_timeout),
        grace_s=max(0.0, ns.grace),
        prefetch=prefetch,
    )


def _load_callable(spec: str) -> Callable[[bytes], Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise _Usage(f"--call {spec!r} must look like 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception as exc:
        raise _Usage(
            f"--call {spec!r} cannot be loaded ({type(exc).__name__}: {exc}); check that the "
            "module is installed in the image and the function name is right"
        ) from None
    if not callable(target):
        raise _Usage(f"--call {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def _tail(data: bytes | str) -> str:
    """The last lines of an item's stderr, for its outcome record."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return "".join(text.splitlines(keepends=True)[-TAIL_LINES:])[-TAIL_CHARS:]


@dataclass(frozen=True)
class _Result:
    """How one item ended: its exit code (0 for success) and the end of its stderr."""

    exit_code: int
    tail: str = ""


def _call_item(fn: Callable[[bytes], Any], body: bytes) -> _Result:
    """Call a ``--call`` function with one item's body."""
    try:
        fn(body)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return _Result(code, f"SystemExit({exc.code!r})\n" if code else "")
    except BaseException:
        text = traceback.format_exc()
        sys.stderr.write(text)
        return _Result(1, _tail(text))
    return _Result(0)


class _Executor:
    """One thread for the worker's whole life that runs the commands, one at a time.

    The main thread owns the broker connection: while a command runs it keeps serving
    heartbeats, deliveries and publisher confirms, however long the command takes, and it
    notices signals. Each command is one process, fed and read by this thread with a selector;
    nothing else is started per item.
    """

    def __init__(self, *, argv: list[str]) -> None:
        self._argv = argv
        self._jobs: queue.SimpleQueue[tuple[bytes, dict[str, str]]] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[_Result] = queue.SimpleQueue()
        self._proc: subprocess.Popen[bytes] | None = None
        self.busy = False
        threading.Thread(target=self._serve, name="queuejob-items", daemon=True).start()

    def submit(self, body: bytes, env: dict[str, str]) -> None:
        """Start one item; `result` returns its outcome."""
        self.busy = True
        self._jobs.put((body, env))

    def result(self, timeout_s: float) -> _Result | None:
        """The running item's outcome, or None if it is still running after ``timeout_s``."""
        try:
            res = self._results.get(timeout=timeout_s)
        except queue.Empty:
            return None
        self.busy = False
        return res

    def stop(self, grace_s: float) -> None:
        """Stop the running command (SIGTERM to its process group, SIGKILL after ``grace_s``).
        A Python function cannot be stopped: the process exits without waiting for it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)

    def _serve(self) -> None:
        while True:
            body, env = self._jobs.get()
            try:
                res = self._run(body, env)
            except BaseException as exc:  # never leave the main thread waiting
                res = _Result(1, f"queuejob worker: {type(exc).__name__}: {exc}\n")
            self._results.put(res)

    def _run(self, body: bytes, env: dict[str, str]) -> _Result:
        try:
            # Its own process group, so a stop reaches the command's children too.
            proc = subprocess.Popen(
                self._argv,
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            tail = f"cannot run {self._argv[0]!r}: {exc.strerror or exc}\n"
            sys.stderr.write(tail)
            return _Result(127 if isinstance(exc, FileNotFoundError) else 126, tail)
        self._proc = proc
        try:
            tail = _tail(self._pump(proc, body))
            return _Result(proc.returncode, tail)
        finally:
            self._proc = None

    @staticmethod
    def _pump(proc: subprocess.Popen[bytes], body: bytes) -> bytes:
        """Feed ``body`` to the command's stdin and copy its stderr to ours until it exits;
        return the end of its stderr."""
        assert proc.stdin is not None and proc.stderr is not None
        stdin, stderr = proc.stdin, proc.stderr
        out = getattr(sys.stderr, "buffer", None)
        kept = bytearray()
        pending = memoryview(body)
        exited_at: float | None = None
        with selectors.DefaultSelector() as sel:
            sel.register(stderr, selectors.EVENT_READ)
            if pending:
                os.set_blocking(stdin.fileno(), False)
                sel.register(stdin, selectors.EVENT_WRITE)
            else:
                stdin.close()
            while sel.get_map():
                for key, _events in sel.select(timeout=_TICK_S):
                    if key.fileobj is stdin:
                        try:
                            pending = pending[os.write(stdin.fileno(), pending[:_PIPE_CHUNK]) :]
                        except BlockingIOError:
                            continue
                        except OSError:  # a command that does not read stdin: not a failure
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(stdin)
                            with contextlib.suppress(OSError):
                                stdin.close()
                        continue
                    chunk = os.read(stderr.fileno(), _PIPE_CHUNK)
                    if not chunk:
                        sel.unregister(stderr)
                        continue
                    kept += chunk
                    del kept[: -4 * TAIL_CHARS]
                    if out is not None:
                        with contextlib.suppress(OSError, ValueError):
                            out.write(chunk)
                            out.flush()
                if exited_at is None and proc.poll() is not None:
                    exited_at = time.monotonic()
                # A background grandchild may keep a pipe open: do not wait for it forever.
                if exited_at is not None and time.monotonic() - exited_at > _ORPHAN_PIPE_S:
                    break
        for pipe in (stdin, stderr):
            with contextlib.suppress(OSError):
                pipe.close()
        proc.wait()
        return bytes(kept)


@dataclass
class _Settle:
    """What to do with a message once the publish numbered ``seq`` (and every one before it)
    is confirmed: ``ack``, ``requeue`` (reject, the broker redelivers), ``dead`` (reject without
    requeue: to the dead-letter queue) or ``none`` (a record whose action follows)."""

    seq: int
    action: str
    tag: int
    item: str


class _Worker:
    def __init__(
        self,
        *,
        cfg: BrokerConfig,
        qs: QueueSettings,
        run_id: str,
        pod: str,
        opts: _Options,
        call: Callable[[bytes], Any] | None,
    ) -> None:
        self.cfg = cfg
        self.qs = qs
        self.run_id = run_id
        self.pod = pod
        self.opts = opts
        self.call = call
        self.executor = _Executor(argv=opts.command) if call is None else None
        # A --call function runs on the main thread, which then lets go of the connection: a
        # keeper thread serves it (heartbeats, and a signal) while a call takes long.
        self.io = threading.Lock()
        self.io.acquire()
        self.calling: tuple[_Item, float] | None = None
        self.prefetch = 1 if opts.mode == "coarse" else opts.prefetch
        self.chatty = opts.mode == "coarse" or opts.call is None  # a log line per item
        self.signal: int | None = None
        self.deliveries: deque[tuple[Any, Any, bytes]] = deque()
        self.records = True
        self.conn: Any = None
        self.work: Any = None
        self.pub: Any = None
        self.consumer_tag: str | None = None
        # Publisher confirms, pipelined: publishes not yet confirmed (in order), the ones the
        # broker refused, confirm frames not yet looked at, and messages waiting to be settled.
        self.seq = 0
        self.unconfirmed: dict[int, None] = {}
        self.nacked: set[int] = set()
        self.confirms: deque[tuple[int, bool, bool]] = deque()
        self.settling: deque[_Settle] = deque()
        self.refused: str | None = None
        self.failed = 0
        self.processed = 0
        self.held = 0  # messages delivered and not yet acked or rejected
        # A command's environment: the pod's, minus the broker URL (a function gets the body only).
        self.env = {k: v for k, v in os.environ.items() if k != "BROKER_URL"}

    def say(self, message: str) -> None:
        print(f"[queuejob worker {self.pod}] {message}", file=sys.stderr, flush=True)

    def on_signal(self, signum: int, _frame: Any) -> None:
        if self.signal is None:
            self.signal = signum

    # -- setup -----------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.conn = connect(self.cfg, deadline_s=self.opts.connect_timeout_s)
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
        except _Usage as exc:
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

    def _serve(self) -> int:
        conn = self.conn
        pub = conn.channel()
        try:
            pub.queue_declare(self.qs.results_name, passive=True)
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            self.records = False
            self.say(
                f"warning: no results queue {self.qs.results_name!r}: outcome records are not "
                "published (queuejob declares it; a plain work queue works without it)"
            )
            pub = conn.channel()
        self._confirm_mode(pub)
        self.pub = pub
        work = conn.channel()
        try:
            work.queue_declare(self.qs.name, passive=True)
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise _Usage(
                    f"queue {self.qs.name!r} does not exist on {self.cfg.describe()}; check QUEUE "
                    "(the flow declares the queue before it creates the Job)"
                ) from None
            raise
        work.basic_qos(prefetch_count=self.prefetch)
        self.work = work
        self.consumer_tag = work.basic_consume(self.qs.name, self._on_delivery, auto_ack=False)
        if self.call is not None:
            threading.Thread(target=self._keep, name="queuejob-keeper", daemon=True).start()
        return self._loop()

    def _keep(self) -> None:
        """While a ``--call`` function runs on the main thread for longer than a moment, serve
        the connection in its place: heartbeats, deliveries, confirms and the acks they allow.
        On a signal mid-call, do what the main thread would: record the item ``interrupted``,
        settle what is done, and end the process (a Python function cannot be stopped)."""
        while True:
            time.sleep(_TICK_S)
            calling = self.calling
            if calling is None:
                continue
            if self.signal is None and time.monotonic() - calling[1] < _KEEP_AFTER_S:
                continue
            if not self.io.acquire(blocking=False):
                continue  # the call just ended
            try:
                if self.calling is None:
                    continue
                if self.signal is not None:
                    code = self._stop_on_signal(self.calling)
                    with contextlib.suppress(Exception):
                        self.conn.close()
                    for stream in (sys.stdout, sys.stderr):
                        with contextlib.suppress(Exception):
                            stream.flush()
                    os._exit(code)
                self._io(time_limit=0)
                self._settle()
            except Exception as exc:  # the main thread meets the same error after the call
                self.say(f"warning: serving the connection during a call: {exc!r}")
                return
            finally:
                self.io.release()

    def _confirm_mode(self, pub: Any) -> None:
        """Publisher confirms without waiting for each one: pika's blocking channel only offers
        a confirm per publish, so this talks to the channel underneath it (pika's own
        `Channel`), whose callbacks run inside ``process_data_events``."""
        impl = pub._impl  # pika's asynchronous Channel, which BlockingChannel wraps
        selected: list[bool] = []
        impl.confirm_delivery(self._on_confirm, callback=lambda _frame: selected.append(True))
        impl.add_on_return_callback(self._on_return)
        deadline = time.monotonic() + max(10.0, self.opts.connect_timeout_s)
        while not selected:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(
                    f"broker at {self.cfg.describe()} did not turn on publisher confirms"
                )
            self._io(time_limit=_TICK_S)
        self._publish_raw = impl.basic_publish

    # -- broker callbacks (they only take note; the loop acts) -----------------------------------

    def _on_delivery(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.deliveries.append((method, props, body))
        self.held += 1

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
            self.say(f"warning: results queue {self.qs.results_name!r} is gone; records off")

    def _cancel(self) -> None:
        """Take no more messages. pika rejects (requeues) deliveries not yet handed to us."""
        if self.consumer_tag is not None:
            tag, self.consumer_tag = self.consumer_tag, None
            self.work.basic_cancel(tag)

    # -- publishing and settling -----------------------------------------------------------------

    def _io(self, time_limit: float) -> None:
        """Send what is buffered and take what arrived (callbacks run), for up to ``time_limit``."""
        # pika writes each frame with its own send(), three per record: join them first.
        coalesce_pending_frames(self.conn._impl)
        self.conn.process_data_events(time_limit=time_limit)

    def _publish(self, routing_key: str, body: bytes, props: Any) -> int:
        self._publish_raw("", routing_key, body, props, mandatory=True)
        self.seq += 1
        self.unconfirmed[self.seq] = None
        return self.seq

    def _publish_record(self, rec: OutcomeRecord) -> int:
        """Publish a record (persistent, confirmed later); return the sequence number that
        must be confirmed before the item's message is settled."""
        if not self.records:
            return self.seq
        return self._publish(self.qs.results_name, _record_json(rec), _RECORD_PROPS)

    def _settle(self) -> None:
        """Act on the confirms that arrived: settle, in delivery order, each message whose
        publishes are confirmed, acking runs of them with one ``multiple`` ack.

        After a failed item, while the consumer still runs, nothing is settled: an ack would
        let the broker send more, and a message in flight when the consumer is cancelled goes
        back to the queue with its delivery count raised, though no one started it."""
        if self.failed and self.consumer_tag is not None:
            return
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
        while self.settling and self.settling[0].seq < oldest:
            entry = self.settling.popleft()
            if entry.seq in self.nacked:
                self.nacked.discard(entry.seq)
                if self.refused is None:
                    self.refused = entry.item
                continue  # left unacked: the broker redelivers it
            if entry.action == "none":
                continue
            self.held -= 1
            if entry.action == "ack" and self.refused is None:
                ack_upto = entry.tag  # every earlier message is settled already
                continue
            if ack_upto:
                self.work.basic_ack(ack_upto, multiple=True)
                ack_upto = 0
            if entry.action == "ack":
                self.work.basic_ack(entry.tag)
            else:
                self.work.basic_reject(entry.tag, requeue=entry.action == "requeue")
        if ack_upto:
            self.work.basic_ack(ack_upto, multiple=True)

    def _drain(self, timeout_s: float = _DRAIN_S) -> None:
        """Wait until every publish is confirmed and its message settled (or the time is up:
        what is left stays unacked and is redelivered)."""
        deadline = time.monotonic() + timeout_s
        self._settle()
        while self.settling and time.monotonic() < deadline:
            self._io(time_limit=_TICK_S)
            self._settle()
        if self.settling:
            self.say(
                f"warning: {len(self.settling)} outcome record(s) not confirmed within "
                f"{timeout_s:g} s; their items stay unacked and will be redelivered"
            )

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> int:
        idle_since = time.monotonic()
        since_poll = 0
        while True:
            if self.signal is not None:
                return self._stop_on_signal(None)
            if self.refused is not None:
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
            if self.settling:  # records in flight: wait for their confirms, not for the idle time
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

    def _finish(self) -> int:
        """Every item taken is done: settle them all and say how it went."""
        self._drain()
        if self.refused is not None:
            return self._stop_refused()
        if self.opts.mode == "fine":
            self.say(
                f"done: {self.processed} item(s), {self.failed} failed; a failed item stops the "
                "worker once the items it holds are done"
            )
        return EXIT_ITEM_FAILED if self.failed else EXIT_OK

    def _idle_exit(self, idle_s: float) -> int:
        if self.processed == 0:
            self._publish_record(
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
        return self._stop_refused() if self.refused is not None else EXIT_OK

    def _stop_refused(self) -> int:
        self._cancel()
        self.say(
            f"error: the broker refused the outcome record of item {self.refused!r} (basic.nack: "
            f"is {self.qs.results_name!r} at a max-length with overflow reject-publish?); that "
            "item and the ones after it that were not settled stay unacked and will be "
            "redelivered"
        )
        self._drain(_SIGNAL_DRAIN_S)
        return EXIT_BROKER

    def _stop_on_signal(self, current: tuple[_Item, float] | None) -> int:
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
            self._publish_record(item.record(INTERRUPTED, res, time.monotonic() - started))
        for method, props, body in held:
            del method
            item = _Item.of(props, body, self.run_id, self.pod)
            note = f"not started: the worker stopped on signal {self.signal}\n"
            self._publish_record(item.record(INTERRUPTED, None, 0.0, note))
        self._drain(_SIGNAL_DRAIN_S)
        return _signal_exit(self.signal)

    def _handle(self, method: Any, props: Any, body: bytes) -> int | None:
        item = _Item.of(props, body, self.run_id, self.pod)
        env: dict[str, str] = {}
        if self.opts.call is None:
            env = dict(self.env)
            env.update(
                QUEUEJOB_ITEM_ID=item.item_id,
                QUEUEJOB_ITEM_INDEX="" if item.index is None else str(item.index),
                QUEUEJOB_ATTEMPT=str(item.attempt),
            )
        if self.chatty:
            self.say(f"item {item.item_id!r} attempt {item.attempt}: started")
        started = time.monotonic()
        if self.call is not None:
            self.calling = (item, started)
            self.io.release()
            try:
                res: _Result | None = _call_item(self.call, body)
            finally:
                self.io.acquire()
                self.calling = None
        else:
            assert self.executor is not None
            self.executor.submit(body, env)
            res = self.executor.result(_TICK_S)
            while res is None:
                if self.signal is not None:
                    return self._stop_on_signal((item, started))
                self._io(time_limit=0)
                self._settle()
                res = self.executor.result(_TICK_S)
        assert res is not None
        duration = time.monotonic() - started
        self.processed += 1
        if res.exit_code == 0:
            seq = self._publish_record(item.record(SUCCEEDED, res, duration))
            self.settling.append(_Settle(seq, "ack", method.delivery_tag, item.item_id))
            if self.chatty:
                self.say(
                    f"item {item.item_id!r} attempt {item.attempt}: succeeded in {duration:.2f} s"
                )
            return None

        self.failed += 1
        seq = self._publish_record(item.record(FAILED, res, duration))
        limit = self.opts.delivery_limit
        if limit is not None and item.attempt > limit:
            self.settling.append(_Settle(seq, "dead", method.delivery_tag, item.item_id))
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
            self.settling.append(_Settle(seq, "none", method.delivery_tag, item.item_id))
            seq = self._publish(self.qs.name, body, copy)
            self.settling.append(_Settle(seq, "ack", method.delivery_tag, item.item_id))
            fate = "requeued for another attempt"
        else:
            self.settling.append(_Settle(seq, "requeue", method.delivery_tag, item.item_id))
            fate = "rejected: the broker redelivers it, or dead-letters it past its delivery limit"
        self.say(
            f"item {item.item_id!r} attempt {item.attempt}: failed with exit code "
            f"{res.exit_code} in {duration:.2f} s; {fate}"
        )
        return None


@dataclass(frozen=True)
class _Item:
    """What the worker knows of one delivered message."""

    item_id: str
    index: int | None
    attempt: int
    failures: int
    run_id: str
    pod: str
    headers: dict[str, Any]

    @classmethod
    def of(cls, props: Any, body: bytes, run_id: str, pod: str) -> _Item:
        headers: dict[str, Any] = dict(props.headers or {})
        index = headers.get(HEADER_INDEX)
        failures = _int(headers.get(HEADER_FAILURES))
        return cls(
            item_id=props.message_id or f"msg-{hashlib.blake2b(body, digest_size=6).hexdigest()}",
            index=index if isinstance(index, int) and not isinstance(index, bool) else None,
            attempt=_int(headers.get(HEADER_DELIVERY_COUNT)) + failures + 1,
            failures=failures,
            run_id=_text(headers.get(HEADER_RUN_ID)) or run_id,
            pod=pod,
            headers=headers,
        )

    def record(
        self, status: str, res: _Result | None, duration_s: float, note: str = ""
    ) -> OutcomeRecord:
        return OutcomeRecord(
            run_id=self.run_id,
            status=status,
            item_id=self.item_id,
            index=self.index,
            attempt=self.attempt,
            pod=self.pod,
            exit_code=res.exit_code if res is not None else None,
            duration_s=round(duration_s, 3),
            stderr_tail=res.tail if res is not None else note,
            ts=time.time(),
        )


_RECORD_PROPS = pika.BasicProperties(content_type=RECORD_CONTENT_TYPE, delivery_mode=PERSISTENT)
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(OutcomeRecord))


def _record_json(rec: OutcomeRecord) -> bytes:
    """``rec.to_json()``, the same bytes, without the deep copy of `dataclasses.asdict` (a
    worker writes thousands of records a second)."""
    return json.dumps({k: getattr(rec, k) for k in _RECORD_FIELDS}, separators=(",", ":")).encode()


def _noop() -> None:
    """Wakes the broker loop (scheduled from a runner thread)."""


def _signal_exit(signum: int) -> int:
    return EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def main(argv: list[str] | None = None) -> int:
    """Run the worker with these arguments (``sys.argv[1:]`` when None); return the exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    pod = os.environ.get("POD_NAME") or socket.gethostname()
    try:
        opts = _parse(args)
        url = os.environ.get("BROKER_URL", "").strip()
        name = os.environ.get("QUEUE", "").strip()
        if not url or not name:
            missing = [n for n, v in (("BROKER_URL", url), ("QUEUE", name)) if not v]
            raise _Usage(f"set {' and '.join(missing)} in the environment (the Job sets both)")
        try:
            cfg = BrokerConfig(url)
            qs = QueueSettings(name)
        except QueueJobError as exc:
            raise _Usage(str(exc)) from None
        fn = _load_callable(opts.call) if opts.call else None
    except _Usage as exc:
        print(f"[queuejob worker {pod}] error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except SystemExit as exc:  # argparse: --help (0) or a bad option (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    worker = _Worker(
        cfg=cfg,
        qs=qs,
        run_id=os.environ.get("QUEUEJOB_RUN_ID", ""),
        pod=pod,
        opts=opts,
        call=fn,
    )
    return worker.run()


__all__ = ["main"]
