"""Dead letters as queuejob reads them: item ids, attempts and requeue tokens (pure)."""

from __future__ import annotations

import pytest

from queuejob.flows.core.dead_letters import DeadLetter, attempts_from, item_id_of, requeue_token


def _letter(item_id: str = "a", run_id: str | None = "r1", requeues: int = 0) -> DeadLetter:
    return DeadLetter(item_id, run_id, 0, "delivery_limit", None, requeues, 1)


def test_the_same_dead_letter_has_the_same_token_and_a_requeued_one_a_new_token() -> None:
    assert _letter().token == _letter().token
    assert _letter(requeues=1).token != _letter().token  # dead-lettered again after a requeue
    assert _letter(item_id="b").token != _letter().token
    assert _letter(run_id="r2").token != _letter().token
    assert _letter(run_id=None).token == requeue_token("a", None, 0)


def test_a_message_without_an_id_is_named_by_its_body() -> None:
    assert item_id_of("x1", b"body") == "x1"
    assert item_id_of(None, b"body") == item_id_of("", b"body")
    assert item_id_of(None, b"body").startswith("msg-")
    assert item_id_of(None, b"other") != item_id_of(None, b"body")


@pytest.mark.parametrize(
    ("reason", "failures", "limit", "expected"),
    [
        pytest.param("rejected", 2, None, 3, id="classic-worker-count"),
        pytest.param("delivery_limit", 0, 3, 4, id="quorum-limit-known"),
        pytest.param("delivery_limit", 0, None, None, id="quorum-limit-unknown"),
        pytest.param(None, 0, 3, None, id="no-reason"),
    ],
)
def test_attempts_where_the_headers_or_the_limit_tell(
    reason: str | None, failures: int, limit: int | None, expected: int | None
) -> None:
    assert attempts_from(reason=reason, failures=failures, delivery_limit=limit) == expected
