"""Pods that never start, on the fake API server: its kubelet, scheduler and Job controller write
these states as real ones do, and the Kubernetes backend's wait names the cause and gives up
when it will not resolve (not before), reading only the pods when the events are forbidden."""

from __future__ import annotations

import logging
import re
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from queuejob.flows.adapters.kube import KubeBackend
from queuejob.flows.core.job_status import JobState
from queuejob.flows.core.pods import StartLimits
from tests.fakekube import FakeKubeServer
from tests.fakekube.objects import UNSCHEDULABLE_MESSAGE
from tests.fakekube.rawhttp import WatchRecorder, call, wait_until
from tests.images import PullFailure
from tests.shell_jobs import IMAGE, shell_run

pytestmark = pytest.mark.kube

BROKER_URL = "amqp://queuejob:pw-never-shown-4e2a@rabbitmq.example.invalid:5672/%2F"
MISSING = "registry.example.invalid/queuejob-worker:missing"
INVALID = "registry.example.invalid/queuejob..worker:1.0"  # queuejob's check lets it through


@pytest.fixture
def node() -> Iterator[FakeKubeServer]:
    """A fake server whose node cannot pull ``...:missing`` (back-off 0.5 s, doubling)."""
    server = FakeKubeServer(pull_failures=[PullFailure("*:missing")], pull_backoff_s=0.5)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _backend(server: FakeKubeServer, tmp_path: Path, token: str | None = None) -> KubeBackend:
    path = server.write_kubeconfig(tmp_path / f"kubeconfig-{uuid.uuid4().hex[:6]}", token=token)
    return KubeBackend.from_config(
        kubeconfig=str(path), request_timeout_s=5, watch_timeout_s=5, retry_base_s=0.05
    )


