"""Pods that never start: what the tracker makes of pods and events over time, the findings and
the run's outcome (pure: the clock is an argument)."""

from __future__ import annotations

from typing import Any

import pytest

from queuejob.flows.core.caveats import Code, Severity, check_after, check_start, fit
from queuejob.flows.core.errors import InvalidInput
from queuejob.flows.core.job_status import JobCounts, JobPhase, JobState
from queuejob.flows.core.ledger import LedgerSummary
from queuejob.flows.core.outcome import Tolerance, decide
from queuejob.flows.core.pods import PodTracker, StartLimits

IMAGE = "registry.example/queuejob:1.O"
JOB = {
    "metadata": {"name": "queuejob-abc", "uid": "job-uid", "namespace": "batch"},
    "spec": {"completions": 3, "parallelism": 2},
}
FINE_JOB = {**JOB, "spec": {"parallelism": 2}}
PULL = 'rpc error: code = NotFound desc = failed to pull and unpack image "x": not found'
BACKOFF = f'Back-off pulling image "{IMAGE}"'
UNSCHEDULABLE = "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
QUOTA = (
    'pods "queuejob-abc-x7k2p" is forbidden: exceeded quota: nopods, requested: pods=1, used: '
    "pods=0, limited: pods=0"
)


def pod(
    name: str,
    *,
    waiting: tuple[str, str | None] | None = None,
    running: bool = False,
    unschedulable: str | None = None,
    phase: str | None = None,
) -> dict[str, Any]:
    """A pod of the Job as a real kubelet and scheduler write it."""
    status: dict[str, Any] = {"phase": phase or ("Running" if running else "Pending")}
    if unschedulable is not None:
        status["conditions"] = [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": unschedulable,
            }
        ]
    elif waiting is not None or running:
        state: dict[str, Any] = (
            {"running": {"startedAt": "2026-12-05T10:00:00Z"}}
            if running
            else {"waiting": {"reason": waiting[0], "message": waiting[1]}}  # type: ignore[index]
        )
        status["containerStatuses"] = [
            {"name": "worker", "image": IMAGE, "state": state, "ready": running}
        ]
    return {
        "metadata": {"name": f"queuejob-abc-{name}", "uid": f"uid-{name}", "namespace": "batch"},
        "spec": {"containers": [{"name": "worker", "image": IMAGE}]},
        "status": status,
    }


def job_event(reason: str, message: str, at: str, kind: str = "Warning") -> dict[str, Any]:
    """An event of the Job as the Job controller records it (core/v1)."""
    return {
        "involvedObject": {"kind": "Job", "name": "queuejob-abc", "uid": "job-uid"},
        "reason": reason,
        "message": message,
        "type": kind,
        "lastTimestamp": at,
    }


def running_state(active: int = 2, **counts: int) -> JobState:
    return JobState(phase=JobPhase.RUNNING, counts=JobCounts(active=active, **counts))


def tracker(job: dict[str, Any] = JOB, grace: float = 60, timeout: float = 600) -> PodTracker:
    return PodTracker.for_job(job, limits=StartLimits(grace_s=grace, timeout_s=timeout), now=0.0)


# --- the rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["InvalidImageName", "ErrImageNeverPull"])
def test_a_reason_no_retry_can_fix_gives_up_at_once(reason: str) -> None:
    t = tracker()
    t.observe(pod("a", waiting=(reason, "bad reference")), now=1.0)
    state = t.apply(running_state(), 1.5)
    failure = state.start_failure
    assert failure is not None
    assert (failure.reason, failure.rule, failure.pods, failure.image) == (
        reason,
        "at once",
        ("queuejob-abc-a",),
        IMAGE,
    )
    assert failure.line() == f"1 pod pending: {reason}: bad reference"
    assert state.settled and not state.phase.decided


