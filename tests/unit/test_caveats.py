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


def test_drained_queue_with_running_pods_is_information() -> None:
    # The waiting pods are completion slots of a cause the report names after the Job (too
    # many completions, or dead-lettered items): this live finding advises no setting.
    finding = drained(0, 0, state(active=2, succeeded=8))
    assert finding is not None
    assert finding.code is Code.QUEUE_DRAINED_PODS_WAITING
    assert finding.severity is Severity.INFO
    assert finding.stage == "during"
    assert finding.numbers == {"active": 2, "ready": 0, "unacked": 0}
    assert "2 pod(s) are still running; they exit 'no work' after 30 s idle" in finding.message
    assert "completions" not in finding.advice
    assert failing([finding]) == []


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
    assert finding.numbers == {"items": 3, "ready": 2, "unacked": 1}
    assert "the Job completed but queue 'job1' still holds 3 item(s) never processed" in (
        finding.message
    )


def test_items_left_advice_names_the_rerun_of_the_left_items() -> None:
    (finding,) = after(
        run_id="1a2b-run",
        residual_ready=3,
        summary=summary(expected=8, succeeded=5, left=3, attempts=5),
    )
    assert "`queuejob rerun 1a2b-run --fate left` runs them as a new run" in finding.advice
    assert "completions" not in finding.advice  # not the cause with completions=auto


def test_items_left_after_a_failed_job_says_it_failed_before_they_were_taken() -> None:
    findings = after(
        state=state(JobPhase.FAILED, failed=3),
        residual_ready=8,
        summary=summary(expected=8, left=8),
    )
    assert codes(findings) == [Code.ITEMS_LEFT]
    assert "the Job failed before queue 'job1' was drained: it still holds 8 item(s)" in (
        findings[0].message
    )


def test_a_failed_item_back_in_the_queue_is_not_also_an_item_left() -> None:
    # The Job gave up on "flaky": its message went back to the queue. One item, one finding.
    findings = after(
        state=state(JobPhase.FAILED, failed=3),
        residual_ready=1,
        summary=summary(expected=4, succeeded=3, failed=1, attempts=6),
        confirmed=4,
    )
    assert codes(findings) == [Code.ITEMS_FAILED]


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
    assert "completions" not in findings[0].advice


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
ERROR = Finding(Code.COMPLETIONS_SHORT, Severity.ERROR, "3 left", "pass completions=auto")
ITEMS = Finding(Code.ITEMS_LEFT, Severity.ERROR, "3 left", "rerun them", {"ready": 3})


def test_finding_line_and_dict() -> None:
    assert ITEMS.line() == "[error] items-left-in-queue: 3 left (rerun them)"
    assert ITEMS.as_dict() == {
        "code": "items-left-in-queue",
        "kind": "outcome",
        "severity": "error",
        "stage": "after",
        "message": "3 left",
        "advice": "rerun them",
        "numbers": {"ready": 3},
    }
    assert ERROR.as_dict()["kind"] == "caveat"
    # The dict is a copy: editing it does not change the finding.
    ITEMS.as_dict()["numbers"]["ready"] = 99
    assert ITEMS.numbers == {"ready": 3}


def test_failing_keeps_warnings_and_errors() -> None:
    assert failing([INFO, WARN, ERROR]) == [WARN, ERROR]


def test_the_items_outcomes_are_not_caveats_for_the_policy() -> None:
    # Failed, dead-lettered and left items, the Job's failure and pods that could not start
    # decide the run (max_failed_items, or failed whatever it allows), not the caveat policy.
    outcome_codes = {
        Code.ITEMS_LEFT, Code.ITEMS_FAILED, Code.DEAD_LETTERS, Code.LEDGER_SHORT, Code.JOB_FAILED,
        Code.PODS_CANNOT_START,
    }  # fmt: skip
    assert {c for c in Code if c.kind == "outcome"} == outcome_codes
    outcomes = [Finding(c, Severity.ERROR, "m", "a") for c in outcome_codes]
    assert failing(outcomes) == []
    enforce(outcomes, "fail")  # does not raise


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
    found = caveats.check_kept_queues(
        queue="job1", dead_queue="job1.dead", kept={"job1": 3}, run_id="r1"
    )
    assert [(f.code, f.severity, f.numbers) for f in found] == [
        (caveats.Code.QUEUE_KEPT, caveats.Severity.INFO, {"queue": "job1", "messages": 3})
    ]
    assert found[0].message == "kept queue 'job1': it holds 3 item(s)"
    assert "`queuejob rerun r1`" in found[0].advice
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


