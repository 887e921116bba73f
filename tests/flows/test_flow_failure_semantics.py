"""Failure semantics of whole runs (real Prefect, real RabbitMQ): a configuration error (the
worker's exit 2) fails the run in seconds naming its cause; a hanging item times out while the
others succeed; an evicted pod is reported and not counted."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from queuejob.flows.core.errors import JobFailed
from queuejob.flows.core.items import ItemSource
from queuejob.flows.params import CleanupParams, JobParams, QueueParams
from queuejob.flows.work_queue import run_work_queue
from tests.fakekube import FakeKubeServer
from tests.fakekube.rawhttp import call
from tests.flows.conftest import local_kwargs

pytestmark = [pytest.mark.broker, pytest.mark.prefect]

IMAGE = "registry.example.invalid/queuejob-worker:1.0"


def _report(flow_env: dict[str, str], run_id: str) -> dict[str, Any]:
    path = Path(flow_env["QUEUEJOB_LEDGER_DIR"]) / run_id / "report.json"
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_a_configuration_error_fails_the_run_at_once_naming_the_pod_and_its_log(
    flow_env: dict[str, str], queue_name: str
) -> None:
    kwargs = local_kwargs(queue_name, items=["a", "b", "c", "d"], parallelism=2)
    kwargs["job"] = JobParams(call="nosuch.module:f", parallelism=2, idle_timeout_seconds=1.5)
    started = time.monotonic()
    state = run_work_queue(**kwargs, return_state=True)
    took = time.monotonic() - started

    assert state.is_failed()
    with pytest.raises(JobFailed) as info:
        state.result()
    message = str(info.value)
    report = _report(flow_env, str(state.state_details.flow_run_id))
    assert report["job_reason"] == "PodFailurePolicy"
    assert 1 <= len(report["pod_failures"]) <= 2, report["pod_failures"]
    pod = report["pod_failures"][0]["pod"]
    named = next(p["pod"] for p in report["pod_failures"] if p["pod"] in message)
    assert f"for pod default/{named} failed with exit code 2 matching FailJob rule" in message
    assert "usage or configuration error" in message
    assert "--call 'nosuch.module:f' cannot be loaded" in message  # the end of its log
    assert pod.startswith(report["job"])
    assert report["summary"]["succeeded"] == 0
    assert took < 60, f"{took:.0f} s: the run should fail without back-offs"


def test_a_hanging_item_times_out_while_the_others_succeed(
    flow_env: dict[str, str], queue_name: str
) -> None:
    command = ["sh", "-c", 'item=$(cat); if [ "$item" = hang ]; then sleep 60; fi; echo "$item"']
    kwargs = local_kwargs(queue_name, items=["a", "hang", "b", "c"], command=command)
    kwargs["job"] = kwargs["job"].model_copy(update={"item_timeout_seconds": 2.0})  # type: ignore[attr-defined]
    kwargs["queue"] = QueueParams(name=queue_name, delivery_limit=1)
    started = time.monotonic()
    # The hanging item ends dead-lettered: tolerated here, so the run returns its report.
    report = run_work_queue(**kwargs, max_failed_items=1)
    took = time.monotonic() - started

    s = report["summary"]
    assert (s["succeeded"], s["dead_lettered"], s["left"]) == (3, 1, 0)
    assert took < 50, f"{took:.0f} s: the hanging item was not stopped at its timeout"
    rows = [json.loads(line) for line in Path(report["ledger_path"]).read_text().splitlines()]
    (hang,) = [r for r in rows if r["body"] == "hang"]
    # Tried twice (the delivery limit of 1 allows one redelivery), each attempt stopped at 2 s.
    assert (hang["status"], hang["attempts"], hang["exit_code"]) == ("dead_lettered", 2, 124)
    assert "timed out after 2 s" in hang["error_tail"]
    assert hang["duration_s"] < 20


@pytest.mark.kube
def test_an_evicted_pod_is_reported_and_not_counted(
    flow_env: dict[str, str],
    fake_kube: FakeKubeServer,
    fake_kubeconfig: Path,
    queue_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(fake_kubeconfig))
    mark = tmp_path / "slow-started"
    # The first attempt at "slow" blocks until its pod is evicted; the redelivery is quick.
    command = [
        "sh",
        "-c",
        f'item=$(cat); if [ "$item" = slow ] && [ ! -e {mark} ]; then touch {mark}; '
        "sleep 30; fi; echo done",
    ]
    evicted: list[str] = []

    def evict_when_slow_runs() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not mark.exists():
            time.sleep(0.05)
        running = [
            p["metadata"]["name"]
            for p in fake_kube.list_objects("pods", "default")
            if (p.get("status") or {}).get("phase") == "Running"
        ]
        for pod in running:
            reply = call(
                fake_kube.url,
                "POST",
                f"/api/v1/namespaces/default/pods/{pod}/eviction",
                token=fake_kube.token,
                body={"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod}},
            )
            if reply.status == 201:
                evicted.append(pod)

    evictor = threading.Thread(target=evict_when_slow_runs, daemon=True)
    evictor.start()
    report = run_work_queue(
        items=ItemSource.inline(["slow", "x", "y"]),
        queue=QueueParams(name=queue_name),
        # backoffLimit 0: had the eviction counted, the Job would have failed.
        job=JobParams(
            image=IMAGE,
            command=command,
            parallelism=1,
            backoff_limit=0,
            idle_timeout_seconds=1.5,
        ),
        backend="kubernetes",
        timeout_seconds=120.0,
        cleanup=CleanupParams(delete_job=True),
    )
    evictor.join(5)

    assert evicted, "no pod was running the slow item"
    assert report["job_phase"] == "Succeeded"
    assert report["summary"]["succeeded"] == 3
    (disruption,) = report["disruptions"]
    assert disruption == {
        "pod": evicted[0],
        "reason": "EvictionByEvictionAPI",
        "message": "Eviction API: evicting",
        "counted": False,
    }
    (finding,) = [f for f in report["findings"] if f["code"] == "pods-disrupted"]
    assert finding["severity"] == "info" and evicted[0] in finding["message"]
    assert "none counted toward backoffLimit" in finding["message"]