def test_a_pull_error_is_named_at_once_and_gives_up_after_the_grace() -> None:
    t = tracker(grace=60)
    t.observe(pod("a", waiting=("ErrImagePull", PULL)), now=2.0)
    t.observe(pod("b", waiting=("ErrImagePull", PULL)), now=2.5)
    state = t.apply(running_state(), 3.0)
    assert state.start_failure is None
    assert state.pending is not None
    assert state.pending.line() == f"2 pods pending: ErrImagePull: {PULL}"
    # The kubelet's back-off alternates the two reasons: one error all along.
    # The pods back off at their own pace: still one cause, named by the back-off and the
    # last pull error (the back-off alone does not say why).
    t.observe(pod("a", waiting=("ImagePullBackOff", BACKOFF)), now=4.0)
    state = t.apply(running_state(), 4.0)
    assert state.pending is not None
    assert state.pending.line() == (
        f"2 pods pending: ImagePullBackOff: {BACKOFF}: ErrImagePull: {PULL}"
    )
    t.observe(pod("b", waiting=("ImagePullBackOff", BACKOFF)), now=4.5)
    assert t.apply(running_state(), 61.9).start_failure is None
    state = t.apply(running_state(), 62.0)
    failure = state.start_failure
    assert failure is not None
    assert failure.line() == f"2 pods pending: ImagePullBackOff: {BACKOFF}: ErrImagePull: {PULL}"
    assert failure.pods == ("queuejob-abc-a", "queuejob-abc-b")
    assert failure.rule == "start_grace_seconds=60" and failure.seconds == pytest.approx(60.0)
    assert "ImagePullBackOff" in state.describe()


def test_a_start_error_that_clears_inside_the_grace_does_not_fail() -> None:
    t = tracker(grace=10, timeout=30)
    t.observe(pod("a", waiting=("CreateContainerConfigError", 'secret "late" not found')), now=1)
    assert t.apply(running_state(), 5).pending is not None
    t.observe(pod("a", running=True), now=6)
    assert t.started
    for now in (11.0, 31.0, 1000.0):
        state = t.apply(running_state(ready=1), now)
        assert state.start_failure is None and state.pending is None


def test_unschedulable_waits_for_the_start_timeout_not_the_grace() -> None:
    t = tracker(grace=5, timeout=30)
    t.observe(pod("a", unschedulable=UNSCHEDULABLE), now=0.5)
    state = t.apply(running_state(), 10.0)
    assert state.start_failure is None
    assert state.pending is not None and state.pending.kind == "scheduling"
    assert state.pending.line() == f"1 pod pending: Unschedulable: {UNSCHEDULABLE}"
    failure = t.apply(running_state(), 30.0).start_failure
    assert failure is not None and failure.reason == "Unschedulable"
    assert failure.rule == "start_timeout_seconds=30"


def test_a_start_timeout_of_zero_waits_as_before_but_a_bad_image_still_fails() -> None:
    t = tracker(grace=5, timeout=0)
    t.observe(pod("a", unschedulable=UNSCHEDULABLE), now=0)
    assert t.apply(running_state(), 10_000).start_failure is None
    t.observe(pod("b", waiting=("InvalidImageName", "bad")), now=10_001)
    assert t.apply(running_state(), 10_001).start_failure is not None


def test_failed_create_names_the_quota_and_gives_up_at_the_timeout() -> None:
    t = tracker(grace=5, timeout=30)
    state = t.apply(JobState(phase=JobPhase.PENDING, counts=JobCounts()), 1.0)
    assert state.pending is None  # a Job with no pod yet, for a moment: nothing to say
    changed = t.observe_event(
        job_event("FailedCreate", f"Error creating: {QUOTA}", "2026-12-05T10:00:01Z"), now=1.0
    )
    assert changed
    state = t.apply(JobState(phase=JobPhase.PENDING, counts=JobCounts()), 2.0)
    assert state.pending is not None
    assert state.pending.line() == f"Job cannot create pods: FailedCreate: {QUOTA}"
    # The same event again (its count raised) changes nothing.
    assert not t.observe_event(
        job_event("FailedCreate", f"Error creating: {QUOTA}", "2026-12-05T10:00:09Z"), now=9.0
    )
    failure = t.apply(JobState(phase=JobPhase.PENDING, counts=JobCounts()), 30.0).start_failure
    assert failure is not None
    assert (failure.kind, failure.reason, failure.message) == ("create", "FailedCreate", QUOTA)


def test_a_later_successful_create_clears_the_failed_create() -> None:
    t = tracker(grace=5, timeout=30)
    t.observe_event(job_event("FailedCreate", f"Error creating: {QUOTA}", "2026-12-05T10:00:01Z"))
    assert t.observe_event(
        job_event(
            "SuccessfulCreate", "Created pod: queuejob-abc-a", "2026-12-05T10:00:05Z", "Normal"
        )
    )
    # An older FailedCreate read after it (a re-list) does not bring it back.
    assert not t.observe_event(
        job_event("FailedCreate", f"Error creating: {QUOTA}", "2026-12-05T10:00:02Z")
    )
    t.observe(pod("a", waiting=("ContainerCreating", None)), now=6)
    state = t.apply(running_state(active=1), 7)
    assert state.pending is None  # on its way: said only once it has lasted the grace
    assert t.apply(running_state(active=1), 11).pending is not None