# --- findings fit the run: one finding per cause, no advice for a setting in force -----------


def fitted(
    findings: list[Finding],
    s: LedgerSummary,
    *,
    mode: Any = "coarse",
    completions: int | None = None,
    confirmed: int | None = None,
) -> list[Finding]:
    n = s.expected if confirmed is None else confirmed
    return caveats.fit(
        findings, summary=s, mode=mode, completions=n if completions is None else completions,
        confirmed=n,
    )  # fmt: skip


def test_one_poison_item_among_six_with_completions_auto_is_one_finding() -> None:
    """The issue's run: 6 items, one dead-lettered (delivery limit 1), completions=auto. The
    pod that took the dead-lettered item's completion slot waited (live), then found no work:
    both are that one cause, named inside the dead-letter finding."""
    s = summary(expected=6, succeeded=5, dead_lettered=1, attempts=7, no_work_pods=1)
    live = drained(0, 0, state(active=1, succeeded=5, failed=2))
    assert live is not None
    findings = [live, *after(confirmed=6, dead_letters=1, delivery_limit=1, summary=s)]
    assert codes(findings) == [
        Code.QUEUE_DRAINED_PODS_WAITING, Code.DEAD_LETTERS, Code.NO_WORK_PODS
    ]  # fmt: skip
    (finding,) = fitted(findings, s)
    assert finding.code is Code.DEAD_LETTERS
    assert finding.numbers == {"dead_lettered": 1, "no_work_pods": 1}
    assert (
        "1 pod(s) found no work: the completion slot(s) of the dead-lettered item(s), which a "
        "non-indexed Job cannot give back" in finding.message
    )
    assert "completions" not in finding.advice


def test_no_work_pods_of_failed_items_are_named_in_the_items_failed_finding() -> None:
    s = summary(expected=6, succeeded=5, failed=1, attempts=8, no_work_pods=1)
    (finding,) = fitted(after(confirmed=6, summary=s), s)
    assert finding.code is Code.ITEMS_FAILED
    assert finding.numbers == {"failed": 1, "no_work_pods": 1}
    assert "completion slot(s) of the failed item(s)" in finding.message


def test_too_many_completions_is_one_finding_with_the_pods_that_found_no_work() -> None:
    s = summary(expected=8, succeeded=8, attempts=8, no_work_pods=2)
    before = completions(10, 8)
    live = drained(0, 0, state(active=2, succeeded=8))
    assert live is not None
    (finding,) = fitted([*before, live, *after(summary=s)], s, completions=10)
    assert finding.code is Code.COMPLETIONS_EXCESS
    assert finding.numbers == {
        "completions": 10, "items": 8, "pods_without_work": 2, "no_work_pods": 2
    }  # fmt: skip
    assert "2 pod(s) found no work and exited after the idle timeout" in finding.message
    assert finding.advice == "pass completions=auto"  # completions=10 is the setting in force


def test_too_few_completions_is_one_finding_the_items_left_naming_the_completions() -> None:
    s = summary(expected=8, succeeded=5, left=3, attempts=5)
    before = completions(5, 8)
    left = after(run_id="r1", residual_ready=3, summary=s)
    kept = caveats.check_kept_queues(
        queue=Q, dead_queue=f"{Q}.dead", kept={Q: 3}, run_id="r1"
    )  # the cleanup asked for the queues to go: the work queue still holds the 3
    (finding,) = fitted([*before, *left, *kept], s, completions=5)
    assert finding.code is Code.ITEMS_LEFT
    assert finding.numbers == {
        "items": 3, "ready": 3, "unacked": 0, "completions": 5, "queue_kept": 3
    }  # fmt: skip
    assert "completions=5 for 8 items left them" in finding.message
    assert "queue 'job1' is kept: it holds 3 message(s)" in finding.message
    assert "`queuejob rerun r1 --fate left` runs them" in finding.advice
    assert "leave completions=auto" in finding.advice  # completions=5 was the setting


def test_completions_short_alone_before_the_job_keeps_its_advice() -> None:
    # Under caveat_policy=fail the run stops before the Job with this finding alone.
    (finding,) = fitted(completions(5, 8), summary(expected=8), completions=5)
    assert finding.code is Code.COMPLETIONS_SHORT
    assert "completions=auto" in finding.advice


