"""Job phase from status, checked against Job objects a real v1.32 control plane returned.

The recorded traces are test data kept in the repository (``tests/kube/traces``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from queuejob.flows.core.job_status import JobCounts, JobPhase, JobState, job_state
from tests.kube import TRACES

P, R, S, OK, F = (
    JobPhase.PENDING,
    JobPhase.RUNNING,
    JobPhase.SUSPENDED,
    JobPhase.SUCCEEDED,
    JobPhase.FAILED,
)


@pytest.fixture(scope="module")
def traces() -> Path:
    """The recorded traces folder (a failure when the checkout lacks it)."""
    if not (TRACES / "README.md").is_file():
        pytest.fail(f"the recorded Kubernetes traces are missing from the checkout: {TRACES}")
    return TRACES


def response_body(traces: Path, name: str) -> dict[str, Any]:
    exchange = json.loads((traces / name).read_text())
    assert exchange["response"]["status"] in (200, 201), name
    body: dict[str, Any] = exchange["response"]["body"]
    assert body["kind"] == "Job", name
    return body


def watch_events(traces: Path, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(type, Job) for every Job event of a recorded watch, BOOKMARKs left out."""
    with (traces / name).open() as fh:
        for line in fh:
            record = json.loads(line)
            event = record.get("event")
            if event is None or event["type"] == "BOOKMARK":
                continue
            yield event["type"], event["object"]


# --- single GETs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trace", "phase", "condition", "reason", "terminal", "counts"),
    [
        pytest.param(
            "s02-03-get-job-right-after-create.json",
            P,
            None,
            None,
            False,
            JobCounts(),
            id="s02-03-pending-right-after-create",
        ),
        pytest.param(
            "s02-05-get-job-at-end.json",
            OK,
            "Complete",
            "CompletionsReached",
            True,
            JobCounts(succeeded=3),
            id="s02-05-complete",
        ),
        pytest.param(
            "s02-08-get-suspended-job-after-2s.json",
            S,
            "Suspended",
            "JobSuspended",
            False,
            JobCounts(),
            id="s02-08-suspended-at-create",
        ),
        pytest.param(
            "s04-03-get-job-at-end.json",
            F,
            "Failed",
            "BackoffLimitExceeded",
            True,
            JobCounts(failed=2),
            id="s04-03-failed-backoff-limit",
        ),
        pytest.param(
            "s05-04-get-job-at-end.json",
            F,
            "Failed",
            "DeadlineExceeded",
            True,
            JobCounts(failed=1),
            id="s05-04-failed-deadline",
        ),
        pytest.param(
            "s06-13-get-completions-0-job-after-3s.json",
            OK,
            "Complete",
            "CompletionsReached",
            True,
            JobCounts(),
            id="s06-13-completions-0-complete-without-pods",
        ),
        pytest.param(
            "s09-03-get-job-after-5s.json",
            R,
            None,
            None,
            False,
            JobCounts(active=1, ready=1, succeeded=2),
            id="s09-03-running-one-pod-blocked",
        ),
        pytest.param(
            "s11-07-get-job-suspended.json",
            S,
            "Suspended",
            "JobSuspended",
            False,
            JobCounts(),
            id="s11-07-suspended-while-running",
        ),
        pytest.param(
            "s11-10-get-job-resumed.json",
            R,
            None,
            None,
            False,
            JobCounts(active=3, ready=3),
            id="s11-10-resumed-suspended-false",
        ),
    ],
)
def test_recorded_job(
    traces: Path,
    trace: str,
    phase: JobPhase,
    condition: str | None,
    reason: str | None,
    terminal: bool,
    counts: JobCounts,
) -> None:
    state = job_state(response_body(traces, trace))
    assert state.phase is phase
    assert state.condition == condition
    assert state.reason == reason
    assert state.terminal is terminal
    assert state.counts == counts
    assert state.phase.decided is (phase in (OK, F))


def test_failure_message_is_the_servers(traces: Path) -> None:
    state = job_state(response_body(traces, "s05-04-get-job-at-end.json"))
    assert state.message == "Job was active longer than specified deadline"
    assert state.describe() == (
        "Failed (DeadlineExceeded): active=0 ready=0 succeeded=0 failed=1 terminating=0"
    )


# --- watch sequences ------------------------------------------------------------------------


def _phases(traces: Path, name: str) -> list[tuple[str, JobPhase, str | None, bool]]:
    out = []
    for kind, obj in watch_events(traces, name):
        state = job_state(obj)
        out.append((kind, state.phase, state.condition, state.terminal))
    return out


