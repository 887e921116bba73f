"""The work-queue caveat rules, with the numbers they report and the policies that act on them."""

from __future__ import annotations

from typing import Any

import pytest

from queuejob.flows.core import caveats
from queuejob.flows.core.caveats import (
    Code,
    Finding,
    Severity,
    check_after,
    check_completions,
    check_drained,
    check_job_failed,
    check_stale,
    enforce,
    failing,
    plan_completions,
)
from queuejob.flows.core.errors import CaveatViolation, PermanentError, StaleMessages
from queuejob.flows.core.job_status import JobCounts, JobPhase, JobState
from queuejob.flows.core.ledger import LedgerSummary

Q = "job1"


def state(phase: JobPhase = JobPhase.RUNNING, reason: str | None = None, **counts: int) -> JobState:
    return JobState(phase=phase, counts=JobCounts(**counts), reason=reason)


def summary(**kw: int) -> LedgerSummary:
    values = {
        "expected": 0,
        "succeeded": 0,
        "failed": 0,
        "dead_lettered": 0,
        "left": 0,
        "processed_more_than_once": 0,
        "attempts": 0,
        "no_work_pods": 0,
        "foreign_records": 0,
    }
    values.update(kw)
    return LedgerSummary(**values)


def after(**kw: Any) -> list[Finding]:
    args: dict[str, Any] = {
        "queue": Q,
        "confirmed": 8,
        "state": state(JobPhase.SUCCEEDED, succeeded=8),
        "residual_ready": 0,
        "residual_unacked": 0,
        "dead_letters": 0,
        "summary": summary(expected=8, succeeded=8, attempts=8),
        "delivery_limit": None,
    }
    args.update(kw)
    return check_after(**args)


def codes(findings: list[Finding]) -> list[Code]:
    return [f.code for f in findings]


# --- stale messages -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fail", "purge"])
def test_empty_queue_without_consumers_is_fine(policy: str) -> None:
    assert check_stale(queue=Q, ready=0, unacked=0, consumers=0, policy=policy) is None


def test_stale_ready_messages_fail_under_fail_policy() -> None:
    with pytest.raises(StaleMessages) as info:
        check_stale(queue=Q, ready=3, unacked=0, consumers=0, policy="fail")
    message = str(info.value)
    assert "queue 'job1' already holds 3 message(s)" in message
    assert "stale_messages='purge'" in message
    assert isinstance(info.value, PermanentError)


@pytest.mark.parametrize(
    ("ready", "unacked", "consumers"),
    [
        pytest.param(0, 0, 1, id="consumer-only"),
        pytest.param(0, 2, 0, id="unacked-only"),
        pytest.param(5, 1, 1, id="all"),
    ],
)
@pytest.mark.parametrize("policy", ["fail", "purge"])
def test_queue_in_use_by_another_run_raises_whatever_the_policy(
    policy: str, ready: int, unacked: int, consumers: int
) -> None:
    with pytest.raises(StaleMessages) as info:
        check_stale(queue=Q, ready=ready, unacked=unacked, consumers=consumers, policy=policy)
    message = str(info.value)
    assert f"{consumers} consumer(s) and {unacked} unacknowledged" in message
    assert "another run is still working on it" in message


def test_stale_ready_messages_under_purge_policy_give_a_warning() -> None:
    finding = check_stale(queue=Q, ready=4, unacked=0, consumers=0, policy="purge")
    assert finding is not None
    assert finding.code is Code.STALE_PURGED
    assert finding.severity is Severity.WARNING
    assert finding.stage == "before"
    assert finding.numbers == {"ready": 4, "unacked": 0, "consumers": 0}
    assert "held 4 stale message(s)" in finding.message


# --- completions versus items ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "confirmed", "mode", "expected"),
    [
        pytest.param("auto", 8, "coarse", 8, id="auto-coarse"),
        pytest.param(5, 8, "coarse", 5, id="fixed-coarse"),
        pytest.param("auto", 8, "fine", None, id="auto-fine"),
        pytest.param(5, 8, "fine", None, id="fixed-fine-ignored"),
    ],
)
def test_plan_completions(requested: Any, confirmed: int, mode: Any, expected: int | None) -> None:
    assert plan_completions(requested=requested, confirmed=confirmed, mode=mode) == expected


def completions(requested: Any, confirmed: int, mode: Any = "coarse") -> list[Finding]:
    return check_completions(
        queue=Q, requested=requested, confirmed=confirmed, mode=mode, idle_timeout_s=10
    )


