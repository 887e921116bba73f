"""The Kubernetes backend against a real Kubernetes 1.20 control plane.

The apiserver (validation, defaulting, RBAC, watch), the Job controller and the garbage collector
are Kubernetes' own; only the node is a stand-in that runs pods as local processes. 1.20 differs
from current clusters in ways the backend must survive: no interim SuccessCriteriaMet /
FailureTarget conditions, no ``status.ready``, pods labelled only ``job-name`` and
``controller-uid``.
"""

from __future__ import annotations

import uuid

import pytest

from queuejob.flows.adapters.kube import KubeBackend
from queuejob.flows.core.backend import JobHandle
from queuejob.flows.core.errors import JobConflict, JobTimeout, KubeInvalid, KubeNotFound
from queuejob.flows.core.job_status import JobPhase, JobState
from queuejob.flows.core.manifest import ITEMS_ANNOTATION, RUN_ID_LABEL, run_labels, secret_name
from tests.realkube.helpers import (
    BROKER_URL,
    NS,
    PASSWORD,
    get,
    job_path,
    make_run,
    pods_of,
    secret_path,
    wait_for,
    watch_threads,
)
from tests.realkube.kubelet import Api, Kubelet


def test_the_cluster_is_kubernetes_1_20_with_a_ready_node(admin: Api, kubelet: Kubelet) -> None:
    version = admin.get("/version") or {}
    assert (version.get("major"), version.get("minor")) == ("1", "20"), version
    node = admin.get(f"/api/v1/nodes/{kubelet.node_name}") or {}
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True"
    lease = admin.get(
        f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{kubelet.node_name}"
    )
    assert lease and lease["spec"]["holderIdentity"] == kubelet.node_name


def test_create_makes_secret_then_job_owned_by_it(
    backend: KubeBackend, admin: Api, rid: str
) -> None:
    secret, job = make_run(rid, "exit 0")
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    name = job["metadata"]["name"]
    assert (handle.name, handle.namespace, handle.adopted) == (name, NS, False)
    assert handle.annotations and handle.annotations[ITEMS_ANNOTATION] == "1"
    stored_job = get(admin, job_path(name))
    assert stored_job is not None and stored_job["metadata"]["uid"] == handle.uid
    assert BROKER_URL not in str(stored_job), "the broker URL must reach pods via the Secret"
    stored_secret = get(admin, secret_path(secret_name(name)))
    assert stored_secret is not None
    owners = stored_secret["metadata"].get("ownerReferences") or []
    assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [("Job", name, handle.uid)]


def test_create_again_for_the_same_run_adopts(backend: KubeBackend, admin: Api, rid: str) -> None:
    secret, job = make_run(rid, "sleep 30")
    first = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    again = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    assert again.adopted is True and again.uid == first.uid
    found = backend.find_job(namespace=NS, name=first.name, run_id=rid)
    assert found is not None and found.uid == first.uid
    selector = f"{RUN_ID_LABEL}%3D{run_labels(rid)[RUN_ID_LABEL]}"
    jobs = admin.get(f"/apis/batch/v1/namespaces/{NS}/jobs?labelSelector={selector}") or {}
    secrets = admin.get(f"/api/v1/namespaces/{NS}/secrets?labelSelector={selector}") or {}
    assert len(jobs["items"]) == 1 and len(secrets["items"]) == 1


def test_a_job_of_another_run_is_a_conflict(backend: KubeBackend, admin: Api, rid: str) -> None:
    secret_a, job_a = make_run(rid, "sleep 30")
    backend.create_or_adopt(secret=secret_a, job=job_a, run_id=rid)
    other = f"run-{uuid.uuid4().hex[:12]}"
    secret_b, job_b = make_run(other, "exit 0")
    job_b["metadata"]["name"] = job_a["metadata"]["name"]  # the same name, another run
    try:
        with pytest.raises(JobConflict) as info:
            backend.create_or_adopt(secret=secret_b, job=job_b, run_id=other)
        assert rid in str(info.value) and job_a["metadata"]["name"] in str(info.value)
        # The other run's Secret, created before the Job's 409, does not linger.
        assert get(admin, secret_path(secret_b["metadata"]["name"])) is None
    finally:
        backend.delete_run(namespace=NS, run_id=other)


