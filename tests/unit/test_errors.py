"""Error types and their retry meaning: tasks decide whether to retry from the class alone."""

from __future__ import annotations

import inspect

import pytest

from queuejob.flows.core import errors
from queuejob.flows.core.errors import (
    BrokerAuthError,
    BrokerUnavailable,
    CaveatViolation,
    ConfigError,
    FillInProgress,
    InvalidInput,
    ItemError,
    ItemsFailed,
    JobConflict,
    JobFailed,
    JobTimeout,
    KubeError,
    KubeForbidden,
    KubeInvalid,
    KubeNotFound,
    KubeUnavailable,
    LedgerNotFound,
    LedgerStorageError,
    PermanentError,
    PodsCannotStart,
    PublishError,
    QueueConflict,
    QueueJobError,
    QueueNotFound,
    RetryableError,
    RunFailed,
    StaleMessages,
)

BASES = {QueueJobError, RetryableError, PermanentError}

# Every named error and what a retry policy should do with it. A new error type must be added
# here (the completeness test below fails otherwise): deciding its retry meaning is not optional.
MEANING: dict[type[QueueJobError], tuple[type[QueueJobError], bool]] = {
    InvalidInput: (PermanentError, False),
    ItemError: (InvalidInput, False),
    ConfigError: (PermanentError, False),
    LedgerNotFound: (InvalidInput, False),
    LedgerStorageError: (ConfigError, False),
    BrokerUnavailable: (RetryableError, True),
    BrokerAuthError: (PermanentError, False),
    QueueConflict: (PermanentError, False),
    QueueNotFound: (PermanentError, False),
    FillInProgress: (RetryableError, True),
    PublishError: (RetryableError, True),
    StaleMessages: (PermanentError, False),
    KubeUnavailable: (RetryableError, True),
    KubeInvalid: (PermanentError, False),
    KubeForbidden: (PermanentError, False),
    KubeNotFound: (PermanentError, False),
    KubeError: (PermanentError, False),
    JobConflict: (PermanentError, False),
    JobTimeout: (PermanentError, False),
    RunFailed: (PermanentError, False),
    ItemsFailed: (RunFailed, False),
    JobFailed: (RunFailed, False),
    PodsCannotStart: (RunFailed, False),
    CaveatViolation: (RunFailed, False),
}


def _named_errors() -> set[type[QueueJobError]]:
    return {
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, QueueJobError) and obj.__module__ == errors.__name__
    } - BASES


def test_every_named_error_has_a_declared_meaning() -> None:
    assert _named_errors() == set(MEANING)


@pytest.mark.parametrize(
    ("cls", "parent", "retryable"),
    [pytest.param(cls, parent, r, id=cls.__name__) for cls, (parent, r) in MEANING.items()],
)
def test_retry_meaning(
    cls: type[QueueJobError], parent: type[QueueJobError], retryable: bool
) -> None:
    assert issubclass(cls, parent)
    err = cls("queue 'job1': something happened; do this next")
    assert err.retryable is retryable
    assert isinstance(err, RetryableError) is retryable
    assert isinstance(err, PermanentError) is not retryable
    assert isinstance(err, QueueJobError)
    # Not both: a retry policy keyed on either class must give one answer.
    assert not (isinstance(err, RetryableError) and isinstance(err, PermanentError))
    assert cls.__doc__ and cls.__doc__.strip()


def test_base_meanings() -> None:
    assert QueueJobError.retryable is False
    assert RetryableError.retryable is True
    assert PermanentError.retryable is False


def test_errors_are_ordinary_exceptions_with_the_message_and_cause() -> None:
    cause = ConnectionRefusedError(111, "Connection refused")
    with pytest.raises(BrokerUnavailable) as info:
        try:
            raise cause
        except OSError as exc:
            raise BrokerUnavailable("broker 127.0.0.1:5672 vhost '/' did not answer") from exc
    assert str(info.value) == "broker 127.0.0.1:5672 vhost '/' did not answer"
    assert info.value.__cause__ is cause
    assert not isinstance(info.value, OSError)


def test_item_error_is_caught_as_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        raise ItemError("items.txt:3: malformed")