@pytest.mark.parametrize(
    ("trace", "expected"),
    [
        pytest.param(
            "s03-job-watch-until-complete.jsonl",
            [
                ("MODIFIED", R, None, False),
                ("MODIFIED", R, None, False),
                ("MODIFIED", R, None, False),  # two pods uncounted: not yet succeeded
                ("MODIFIED", R, None, False),
                ("MODIFIED", R, None, False),
                ("MODIFIED", OK, "SuccessCriteriaMet", False),  # interim: already decided
                ("MODIFIED", OK, "Complete", True),
            ],
            id="s03-complete",
        ),
        pytest.param(
            "s04-job-watch-until-failed.jsonl",
            [
                ("MODIFIED", R, None, False),
                ("MODIFIED", R, None, False),  # no active pod, a failed one uncounted
                ("MODIFIED", R, None, False),  # failed=1, waiting for the back-off
                ("MODIFIED", R, None, False),
                ("MODIFIED", F, "FailureTarget", False),
                ("MODIFIED", F, "Failed", True),
            ],
            id="s04-backoff-limit",
        ),
        pytest.param(
            "s05-job-watch-until-failed.jsonl",
            [
                ("MODIFIED", R, None, False),
                ("MODIFIED", R, None, False),
                ("MODIFIED", F, "FailureTarget", False),  # a pod is still terminating
                ("MODIFIED", F, "FailureTarget", False),
                ("MODIFIED", F, "FailureTarget", False),
                ("MODIFIED", F, "Failed", True),
            ],
            id="s05-deadline",
        ),
        pytest.param(
            "s09-job-watch.jsonl",
            [
                ("MODIFIED", R, None, False),
                ("MODIFIED", R, None, False),
                ("MODIFIED", R, None, False),
                ("MODIFIED", R, None, False),
                ("DELETED", R, None, False),  # deleted while a pod was still blocked
            ],
            id="s09-blocked-then-deleted",
        ),
        pytest.param(
            "s11-job-watch.jsonl",
            [("MODIFIED", R, None, False)] * 6
            + [("MODIFIED", S, "Suspended", False)] * 3
            + [("MODIFIED", R, None, False)] * 2
            + [("DELETED", R, None, False)],
            id="s11-suspend-resume",
        ),
    ],
)
def test_watch_sequence(
    traces: Path, trace: str, expected: list[tuple[str, JobPhase, str | None, bool]]
) -> None:
    assert _phases(traces, trace) == expected


@pytest.mark.parametrize(
    ("trace", "reason"),
    [
        pytest.param("s03-job-watch-until-complete.jsonl", "CompletionsReached", id="s03"),
        pytest.param("s04-job-watch-until-failed.jsonl", "BackoffLimitExceeded", id="s04"),
        pytest.param("s05-job-watch-until-failed.jsonl", "DeadlineExceeded", id="s05"),
    ],
)
def test_first_decided_event_is_the_interim_one_and_nothing_changes_after(
    traces: Path, trace: str, reason: str
) -> None:
    states = [job_state(obj) for _, obj in watch_events(traces, trace)]
    decided = [n for n, s in enumerate(states) if s.phase.decided]
    first = states[decided[0]]
    # A waiter returns here, before every pod has terminated: the outcome is already known.
    assert first.condition in ("SuccessCriteriaMet", "FailureTarget")
    assert first.reason == reason
    assert not first.terminal
    assert decided == list(range(decided[0], len(states)))
    assert {s.phase for s in states[decided[0] :]} == {first.phase}
    assert states[-1].terminal


def test_interleaved_watch_of_many_jobs_never_leaves_a_decided_phase(traces: Path) -> None:
    # Replays the history of every Job of the session (ADDED from RV 1): per Job, once a phase
    # is decided it stays, and the Jobs known to end are seen ending the right way.
    last: dict[str, JobState] = {}
    for kind, obj in watch_events(traces, "s06-18a-watch-jobs-resourceVersion-1-young-cache.jsonl"):
        name = obj["metadata"]["name"]
        state = job_state(obj)
        before = last.get(name)
        if before is not None and before.phase.decided:
            assert state.phase is before.phase, (name, kind)
        if kind == "ADDED":
            assert state.phase is P, name
        last[name] = state
    assert last["queuejob-0002"].phase is OK
    assert last["queuejob-0004"].reason == "BackoffLimitExceeded"
    assert last["queuejob-0005"].reason == "DeadlineExceeded"
    assert last["queuejob-0009"].phase is R
    assert last["queuejob-0002-gen-wznqr"].phase is S