def _run(**kw: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    rid = f"run-{uuid.uuid4().hex[:12]}"
    secret, job = shell_run(rid, "echo started", broker_url=BROKER_URL, **kw)
    return rid, secret, job


def _worker_state(server: FakeKubeServer) -> tuple[str, dict[str, Any]]:
    (pod,) = server.list_objects("pods", "default")
    status = pod.get("status") or {}
    (cs,) = status.get("containerStatuses") or [{}]
    return str(status.get("phase")), (cs.get("state") or {})


# --- the doubles, as a real node writes it --------------------------------------------------


def test_an_image_that_cannot_be_pulled_backs_off_pending(node: FakeKubeServer) -> None:
    _rid, secret, job = _run(image=MISSING)
    call(node.url, "POST", "/api/v1/namespaces/default/secrets", token=node.token, body=secret)
    call(node.url, "POST", "/apis/batch/v1/namespaces/default/jobs", token=node.token, body=job)
    seen: list[str] = []

    def reasons() -> bool:
        if node.list_objects("pods", "default"):
            phase, state = _worker_state(node)
            assert phase == "Pending" and "running" not in state
            reason = (state.get("waiting") or {}).get("reason")
            if reason and (not seen or seen[-1] != reason):
                seen.append(reason)
        return seen[:3] == ["ErrImagePull", "ImagePullBackOff", "ErrImagePull"]

    wait_until(reasons, 10, "ErrImagePull, ImagePullBackOff, ErrImagePull again")
    wait_until(
        lambda: (_worker_state(node)[1].get("waiting") or {}).get("reason") == "ImagePullBackOff",
        5,
        "the back-off",
    )
    waiting = _worker_state(node)[1]["waiting"]
    assert waiting["message"] == f'Back-off pulling image "{MISSING}"'
    assert node.pod_processes() == []


@pytest.mark.parametrize(
    ("image", "policy", "reason", "message"),
    [
        (
            INVALID,
            None,
            "InvalidImageName",
            f'Failed to apply default image tag "{INVALID}": couldn\'t parse image reference '
            f'"{INVALID}": invalid reference format',
        ),
        (
            MISSING,
            "Never",
            "ErrImageNeverPull",
            f'Container image "{MISSING}" is not present with pull policy of Never',
        ),
    ],
)
def test_images_that_cannot_be_used_wait_with_the_kubelets_reason(
    node: FakeKubeServer, image: str, policy: str | None, reason: str, message: str
) -> None:
    _rid, _secret, job = _run(image=image)
    if policy:
        job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = policy
    call(node.url, "POST", "/apis/batch/v1/namespaces/default/jobs", token=node.token, body=job)
    wait_until(
        lambda: node.list_objects("pods", "default") and _worker_state(node)[1].get("waiting"),
        10,
        "the pod to wait",
    )
    phase, state = _worker_state(node)
    assert phase == "Pending"
    assert state["waiting"] == {"reason": reason, "message": message}


def test_a_node_selector_no_node_matches_leaves_the_pod_unscheduled(
    fake_kube: FakeKubeServer,
) -> None:
    _rid, _secret, job = _run(node_selector={"disktype": "ssd"})
    call(
        fake_kube.url,
        "POST",
        "/apis/batch/v1/namespaces/default/jobs",
        token=fake_kube.token,
        body=job,
    )

    def scheduled() -> dict[str, Any] | None:
        pods = fake_kube.list_objects("pods", "default")
        conds = (pods[0].get("status") or {}).get("conditions") or [] if pods else []
        return next((c for c in conds if c["type"] == "PodScheduled"), None)

    cond = wait_until(scheduled, 10, "the scheduler's condition")
    assert (cond["status"], cond["reason"], cond["message"]) == (
        "False",
        "Unschedulable",
        UNSCHEDULABLE_MESSAGE,
    )
    (pod,) = fake_kube.list_objects("pods", "default")
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")


def test_a_quota_makes_the_job_controller_record_failed_create(fake_kube: FakeKubeServer) -> None:
    fake_kube.limit_pods("default", 0, name="nopods")
    _rid, _secret, job = _run()
    made = call(
        fake_kube.url,
        "POST",
        "/apis/batch/v1/namespaces/default/jobs",
        token=fake_kube.token,
        body=job,
    ).json
    uid, name = made["metadata"]["uid"], made["metadata"]["name"]
    selector = urllib.parse.quote(f"involvedObject.uid={uid}")
    path = f"/api/v1/namespaces/default/events?fieldSelector={selector}"
    watch = WatchRecorder(fake_kube.url, f"{path}&watch=true", token=fake_kube.token)
    watch.start()
    try:
        event = watch.wait_for(lambda e: e["object"]["reason"] == "FailedCreate", 10)["object"]
        assert event["type"] == "Warning" and event["involvedObject"]["kind"] == "Job"
        assert event["involvedObject"]["name"] == name
        assert event["source"] == {"component": "job-controller"}
        # The message names the name the apiserver generated before the quota refused it.
        refused = re.compile(
            rf'Error creating: pods "{re.escape(name)}-[a-z0-9]{{5}}" is forbidden: exceeded '
            r"quota: nopods, requested: pods=1, used: pods=0, limited: pods=0"
        )
        assert refused.fullmatch(event["message"]), event["message"]
        # A retry is refused under another generated name: an event of its own, as on 1.20.
        again = watch.wait_for(
            lambda e: (
                e["type"] == "ADDED"
                and e["object"]["reason"] == "FailedCreate"
                and e["object"]["message"] != event["message"]
            ),
            10,
        )["object"]
        assert refused.fullmatch(again["message"]) and again["count"] == 1
        assert not fake_kube.list_objects("pods", "default")
        fake_kube.limit_pods("default", None)
        watch.wait_for(lambda e: e["object"]["reason"] == "SuccessfulCreate", 10)
    finally:
        watch.stop()
    listed = call(fake_kube.url, "GET", path, token=fake_kube.token).json
    assert {e["reason"] for e in listed["items"]} == {"FailedCreate", "SuccessfulCreate"}
    other = urllib.parse.quote("involvedObject.uid=someone-else")
    assert not call(
        fake_kube.url, "GET", f"/api/v1/namespaces/default/events?fieldSelector={other}",
        token=fake_kube.token,
    ).json["items"]  # fmt: skip


# --- the wait ---------------------------------------------------------------------------------


def test_the_wait_names_a_pull_error_and_gives_up_after_the_grace(
    node: FakeKubeServer, tmp_path: Path
) -> None:
    kb = _backend(node, tmp_path)
    rid, secret, job = _run(image=MISSING, completions=2, parallelism=2)
    handle = kb.create_or_adopt(secret=secret, job=job, run_id=rid)
    lines: list[str] = []

    def seen(state: JobState) -> None:
        if state.pending is not None:
            lines.append(state.pending.line())

    started = time.monotonic()
    state = kb.wait(handle, timeout_s=60, on_update=seen, tick_s=0.2, start=StartLimits(3, 60))
    took = time.monotonic() - started
    failure = state.start_failure
    assert failure is not None and failure.reason in ("ErrImagePull", "ImagePullBackOff")
    assert failure.rule == "start_grace_seconds=3" and failure.image == MISSING
    assert len(failure.pods) == 2
    assert 3 <= took < 3 + 10, took
    assert any(line.startswith("2 pods pending: ErrImagePull: ") for line in lines), lines
    backoff = (
        f'2 pods pending: ImagePullBackOff: Back-off pulling image "{MISSING}": ErrImagePull: '
    )
    assert any(line.startswith(backoff) and line.endswith("not found") for line in lines), lines
    kb.delete_run(namespace="default", run_id=rid)


def test_the_wait_gives_up_on_an_invalid_image_name_at_once(
    node: FakeKubeServer, tmp_path: Path
) -> None:
    kb = _backend(node, tmp_path)
    rid, secret, job = _run(image=INVALID)
    handle = kb.create_or_adopt(secret=secret, job=job, run_id=rid)
    started = time.monotonic()
    state = kb.wait(handle, timeout_s=60, tick_s=0.2, start=StartLimits(60, 600))
    assert time.monotonic() - started < 10
    assert state.start_failure is not None and state.start_failure.reason == "InvalidImageName"
    assert state.start_failure.rule == "at once"
    kb.delete_run(namespace="default", run_id=rid)


def test_the_wait_names_the_quota_and_gives_up_at_the_start_timeout(
    fake_kube: FakeKubeServer, tmp_path: Path
) -> None:
    fake_kube.limit_pods("default", 0, name="nopods")
    kb = _backend(fake_kube, tmp_path)
    rid, secret, job = _run()
    handle = kb.create_or_adopt(secret=secret, job=job, run_id=rid)
    lines: list[str] = []
    started = time.monotonic()
    state = kb.wait(
        handle,
        timeout_s=60,
        tick_s=0.2,
        start=StartLimits(1, 4),
        on_update=lambda s: lines.append(s.pending.line()) if s.pending else None,
    )
    took = time.monotonic() - started
    failure = state.start_failure
    assert failure is not None and failure.kind == "create" and 4 <= took < 4 + 10, took
    quota = re.compile(
        rf'pods "{re.escape(handle.name)}-[a-z0-9]{{5}}" is forbidden: exceeded quota: nopods, '
        r"requested: pods=1, used: pods=0, limited: pods=0"
    )
    assert quota.fullmatch(failure.message or ""), failure.message
    assert failure.rule == "start_timeout_seconds=4"
    assert f"Job cannot create pods: FailedCreate: {failure.message}" in lines
    kb.delete_run(namespace="default", run_id=rid)


def test_without_events_one_line_is_logged_and_the_pods_still_decide(
    node: FakeKubeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = f"token-{uuid.uuid4().hex}"
    allow = {(v, "jobs") for v in ("create", "get", "list", "watch", "delete")}
    allow |= {(v, "secrets") for v in ("create", "get", "list", "delete", "patch")}
    allow |= {("list", "pods"), ("watch", "pods"), ("get", "pods/log")}
    node.add_service_account(token, "system:serviceaccount:default:no-events", allow)
    kb = _backend(node, tmp_path, token=token)
    rid, secret, job = _run(image=MISSING)
    handle = kb.create_or_adopt(secret=secret, job=job, run_id=rid)
    with caplog.at_level(logging.WARNING, logger="queuejob.flows.adapters.kube"):
        state = kb.wait(handle, timeout_s=60, tick_s=0.2, start=StartLimits(2, 60))
    assert state.start_failure is not None and state.start_failure.kind == "container"
    said = [r.getMessage() for r in caplog.records if "events of Job" in r.getMessage()]
    assert len(said) == 1, said
    assert "cannot list events" in said[0] or "cannot watch events" in said[0], said
    kb.delete_run(namespace="default", run_id=rid)


def test_a_pod_that_starts_is_not_held_to_the_limits(
    fake_kube: FakeKubeServer, tmp_path: Path
) -> None:
    kb = _backend(fake_kube, tmp_path)
    rid, secret, job = _run()
    job["spec"]["template"]["spec"]["containers"][0]["command"] = ["sh", "-c", "sleep 2"]
    handle = kb.create_or_adopt(secret=secret, job=job, run_id=rid)
    state = kb.wait(handle, timeout_s=30, tick_s=0.2, start=StartLimits(0, 1))
    assert state.phase.decided and state.start_failure is None and state.pending is None
    assert IMAGE  # the image every node has
    kb.delete_run(namespace="default", run_id=rid)
