"""The local backend applies a Job's podFailurePolicy as Kubernetes does: each rule of queuejob's
policy (FailJob on exit 2, Ignore on a disruption, everything else counted), with plain shell
pods (no broker needed); and podReplacementPolicy: Failed."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from queuejob.flows.core.errors import InvalidInput
from queuejob.flows.core.job_status import JobPhase
from queuejob.flows.core.pod_failure import pod_failure_policy

from .conftest import Harness, until

pytestmark = pytest.mark.timeout(60)

POLICY = {"podFailurePolicy": pod_failure_policy("worker")}


def pods(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job["local"]["pods"])


def test_exit_2_fails_the_job_at_once_naming_the_pod(harness: Harness) -> None:
    handle = harness.create(
        "echo bad config >&2; exit 2",
        completions=4,
        parallelism=2,
        backoff_limit=6,
        extra_spec=POLICY,
    )
    state = harness.backend.wait(handle, timeout_s=30)

    assert state.phase is JobPhase.FAILED and state.reason == "PodFailurePolicy"
    job = harness.terminal(handle)
    assert job["spec"]["podReplacementPolicy"] == "Failed"  # defaulted with a policy
    first = pods(job)[0]["name"]
    message = state.message or ""
    assert message.endswith("failed with exit code 2 matching FailJob rule at index 0")
    named = message.split("for pod default/")[1].split()[0]
    assert named in {p["name"] for p in pods(job)}
    assert [(c["type"], c["reason"]) for c in job["status"]["conditions"]] == [
        ("FailureTarget", "PodFailurePolicy"),
        ("Failed", "PodFailurePolicy"),
    ]
    # No replacement and no back-off: the two pods that ran, and nothing after them.
    assert len(pods(job)) <= 2 and job["status"]["failed"] == len(pods(job))
    assert first in {p["name"] for p in pods(job)}
    (detail, *_) = [f for f in harness.backend.failure_details(handle) if f.pod == named]
    assert detail.exit_code == 2 and "bad config" in detail.log_tail


def test_other_failures_count_toward_the_backoff_limit(harness: Harness) -> None:
    handle = harness.create("exit 3", completions=1, backoff_limit=1, extra_spec=POLICY)
    state = harness.backend.wait(handle, timeout_s=30)
    assert state.phase is JobPhase.FAILED and state.reason == "BackoffLimitExceeded"
    job = harness.terminal(handle)
    assert job["status"]["failed"] == 2 and len(pods(job)) == 2
    assert not state.disruptions


def test_a_pod_the_backend_stopped_is_a_disruption_the_policy_ignores(
    harness: Harness, tmp_path: Path
) -> None:
    # The first pod blocks; its supervisor is killed, which stops it (as a node going away
    # stops its pods). The replacement finds the marker and succeeds.
    script = 'if [ -e "$MARK" ]; then exit 0; fi; touch "$MARK"; sleep 600'
    handle = harness.create(
        script, backoff_limit=0, env={"MARK": str(tmp_path / "mark")}, extra_spec=POLICY
    )
    until(lambda: harness.job(handle)["status"].get("active") == 1, what="an active pod")
    os.kill(harness.job(handle)["local"]["supervisor"]["pid"], signal.SIGKILL)
    until(lambda: len(harness.processes(handle)) == 0, timeout=10, what="the pod to stop")

    # backoffLimit 0: had the lost pod counted, the Job would have failed.
    state = harness.backend.wait(handle, timeout_s=30)
    assert state.phase is JobPhase.SUCCEEDED
    job = harness.terminal(handle)
    assert "failed" not in job["status"] and job["status"]["succeeded"] == 1
    lost = pods(job)[0]
    assert lost["phase"] == "Failed" and lost["ignored"]
    assert [(c["type"], c["reason"]) for c in lost["conditions"]] == [
        ("DisruptionTarget", "DeletionByPodGC")
    ]
    (disruption,) = state.disruptions
    assert (disruption.pod, disruption.reason, disruption.counted) == (
        lost["name"],
        "DeletionByPodGC",
        False,
    )
    assert harness.backend.failure_details(handle) == []  # ignored: not a failure to explain


def test_without_a_policy_the_stopped_pod_counts(harness: Harness, tmp_path: Path) -> None:
    script = 'if [ -e "$MARK" ]; then exit 0; fi; touch "$MARK"; sleep 600'
    handle = harness.create(script, backoff_limit=0, env={"MARK": str(tmp_path / "mark")})
    until(lambda: harness.job(handle)["status"].get("active") == 1, what="an active pod")
    os.kill(harness.job(handle)["local"]["supervisor"]["pid"], signal.SIGKILL)
    until(lambda: len(harness.processes(handle)) == 0, timeout=10, what="the pod to stop")
    state = harness.backend.wait(handle, timeout_s=30)
    assert state.phase is JobPhase.FAILED and state.reason == "BackoffLimitExceeded"
    assert [d.counted for d in state.disruptions] == [True]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"podFailurePolicy": {"rules": "FailJob"}}, "needs a list of rules"),
        (
            {"podFailurePolicy": {"rules": [{"action": "FailIndex", "onExitCodes": {}}]}},
            "FailIndex",
        ),
        ({**POLICY, "podReplacementPolicy": "TerminatingOrFailed"}, "must be Failed"),
        ({"podReplacementPolicy": "Never"}, "Failed or TerminatingOrFailed"),
    ],
)
def test_policies_kubernetes_would_refuse_are_refused(
    harness: Harness, extra: dict[str, Any], match: str
) -> None:
    run_id, secret, job = harness.shell_job("true", extra_spec=extra)
    with pytest.raises(InvalidInput, match=match):
        harness.backend.create_or_adopt(secret=secret, job=job, run_id=run_id)
