"""The whole flow on the kubernetes backend: real Prefect, real RabbitMQ, real Kubernetes 1.20.

The flow authenticates as the ``queuejob-flow`` service account bound to the Role in
deployments/k8s/rbac.yaml, so this also proves that Role is enough for a real run. The Job's
pods run ``queuejob worker`` as local processes (the kubelet stand-in), reading the broker URL
from the run's Secret through ``secretKeyRef``, exactly as they would in a cluster.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from queuejob.flows.core.items import ItemSource
from queuejob.flows.params import CleanupParams, JobParams, QueueParams
from tests.realkube.cluster import ControlPlane
from tests.realkube.helpers import NS, apply_role, pods_of, wait_for
from tests.realkube.kubelet import Kubelet
from tests.shell_jobs import IMAGE

pytestmark = [pytest.mark.broker, pytest.mark.prefect]

DOCS_ITEMS = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]


def _omission_logged(run_id: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return any(
        "the Job leaves out podFailurePolicy (Kubernetes 1.26+) and podReplacementPolicy"
        in log.message
        and "v1.20." in log.message
        for log in logs
    )


def test_the_docs_items_run_once_each_on_a_real_control_plane(
    control_plane: ControlPlane,
    kubelet: Kubelet,
    broker_url: str,
    queue_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from queuejob.flows.work_queue import run_work_queue

    # No credentials block: the flow falls back to KUBECONFIG, as on a laptop; its user is the
    # service account of deployments/k8s/rbac.yaml.
    kubeconfig = apply_role(control_plane, tmp_path, name="queuejob-flow")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("QUEUEJOB_BROKER_URL", broker_url)
    monkeypatch.setenv("QUEUEJOB_LEDGER_DIR", str(tmp_path / "ledgers"))
    admin = control_plane.api()

    report = run_work_queue(
        items=ItemSource.inline(DOCS_ITEMS),
        queue=QueueParams(name=queue_name),
        job=JobParams(
            image=IMAGE,
            command=["sh", "-c", 'item=$(cat); echo "processed $item"'],
            namespace=NS,
            parallelism=3,
            completions="auto",
            idle_timeout_seconds=3.0,
            backoff_limit=2,
        ),
        mode="coarse",
        backend="kubernetes",
        caveat_policy="fail",
        timeout_seconds=180.0,
        cleanup=CleanupParams(delete_job=True, delete_queues=True),
    )

    s = report["summary"]
    assert (s["expected"], s["succeeded"], s["failed"], s["dead_lettered"], s["left"]) == (
        8,
        8,
        0,
        0,
        0,
    )
    assert s["processed_more_than_once"] == 0
    assert report["job_phase"] == "Succeeded"
    assert report["completions"] == 8
    rows = [json.loads(line) for line in Path(report["ledger_path"]).read_text().splitlines()]
    assert sorted(r["status"] for r in rows) == ["succeeded"] * 8
    # Each item was processed by a pod of the Job (the pod name comes from the downward API).
    job = str(report["job"])
    assert all(str(r.get("pod", "")).startswith(f"{job}-") for r in rows), rows[:2]

    # 1.20 knows neither podFailurePolicy nor podReplacementPolicy: the Job left them out, and
    # the run's log says so.
    wait_for("the omission line in the run's logs", lambda: _omission_logged(report["run_id"]))

    # Cleanup on success: the Job, its pods (garbage collected) and the Secret are gone.
    wait_for("the Job's pods to be collected", lambda: not pods_of(admin, job), timeout_s=30)
    assert admin.get(f"/apis/batch/v1/namespaces/{NS}/jobs/{job}", ok_missing=True) is None
    assert admin.get(f"/api/v1/namespaces/{NS}/secrets/{job}-broker", ok_missing=True) is None
    wait_for(
        "the pod processes to end",
        lambda: not any(k.startswith(f"{NS}/{job}-") for k in kubelet.pod_processes()),
    )
