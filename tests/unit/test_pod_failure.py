"""The Job's pod failure policy: the rules, a template's extra rules, matching a failed pod the
way Kubernetes does (order, wording), what a server of a given version keeps, and the pods the
wait saw disrupted."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from queuejob.flows.core.manifest import JobSpec, build_job
from queuejob.flows.core.pod_failure import (
    COUNT,
    FAIL_JOB,
    IGNORE,
    USAGE_EXIT_CODE,
    ServerFeatures,
    check_rules,
    explain_policy_failure,
    match,
    match_pod,
    named_pod,
    pod_failure_policy,
)
from queuejob.flows.core.pods import PodTracker
from queuejob.flows.worker.options import EXIT_USAGE

RUN_ID = "3f2a9c1e-7b4d-4e8f-9a0b-1c2d3e4f5a6b"
IMAGE = "registry.example.invalid/queuejob-worker:1.0"
# The policy of every recorded Job in tests/kube/traces/p*.
RECORDED = {
    "rules": [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "worker", "operator": "In", "values": [2]},
        },
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]
}


def spec(**kw: Any) -> JobSpec:
    return JobSpec(image=IMAGE, command=("cat",), **kw)


def test_the_worker_exit_code_the_policy_fails_on_is_the_workers_usage_exit() -> None:
    assert USAGE_EXIT_CODE == EXIT_USAGE == 2


def test_the_job_carries_the_recorded_policy_and_replacement_policy() -> None:
    job = build_job(spec(), run_id=RUN_ID, queue="q", completions=2)
    assert job["spec"]["podFailurePolicy"] == RECORDED
    assert job["spec"]["podReplacementPolicy"] == "Failed"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # what the policy needs


def test_a_templates_rules_follow_queuejobs_own() -> None:
    extra = {"action": "Count", "onPodConditions": [{"type": "ConfigIssue"}]}
    job = build_job(spec(pod_failure_rules=(extra,)), run_id=RUN_ID, queue="q", completions=2)
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[:2] == RECORDED["rules"]
    # The server's default for a pattern's status is written out.
    assert rules[2] == {
        "action": "Count",
        "onPodConditions": [{"type": "ConfigIssue", "status": "True"}],
    }


@pytest.mark.parametrize(
    ("features", "policy", "replacement"),
    [
        pytest.param(ServerFeatures(), True, True, id="current"),
        pytest.param(
            ServerFeatures.from_version({"major": "1", "minor": "27+"}), True, False, id="1.27"
        ),
        pytest.param(
            ServerFeatures.from_version({"major": "1", "minor": "20"}), False, False, id="1.20"
        ),
    ],
)
def test_fields_a_server_does_not_know_are_left_out(
    features: ServerFeatures, policy: bool, replacement: bool
) -> None:
    job = build_job(spec(), run_id=RUN_ID, queue="q", completions=2, features=features)
    assert ("podFailurePolicy" in job["spec"]) is policy
    assert ("podReplacementPolicy" in job["spec"]) is replacement
    assert job["spec"]["backoffLimit"] == 6


@pytest.mark.parametrize(
    ("info", "policy", "replacement", "version"),
    [
        ({"major": "1", "minor": "20", "gitVersion": "v1.20.15"}, False, False, "v1.20.15"),
        ({"major": "1", "minor": "25", "gitVersion": "v1.25.0"}, False, False, "v1.25.0"),
        ({"major": "1", "minor": "26", "gitVersion": "v1.26.1"}, True, False, "v1.26.1"),
        (
            {"major": "1", "minor": "28+", "gitVersion": "v1.28.3-gke.1"},
            True,
            False,
            "v1.28.3-gke.1",
        ),
        ({"major": "1", "minor": "29"}, True, True, "v1.29"),
        ({"major": "1", "minor": "32", "gitVersion": "v1.32.13"}, True, True, "v1.32.13"),
        ({"major": "", "minor": "", "gitVersion": "v1.24.2-eks-1"}, False, False, "v1.24.2-eks-1"),
        ({}, True, True, None),
    ],
)
def test_server_features_from_version(
    info: dict[str, str], policy: bool, replacement: bool, version: str | None
) -> None:
    features = ServerFeatures.from_version(info)
    assert (features.pod_failure_policy, features.pod_replacement_policy) == (policy, replacement)
    assert features.version == version


def test_the_omission_note_names_the_version_the_fields_and_the_effect() -> None:
    note = ServerFeatures.from_version({"major": "1", "minor": "20", "gitVersion": "v1.20.15"})
    text = note.omission_note() or ""
    assert "v1.20.15" in text and "podFailurePolicy (Kubernetes 1.26+)" in text
    assert "podReplacementPolicy (Kubernetes 1.29+)" in text and "backoffLimit" in text
    assert ServerFeatures().omission_note() is None


# --- matching ---------------------------------------------------------------------------------


def test_exit_2_matches_failjob_in_kubernetes_words() -> None:
    found = match(
        RECORDED,
        namespace="default",
        pod="pfp-exit2-rht9q",
        exit_codes={"worker": 2},
        conditions=(),
    )
    assert found is not None and (found.action, found.index) == (FAIL_JOB, 0)
    # p01-job-watch-until-finished.jsonl, the FailureTarget condition's message:
    assert found.message == (
        "Container worker for pod default/pfp-exit2-rht9q failed with exit code 2 matching "
        "FailJob rule at index 0"
    )


def test_a_disruption_matches_ignore_and_other_failures_match_nothing() -> None:
    evicted = [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]
    found = match(RECORDED, namespace="ns", pod="p", exit_codes={"worker": 143}, conditions=evicted)
    assert found is not None and (found.action, found.index) == (IGNORE, 1)
    assert (
        found.message == "Pod ns/p has condition DisruptionTarget matching Ignore rule at index 1"
    )
    assert match(RECORDED, namespace="ns", pod="p", exit_codes={"worker": 3}, conditions=()) is None
    not_true = [{"type": "DisruptionTarget", "status": "False"}]
    assert (
        match(RECORDED, namespace="ns", pod="p", exit_codes={"worker": 3}, conditions=not_true)
        is None
    )


def test_first_matching_rule_wins_and_exit_0_matches_no_exit_code_rule() -> None:
    policy = {
        "rules": [
            {"action": COUNT, "onExitCodes": {"operator": "NotIn", "values": [5]}},
            {"action": FAIL_JOB, "onExitCodes": {"operator": "In", "values": [2]}},
        ]
    }
    found = match(policy, namespace="n", pod="p", exit_codes={"worker": 2}, conditions=())
    assert found is not None and (found.action, found.index) == (COUNT, 0)
    assert match(policy, namespace="n", pod="p", exit_codes={"worker": 0}, conditions=()) is None
    assert match(policy, namespace="n", pod="p", exit_codes={"worker": None}, conditions=()) is None
    assert match(None, namespace="n", pod="p", exit_codes={"worker": 2}, conditions=()) is None
    other = {
        "rules": [
            {
                "action": FAIL_JOB,
                "onExitCodes": {"containerName": "side", "operator": "In", "values": [2]},
            }
        ]
    }
    assert match(other, namespace="n", pod="p", exit_codes={"worker": 2}, conditions=()) is None


def test_match_pod_reads_a_pod_object() -> None:
    pod = {
        "metadata": {"name": "p1", "namespace": "batch"},
        "status": {
            "phase": "Failed",
            "containerStatuses": [{"name": "worker", "state": {"terminated": {"exitCode": 2}}}],
        },
    }
    found = match_pod(pod_failure_policy("worker"), pod)
    assert found is not None and found.action == FAIL_JOB and "pod batch/p1" in found.message


# --- a template's rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        (
            {"action": "FailIndex", "onExitCodes": {"operator": "In", "values": [1]}},
            "backoffLimitPerIndex",
        ),
        ({"action": "Retry", "onExitCodes": {"operator": "In", "values": [1]}}, "not one of"),
        ({"action": "Count"}, "exactly one of"),
        (
            {
                "action": "Count",
                "onExitCodes": {"operator": "In", "values": [1]},
                "onPodConditions": [{"type": "X"}],
            },
            "exactly one of",
        ),
        ({"action": "Count", "onExitCodes": {"operator": "In", "values": [0, 1]}}, "exit code 0"),
        (
            {"action": "Count", "onExitCodes": {"operator": "In", "values": [3, 1]}},
            "increasing order",
        ),
        ({"action": "Count", "onExitCodes": {"operator": "In", "values": []}}, "non-empty"),
        ({"action": "Count", "onExitCodes": {"operator": "Is", "values": [1]}}, "In or NotIn"),
        (
            {
                "action": "Count",
                "onExitCodes": {"containerName": "main", "operator": "In", "values": [1]},
            },
            "'worker'",
        ),
        ({"action": "Count", "onPodConditions": []}, "non-empty"),
        ({"action": "Count", "onPodConditions": [{"type": "bad type"}]}, "condition type"),
        (
            {"action": "Count", "onPodConditions": [{"type": "X", "status": "yes"}]},
            "True, False or Unknown",
        ),
        ({"action": "Count", "onExitCode": {}}, "unknown field"),
        ("FailJob", "must be an object"),
    ],
)
def test_bad_extra_rules_are_refused_with_what_to_change(rule: Any, fragment: str) -> None:
    with pytest.raises(ValueError, match="pod failure rule 0") as info:
        check_rules([rule], container="worker")
    assert fragment in str(info.value)
    with pytest.raises(pydantic.ValidationError, match="pod_failure_rules"):
        spec(pod_failure_rules=(rule,))


def test_at_most_eighteen_extra_rules() -> None:
    rule = {"action": "Count", "onPodConditions": [{"type": "X"}]}
    assert len(check_rules([rule] * 18, container="worker")) == 18
    with pytest.raises(ValueError, match="give at most 18"):
        check_rules([rule] * 19, container="worker")


# --- a Job failed by the policy ---------------------------------------------------------------


def test_explanation_names_the_pod_the_meaning_of_exit_2_and_the_end_of_its_log() -> None:
    message = (
        "Container worker for pod default/job-abc12 failed with exit code 2 matching FailJob "
        "rule at index 0"
    )
    assert named_pod(message) == "job-abc12"
    failures = [
        {"pod": "job-zzz99", "log_tail": "other"},
        {
            "pod": "job-abc12",
            "log_tail": "line 1\nline 2\n\n[queuejob worker job-abc12] error: --call 'nosuch:f' "
            "cannot be loaded\n",
        },
    ]
    text = explain_policy_failure(message, failures, lines=2)
    assert text.startswith(message)
    assert "usage or configuration error" in text
    assert text.endswith(
        "line 2 / [queuejob worker job-abc12] error: --call 'nosuch:f' cannot be loaded"
    )
    assert "other" not in text and "\n" not in text
    assert (
        named_pod("Pod default/p-1 has condition ConfigIssue matching FailJob rule at index 2")
        == "p-1"
    )


# --- what the wait saw ------------------------------------------------------------------------


def _pod(
    name: str, phase: str, conditions: list[dict[str, Any]], code: int | None = None
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "conditions": conditions}
    if code is not None:
        status["containerStatuses"] = [
            {"name": "worker", "state": {"terminated": {"exitCode": code}}}
        ]
    return {"metadata": {"name": name, "namespace": "default"}, "status": status}


EVICTED = {
    "type": "DisruptionTarget",
    "status": "True",
    "reason": "EvictionByEvictionAPI",
    "message": "Eviction API: evicting",
}


def test_tracker_lists_disrupted_pods_once_and_whether_they_counted() -> None:
    tracker = PodTracker(RECORDED)
    tracker.observe(_pod("a", "Running", [{"type": "Ready", "status": "True"}]))  # a new pod
    assert not tracker.observe(_pod("a", "Running", [{"type": "Ready", "status": "True"}]))
    assert not tracker.disruptions
    assert tracker.observe(_pod("a", "Running", [EVICTED]))
    assert not tracker.observe(_pod("a", "Running", [EVICTED]))
    assert tracker.observe(_pod("b", "Failed", [EVICTED], code=143))
    (a, b) = tracker.disruptions
    assert (a.pod, a.reason, a.message, a.counted) == (
        "a",
        "EvictionByEvictionAPI",
        "Eviction API: evicting",
        False,
    )
    assert b.pod == "b" and not b.counted
    # A disrupted pod that still exited 0 succeeded: not a disruption of the run.
    assert tracker.observe(_pod("a", "Succeeded", [EVICTED], code=0))
    assert [d.pod for d in tracker.disruptions] == ["b"]


def test_without_a_policy_a_disruption_counts() -> None:
    tracker = PodTracker(None)
    tracker.observe(_pod("a", "Failed", [EVICTED], code=143))
    assert tracker.disruptions[0].counted


def test_a_template_block_adds_rules_and_a_timeout_and_refuses_bad_rules() -> None:
    from queuejob.blocks import WorkQueueJobTemplate
    from queuejob.flows.core.errors import InvalidInput

    rule = {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [137]}}
    block = WorkQueueJobTemplate(
        image=IMAGE, command=["cat"], pod_failure_rules=[rule], item_timeout_seconds=30
    )
    job = build_job(block.to_job_spec(), run_id=RUN_ID, queue="q", completions=1)
    assert job["spec"]["podFailurePolicy"]["rules"][2] == rule
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--item-timeout") + 1] == "30"
    bad = WorkQueueJobTemplate(
        image=IMAGE, command=["cat"], pod_failure_rules=[{**rule, "action": "FailIndex"}]
    )
    with pytest.raises(InvalidInput, match="pod failure rule 0: action FailIndex"):
        bad.to_job_spec()
