"""The Job's failure fields on a Kubernetes 1.20 API server, which has neither
``podFailurePolicy`` (1.26+) nor ``podReplacementPolicy`` (1.29+): the backend reads the version,
the Job leaves the fields out, and exit 2 counts like any failure. And the kubelet stand-in keeps
the pod conditions it does not own."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from queuejob.flows.adapters.kube import KubeBackend
from queuejob.flows.core.job_status import JobPhase
from tests.realkube.helpers import NS, get, job_path, make_run, pods_of, wait_for
from tests.realkube.kubelet import Api


def test_a_1_20_server_gets_a_job_without_the_failure_fields(
    backend: KubeBackend, admin: Api, rid: str
) -> None:
    features = backend.server_features()
    assert features.version and features.version.startswith("v1.20.")
    assert not features.pod_failure_policy and not features.pod_replacement_policy
    note = features.omission_note() or ""
    assert features.version in note and "podFailurePolicy" in note

    secret, job = make_run(rid, "echo bad config >&2; exit 2", backoff_limit=1, features=features)
    assert "podFailurePolicy" not in job["spec"] and "podReplacementPolicy" not in job["spec"]
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    state = backend.wait(handle, timeout_s=90, tick_s=0.5)
    # No policy here: exit 2 is retried to the back-off limit like any failure.
    assert state.phase is JobPhase.FAILED and state.reason == "BackoffLimitExceeded"
    assert state.counts.failed == 2


def test_fields_a_1_20_server_drops_are_logged(
    backend: KubeBackend, admin: Api, rid: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret, job = make_run(rid, "exit 0")  # built for a current server: with both fields
    assert "podFailurePolicy" in job["spec"]
    with caplog.at_level(logging.WARNING, logger="queuejob.flows.adapters.kube"):
        handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    stored = get(admin, job_path(handle.name)) or {}
    assert "podFailurePolicy" not in stored["spec"], "1.20 does not know the field"
    assert any(
        "dropped podFailurePolicy and podReplacementPolicy" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_the_stand_in_keeps_conditions_it_does_not_own(
    backend: KubeBackend, admin: Api, rid: str, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    script = f"while [ ! -e {release} ]; do sleep 0.1; done; exit 1"
    secret, job = make_run(rid, script)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)

    def running_pod() -> str | None:
        pods = pods_of(admin, handle.name)
        ok = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        return str(ok[0]["metadata"]["name"]) if ok else None

    wait_for("a running pod", running_pod, timeout_s=30)
    pod = running_pod()
    # What the Eviction API of 1.26+ adds before it deletes the pod.
    condition = {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "EvictionByEvictionAPI",
        "message": "Eviction API: evicting",
    }
    admin.strategic_patch(
        f"/api/v1/namespaces/{NS}/pods/{pod}/status", {"status": {"conditions": [condition]}}
    )
    release.touch()

    def ended() -> dict | None:  # type: ignore[type-arg]
        current = get(admin, f"/api/v1/namespaces/{NS}/pods/{pod}") or {}
        return current if (current.get("status") or {}).get("phase") == "Failed" else None

    wait_for("the pod's terminal status", ended, timeout_s=30)
    final = ended() or {}
    types = {c["type"]: c for c in final["status"]["conditions"]}
    assert {"Initialized", "Ready", "ContainersReady", "PodScheduled"} <= set(types)
    assert types["DisruptionTarget"]["reason"] == "EvictionByEvictionAPI"
    assert types["Ready"]["status"] == "False"