def test_no_pod_at_all_fails_at_the_timeout_and_says_the_events_could_not_be_read() -> None:
    t = tracker(grace=5, timeout=20)
    t.events_readable = False
    failure = t.apply(JobState(phase=JobPhase.PENDING, counts=JobCounts()), 20.0).start_failure
    assert failure is not None and failure.kind == "none" and failure.reason == "NoPods"
    assert "events" in (failure.message or "")
    assert failure.line().startswith("Job has no pods: NoPods: ")


def test_time_while_suspended_does_not_count() -> None:
    t = tracker(grace=5, timeout=20)
    t.apply(JobState(phase=JobPhase.SUSPENDED, counts=JobCounts()), 15.0)
    assert t.apply(JobState(phase=JobPhase.PENDING, counts=JobCounts()), 30.0).start_failure is None
    assert t.apply(JobState(phase=JobPhase.PENDING, counts=JobCounts()), 35.0).start_failure


def test_a_decided_job_has_no_start_failure() -> None:
    t = tracker(grace=0, timeout=1)
    t.observe(pod("a", waiting=("InvalidImageName", "bad")), now=0)
    decided = JobState(phase=JobPhase.FAILED, counts=JobCounts(failed=1), reason="X")
    state = t.apply(decided, 100.0)
    assert state.start_failure is None and state.pending is None


def test_sandbox_events_of_the_jobs_pods_say_why_they_wait() -> None:
    t = tracker(grace=5, timeout=20)
    t.observe(pod("a", waiting=("ContainerCreating", None)), now=0)
    other = {
        "involvedObject": {"kind": "Pod", "name": "someone-else-x1"},
        "reason": "FailedCreatePodSandBox",
        "message": "not ours",
    }
    assert not t.observe_event(other)
    ours = {**other, "involvedObject": {"kind": "Pod", "name": "queuejob-abc-a", "uid": "uid-a"}}
    ours["message"] = "Failed to create pod sandbox: network plugin is not ready"
    assert t.observe_event(ours)
    state = t.apply(running_state(), 1.0)
    assert state.pending is not None and state.pending.kind == "sandbox"
    assert "network plugin is not ready" in state.pending.line()
    failure = t.apply(running_state(), 20.0).start_failure
    assert failure is not None and failure.reason == "FailedCreatePodSandBox"


def test_limits_are_not_negative() -> None:
    with pytest.raises(InvalidInput, match="0 or more seconds"):
        StartLimits(grace_s=-1)


# --- once a pod has started -----------------------------------------------------------------


def test_a_pod_stuck_while_others_run_is_noted_not_failed() -> None:
    t = tracker(grace=5, timeout=20)
    t.observe(pod("a", running=True), now=0)
    t.observe(pod("b", waiting=("ImagePullBackOff", BACKOFF)), now=0)
    assert t.apply(running_state(ready=1), 4.0).stuck == ()
    state = t.apply(running_state(ready=1), 6.0)
    assert state.start_failure is None and not state.held_open
    (stuck,) = state.stuck
    assert stuck.pods == ("queuejob-abc-b",) and stuck.rule == "start_grace_seconds=5"
    # Coarse mode (completions set): a Job with a succeeded pod is not held open by it.
    assert not t.apply(running_state(active=1, succeeded=1), 30.0).held_open


def test_a_fine_mode_job_whose_work_is_done_is_not_held_by_a_pod_that_never_started() -> None:
    t = tracker(FINE_JOB, grace=5, timeout=20)
    t.observe(pod("a", running=True), now=0)
    t.observe(pod("b", waiting=("ImagePullBackOff", BACKOFF)), now=0)
    assert not t.apply(running_state(ready=1), 10.0).held_open  # a still works
    t.observe(pod("a", phase="Succeeded"), now=11.0)
    state = t.apply(running_state(active=1, succeeded=1), 11.0)
    assert state.held_open and state.settled
    assert [s.pods for s in state.stuck] == [("queuejob-abc-b",)]