def test_an_invalid_job_quotes_the_servers_causes_and_removes_the_secret(
    backend: KubeBackend, admin: Api, rid: str
) -> None:
    secret, job = make_run(rid, "exit 0")
    job["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    job["spec"]["parallelism"] = -1
    with pytest.raises(KubeInvalid) as info:
        backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    text = str(info.value)
    assert "spec.template.spec.restartPolicy" in text and "spec.parallelism" in text
    assert PASSWORD not in text
    assert get(admin, secret_path(secret["metadata"]["name"])) is None


def test_a_missing_namespace_is_named(backend: KubeBackend, rid: str) -> None:
    secret, job = make_run(rid, "exit 0", namespace="queuejob-nope")
    with pytest.raises(KubeNotFound, match="namespace 'queuejob-nope' does not exist"):
        backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    with pytest.raises(KubeNotFound, match="namespace 'queuejob-nope' does not exist"):
        backend.check_namespace("queuejob-nope")
    backend.check_namespace(NS)


def test_wait_success_is_complete_and_pods_saw_secret_and_downward_env(
    backend: KubeBackend, admin: Api, rid: str
) -> None:
    # The pod checks its own environment: the Secret's URL and the downward-API pod name.
    script = f'test "$BROKER_URL" = "{BROKER_URL}" && test "$POD_NAME" = "$HOSTNAME" && sleep 0.3'
    secret, job = make_run(rid, script, completions=3, parallelism=2)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    updates: list[JobState] = []
    state = backend.wait(handle, timeout_s=60, on_update=updates.append, tick_s=0.5)
    assert state.phase is JobPhase.SUCCEEDED
    # 1.20 writes no interim condition: the decision is the terminal Complete.
    assert (state.condition, state.terminal) == ("Complete", True)
    assert state.counts.succeeded == 3 and state.counts.failed == 0
    assert any(s.counts.active > 0 for s in updates), "running counts were reported"
    pods = pods_of(admin, handle.name)
    assert len(pods) == 3 and {p["status"]["phase"] for p in pods} == {"Succeeded"}
    labels = pods[0]["metadata"]["labels"]
    assert labels["job-name"] == handle.name and labels["controller-uid"] == handle.uid
    assert "batch.kubernetes.io/job-name" not in labels, "1.20 sets only the legacy labels"


def test_back_off_failure_and_its_details(backend: KubeBackend, rid: str) -> None:
    script = "for i in 1 2 3 4 5; do echo line-$i; done; echo oops >&2; exit 3"
    secret, job = make_run(rid, script, backoff_limit=1)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    # The second pod starts after the controller's 10 s back-off.
    state = backend.wait(handle, timeout_s=90, tick_s=1.0)
    assert state.phase is JobPhase.FAILED
    assert (state.condition, state.reason) == ("Failed", "BackoffLimitExceeded")
    assert state.counts.failed == 2
    details = backend.failure_details(handle, tail_lines=2)
    assert len(details) == 2
    for failure in details:
        assert failure.exit_code == 3 and failure.reason == "Error"
        assert failure.log_tail == "line-5\noops\n", "the tail comes through pods/log"


def test_active_deadline_fails_the_job_and_stops_its_pods(
    backend: KubeBackend, kubelet: Kubelet, rid: str
) -> None:
    secret, job = make_run(rid, "sleep 300", active_deadline_seconds=2)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    state = backend.wait(handle, timeout_s=60, tick_s=0.5)
    assert state.phase is JobPhase.FAILED and state.reason == "DeadlineExceeded"
    wait_for(
        "the deadline to end the pod's process",
        lambda: not any(k.startswith(f"{NS}/{handle.name}-") for k in kubelet.pod_processes()),
    )


def test_the_wait_deadline_raises_job_timeout_and_stops_the_watch(
    backend: KubeBackend, rid: str
) -> None:
    secret, job = make_run(rid, "sleep 300")
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    with pytest.raises(JobTimeout) as info:
        backend.wait(handle, timeout_s=1.5, tick_s=0.3)
    assert handle.name in str(info.value)
    assert not watch_threads()


def test_deleting_the_run_collects_pods_processes_and_secret(
    backend: KubeBackend, admin: Api, kubelet: Kubelet, rid: str
) -> None:
    secret, job = make_run(rid, "sleep 600", completions=2, parallelism=2)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    prefix = f"{NS}/{handle.name}-"

    def running() -> int:
        return sum(1 for k in kubelet.pod_processes() if k.startswith(prefix))

    wait_for("two running pods", lambda: running() == 2)
    assert backend.delete_run(namespace=NS, run_id=rid) == 1
    wait_for("the Job to go", lambda: get(admin, job_path(handle.name)) is None)
    wait_for("the garbage collector to delete the pods", lambda: not pods_of(admin, handle.name))
    wait_for("the pod processes to end", lambda: running() == 0)
    assert get(admin, secret_path(secret["metadata"]["name"])) is None
    assert backend.delete_run(namespace=NS, run_id=rid) == 0


def test_foreground_delete_waits_for_the_pods(
    backend: KubeBackend, admin: Api, kubelet: Kubelet, rid: str
) -> None:
    secret, job = make_run(rid, "sleep 600")
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    wait_for(
        "a running pod",
        lambda: (
            bool(pods_of(admin, handle.name))
            and bool([k for k in kubelet.pod_processes() if k.startswith(f"{NS}/{handle.name}-")])
        ),
    )
    assert backend.delete_job(namespace=NS, name=handle.name, propagation="Foreground")
    wait_for("the Job to go", lambda: get(admin, job_path(handle.name)) is None)
    # Foreground: the Job is removed only after its pods are.
    assert not pods_of(admin, handle.name)


def test_wait_on_a_job_deleted_meanwhile_says_so(backend: KubeBackend, rid: str) -> None:
    secret, job = make_run(rid, "sleep 600")
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    deleted: list[bool] = []

    def delete_once(state: JobState) -> None:
        if not deleted:
            deleted.append(backend.delete_job(namespace=NS, name=handle.name))

    with pytest.raises(KubeNotFound, match="was deleted while waiting"):
        backend.wait(handle, timeout_s=30, on_update=delete_once, tick_s=0.3)
    assert deleted == [True]
    gone = JobHandle(name=handle.name, namespace=NS, uid=handle.uid, run_id=rid)
    with pytest.raises(KubeNotFound):
        backend.wait(gone, timeout_s=5)