def test_a_kept_dead_letter_queue_is_said_in_the_dead_letter_finding() -> None:
    s = summary(expected=8, succeeded=7, dead_lettered=1, attempts=11)
    kept = caveats.check_kept_queues(queue=Q, dead_queue=f"{Q}.dead", kept={f"{Q}.dead": 1})
    (finding,) = fitted([*after(dead_letters=1, summary=s), *kept], s)
    assert finding.code is Code.DEAD_LETTERS
    assert "queue 'job1.dead' is kept: it holds 1 message(s)" in finding.message


def test_a_kept_queue_with_nothing_of_this_run_in_it_stays_its_own_finding() -> None:
    # Another run's dead letters in the shared dead-letter queue.
    s = summary(expected=8, succeeded=8, attempts=8)
    kept = caveats.check_kept_queues(queue=Q, dead_queue=f"{Q}.dead", kept={f"{Q}.dead": 2})
    assert codes(fitted(kept, s)) == [Code.QUEUE_KEPT]


@pytest.mark.parametrize(
    ("mode", "text", "advice"),
    [
        pytest.param("coarse", "left its completion to a later pod", "killed or evicted", id="c"),
        pytest.param("fine", "in fine mode a pod that starts after", "lower parallelism", id="f"),
    ],
)
def test_no_work_pods_without_a_cause_stay_information_that_fits_the_mode(
    mode: str, text: str, advice: str
) -> None:
    s = summary(expected=8, succeeded=8, attempts=8, no_work_pods=1)
    (finding,) = fitted(after(summary=s), s, mode=mode)
    assert finding.code is Code.NO_WORK_PODS
    assert finding.severity is Severity.INFO
    assert text in finding.message and advice in finding.advice
    assert "completions=auto" not in finding.advice


def test_a_drained_queue_whose_pods_then_got_work_stays_information() -> None:
    live = drained(0, 0, state(active=1, succeeded=7))
    assert live is not None
    s = summary(expected=8, succeeded=8, attempts=8)
    assert fitted([live], s) == [live]


def test_the_other_findings_pass_through_unchanged() -> None:
    s = summary(expected=8, succeeded=6, left=2, processed_more_than_once=1, attempts=9)
    findings = [
        *after(summary=s, unreported_attempts=1),
        *completions(5, 8, "fine"),
    ]
    stale = check_stale(queue=Q, ready=2, unacked=0, consumers=0, policy="purge")
    assert stale is not None
    findings.insert(0, stale)
    failed_job = check_job_failed(state(JobPhase.FAILED, "BackoffLimitExceeded", failed=7), job="j")
    assert failed_job is not None
    findings.append(failed_job)
    assert fitted(findings, s, mode="fine") == findings
    assert codes(findings) == [
        Code.STALE_PURGED, Code.LEDGER_SHORT, Code.AT_LEAST_ONCE,
        Code.REDELIVERED_AFTER_LOST_ATTEMPT, Code.COMPLETIONS_IGNORED_FINE, Code.JOB_FAILED,
    ]  # fmt: skip


def test_with_completions_auto_no_finding_advises_completions_auto() -> None:
    """Every finding a run with completions=auto can end with: none asks for the setting the
    run already has."""
    s = summary(
        expected=20, succeeded=10, failed=1, dead_lettered=2, left=7,
        processed_more_than_once=1, attempts=25, no_work_pods=4,
    )  # fmt: skip
    live = drained(0, 0, state(active=1))
    assert live is not None
    stale = check_stale(queue=Q, ready=2, unacked=0, consumers=0, policy="purge")
    assert stale is not None
    findings = [
        stale,
        live,
        *after(
            confirmed=20, state=state(JobPhase.FAILED, "BackoffLimitExceeded", failed=7),
            residual_ready=3, dead_letters=2, delivery_limit=3, summary=s,
            unreported_attempts=1, run_id="r1",
        ),
        *caveats.check_kept_queues(queue=Q, dead_queue=f"{Q}.dead", kept={Q: 3}, run_id="r1"),
    ]  # fmt: skip
    job_failed = check_job_failed(state(JobPhase.FAILED, "BackoffLimitExceeded"), job="j")
    assert job_failed is not None
    final = fitted([*findings, job_failed], s)
    assert len({f.code for f in final}) == len(final), "one finding per code"
    for f in final:
        assert "completions=auto" not in f.advice, f.line()
    assert Code.NO_WORK_PODS in codes(final)  # 4 no-work pods: 2 dead, 1 failed slot, 1 other
    assert dict((f.code, f.numbers.get("no_work_pods")) for f in final)[Code.NO_WORK_PODS] == 1
