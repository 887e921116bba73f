"""RabbitMQ adapter (pika): readiness, declaration, fill, depth, dead letters and results.

Modules:

* `config`: `BrokerConfig` (the URL, timeouts, redaction), `QueueSettings` (names and
  arguments of a work queue's queues) and the message headers.
* `connection`: connecting, `wait_for_broker` with back-off, and pika's errors translated.
* `topology`: declaring, measuring (`queue_depths`), purging and deleting the queues.
* `frames`: `FillFrames`, the fill's pre-marshalled AMQP frames.
* `fill`: `fill_queue`, its lock and its marker, and the publisher with pipelined confirms.
* `results`: `ResultsConsumer`, the flow's reader of outcome records.
* `dead_letters`: listing ``<queue>.dead`` and requeueing its messages.
* `leftovers`: `take_leftovers`, an earlier run's messages taken out of its work queue before a
  rerun queues their items again (imported from there: the worker does not need it).

Everything here is I/O; pika's exceptions are translated into `queuejob.flows.core.errors`:

* `BrokerUnavailable` (retryable): refused or dropped connections, DNS failures, timeouts.
* `BrokerAuthError` (permanent): the broker refused the credentials or the vhost.
* `QueueConflict` (permanent): a queue exists with other arguments (PRECONDITION_FAILED).
* `QueueNotFound` (permanent): a queue the call needs has not been declared (or was deleted).
* `PublishError` (retryable): a publish was nacked or returned unroutable, or the work queue
  did not gain exactly the confirmed messages.
* `FillInProgress` (retryable): another fill of the same queue holds its lock.

Queues of one work queue ``<name>`` (see `QueueSettings`):

* ``<name>``: the durable work queue, quorum by default. Its ``x-delivery-limit`` bounds poison
  messages: RabbitMQ dead-letters a message once it has been returned (rejected, or left unacked
  by a dying consumer) more than ``delivery_limit`` times, so an item is attempted at most
  ``delivery_limit + 1`` times. Dead letters go through the default exchange to ``<name>.dead``.
* ``<name>.dead``: classic, durable; dead letters keep their headers and ``message_id``.
* ``<name>.results``: classic, durable; workers' outcome records (`OutcomeRecord` JSON).
* ``<name>.fill``: classic, durable; at most one live *fill marker* (see `fill_queue`).
* ``<name>.fill.lock``: exclusive and transient, held by a running fill so two fills of the
  same queue never interleave (the broker drops it when the filling connection closes).

Timeouts: connecting is bounded by ``connect_timeout_s`` (socket connect, TLS and the AMQP
handshake). Once connected, pika's heartbeat closes a connection that has been silent for
``heartbeat_s`` seconds, so a broker that dies mid-call fails the call within about that long;
a fill also aborts when no publisher confirm arrives for ``max(30, 3 * connect_timeout_s)``
seconds, and drops its socket if the broker then does not answer the close within 5 s. No call
here can wait forever on a dead or stuck broker.

The password of a broker URL never appears in a message, a log line or an exception.
"""

from __future__ import annotations

from queuejob.flows.adapters.broker.config import (
    CLASSIC_STORAGE_ARGUMENTS,
    HEADER_DELIVERY_COUNT,
    HEADER_FAILURES,
    HEADER_INDEX,
    HEADER_RUN_ID,
    ITEM_CONTENT_TYPE,
    PERSISTENT,
    RECORD_CONTENT_TYPE,
    BrokerConfig,
    QueueSettings,
    check_queue_name,
    work_queue_arguments,
)
from queuejob.flows.adapters.broker.connection import (
    connect,
    wait_for_broker,
)
from queuejob.flows.adapters.broker.dead_letters import (
    dead_letter_ids,
)
from queuejob.flows.adapters.broker.fill import (
    FillMarker,
    FillResult,
    fill_queue,
    read_fill_marker,
)
from queuejob.flows.adapters.broker.frames import (
    FillFrames,
)
from queuejob.flows.adapters.broker.results import (
    ResultBatch,
    ResultsConsumer,
)
from queuejob.flows.adapters.broker.topology import (
    QueueDepth,
    declare_queues,
    delete_queues,
    purge_results,
    purge_work_queue,
    queue_depths,
)

__all__ = [
    "CLASSIC_STORAGE_ARGUMENTS",
    "HEADER_DELIVERY_COUNT",
    "HEADER_FAILURES",
    "HEADER_INDEX",
    "HEADER_RUN_ID",
    "ITEM_CONTENT_TYPE",
    "PERSISTENT",
    "RECORD_CONTENT_TYPE",
    "BrokerConfig",
    "FillFrames",
    "FillMarker",
    "FillResult",
    "QueueDepth",
    "QueueSettings",
    "ResultBatch",
    "ResultsConsumer",
    "check_queue_name",
    "connect",
    "dead_letter_ids",
    "declare_queues",
    "delete_queues",
    "fill_queue",
    "purge_results",
    "purge_work_queue",
    "queue_depths",
    "read_fill_marker",
    "wait_for_broker",
    "work_queue_arguments",
]
