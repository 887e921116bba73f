"""The pod worker: ``python -m queuejob.flows.worker`` (also ``queuejob worker``).

Takes work items from a RabbitMQ queue and runs a command on each, with the item's body on stdin
(the ``amqp-consume`` contract), or calls a Python function with the body::

    python -m queuejob.flows.worker [--mode coarse|fine] [--idle-timeout S] [--delivery-limit N]
                           [--prefetch N] [--item-timeout S] [--max-result-bytes N]
                           [--call module:function] [-- CMD ARGS...]

Environment: ``BROKER_URL`` (amqp://user:password@host:port/vhost) and ``QUEUE`` (the work queue)
are required, as in the Kubernetes docs' work-queue Job. ``QUEUEJOB_RUN_ID`` tags the outcome
records, ``POD_NAME`` (else the host name) names the pod in them, and
``QUEUEJOB_DELIVERY_LIMIT`` is the default of ``--delivery-limit``. The command runs with the
pod's environment minus ``BROKER_URL``, plus ``QUEUEJOB_ITEM_ID``, ``QUEUEJOB_ITEM_INDEX``,
``QUEUEJOB_ATTEMPT`` and ``QUEUEJOB_RESULT_FILE``; its stdout and stderr go to the pod's log.

Results: a ``--call`` function's return value is the item's result (a JSON value; ``bytes``
are taken as a command's file is; None is no result). A command's result is what it writes to
the file named by ``$QUEUEJOB_RESULT_FILE``, which the worker creates empty for each item (in
``$TMPDIR``, else /tmp) and reads once the command exits 0: its text, exactly as written, or,
for bytes that are not UTF-8, ``{"$base64": "..."}``; an empty file is no result. A succeeded
item's record carries its result. A result over ``--max-result-bytes`` (the JSON of a
``--call`` value, the file's bytes; default 65536), or a return value that is not
JSON-serialisable, fails the item (exit code 1 in its record) with a message saying so:
nothing is truncated; store large outputs elsewhere and return a reference to them.

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
* ``--item-timeout S``: a command still running after S seconds is stopped (SIGTERM to its
  process group, SIGKILL after ``--grace`` seconds) and its item is a failure like any other,
  recorded ``failed`` with exit code 124 and "timed out after S s", rejected for redelivery (so
  the delivery limit bounds a hanging item as it bounds a failing one). A ``--call`` function
  cannot be stopped: past the timeout the worker records its item ``failed`` ("timed out"),
  rejects it for redelivery once the record is confirmed, records every message held but not
  started ``interrupted``, and exits 1 without waiting for the function, so the pod ends and
  the Job replaces it.
* the queue stays empty for the idle timeout: publish a ``no_work`` record (only if this
  worker processed nothing) and exit 0. A pod never blocks forever.
* SIGTERM (or SIGINT): stop taking messages, stop the command (SIGTERM to its process group,
  SIGKILL after ``--grace`` seconds; a Python function cannot be stopped and is abandoned),
  publish an ``interrupted`` record for it and for every message held but not started (a
  quorum queue counts their return as a delivery, so the ledger sees each attempt), ack the
  items already done once their records are confirmed, close the connection without acking
  the rest (the broker redelivers them) and exit 143 (130).

A lost connection (a broker node that died or restarted, a balancer that dropped it): the
worker connects again, through the next node when ``BROKER_URL`` names several
(``amqp://user:pw@h1:5672,h2:5672/vhost``), for up to ``--reconnect-timeout`` seconds, and
carries on. The messages it held unacked go back to the queue: the broker delivers them again,
to it or another worker, and they show as a further attempt, never as a loss. An item running
when the connection went finishes, and its record is published on the new connection (its
message cannot be acked any more: it comes again). A coarse worker whose item's message went
back exits 3 after that record, so that the Job starts a pod for it. With a TLS broker
(``amqps://``) the CA bundle is ``QUEUEJOB_BROKER_CA_FILE`` (set by the Job when its template
names a CA Secret or ConfigMap), else the one the URL names, else the system's.

Records carry the item id (the message id), its index, the attempt (1 + the quorum queue's
``x-delivery-count`` + the worker's ``queuejob-failures``), the pod, the exit code, the
duration, the last lines of stderr and, for a succeeded item, its result.

Exit codes:

* 0: the item (coarse) or every item taken (fine) succeeded, or there was no work;
* 1: an item failed (or timed out); it was rejected for redelivery, or dead-lettered at its
  limit;
* 2: usage or configuration error: bad arguments, ``BROKER_URL``/``QUEUE`` missing or
  invalid, credentials or vhost refused, the queue does not exist, ``--call`` not importable.
  Retrying cannot fix it: queuejob's Job fails at once on it (its podFailurePolicy);
* 3: the broker could not be reached within ``--connect-timeout``, a lost connection could
  not be made again within ``--reconnect-timeout``, a coarse worker lost the message of its
  item, or the broker refused an outcome record (the unacked items are redelivered);
* 130 / 143: stopped by SIGINT / SIGTERM; the items held were left unacked.

This package imports neither prefect, kubernetes nor pydantic: a pod's start-up time counts once
per item in coarse mode.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from queuejob.flows.core.results import DEFAULT_MAX_RESULT_BYTES, MAX_RESULT_BYTES_CEILING

EXIT_OK = 0
EXIT_ITEM_FAILED = 1
EXIT_TIMED_OUT = 124  # a timed-out item's exit code in its record, as timeout(1) exits
EXIT_USAGE = 2
EXIT_BROKER = 3
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


# Fine mode's window (prefetch): enough messages to cover a publisher confirm's round trip.
DEFAULT_PREFETCH_CALL = 100  # a --call item may take microseconds
DEFAULT_PREFETCH_COMMAND = 2  # a command costs at least a process start: one more is enough


class Usage(Exception):
    """A usage or configuration problem: exit 2 with this message."""


@dataclass(frozen=True)
class Options:
    mode: str
    idle_timeout_s: float
    call: str | None
    command: list[str]
    delivery_limit: int | None
    connect_timeout_s: float
    grace_s: float
    prefetch: int
    reconnect_timeout_s: float = 60.0
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    item_timeout_s: float | None = None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m queuejob.flows.worker",
        description=__doc__,  # this module's docstring: the worker's whole contract
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
        "--max-result-bytes",
        type=int,
        default=DEFAULT_MAX_RESULT_BYTES,
        metavar="N",
        help="an item's result may be at most N bytes; a larger one fails the item (default: "
        f"{DEFAULT_MAX_RESULT_BYTES})",
    )
    parser.add_argument(
        "--item-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="an item still running after this long fails: a command is stopped, a --call "
        "ends the worker (default: no limit)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the broker at start-up (default: 30)",
    )
    parser.add_argument(
        "--reconnect-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="after a lost connection, how long to try to connect again (each node of "
        "BROKER_URL in turn) before exiting 3; 0 exits at once (default: "
        "$QUEUEJOB_RECONNECT_TIMEOUT, else 60)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="after SIGTERM, time the command gets before SIGKILL (default: 10)",
    )
    return parser


def parse_args(argv: list[str]) -> Options:
    if "--" in argv:
        cut = argv.index("--")
        own, command = argv[:cut], argv[cut + 1 :]
    else:
        own, command = argv, []
    parser = build_parser()
    ns, extra = parser.parse_known_args(own)
    if extra:
        raise Usage(
            f"unexpected arguments {extra!r}; put the command after '--', e.g. "
            "python -m queuejob.flows.worker -- ./process.sh"
        )
    if bool(ns.call) == bool(command):
        raise Usage("give exactly one of --call MODULE:FUNCTION and a command after '--'")
    if not ns.idle_timeout > 0:
        raise Usage(f"--idle-timeout must be positive (got {ns.idle_timeout})")
    limit = ns.delivery_limit
    if limit is None and os.environ.get("QUEUEJOB_DELIVERY_LIMIT", "").strip():
        raw = os.environ["QUEUEJOB_DELIVERY_LIMIT"].strip()
        try:
            limit = int(raw)
        except ValueError:
            raise Usage(f"QUEUEJOB_DELIVERY_LIMIT must be an integer (got {raw!r})") from None
    if limit is not None and limit < 0:
        raise Usage(f"--delivery-limit must be 0 or more (got {limit})")
    if ns.item_timeout is not None and not 0 < ns.item_timeout < float("inf"):
        raise Usage(f"--item-timeout must be a positive number of seconds (got {ns.item_timeout})")
    prefetch = ns.prefetch
    if prefetch is None:
        prefetch = DEFAULT_PREFETCH_CALL if ns.call else DEFAULT_PREFETCH_COMMAND
    if not 1 <= prefetch <= 65535:
        raise Usage(f"--prefetch must be between 1 and 65535 (got {prefetch})")
    reconnect = ns.reconnect_timeout
    if reconnect is None:
        raw = os.environ.get("QUEUEJOB_RECONNECT_TIMEOUT", "").strip() or "60"
        try:
            reconnect = float(raw)
        except ValueError:
            raise Usage(f"QUEUEJOB_RECONNECT_TIMEOUT must be a number (got {raw!r})") from None
    if not reconnect >= 0:
        raise Usage(f"--reconnect-timeout must be 0 or more (got {reconnect})")
    if not 0 <= ns.max_result_bytes <= MAX_RESULT_BYTES_CEILING:
        raise Usage(
            f"--max-result-bytes must be between 0 and {MAX_RESULT_BYTES_CEILING} (got "
            f"{ns.max_result_bytes}); store larger outputs elsewhere and return a reference"
        )
    return Options(
        reconnect_timeout_s=reconnect,
        mode=ns.mode,
        idle_timeout_s=ns.idle_timeout,
        call=ns.call,
        command=command,
        delivery_limit=limit,
        connect_timeout_s=max(0.0, ns.connect_timeout),
        grace_s=max(0.0, ns.grace),
        prefetch=prefetch,
        max_result_bytes=ns.max_result_bytes,
        item_timeout_s=ns.item_timeout,
    )


def load_callable(spec: str) -> Callable[[bytes], Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise Usage(f"--call {spec!r} must look like 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except Exception as exc:
        raise Usage(
            f"--call {spec!r} cannot be loaded ({type(exc).__name__}: {exc}); check that the "
            "module is installed in the image and the function name is right"
        ) from None
    if not callable(target):
        raise Usage(f"--call {spec!r} is not callable")
    return target  # type: ignore[no-any-return]