def test_completions_5_for_8_items_leaves_3() -> None:
    (finding,) = completions(5, 8)
    assert finding.code is Code.COMPLETIONS_SHORT
    assert finding.severity is Severity.ERROR
    assert finding.stage == "before"
    assert finding.numbers == {"completions": 5, "items": 8, "items_left": 3}
    assert "queue 'job1' holds 8 items but completions=5: 3 item(s) will be left" in (
        finding.message
    )
    assert "completions=auto" in finding.advice


def test_completions_10_for_8_items_gives_2_pods_without_work() -> None:
    (finding,) = completions(10, 8)
    assert finding.code is Code.COMPLETIONS_EXCESS
    assert finding.severity is Severity.WARNING
    assert finding.numbers == {"completions": 10, "items": 8, "pods_without_work": 2}
    assert "2 pod(s) will find no work" in finding.message
    assert "after 10 s idle" in finding.message


@pytest.mark.parametrize(
    ("requested", "confirmed"),
    [pytest.param("auto", 8, id="auto"), pytest.param(8, 8, id="exact")],
)
def test_completions_matching_items_has_no_finding(requested: Any, confirmed: int) -> None:
    assert completions(requested, confirmed) == []


def test_fine_mode_auto_has_no_finding() -> None:
    assert completions("auto", 8, "fine") == []


def test_fine_mode_with_a_number_is_an_info() -> None:
    (finding,) = completions(5, 8, "fine")
    assert finding.code is Code.COMPLETIONS_IGNORED_FINE
    assert finding.severity is Severity.INFO
    assert finding.numbers == {"completions": 5, "items": 8}
    assert failing([finding]) == []


# --- during the Job ---------------------------------------------------------------------------


def drained(ready: int, unacked: int, st: JobState) -> Finding | None:
    return check_drained(queue=Q, ready=ready, unacked=unacked, state=st, idle_timeout_s=30)


def test_drained_queue_with_running_pods_is_a_warning() -> None:
    finding = drained(0, 0, state(active=2, succeeded=8))
    assert finding is not None
    assert finding.code is Code.QUEUE_DRAINED_PODS_WAITING
    assert finding.severity is Severity.WARNING
    assert finding.stage == "during"
    assert finding.numbers == {"active": 2, "ready": 0, "unacked": 0}
    assert "2 pod(s) are still running; they exit 'no work' after 30 s idle" in finding.message


@pytest.mark.parametrize(
    ("ready", "unacked", "st"),
    [
        pytest.param(1, 0, state(active=2), id="ready-left"),
        pytest.param(0, 1, state(active=2), id="in-flight"),
        pytest.param(0, 0, state(active=0, succeeded=3), id="no-active-pods"),
        pytest.param(0, 0, state(JobPhase.SUCCEEDED, active=1), id="already-succeeded"),
        pytest.param(0, 0, state(JobPhase.FAILED, active=1), id="already-failed"),
    ],
)
def test_not_drained(ready: int, unacked: int, st: JobState) -> None:
    assert drained(ready, unacked, st) is None


@pytest.mark.parametrize(
    ("reason", "advice"),
    [
        pytest.param("BackoffLimitExceeded", "raise backoff_limit", id="backoff"),
        pytest.param("DeadlineExceeded", "raise active_deadline_seconds", id="deadline"),
        pytest.param(None, "read the Job's events", id="unknown"),
    ],
)
def test_job_failed(reason: str | None, advice: str) -> None:
    st = JobState(
        phase=JobPhase.FAILED,
        counts=JobCounts(failed=3, succeeded=1),
        reason=reason,
        message="Job has reached the specified backoff limit" if reason else None,
    )
    finding = check_job_failed(st, job="queuejob-abc")
    assert finding is not None
    assert finding.code is Code.JOB_FAILED
    assert finding.severity is Severity.ERROR
    assert finding.numbers == {"failed_pods": 3, "succeeded_pods": 1}
    assert finding.message.startswith(f"Job 'queuejob-abc' failed: {reason or 'unknown reason'}")
    assert advice in finding.advice


@pytest.mark.parametrize(
    "phase", [JobPhase.PENDING, JobPhase.RUNNING, JobPhase.SUSPENDED, JobPhase.SUCCEEDED]
)
def test_job_not_failed(phase: JobPhase) -> None:
    assert check_job_failed(state(phase), job="x") is None


# --- after the Job ----------------------------------------------------------------------------


