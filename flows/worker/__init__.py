"""The pod worker: ``python -m flows.worker`` (also ``queuejob worker``).

Takes work items from a RabbitMQ queue and runs a command on each, with the item's body on stdin
(the ``amqp-consume`` contract), or calls a Python function with the body::

    python -m flows.worker [--mode coarse|fine] [--idle-timeout S] [--delivery-limit N]
                           [--call module:function] [-- CMD ARGS...]

Environment: ``BROKER_URL`` (amqp://user:password@host:port/vhost) and ``QUEUE`` (the work queue)
are required, as in the Kubernetes docs' work-queue Job. ``QUEUEJOB_RUN_ID`` tags the outcome
records, ``POD_NAME`` (else the host name) names the pod in them, and
``QUEUEJOB_DELIVERY_LIMIT`` is the default of ``--delivery-limit``. The command runs with the
pod's environment minus ``BROKER_URL``, plus ``QUEUEJOB_ITEM_ID``, ``QUEUEJOB_ITEM_INDEX`` and
``QUEUEJOB_ATTEMPT``; its stdout and stderr go to the pod's log.

Per item:

* coarse mode (default): take one message (prefetch 1) and exit; fine mode: keep taking
  messages until the queue has been empty for the idle timeout.
* success (exit 0, or the function returns): publish a ``succeeded`` record to
  ``<queue>.results`` (persistent, confirmed) and only then ack the message. A crash in between
  gives a duplicate record, never a lost one.
* failure: publish a ``failed`` record (with the exit code and the end of stderr), reject the
  message so the broker redelivers it, and exit 1 so the Job's backoffLimit sees the failure.
  A quorum queue's ``x-delivery-limit`` dead-letters an item returned more than that many
  times. Classic queues have no such limit: with ``--delivery-limit N`` the worker counts
  failures itself (it republishes the message with a ``queuejob-failures`` header and acks the
  old copy) and rejects the message without requeue, into ``<queue>.dead``, once it failed
  N + 1 times. That count only sees failures a worker reports: a pod killed mid-item is
  bounded by quorum queues alone, which is why they are the default.
* the queue stays empty for the idle timeout: publish a ``no_work`` record (only if this
  worker processed nothing) and exit 0. A pod never blocks forever.
* SIGTERM (or SIGINT): stop taking messages, stop the command (SIGTERM to its process group,
  SIGKILL after ``--grace`` seconds), publish an ``interrupted`` record, close the connection
  without acking (the broker redelivers the item) and exit 143 (130).

Records carry the item id (the message id), its index, the attempt (1 + the quorum queue's
``x-delivery-count`` + the worker's ``queuejob-failures``), the pod, the exit code, the
duration and the last lines of stderr.

Exit codes:

* 0: the item (coarse) or every item taken (fine) succeeded, or there was no work;
* 1: an item failed; it was rejected for redelivery, or dead-lettered at its limit;
* 2: usage or configuration error: bad arguments, ``BROKER_URL``/``QUEUE`` missing or
  invalid, credentials or vhost refused, the queue does not exist, ``--call`` not importable;
* 3: the broker could not be reached within ``--connect-timeout``, or the connection was lost
  mid-item (the item is redelivered);
* 130 / 143: stopped by SIGINT / SIGTERM; the current item was left unacked.

This package imports neither prefect, kubernetes nor pydantic: a pod's start-up time counts once
per item in coarse mode.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import os
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
    return _Options(
        mode=ns.mode,
        idle_timeout_s=ns.idle_timeout,
        call=ns.call,
        command=command,
        delivery_limit=limit,
        connect_timeout_s=max(0.0, ns.connect_timeout),
        grace_s=max(0.0, ns.grace),
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


def _tail(lines: deque[str]) -> str:
    text = "".join(lines)
    return text[-TAIL_CHARS:]


class _Runner:
    """Runs one item in the background and wakes the broker loop when it is done."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.exit_code: int | None = None
        self.tail = ""

    def start(self, body: bytes, env: dict[str, str], wake: Callable[[], None]) -> None:
        raise NotImplementedError

    def stop(self, grace_s: float) -> None:
        """Stop the item early (SIGTERM): best effort, returns when it has ended or given up."""


