"""The Kubernetes backend and the Job's pod failure policy, against the fake API server: the
server's version read once, exit 2 failing the Job at once, an eviction through the Eviction
API seen by the wait and not counted, and a Role without ``watch`` on pods survived."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from queuejob.flows.adapters.kube import KubeBackend
from queuejob.flows.core.job_status import JobPhase, JobState
from queuejob.flows.core.pod_failure import ServerFeatures
from tests.fakekube import FakeKubeServer
from tests.fakekube.rawhttp import call
from tests.shell_jobs import shell_run

pytestmark = pytest.mark.kube

BROKER_URL = "amqp://queuejob:pw-never-shown-9c1d@rabbitmq.example.invalid:5672/%2F"


@pytest.fixture
def backend(fake_kubeconfig: Path) -> Iterator[KubeBackend]:
    yield KubeBackend.from_config(
        kubeconfig=str(fake_kubeconfig), request_timeout_s=5, watch_timeout_s=5, retry_base_s=0.05
    )


@pytest.fixture
def rid() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


def _run(run_id: str, script: str, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return shell_run(run_id, script, broker_url=BROKER_URL, **kw)


def _versions_read(fake: FakeKubeServer) -> int:
    return sum(
        1 for m, path, _ in list(fake.requests) if m == "GET" and path.rstrip("/") == "/version"
    )


def test_the_fakes_version_keeps_both_fields_and_is_read_once(
    fake_kube: FakeKubeServer, backend: KubeBackend
) -> None:
    features = backend.server_features()
    assert features == ServerFeatures(version="v1.32.13")
    assert backend.server_features() is features
    assert _versions_read(fake_kube) == 1


def test_exit_2_fails_the_job_at_once_naming_the_pod(
    fake_kube: FakeKubeServer, backend: KubeBackend, rid: str
) -> None:
    secret, job = _run(rid, "echo bad config >&2; exit 2", completions=3, backoff_limit=6)
    assert job["spec"]["podFailurePolicy"]["rules"][0]["action"] == "FailJob"
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    state = backend.wait(handle, timeout_s=20, tick_s=0.5)
    assert state.phase is JobPhase.FAILED and state.reason == "PodFailurePolicy"
    (pod,) = [p["metadata"]["name"] for p in fake_kube.list_objects("pods", "default")]
    assert state.message == (
        f"Container worker for pod default/{pod} failed with exit code 2 matching FailJob rule "
        "at index 0"
    )
    (failure,) = backend.failure_details(handle)
    assert (failure.pod, failure.exit_code) == (pod, 2) and "bad config" in failure.log_tail
    backend.delete_run(namespace="default", run_id=rid)


def test_an_eviction_is_seen_by_the_wait_and_not_counted(
    fake_kube: FakeKubeServer, backend: KubeBackend, rid: str, tmp_path: Path
) -> None:
    mark = tmp_path / "mark"
    # backoffLimit 0: had the evicted pod counted, the Job would have failed.
    script = f"[ -e {mark} ] && exit 0; touch {mark}; trap 'exit 143' TERM; sleep 30 & wait"
    secret, job = _run(rid, script, backoff_limit=0)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    evicted: list[str] = []

    def evict_once(state: JobState) -> None:
        # Once both watches (the Job's and its pods') are open, as a drain comes mid-run.
        if evicted or not state.counts.active or not mark.exists():
            return
        if fake_kube.open_watches() < 2:
            return
        (pod,) = [p["metadata"]["name"] for p in fake_kube.list_objects("pods", "default")]
        reply = call(
            fake_kube.url,
            "POST",
            f"/api/v1/namespaces/default/pods/{pod}/eviction",
            token=fake_kube.token,
            body={
                "apiVersion": "policy/v1",
                "kind": "Eviction",
                "metadata": {"name": pod, "namespace": "default"},
            },
        )
        assert reply.status == 201, reply.text
        evicted.append(pod)

    state = backend.wait(handle, timeout_s=30, on_update=evict_once, tick_s=0.1)
    assert state.phase is JobPhase.SUCCEEDED and evicted
    (disruption,) = state.disruptions
    assert (disruption.pod, disruption.reason, disruption.counted) == (
        evicted[0],
        "EvictionByEvictionAPI",
        False,
    )
    assert disruption.message == "Eviction API: evicting"
    assert state.counts.failed == 0
    assert backend.failure_details(handle) == []
    backend.delete_run(namespace="default", run_id=rid)


def test_a_role_without_watch_on_pods_still_waits(
    fake_kube: FakeKubeServer, tmp_path: Path, rid: str, caplog: pytest.LogCaptureFixture
) -> None:
    token = f"token-{uuid.uuid4().hex}"
    allow = {(v, "jobs") for v in ("create", "get", "list", "watch", "delete")} | {
        (v, "secrets") for v in ("create", "get", "list", "delete", "patch")
    }
    allow |= {("list", "pods"), ("get", "pods/log")}
    fake_kube.add_service_account(token, "system:serviceaccount:default:old-role", allow)
    path = fake_kube.write_kubeconfig(tmp_path / "old.yaml", token=token)
    kb = KubeBackend.from_config(kubeconfig=str(path), request_timeout_s=5, retry_base_s=0.05)
    secret, job = _run(rid, "sleep 0.5")
    handle = kb.create_or_adopt(secret=secret, job=job, run_id=rid)
    with caplog.at_level(logging.WARNING, logger="queuejob.flows.adapters.kube"):
        state = kb.wait(handle, timeout_s=20, tick_s=0.2)
    assert state.phase is JobPhase.SUCCEEDED
    assert any(
        "stopped watching the pods" in r.getMessage() and "cannot watch pods" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    kb.delete_run(namespace="default", run_id=rid)


def test_fields_a_server_dropped_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    sent = {"spec": {"podFailurePolicy": {"rules": []}, "podReplacementPolicy": "Failed"}}
    stored = {"metadata": {"name": "j"}, "spec": {}}
    with caplog.at_level(logging.WARNING, logger="queuejob.flows.adapters.kube"):
        KubeBackend._check_kept(sent, stored)
        KubeBackend._check_kept(sent, {"metadata": {"name": "k"}, "spec": dict(sent["spec"])})
    (record,) = caplog.records
    assert "dropped podFailurePolicy and podReplacementPolicy from Job j" in record.getMessage()


def test_on_an_old_server_the_job_leaves_the_fields_out(
    fake_kube: FakeKubeServer, backend: KubeBackend, rid: str
) -> None:
    old = ServerFeatures.from_version({"major": "1", "minor": "20", "gitVersion": "v1.20.15"})
    secret, job = _run(rid, "exit 2", backoff_limit=1, features=old)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    started = time.monotonic()
    state = backend.wait(handle, timeout_s=30, tick_s=0.5)
    # Without the policy, exit 2 is retried like any failure, to the back-off limit.
    assert state.phase is JobPhase.FAILED and state.reason == "BackoffLimitExceeded"
    assert time.monotonic() - started < 25
    stored = fake_kube.get_object("jobs", "default", handle.name) or {}
    assert stored["spec"]["podReplacementPolicy"] == "TerminatingOrFailed"
    assert "podFailurePolicy" not in stored["spec"]
    backend.delete_run(namespace="default", run_id=rid)
