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

Modules: `options` (the command line and exit codes), `loop` (the consumer loop, signals and
`main`), `runner` (running one item: a ``--call`` function or a command) and `outcomes` (the
outcome publisher: pipelined record confirms, then acks in delivery order).
"""

from __future__ import annotations

from flows.worker.loop import main
from flows.worker.options import (
    EXIT_BROKER,
    EXIT_ITEM_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
)

__all__ = [
    "EXIT_BROKER",
    "EXIT_ITEM_FAILED",
    "EXIT_OK",
    "EXIT_SIGINT",
    "EXIT_SIGTERM",
    "EXIT_USAGE",
    "main",
]