class _CommandRunner(_Runner):
    def __init__(self, argv: list[str]) -> None:
        super().__init__()
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, body: bytes, env: dict[str, str], wake: Callable[[], None]) -> None:
        try:
            # Its own process group, so a stop reaches the command's children too.
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            self.exit_code = 127 if isinstance(exc, FileNotFoundError) else 126
            self.tail = f"cannot run {self.argv[0]!r}: {exc.strerror or exc}\n"
            sys.stderr.write(self.tail)
            self.done.set()
            wake()
            return
        self.proc = proc
        lines: deque[str] = deque(maxlen=TAIL_LINES)

        def feed() -> None:
            assert proc.stdin is not None
            # A command that does not read stdin closes it early: that is not a failure.
            with contextlib.suppress(BrokenPipeError, OSError):
                proc.stdin.write(body)
            with contextlib.suppress(BrokenPipeError, OSError):
                proc.stdin.close()

        def read_stderr() -> None:
            assert proc.stderr is not None
            out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
            for raw in iter(proc.stderr.readline, b""):
                lines.append(raw.decode("utf-8", "replace"))
                if out is not None:
                    with contextlib.suppress(OSError, ValueError):
                        out.write(raw)
                        out.flush()

        def wait() -> None:
            code = proc.wait()
            # A background grandchild may keep stderr open: do not wait for it forever.
            reader.join(timeout=2.0)
            self.exit_code = code
            self.tail = _tail(lines)
            self.done.set()
            wake()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        threading.Thread(target=feed, daemon=True).start()
        threading.Thread(target=wait, daemon=True).start()

    def stop(self, grace_s: float) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        if not self.done.wait(grace_s):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.done.wait(5.0)


class _CallRunner(_Runner):
    def __init__(self, fn: Callable[[bytes], Any]) -> None:
        super().__init__()
        self.fn = fn

    def start(self, body: bytes, env: dict[str, str], wake: Callable[[], None]) -> None:
        def call() -> None:
            try:
                self.fn(body)
                self.exit_code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                self.exit_code = code
                if code:
                    self.tail = f"SystemExit({exc.code!r})\n"
            except BaseException:
                text = traceback.format_exc()
                sys.stderr.write(text)
                self.exit_code = 1
                self.tail = _tail(deque(text.splitlines(keepends=True), maxlen=TAIL_LINES))
            finally:
                self.done.set()
                wake()

        # A daemon thread: on SIGTERM a Python function cannot be interrupted, so the process
        # exits without it (the message is redelivered).
        threading.Thread(target=call, daemon=True).start()


