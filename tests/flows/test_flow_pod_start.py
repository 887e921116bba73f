"""Whole runs whose pods never start (real Prefect, real RabbitMQ, the fake API server and its
kubelet): the run names the cause, fails when the cause will not resolve and not before,
deletes the Job, its pods and its Secret, and keeps every item in the queue; a transient pull
error does not fail it, and a pod stuck while another works is a warning."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from queuejob.flows.core.errors import PodsCannotStart
from queuejob.flows.work_queue import run_work_queue
from tests.fakekube import FakeKubeServer
from tests.flows.test_flow_kube import kube_kwargs, run_objects, wait_for
from tests.flows.test_flow_local import work_depth
from tests.images import PullFailure

pytestmark = [pytest.mark.broker, pytest.mark.prefect, pytest.mark.kube]

REGISTRY = "registry.example.invalid/queuejob-worker"
MISSING = f"{REGISTRY}:missing"  # never pulls
FLAKY = f"{REGISTRY}:flaky"  # pulls at the first attempt after 1 s
ONE_NODE = f"{REGISTRY}:one-node"  # the first pod cannot pull it, the others can
INVALID = "registry.example.invalid/queuejob..worker:1.0"  # the kubelet cannot parse it
ITEMS = ["alpha", "beta", "gamma"]


@pytest.fixture
def node(
    flow_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeKubeServer]:
    """A fake cluster whose node cannot pull some images (back-off 0.5 s, doubling), and
    KUBECONFIG pointing at it."""
    server = FakeKubeServer(
        pull_failures=[
            PullFailure("*:missing"),
            PullFailure("*:flaky", for_s=1.0),
            PullFailure("*:one-node", pods=1),
        ],
        pull_backoff_s=0.5,
    )
    server.start()
    monkeypatch.setenv("KUBECONFIG", str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    try:
        yield server
    finally:
        server.stop()


def _kwargs(queue: str, image: str, **job: Any) -> dict[str, Any]:
    kwargs = kube_kwargs(queue, items=ITEMS)
    kwargs["job"] = kwargs["job"].model_copy(update={"image": image, **job})
    return kwargs


def _report(flow_env: dict[str, str], run_id: str) -> dict[str, Any]:
    path = Path(flow_env["QUEUEJOB_LEDGER_DIR"]) / run_id / "report.json"
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _failed_run(
    flow_env: dict[str, str], kwargs: dict[str, Any]
) -> tuple[dict[str, Any], str, float]:
    """Run the flow; it must end Failed with PodsCannotStart: (report, its message, seconds)."""
    started = time.monotonic()
    state = run_work_queue(**kwargs, return_state=True)
    took = time.monotonic() - started
    assert state.is_failed(), state
    with pytest.raises(PodsCannotStart) as info:
        state.result()
    report = _report(flow_env, str(state.state_details.flow_run_id))
    assert dict(info.value) == report or info.value["run_id"] == report["run_id"]
    return report, str(info.value), took


def _assert_nothing_left_and_every_item_queued(
    server: FakeKubeServer, broker_url: str, queue: str, report: dict[str, Any]
) -> None:
    run_id = report["run_id"]
    wait_for(
        lambda: not any(run_objects(server, k, run_id) for k in ("jobs", "pods", "secrets")),
        15,
        "the run's Job, pods and Secret to be gone",
    )
    assert server.pod_processes() == []
    assert work_depth(broker_url, queue) == len(ITEMS)
    s = report["summary"]
    assert (s["expected"], s["succeeded"], s["left"]) == (len(ITEMS), 0, len(ITEMS))
    rows = [json.loads(line) for line in Path(report["ledger_path"]).read_text().splitlines()]
    assert sorted(r["status"] for r in rows) == ["left_in_queue"] * len(ITEMS)
    codes = [f["code"] for f in report["findings"]]
    # One finding for the cause: not also the items-left advice that contradicts it.
    assert codes.count("pods-cannot-start") == 1 and "items-left-in-queue" not in codes, codes
    (finding,) = [f for f in report["findings"] if f["code"] == "pods-cannot-start"]
    assert f"queuejob rerun {run_id} --fate left" in finding["advice"]
    assert f"{len(ITEMS)} item(s) stay in the work queue" in finding["message"]
    outcome = report["outcome"]
    assert outcome["state"] == "Failed" and outcome["reasons"][0] == "pods"
    assert outcome["rerun"] == f"queuejob rerun {run_id} --fate left"


def test_an_image_that_cannot_be_pulled_fails_the_run_after_the_grace(
    node: FakeKubeServer, flow_env: dict[str, str], broker_url: str, queue_name: str
) -> None:
    grace = 3.0
    report, message, took = _failed_run(
        flow_env, _kwargs(queue_name, MISSING, start_grace_seconds=grace)
    )
    assert took < grace + 15, f"{took:.1f} s"
    failure = report["start_failure"]
    assert failure["reason"] in ("ErrImagePull", "ImagePullBackOff")
    assert failure["image"] == MISSING and failure["rule"] == f"start_grace_seconds={grace:g}"
    assert failure["seconds"] >= grace
    assert "no pod could start" in message and MISSING in message
    (finding,) = [f for f in report["findings"] if f["code"] == "pods-cannot-start"]
    assert f"image {MISSING}" in finding["message"] and "--image" in finding["advice"]
    _assert_nothing_left_and_every_item_queued(node, broker_url, queue_name, report)


def test_an_invalid_image_name_fails_the_run_at_once(
    node: FakeKubeServer, flow_env: dict[str, str], broker_url: str, queue_name: str
) -> None:
    report, message, took = _failed_run(
        flow_env, _kwargs(queue_name, INVALID, start_grace_seconds=120)
    )
    assert took < 30, f"{took:.1f} s: InvalidImageName must not wait for the grace"
    assert report["start_failure"]["reason"] == "InvalidImageName"
    assert report["start_failure"]["rule"] == "at once"
    assert "couldn't parse image reference" in message
    _assert_nothing_left_and_every_item_queued(node, broker_url, queue_name, report)


def test_an_unschedulable_pod_fails_the_run_at_the_start_timeout(
    node: FakeKubeServer, flow_env: dict[str, str], broker_url: str, queue_name: str
) -> None:
    from queuejob.blocks.job_template import WorkQueueJobTemplate

    block = f"ssd-only-{uuid.uuid4().hex[:8]}"
    WorkQueueJobTemplate(
        image=f"{REGISTRY}:1.0",
        command=["sh", "-c", "cat"],
        node_selector={"disktype": "ssd"},
        start_grace_seconds=1,
        start_timeout_seconds=4,
    ).save(block)
    kwargs = kube_kwargs(queue_name, items=ITEMS)
    kwargs["job"] = kwargs["job"].model_copy(
        update={"template_block": block, "image": None, "command": None}
    )
    report, message, took = _failed_run(flow_env, kwargs)
    assert took < 4 + 15, f"{took:.1f} s"
    failure = report["start_failure"]
    assert (failure["kind"], failure["reason"]) == ("scheduling", "Unschedulable")
    assert failure["rule"] == "start_timeout_seconds=4" and len(failure["pods"]) == 2
    assert "didn't match Pod's node affinity/selector" in message
    _assert_nothing_left_and_every_item_queued(node, broker_url, queue_name, report)


def test_a_pull_error_that_clears_inside_the_grace_does_not_fail_the_run(
    node: FakeKubeServer, flow_env: dict[str, str], queue_name: str
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    report = run_work_queue(**_kwargs(queue_name, FLAKY, start_grace_seconds=20))
    s = report["summary"]
    assert (s["succeeded"], s["left"]) == (len(ITEMS), 0)
    assert report["start_failure"] is None and report["outcome"]["state"] == "Completed"

    def named() -> list[str]:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[report["run_id"]]))
            )
        return [log.message for log in logs if "pods pending: ErrImagePull" in log.message
                or "pod pending: ErrImagePull" in log.message]  # fmt: skip

    # The pull error was there, and named in the run's log while it lasted.
    assert wait_for(named, 30, "the pull error in the run's logs")


def test_fine_mode_goes_on_when_one_of_two_pods_cannot_start(
    node: FakeKubeServer, flow_env: dict[str, str], queue_name: str
) -> None:
    kwargs = _kwargs(queue_name, ONE_NODE, start_grace_seconds=1, parallelism=2)
    kwargs["mode"] = "fine"
    started = time.monotonic()
    report = run_work_queue(**kwargs)
    took = time.monotonic() - started
    s = report["summary"]
    assert (s["succeeded"], s["left"], s["failed"]) == (len(ITEMS), 0, 0)
    assert report["outcome"]["state"] == "Completed"
    (stuck,) = [f for f in report["findings"] if f["code"] == "pods-stuck-pending"]
    assert stuck["severity"] == "warning"
    assert "never started while others worked through the items" in stuck["message"]
    assert "kept the Job from completing" in stuck["message"]
    assert len(report["stuck_pods"]) == 1 and report["stuck_pods"][0]["image"] == ONE_NODE
    # The Job, held open only by the pod that never started, is cleaned up with it.
    wait_for(
        lambda: (
            not any(run_objects(node, k, report["run_id"]) for k in ("jobs", "pods", "secrets"))
        ),
        15,
        "the run's objects to be collected",
    )
    assert took < 60
