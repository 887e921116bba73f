"""queuejob's error types.

Every error carries a retry meaning: a `RetryableError` is worth another attempt after a back-off
(a broker that is still starting, a 503 from the API server, a dropped connection); a
`PermanentError` is not (bad credentials, a 422, a conflicting queue declaration, bad input).
Prefect tasks key their `retry_condition_fn` on these classes, and adapters translate library
exceptions into them with `raise ... from exc`.

Messages name the object and the next step, and never contain a password.
"""

from __future__ import annotations


class QueueJobError(Exception):
    """Base of every error queuejob raises on purpose."""

    retryable: bool = False


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


class JobFailed(PermanentError):
    """The Job failed (BackoffLimitExceeded, DeadlineExceeded, ...)."""


# --- caveats -----------------------------------------------------------------------------------


class CaveatViolation(PermanentError):
    """Caveat findings were raised and the caller chose the `fail` policy."""