def test_clean_run_has_no_findings() -> None:
    assert after() == []


def test_items_left_in_queue_after_completion() -> None:
    findings = after(
        residual_ready=2,
        residual_unacked=1,
        summary=summary(expected=8, succeeded=5, left=3, attempts=5),
    )
    assert codes(findings) == [Code.ITEMS_LEFT]
    (finding,) = findings
    assert finding.severity is Severity.ERROR
    assert finding.numbers == {"ready": 2, "unacked": 1}
    assert "the Job completed but queue 'job1' still holds 3 item(s)" in finding.message


def test_items_left_after_a_failed_job_says_ended() -> None:
    findings = after(
        state=state(JobPhase.FAILED, failed=3),
        residual_ready=8,
        summary=summary(expected=8, left=8),
    )
    assert codes(findings) == [Code.ITEMS_LEFT]
    assert "the Job ended but" in findings[0].message


@pytest.mark.parametrize(
    ("limit", "text"),
    [
        pytest.param(5, "after 5 redeliveries", id="with-limit"),
        pytest.param(None, "", id="no-limit"),
    ],
)
def test_dead_letters(limit: int | None, text: str) -> None:
    findings = after(
        dead_letters=2,
        delivery_limit=limit,
        summary=summary(expected=8, succeeded=6, dead_lettered=2, attempts=16),
    )
    assert codes(findings) == [Code.DEAD_LETTERS]
    (finding,) = findings
    assert finding.numbers == {"dead_lettered": 2}
    assert f"2 item(s) were dead-lettered{' ' + text if text else ''} into 'job1.dead'" in (
        finding.message
    )


def test_failed_items() -> None:
    findings = after(summary=summary(expected=8, succeeded=7, failed=1, attempts=9))
    assert codes(findings) == [Code.ITEMS_FAILED]
    assert findings[0].numbers == {"failed": 1}


def test_ledger_short() -> None:
    # 8 confirmed, 6 reported, none left in the queue: 2 taken and never reported.
    findings = after(summary=summary(expected=8, succeeded=6, left=2, attempts=6))
    assert codes(findings) == [Code.LEDGER_SHORT]
    (finding,) = findings
    assert finding.severity is Severity.WARNING
    assert finding.numbers == {"items": 8, "reported": 6, "missing": 2}
    assert "2 of 8 item(s) have no outcome record" in finding.message


def test_items_still_in_the_queue_are_not_counted_as_missing() -> None:
    findings = after(residual_ready=2, summary=summary(expected=8, succeeded=6, left=2))
    assert Code.LEDGER_SHORT not in codes(findings)


def test_processed_more_than_once() -> None:
    findings = after(
        summary=summary(expected=8, succeeded=8, processed_more_than_once=1, attempts=9)
    )
    assert codes(findings) == [Code.AT_LEAST_ONCE]
    assert findings[0].severity is Severity.WARNING
    assert findings[0].numbers == {"processed_more_than_once": 1}
    assert "idempotent" in findings[0].advice


def test_no_work_pods_are_info() -> None:
    findings = after(summary=summary(expected=8, succeeded=8, attempts=8, no_work_pods=2))
    assert codes(findings) == [Code.NO_WORK_PODS]
    assert findings[0].severity is Severity.INFO
    assert findings[0].numbers == {"no_work_pods": 2}


def test_everything_at_once_in_a_stable_order() -> None:
    findings = after(
        confirmed=20,
        state=state(JobPhase.FAILED, failed=7),
        residual_ready=3,
        dead_letters=2,
        delivery_limit=3,
        summary=summary(
            expected=20,
            succeeded=10,
            failed=1,
            dead_lettered=2,
            left=7,
            processed_more_than_once=1,
            attempts=19,
            no_work_pods=1,
        ),
    )
    assert codes(findings) == [
        Code.ITEMS_LEFT,
        Code.DEAD_LETTERS,
        Code.ITEMS_FAILED,
        Code.LEDGER_SHORT,
        Code.AT_LEAST_ONCE,
        Code.NO_WORK_PODS,
    ]
    # 20 confirmed - 10 succeeded - 2 dead - 3 in the queue (the failed item went back there
    # and is among them) = 5 unaccounted for.
    assert findings[3].numbers["missing"] == 5
    assert all(f.stage == "after" for f in findings)


# --- findings and policies --------------------------------------------------------------------