# --- synthetic objects (pre-1.31 and edge cases) ------------------------------------------------


def _cond(type_: str, reason: str = "", status: str = "True", message: str = "") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


@pytest.mark.parametrize(
    ("status", "phase", "condition", "terminal"),
    [
        pytest.param(
            {"conditions": [_cond("Complete", "CompletionsReached")], "succeeded": 3},
            OK,
            "Complete",
            True,
            id="pre-1.31-complete-only",
        ),
        pytest.param(
            {"conditions": [_cond("Failed", "BackoffLimitExceeded")], "failed": 7},
            F,
            "Failed",
            True,
            id="pre-1.31-failed-only",
        ),
        pytest.param(
            {"conditions": [_cond("Failed", "DeadlineExceeded")], "startTime": "t"},
            F,
            "Failed",
            True,
            id="pre-1.31-deadline",
        ),
        pytest.param(
            {"conditions": [_cond("Complete", "CompletionsReached", status="False")], "active": 1},
            R,
            None,
            False,
            id="condition-status-false-ignored",
        ),
        pytest.param(
            {"conditions": [_cond("Suspended", "JobSuspended"), _cond("FailureTarget", "X")]},
            F,
            "FailureTarget",
            False,
            id="failure-wins-over-suspended",
        ),
        pytest.param(
            # The terminal condition listed first still counts as the final word.
            {"conditions": [_cond("Failed", "BackoffLimitExceeded"), _cond("FailureTarget", "Y")]},
            F,
            "Failed",
            True,
            id="terminal-before-interim",
        ),
        pytest.param({}, P, None, False, id="empty-status"),
        pytest.param({"conditions": None, "active": None}, P, None, False, id="null-fields"),
        pytest.param({"failed": 1}, R, None, False, id="failed-pod-no-start-time"),
        pytest.param({"startTime": "t"}, R, None, False, id="started-no-pods"),
        pytest.param(
            {"conditions": [_cond("Suspended", "JobResumed", status="False")], "startTime": "t"},
            R,
            None,
            False,
            id="resumed",
        ),
    ],
)
def test_synthetic_status(
    status: dict[str, Any], phase: JobPhase, condition: str | None, terminal: bool
) -> None:
    state = job_state({"status": status})
    assert (state.phase, state.condition, state.terminal) == (phase, condition, terminal)


def test_job_without_status_is_pending() -> None:
    assert job_state({"metadata": {"name": "x"}}).phase is P
    assert job_state({"status": None}).phase is P


def test_counts_default_to_zero_when_omitted() -> None:
    counts = JobCounts.from_status({"active": 2, "terminating": 1, "uncountedTerminatedPods": {}})
    assert counts == JobCounts(active=2, ready=0, succeeded=0, failed=0, terminating=1)


@pytest.mark.parametrize(
    ("phase", "decided"),
    [(P, False), (R, False), (S, False), (OK, True), (F, True)],
    ids=lambda v: str(v),
)
def test_decided(phase: JobPhase, decided: bool) -> None:
    assert phase.decided is decided


def test_describe_without_reason() -> None:
    state = JobState(phase=R, counts=JobCounts(active=2, ready=1))
    assert state.describe() == "Running: active=2 ready=1 succeeded=0 failed=0 terminating=0"


def test_interim_success_counts_the_pods_not_yet_counted(traces: Path) -> None:
    """At SuccessCriteriaMet the recorded 1.32 Job says succeeded=2 with a third pod still in
    uncountedTerminatedPods; 16 ms later Complete says 3. The state read at the interim
    condition already counts 3, so a summary taken there agrees with the final one."""
    states = [
        job_state(obj)
        for _, obj in watch_events(traces, "s03-job-watch-until-complete.jsonl")
        if obj["status"].get("conditions")
    ]
    interim, final = states
    assert (interim.condition, interim.terminal, final.condition, final.terminal) == (
        "SuccessCriteriaMet",
        False,
        "Complete",
        True,
    )
    assert interim.counts.succeeded == final.counts.succeeded == 3
    # While pods are listed uncounted before any condition: the 2 finished pods count already.
    first = next(
        job_state(obj)
        for _, obj in watch_events(traces, "s03-job-watch-until-complete.jsonl")
        if obj["status"].get("uncountedTerminatedPods", {}).get("succeeded")
    )
    assert first.counts.succeeded == 2


def test_uncounted_failed_pods_count_as_failed() -> None:
    status = {"failed": 1, "uncountedTerminatedPods": {"failed": ["u1", "u2"], "succeeded": []}}
    assert JobCounts.from_status(status) == JobCounts(failed=3)
