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
  A queue whose node is down (RabbitMQ answers 404 for it too) is `BrokerUnavailable` instead:
  "node X holding queue Y is down".
* `PublishError` (retryable): a publish was nacked or returned unroutable, or the work queue
  did not gain exactly the confirmed messages.
* `FillInProgress` (retryable): another fill of the same queue holds its lock.

Queues of one work queue ``<name>`` (see `QueueSettings`):

* ``<name>``: the durable work queue, quorum by default. Its ``x-delivery-limit`` bounds poison
  messages: RabbitMQ dead-letters a message once it has been returned (rejected, or left unacked
  by a dying consumer) more than ``delivery_limit`` times, so an item is attempted at most
  ``delivery_limit + 1`` times. Dead letters go through the default exchange to ``<name>.dead``.
* ``<name>.dead``: durable; dead letters keep their headers and ``message_id``.
* ``<name>.results``: durable; workers' outcome records (`OutcomeRecord` JSON).
* ``<name>.fill``: durable; at most one live *fill marker* (see `fill_queue`).
* ``<name>.requeued``: durable; the records of the dead-letter requeue (`dead_letters`).

These four are quorum queues when the work queue is one (replicated on a cluster like it, so
a node lost loses none of a run's state; `companion_arguments`), classic beside a classic work
queue. On RabbitMQ 4, whose quorum queues dead-letter or drop a message returned 20 times unless
told otherwise, a quorum queue without a ``delivery_limit`` is declared with ``-1`` (none).

Nodes and reconnecting: a URL may name several nodes (`BrokerConfig`); each connection attempt
goes through them in turn. The public calls ride out a lost node or connection for the config's
``reconnect_s`` (`connection.rides_out_node_loss`): each is idempotent as a whole, so it simply
starts again on a new connection.
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
    CA_FILE_ENV,
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
    companion_arguments,
    work_queue_arguments,
)
from queuejob.flows.adapters.broker.connection import (
    connect,
    server_major,
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
    "CA_FILE_ENV",
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
    "companion_arguments",
    "connect",
    "dead_letter_ids",
    "declare_queues",
    "delete_queues",
    "fill_queue",
    "purge_results",
    "purge_work_queue",
    "queue_depths",
    "read_fill_marker",
    "server_major",
    "wait_for_broker",
    "work_queue_arguments",
]