INFO = Finding(Code.NO_WORK_PODS, Severity.INFO, "1 pod found no work", "expected")
WARN = Finding(Code.AT_LEAST_ONCE, Severity.WARNING, "twice", "make it idempotent")
ERROR = Finding(Code.ITEMS_LEFT, Severity.ERROR, "3 left", "use completions=auto", {"ready": 3})


def test_finding_line_and_dict() -> None:
    assert ERROR.line() == "[error] items-left-in-queue: 3 left (use completions=auto)"
    assert ERROR.as_dict() == {
        "code": "items-left-in-queue",
        "severity": "error",
        "stage": "after",
        "message": "3 left",
        "advice": "use completions=auto",
        "numbers": {"ready": 3},
    }
    # The dict is a copy: editing it does not change the finding.
    ERROR.as_dict()["numbers"]["ready"] = 99
    assert ERROR.numbers == {"ready": 3}


def test_failing_keeps_warnings_and_errors() -> None:
    assert failing([INFO, WARN, ERROR]) == [WARN, ERROR]


@pytest.mark.parametrize(
    "findings",
    [
        pytest.param([], id="none"),
        pytest.param([INFO], id="info"),
        pytest.param([INFO, WARN, ERROR], id="all"),
    ],
)
def test_warn_policy_never_raises(findings: list[Finding]) -> None:
    enforce(findings, "warn")


@pytest.mark.parametrize(
    "findings", [pytest.param([], id="none"), pytest.param([INFO, INFO], id="only-info")]
)
def test_fail_policy_passes_without_warnings_or_errors(findings: list[Finding]) -> None:
    enforce(findings, "fail")


@pytest.mark.parametrize(
    ("findings", "count"),
    [
        pytest.param([WARN], 1, id="warning"),
        pytest.param([ERROR], 1, id="error"),
        pytest.param([INFO, WARN, ERROR], 2, id="mixed"),
    ],
)
def test_fail_policy_raises_listing_each_failing_finding(
    findings: list[Finding], count: int
) -> None:
    with pytest.raises(CaveatViolation) as info:
        enforce(findings, "fail")
    message = str(info.value)
    assert message.startswith(f"{count} caveat finding(s) with policy 'fail':")
    for finding in failing(findings):
        assert f"  - {finding.line()}" in message
    assert INFO.line() not in message
    assert "caveat_policy='warn'" in message


def test_redelivery_after_a_lost_attempt_explains_at_least_once() -> None:
    findings = after(unreported_attempts=1, summary=summary(expected=8, succeeded=8, attempts=9))
    assert codes(findings) == [Code.REDELIVERED_AFTER_LOST_ATTEMPT]
    (finding,) = findings
    assert finding.severity is Severity.WARNING
    assert finding.numbers == {"items": 1}
    assert "may have run twice" in finding.message
    assert "at-least-once" in finding.advice and "idempotent" in finding.advice
    assert after(unreported_attempts=0) == []


def test_kept_queues_each_get_a_finding_that_says_where_the_items_are() -> None:
    found = caveats.check_kept_queues(queue="job1", dead_queue="job1.dead", kept={"job1": 3})
    assert [(f.code, f.severity, f.numbers) for f in found] == [
        (caveats.Code.QUEUE_KEPT, caveats.Severity.INFO, {"queue": "job1", "messages": 3})
    ]
    assert found[0].message == "kept queue 'job1': it holds 3 item(s)"
    dead = caveats.check_kept_queues(queue="job1", dead_queue="job1.dead", kept={"job1.dead": 1})
    assert "dead letters" in dead[0].advice
    assert caveats.check_kept_queues(queue="job1", dead_queue="job1.dead", kept={}) == []


def test_failed_and_dead_lettered_advice_names_the_rerun_command() -> None:
    findings = after(
        run_id="1a2b-run",
        dead_letters=1,
        summary=summary(expected=8, succeeded=6, failed=1, dead_lettered=1, attempts=12),
        state=state(JobPhase.SUCCEEDED, succeeded=8),
    )
    by_code = {f.code: f for f in findings}
    dead = by_code[Code.DEAD_LETTERS].advice
    assert "`queuejob rerun 1a2b-run --fate dead_lettered`" in dead
    assert "`queuejob dead-letters job1 --requeue`" in dead
    failed = by_code[Code.ITEMS_FAILED].advice
    assert "`queuejob rerun 1a2b-run --fate failed`" in failed
    assert "<RUN_ID>" in after(dead_letters=1)[0].advice  # no run id given: a placeholder
