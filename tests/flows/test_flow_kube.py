"""The whole flow on real Prefect and RabbitMQ, with the Kubernetes backend talking HTTP to the
fake API server (which runs pods as local processes, with the recorded 1.32 semantics)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from queuejob.flows.core.manifest import RUN_ID_LABEL
from queuejob.flows.work_queue import cleanup_hook, run_work_queue
from tests.fakekube import FakeKubeServer
from tests.flows.conftest import local_kwargs

pytestmark = [pytest.mark.broker, pytest.mark.prefect, pytest.mark.kube]

IMAGE = "registry.example.invalid/queuejob-worker:1.0"


@pytest.fixture
def kube_env(
    flow_env: dict[str, str], fake_kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    monkeypatch.setenv("KUBECONFIG", str(fake_kubeconfig))
    return {**flow_env, "KUBECONFIG": str(fake_kubeconfig)}


def kube_kwargs(queue_name: str, **kw: object) -> dict[str, object]:
    kwargs = local_kwargs(queue_name, **kw)  # type: ignore[arg-type]
    kwargs["backend"] = "kubernetes"
    kwargs["job"] = kwargs["job"].model_copy(update={"image": IMAGE})  # type: ignore[attr-defined]
    return kwargs


def run_objects(server: FakeKubeServer, kind: str, run_id: str) -> list[dict[str, object]]:
    return [
        o
        for o in server.list_objects(kind, "default")
        if (o.get("metadata") or {}).get("labels", {}).get(RUN_ID_LABEL) == run_id  # type: ignore[union-attr]
    ]


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_docs_eight_items_on_kubernetes(
    kube_env: dict[str, str], fake_kube: FakeKubeServer, queue_name: str
) -> None:
    report = run_work_queue(**kube_kwargs(queue_name))
    s = report["summary"]
    assert (s["succeeded"], s["failed"], s["dead_lettered"], s["left"]) == (8, 0, 0, 0)
    assert report["job_phase"] == "Succeeded"
    assert not [f for f in report["findings"] if f["severity"] != "info"]
    # cleanup after success: the Job, its pods and the Secret are gone (ownerReference GC)
    run_id = report["run_id"]
    wait_for(
        lambda: not any(run_objects(fake_kube, k, run_id) for k in ("jobs", "pods", "secrets")),
        15,
        "the run's objects to be collected",
    )


def test_kubernetes_credentials_block_is_used(
    flow_env: dict[str, str], fake_kube: FakeKubeServer, queue_name: str
) -> None:
    from prefect_kubernetes.credentials import KubernetesClusterConfig, KubernetesCredentials

    name = f"fake-cluster-{uuid.uuid4().hex[:8]}"
    KubernetesCredentials(
        cluster_config=KubernetesClusterConfig(
            config=fake_kube.kubeconfig_dict(), context_name="fake"
        )
    ).save(name)
    kwargs = kube_kwargs(queue_name, items=["one", "two"], keep_job=True)
    kwargs["kubernetes_credentials_block"] = name
    report = run_work_queue(**kwargs)
    assert report["summary"]["succeeded"] == 2
    (job,) = run_objects(fake_kube, "jobs", report["run_id"])
    assert job["spec"]["completions"] == 2  # type: ignore[index]
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]  # type: ignore[index]
    broker = next(e for e in env if e["name"] == "BROKER_URL")
    secret = f"{job['metadata']['name']}-broker"  # type: ignore[index]
    assert broker == {
        "name": "BROKER_URL",
        "valueFrom": {"secretKeyRef": {"name": secret, "key": "BROKER_URL"}},
    }


def test_crash_after_create_job_then_retry_adopts_on_kubernetes(
    kube_env: dict[str, str],
    fake_kube: FakeKubeServer,
    queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QUEUEJOB_FAULT", "crash-after-create-job")
    retrying = run_work_queue.with_options(retries=1, retry_delay_seconds=0)
    report = retrying(**kube_kwargs(queue_name, keep_job=True))
    s = report["summary"]
    assert (s["succeeded"], s["attempts"], s["processed_more_than_once"]) == (8, 8, 0)
    assert len(run_objects(fake_kube, "jobs", report["run_id"])) == 1
    assert len(run_objects(fake_kube, "secrets", report["run_id"])) == 1
    creates = [r for r in fake_kube.requests if r[0] == "POST" and r[1].endswith("/jobs")]
    assert [status for _, _, status in creates] == [201, 409], "second attempt adopted (409)"


def test_cancellation_hook_deletes_job_pods_and_secret(
    kube_env: dict[str, str], fake_kube: FakeKubeServer, queue_name: str
) -> None:
    from queuejob.flows.adapters.kube import KubeBackend
    from queuejob.flows.core.manifest import JobSpec, build_job, build_secret, job_name, secret_name

    run_id = str(uuid.uuid4())
    spec = JobSpec(image=IMAGE, command=("sh", "-c", "sleep 120"))
    name = job_name(spec.name_prefix, run_id)
    job = build_job(spec, run_id=run_id, queue=queue_name, completions=2)
    job["spec"]["template"]["spec"]["containers"][0]["command"] = ["sh", "-c", "sleep 120"]
    KubeBackend.from_config(kubeconfig=kube_env["KUBECONFIG"]).create_or_adopt(
        secret=build_secret(
            namespace="default", name=secret_name(name), run_id=run_id, broker_url="amqp://x@y/"
        ),
        job=job,
        run_id=run_id,
    )
    wait_for(lambda: fake_kube.pod_processes(), 20, "pod processes to start")
    flow_run = SimpleNamespace(
        id=uuid.UUID(run_id),
        parameters={"backend": "kubernetes", "job": {"namespace": "default"}},
    )
    cleanup_hook(None, flow_run, SimpleNamespace(name="Cancelling"))
    wait_for(
        lambda: not any(run_objects(fake_kube, k, run_id) for k in ("jobs", "pods", "secrets")),
        15,
        "the run's Job, pods and Secret to be gone",
    )
    wait_for(lambda: not fake_kube.pod_processes(), 15, "pod processes to be killed")