def test_a_fine_mode_job_is_not_held_open_by_a_pod_still_within_its_grace() -> None:
    t = tracker(FINE_JOB, grace=60, timeout=600)
    t.observe(pod("a", phase="Succeeded"), now=0)
    t.observe(pod("b", waiting=("ContainerCreating", None)), now=0)
    assert not t.apply(running_state(active=1, succeeded=1), 5.0).held_open


# --- findings and the outcome ---------------------------------------------------------------


def _summary(expected: int, succeeded: int = 0, left: int = 0) -> LedgerSummary:
    return LedgerSummary(
        expected=expected,
        succeeded=succeeded,
        failed=0,
        dead_lettered=0,
        left=left,
        processed_more_than_once=0,
        attempts=succeeded,
        no_work_pods=0,
        foreign_records=0,
    )


def test_the_finding_names_the_cause_the_image_the_pods_and_the_next_command() -> None:
    t = tracker(grace=60)
    t.observe(pod("a", waiting=("ImagePullBackOff", BACKOFF)), now=0)
    state = t.apply(running_state(), 61.0)
    (finding,) = check_start(state, job="queuejob-abc", namespace="batch", run_id="RUN")
    assert finding.code is Code.PODS_CANNOT_START and finding.severity is Severity.ERROR
    assert finding.code.kind == "outcome"
    assert f"ImagePullBackOff: {BACKOFF}" in finding.message
    assert "pod queuejob-abc-a" in finding.message and f"image {IMAGE}" in finding.message
    assert "past start_grace_seconds=60" in finding.message
    assert "deleted the Job, its pods and its Secret" in finding.message
    assert "`queuejob rerun RUN --fate left --image <an image that pulls>`" in finding.advice
    assert finding.numbers["image"] == IMAGE and finding.numbers["reason"] == "ImagePullBackOff"


def test_fit_keeps_one_finding_for_pods_that_cannot_start() -> None:
    t = tracker(grace=5, timeout=30)
    t.observe_event(job_event("FailedCreate", f"Error creating: {QUOTA}", "2026-12-05T10:00:01Z"))
    state = t.apply(JobState(phase=JobPhase.PENDING, counts=JobCounts()), 31.0)
    summary = _summary(3, left=3)
    findings = check_start(state, job="queuejob-abc", namespace="batch", run_id="RUN")
    findings += check_after(
        queue="job1",
        confirmed=3,
        state=state,
        residual_ready=3,
        residual_unacked=0,
        dead_letters=0,
        summary=summary,
        delivery_limit=3,
        run_id="RUN",
    )
    assert {f.code for f in findings} == {Code.PODS_CANNOT_START, Code.ITEMS_LEFT}
    (only,) = fit(findings, summary=summary, mode="coarse", completions=3, confirmed=3)
    assert only.code is Code.PODS_CANNOT_START
    assert "3 item(s) stay in the work queue for a rerun" in only.message
    assert "ResourceQuota" in only.advice and "`queuejob rerun RUN --fate left`" in only.advice


def test_stuck_pods_are_one_warning_caveat() -> None:
    t = tracker(FINE_JOB, grace=5, timeout=20)
    t.observe(pod("a", phase="Succeeded"), now=0)
    t.observe(pod("b", waiting=("ErrImagePull", PULL)), now=0)
    state = t.apply(running_state(active=1, succeeded=1), 6.0)
    (finding,) = check_start(state, job="queuejob-abc", namespace="batch")
    assert finding.code is Code.PODS_STUCK and finding.severity is Severity.WARNING
    assert finding.code.kind == "caveat"
    assert "1 pod(s) of Job 'queuejob-abc' never started" in finding.message
    assert "kept the Job from completing" in finding.message


def test_the_outcome_of_pods_that_cannot_start() -> None:
    line = f"Job cannot create pods: FailedCreate: {QUOTA} (start_timeout_seconds=30)"
    outcome = decide(
        summary=_summary(3, left=3),
        job_phase="Pending",
        job_reason=None,
        tolerance=Tolerance.parse("100%"),  # nothing was tried: no tolerance makes it Completed
        run_id="RUN",
        start_failure=line,
    )
    assert outcome.failed and outcome.reasons == ("pods",)
    assert outcome.headline == "Failed: no pod could start; 3 of 3 items left in the queue"
    assert outcome.job == "Job deleted"
    assert outcome.rerun == "queuejob rerun RUN --fate left"
    assert line in outcome.message
    assert "the items stay in the queue; `queuejob rerun RUN --fate left` runs them" in (
        outcome.message
    )