class _Worker:
    def __init__(
        self,
        *,
        cfg: BrokerConfig,
        qs: QueueSettings,
        run_id: str,
        pod: str,
        opts: _Options,
        runner_factory: Callable[[], _Runner],
    ) -> None:
        self.cfg = cfg
        self.qs = qs
        self.run_id = run_id
        self.pod = pod
        self.opts = opts
        self.runner_factory = runner_factory
        self.signal: int | None = None
        self.pending: deque[tuple[Any, Any, bytes]] = deque()
        self.records = True
        self.conn: Any = None
        self.work: Any = None
        self.pub: Any = None
        self.consumer_tag: str | None = None

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
                f"({type(exc).__name__}: {exc}); the item, if any, will be redelivered"
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
        pub.confirm_delivery()
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
        work.basic_qos(prefetch_count=1)
        self.work = work
        self.consumer_tag = work.basic_consume(self.qs.name, self._on_delivery, auto_ack=False)
        return self._loop()

    def _on_delivery(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.pending.append((method, props, body))

    def _cancel(self) -> None:
        if self.consumer_tag is not None:
            tag, self.consumer_tag = self.consumer_tag, None
            # pika requeues any delivery not yet handed to us.
            self.work.basic_cancel(tag)

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> int:
        processed = 0
        idle_since = time.monotonic()
        while True:
            if self.signal is not None:
                self._cancel()
                self.say(f"stopping on signal {self.signal} while idle")
                return _signal_exit(self.signal)
            if self.pending:
                delivery = self.pending.popleft()
                if self.opts.mode == "coarse":
                    self._cancel()
                code = self._handle(*delivery)
                processed += 1
                if code is not None:
                    return code
                if self.opts.mode == "coarse":
                    return EXIT_OK
                idle_since = time.monotonic()
                continue
            remaining = self.opts.idle_timeout_s - (time.monotonic() - idle_since)
            if remaining <= 0:
                self._cancel()
                if processed == 0:
                    self._publish_record(
                        OutcomeRecord(
                            run_id=self.run_id,
                            status=NO_WORK,
                            attempt=0,
                            pod=self.pod,
                            exit_code=EXIT_OK,
                            duration_s=round(time.monotonic() - idle_since, 3),
                            ts=time.time(),
                        )
                    )
                    self.say(
                        f"no work: queue {self.qs.name!r} stayed empty for "
                        f"{self.opts.idle_timeout_s:g} s"
                    )
                else:
                    self.say(
                        f"done: {processed} item(s); the queue stayed empty for "
                        f"{self.opts.idle_timeout_s:g} s"
                    )
                return EXIT_OK
            self.conn.process_data_events(time_limit=min(remaining, _TICK_S))

    def _handle(self, method: Any, props: Any, body: bytes) -> int | None:
        headers: dict[str, Any] = dict(props.headers or {})
        item_id = props.message_id or f"msg-{hashlib.blake2b(body, digest_size=6).hexdigest()}"
        index = headers.get(HEADER_INDEX)
        index = index if isinstance(index, int) else None
        run_id = _text(headers.get(HEADER_RUN_ID)) or self.run_id
        failures = _int(headers.get(HEADER_FAILURES))
        attempt = _int(headers.get(HEADER_DELIVERY_COUNT)) + failures + 1
        env = {k: v for k, v in os.environ.items() if k != "BROKER_URL"}
        env.update(
            QUEUEJOB_ITEM_ID=item_id,
            QUEUEJOB_ITEM_INDEX="" if index is None else str(index),
            QUEUEJOB_ATTEMPT=str(attempt),
        )
        self.say(f"item {item_id!r} attempt {attempt}: started")
        started = time.monotonic()
        runner = self.runner_factory()
        conn = self.conn
        runner.start(body, env, lambda: conn.add_callback_threadsafe(_noop))
        try:
            while not runner.done.is_set() and self.signal is None:
                conn.process_data_events(time_limit=_TICK_S)
        except BaseException:
            runner.stop(self.opts.grace_s)
            raise

        def record(status: str) -> OutcomeRecord:
            return OutcomeRecord(
                run_id=run_id,
                status=status,
                item_id=item_id,
                index=index,
                attempt=attempt,
                pod=self.pod,
                exit_code=runner.exit_code,
                duration_s=round(time.monotonic() - started, 3),
                stderr_tail=runner.tail,
                ts=time.time(),
            )

        if not runner.done.is_set():  # a signal arrived mid-item
            self._cancel()
            self.say(
                f"item {item_id!r}: signal {self.signal}, stopping the command; the "
                "message stays unacked and will be redelivered"
            )
            runner.stop(self.opts.grace_s)
            with contextlib.suppress(Exception):
                self._publish_record(record(INTERRUPTED))
            assert self.signal is not None
            return _signal_exit(self.signal)

        duration = time.monotonic() - started
        if runner.exit_code == 0:
            self._publish_record(record(SUCCEEDED))
            self.work.basic_ack(method.delivery_tag)
            self.say(f"item {item_id!r} attempt {attempt}: succeeded in {duration:.2f} s")
            return None

        self._publish_record(record(FAILED))
        limit = self.opts.delivery_limit
        if limit is not None and attempt > limit:
            self.work.basic_reject(method.delivery_tag, requeue=False)
            fate = f"dead-lettered to {self.qs.dead_name!r} (limit {limit})"
        elif limit is not None:
            # Classic queues do not count deliveries: carry the count in a header on a fresh
            # copy, confirmed before the old copy is acked (a crash between gives a duplicate).
            headers = {k: v for k, v in headers.items() if not k.startswith("x-")}
            headers[HEADER_FAILURES] = failures + 1
            copy = pika.BasicProperties(
                content_type=props.content_type or ITEM_CONTENT_TYPE,
                delivery_mode=PERSISTENT,
                message_id=props.message_id,
                headers=headers,
            )
            self.pub.basic_publish("", self.qs.name, body, copy, mandatory=True)
            self.work.basic_ack(method.delivery_tag)
            fate = "requeued for another attempt"
        else:
            self.work.basic_reject(method.delivery_tag, requeue=True)
            fate = "rejected: the broker redelivers it, or dead-letters it past its delivery limit"
        self.say(
            f"item {item_id!r} attempt {attempt}: failed with exit code {runner.exit_code} in "
            f"{duration:.2f} s; {fate}"
        )
        return EXIT_ITEM_FAILED

    def _publish_record(self, rec: OutcomeRecord) -> None:
        if not self.records:
            return
        props = pika.BasicProperties(content_type=RECORD_CONTENT_TYPE, delivery_mode=PERSISTENT)
        try:
            self.pub.basic_publish("", self.qs.results_name, rec.to_json(), props, mandatory=True)
        except pex.UnroutableError:
            self.records = False
            self.say(f"warning: results queue {self.qs.results_name!r} is gone; records off")


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
        queue = os.environ.get("QUEUE", "").strip()
        if not url or not queue:
            missing = [n for n, v in (("BROKER_URL", url), ("QUEUE", queue)) if not v]
            raise _Usage(f"set {' and '.join(missing)} in the environment (the Job sets both)")
        try:
            cfg = BrokerConfig(url)
            qs = QueueSettings(queue)
        except QueueJobError as exc:
            raise _Usage(str(exc)) from None
        runner_factory: Callable[[], _Runner]
        if opts.call:
            fn = _load_callable(opts.call)
            runner_factory = lambda: _CallRunner(fn)  # noqa: E731
        else:
            command = opts.command
            runner_factory = lambda: _CommandRunner(command)  # noqa: E731
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
        runner_factory=runner_factory,
    )
    return worker.run()


__all__ = ["main"]
