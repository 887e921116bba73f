"""queuejob's error types.

Every error carries a retry meaning: a `RetryableError` is worth another attempt after a back-off
(a broker that is still starting, a 503 from the API server, a dropped connection); a
`PermanentError` is not (bad credentials, a 422, a conflicting queue declaration, bad input).
Prefect tasks key their `retry_condition_fn` on these classes, and adapters translate library
exceptions into them with `raise ... from exc`.

Messages name the object and the next step, and never contain a password.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


class QueueJobError(Exception):
    """Base of every error queuejob raises on purpose.

    ``refused`` is set on an error raised before anything was queued or created (bad input or
    configuration found by the flow's checks): the CLI exits 2 for it, 1 for other failures.
    """

    retryable: bool = False
    refused: bool = False


class RetryableError(QueueJobError):
    """A transient failure: retrying after a back-off may succeed."""

    retryable = True


class PermanentError(QueueJobError):
    """A failure that another attempt with the same input cannot fix."""

    retryable = False


# --- input and configuration -------------------------------------------------------------------


class InvalidInput(PermanentError):
    """A parameter, item or spec is not acceptable; the message says what to fix."""


class ItemError(InvalidInput):
    """An item source is malformed: names the source and, for files, the line."""


class ConfigError(PermanentError):
    """Configuration (a block, a kubeconfig, a URL) is missing or unusable."""


class LedgerNotFound(InvalidInput):
    """A run has no stored ledger at the storage location asked for (names both)."""


class LedgerStorageError(ConfigError):
    """The ledger storage cannot be written or read (names the location and the cause)."""


# --- broker ----------------------------------------------------------------------------------


class BrokerUnavailable(RetryableError):
    """The broker did not answer an AMQP handshake in time (names host, port and vhost)."""


class BrokerAuthError(PermanentError):
    """The broker refused the credentials; retrying with the same ones is pointless."""


class QueueConflict(PermanentError):
    """A queue exists with arguments different from the ones asked for."""


class QueueNotFound(PermanentError):
    """A queue the operation needs does not exist (not declared yet, or already cleaned up)."""


class FillInProgress(RetryableError):
    """Another fill of the same work queue is still running; retry once it has finished."""


class PublishError(RetryableError):
    """A publish was nacked or returned unroutable, or the queue did not gain what was
    confirmed; the fill must be repeated."""


class StaleMessages(PermanentError):
    """The work queue already holds messages that this run did not put there."""


# --- Kubernetes / jobs -------------------------------------------------------------------------


class KubeUnavailable(RetryableError):
    """The API server answered 429 or 5xx, or could not be reached."""


class KubeInvalid(PermanentError):
    """The API server rejected an object as invalid (422); the message quotes its causes."""


class KubeForbidden(PermanentError):
    """RBAC denied a request (403); the message names the verb and the resource."""


class KubeNotFound(PermanentError):
    """An object, or the namespace, does not exist (404)."""


class KubeError(PermanentError):
    """Any other API error the backend cannot act on."""


class JobConflict(PermanentError):
    """A Job with the wanted name exists and belongs to another run."""


class JobTimeout(PermanentError):
    """The Job did not reach a decisive condition before the wall-clock deadline."""


# --- the run's outcome -------------------------------------------------------------------------


class RunFailed(PermanentError, Mapping[str, Any]):
    """The run ended Failed after it had reported: its message is the Failed state's.

    It reads as the run's report (``failed["summary"]``, ``dict(failed)``): a flow run that ends
    Failed this way has it as its result, so a caller reading the state's result gets the report
    whether the run was Completed or Failed. Raised before the run reported, the report is empty.
    """

    def __init__(self, message: str, report: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report: dict[str, Any] = dict(report or {})

    def __getitem__(self, key: str) -> Any:
        return self.report[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.report)

    def __len__(self) -> int:
        return len(self.report)

    def __bool__(self) -> bool:  # an error is never falsy, even with an empty report
        return True

    # Mapping's __eq__ would compare reports; an error is equal to itself only.
    __eq__ = object.__eq__
    __hash__ = object.__hash__


class ItemsFailed(RunFailed):
    """Items did not succeed (failed, dead-lettered, left in the queue) beyond the run's
    ``max_failed_items``."""


class JobFailed(RunFailed):
    """The Job failed (BackoffLimitExceeded, DeadlineExceeded, ...)."""


class PodsCannotStart(RunFailed):
    """No pod of the Job could start (an image that cannot be pulled, no node that fits, a
    quota that refuses the pods, ...): the run deleted the Job and kept its items in the
    queue."""


# --- caveats -----------------------------------------------------------------------------------


class CaveatViolation(RunFailed):
    """Caveat findings were raised and the caller chose the `fail` policy (before the Job, with
    no report yet, or after it, with the report)."""
