"""Pods that never start, on a real Kubernetes 1.20 control plane.

The stand-in kubelet and scheduler write the pod states as a real node does (a pull that backs
off, a pod no node fits, a missing Secret key), the real apiserver and Job controller refuse pods
as a cluster does (a ResourceQuota of ``pods: 0``, a missing ServiceAccount: ``FailedCreate``
events on the Job). The flow runs as the ``queuejob-flow`` service account of
deployments/k8s/rbac.yaml: it names each cause, fails when it will not resolve, leaves no Job,
pod or Secret, and keeps every item in the queue, and a rerun of them completes once the cause
is gone.
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from queuejob.flows.adapters.kube import KubeBackend
from tests.realkube.cluster import ControlPlane
from tests.realkube.helpers import (
    NS,
    apply_role,
    get,
    job_path,
    make_run,
    pods_of,
    secret_path,
    wait_for,
)
from tests.realkube.kubelet import UNSCHEDULABLE_MESSAGE, Api, ApiError, Kubelet
from tests.shell_jobs import IMAGE

REGISTRY = IMAGE.rsplit(":", 1)[0]
MISSING = f"{REGISTRY}:missing"  # the stand-in cannot pull it (tests/realkube/conftest.py)
FLAKY = f"{REGISTRY}:flaky"  # it pulls it at the first attempt after 3 s
ITEMS = ["alpha", "beta", "gamma"]
QUOTA = "nopods"


def _pod_state(api: Api, job: str) -> dict[str, Any] | None:
    pods = pods_of(api, job)
    if not pods:
        return None
    status = pods[0].get("status") or {}
    statuses = status.get("containerStatuses") or [{}]
    return {
        "phase": status.get("phase"),
        "conditions": {c["type"]: c for c in status.get("conditions") or []},
        "state": statuses[0].get("state") or {},
        "node": (pods[0].get("spec") or {}).get("nodeName"),
    }


def _waiting_reason(api: Api, job: str) -> str | None:
    state = _pod_state(api, job)
    return ((state or {}).get("state", {}).get("waiting") or {}).get("reason")


def test_the_stand_in_writes_the_states_of_pods_that_do_not_start(
    control_plane: ControlPlane, kubelet: Kubelet
) -> None:
    """As a real kubelet and scheduler: a pull backing off, a pull that succeeds after a
    while, a pod no node fits, a Secret key that is missing until it is created."""
    admin = control_plane.api()
    kb = KubeBackend.from_config(kubeconfig=str(control_plane.admin_kubeconfig), retries=1)
    runs = [f"run-{uuid.uuid4().hex[:12]}" for _ in range(4)]
    pull, flaky, unfit, config = runs
    try:
        secret, job = make_run(pull, "true", image=MISSING)
        pull_job = kb.create_or_adopt(secret=secret, job=job, run_id=pull).name
        secret, job = make_run(flaky, "true", image=FLAKY)
        flaky_job = kb.create_or_adopt(secret=secret, job=job, run_id=flaky).name
        secret, job = make_run(unfit, "true", node_selector={"disktype": "ssd"})
        unfit_job = kb.create_or_adopt(secret=secret, job=job, run_id=unfit).name
        secret, job = make_run(config, 'echo "key=$LATE"', env={})
        job["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "LATE", "valueFrom": {"secretKeyRef": {"name": "late-secret", "key": "k"}}}
        )
        config_job = kb.create_or_adopt(secret=secret, job=job, run_id=config).name

        seen: list[str] = []

        def pull_reasons() -> bool:
            reason = _waiting_reason(admin, pull_job)
            if reason and (not seen or seen[-1] != reason):
                seen.append(reason)
            # In this order, not necessarily from the first attempt: a slow poll may miss a
            # short early window, and the doubling back-off makes the later ones longer.
            want = iter(seen)
            return all(r in want for r in ("ErrImagePull", "ImagePullBackOff", "ErrImagePull"))

        wait_for("ErrImagePull, ImagePullBackOff, ErrImagePull again", pull_reasons, 20)
        state = _pod_state(admin, pull_job) or {}
        assert state["phase"] == "Pending" and state["node"] == "queuejob-node"

        flaky_seen: set[str] = set()

        def flaky_ran() -> bool:
            state = _pod_state(admin, flaky_job) or {}
            flaky_seen.add(str((state.get("state", {}).get("waiting") or {}).get("reason")))
            return state.get("phase") == "Succeeded"

        wait_for("the transient pull to succeed and the pod to run", flaky_ran, 20)
        assert {"ErrImagePull", "ImagePullBackOff"} & flaky_seen, flaky_seen

        def unscheduled() -> dict[str, Any] | None:
            state = _pod_state(admin, unfit_job)
            return (state or {}).get("conditions", {}).get("PodScheduled")

        wait_for("the scheduler's condition", lambda: unscheduled(), 20)
        cond = unscheduled() or {}
        assert (cond["status"], cond["reason"], cond["message"]) == (
            "False",
            "Unschedulable",
            UNSCHEDULABLE_MESSAGE,
        )
        assert not (_pod_state(admin, unfit_job) or {}).get("node")

        wait_for(
            "CreateContainerConfigError",
            lambda: _waiting_reason(admin, config_job) == "CreateContainerConfigError",
            20,
        )
        state = _pod_state(admin, config_job) or {}
        assert state["phase"] == "Pending"
        assert state["state"]["waiting"]["message"] == 'secret "late-secret" not found'
        admin.request(
            "POST",
            f"/api/v1/namespaces/{NS}/secrets",
            {"metadata": {"name": "late-secret"}, "stringData": {"k": "here"}},
        )
        wait_for(
            "the pod to start once its Secret exists",
            lambda: ((_pod_state(admin, config_job) or {}).get("phase")) == "Succeeded",
            20,
        )
    finally:
        for run in runs:
            kb.delete_run(namespace=NS, run_id=run)
        admin.request("DELETE", secret_path("late-secret"), ok_missing=True)


# --- whole runs -------------------------------------------------------------------------------


@pytest.fixture
def flow_kube(
    control_plane: ControlPlane,
    kubelet: Kubelet,
    broker_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Path:
    """The flow's environment: the Role's service account, the broker, a ledger directory."""
    kubeconfig = apply_role(control_plane, tmp_path, name="queuejob-flow")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("QUEUEJOB_BROKER_URL", broker_url)
    ledgers = tmp_path / "ledgers"
    monkeypatch.setenv("QUEUEJOB_LEDGER_DIR", str(ledgers))
    return ledgers


def _cli(args: list[str]) -> int:
    from queuejob.flows.cli import main

    sigterm = signal.getsignal(signal.SIGTERM)  # the CLI installs its own
    try:
        return main(args)
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def _ready(broker_url: str, queue: str) -> int:
    from queuejob.flows.adapters import broker as broker_io

    cfg = broker_io.BrokerConfig(url=broker_url)
    return broker_io.queue_depths(cfg, broker_io.QueueSettings(name=queue))["work"].ready


def _nothing_left(admin: Api, job: str) -> bool:
    return (
        get(admin, job_path(job)) is None
        and not pods_of(admin, job)
        and get(admin, secret_path(f"{job}-broker")) is None
    )


def _set_quota(admin: Api, pods: int | None) -> None:
    path = f"/api/v1/namespaces/{NS}/resourcequotas"
    if pods is None:
        admin.request("DELETE", f"{path}/{QUOTA}", ok_missing=True)
        return
    try:
        admin.request(
            "POST", path, {"metadata": {"name": QUOTA}, "spec": {"hard": {"pods": str(pods)}}}
        )
    except ApiError as exc:
        if exc.status != 409:
            raise
    # Quota admission refuses every pod until the quota controller has computed the usage.
    wait_for(
        "the quota's status",
        lambda: ((get(admin, f"{path}/{QUOTA}") or {}).get("status") or {}).get("hard"),
        30,
    )


def test_a_quota_that_allows_no_pods_fails_the_run_in_time_and_a_rerun_completes_its_items(
    control_plane: ControlPlane,
    flow_kube: Path,
    broker_url: str,
    queue_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin = control_plane.api()
    _set_quota(admin, 0)
    try:
        started = time.monotonic()
        code = _cli(
            ["run", *ITEMS, "--image", IMAGE, "--namespace", NS, "--queue", queue_name,
             "--start-timeout", "30", "--timeout", "600", "--", "sh", "-c", "cat"]
        )  # fmt: skip
        took = time.monotonic() - started
        out = capsys.readouterr()
        assert code == 1, out.err[-2000:]
        assert 30 <= took < 90, f"{took:.0f} s"
        run_id = re.search(r"^queuejob run (\S+)", out.out, flags=re.MULTILINE).group(1)  # type: ignore[union-attr]
        job = re.search(r"^  Job:\s+\S+/(\S+):", out.out, flags=re.MULTILINE).group(1)  # type: ignore[union-attr]
        # The quota's message names the pod name the apiserver generated before refusing it.
        quota = (
            rf'pods "{re.escape(job)}-[a-z0-9]{{5}}" is forbidden: exceeded quota: {QUOTA}, '
            r"requested: pods=1, used: pods=0, limited: pods=0"
        )
        assert f"pods-cannot-start: no pod of Job '{job}' could start" in out.out, out.out
        assert re.search(f"Job cannot create pods: FailedCreate: {quota}", out.out), out.out
        assert re.search(r"^  left in queue:\s+3$", out.out, flags=re.MULTILINE), out.out
        assert "items-left-in-queue" not in out.out
        assert f"queuejob rerun {run_id} --fate left" in out.err
        wait_for("no Job, pod or Secret of the run", lambda: _nothing_left(admin, job), 30)
        assert _ready(broker_url, queue_name) == len(ITEMS)
    finally:
        _set_quota(admin, None)

    assert _cli(["rerun", run_id, "--fate", "left"]) == 0
    out = capsys.readouterr()
    assert re.search(r"^  succeeded:\s+3$", out.out, flags=re.MULTILINE), out.out
    assert re.search(r"^  left in queue:\s+0$", out.out, flags=re.MULTILINE), out.out
    assert _ready(broker_url, queue_name) == 0


def _failed_flow(**job: Any) -> tuple[dict[str, Any], float]:
    from queuejob.flows.core.errors import PodsCannotStart
    from queuejob.flows.core.items import ItemSource
    from queuejob.flows.params import JobParams, QueueParams
    from queuejob.flows.work_queue import run_work_queue

    queue = job.pop("queue")
    started = time.monotonic()
    state = run_work_queue(
        items=ItemSource.inline(ITEMS),
        queue=QueueParams(name=queue),
        job=JobParams(command=["sh", "-c", "cat"], namespace=NS, **job),
        backend="kubernetes",
        timeout_seconds=300.0,
        return_state=True,
    )
    took = time.monotonic() - started
    assert state.is_failed(), state
    with pytest.raises(PodsCannotStart) as info:
        state.result()
    return dict(info.value), took


def test_a_missing_service_account_fails_the_run_at_the_start_timeout(
    control_plane: ControlPlane, flow_kube: Path, broker_url: str, queue_name: str
) -> None:
    from queuejob.blocks.job_template import WorkQueueJobTemplate

    block = f"no-such-account-{uuid.uuid4().hex[:8]}"
    WorkQueueJobTemplate(
        image=IMAGE,
        namespace=NS,
        command=["sh", "-c", "cat"],
        service_account="no-such-account",
        start_timeout_seconds=5,
    ).save(block)
    report, took = _failed_flow(queue=queue_name, template_block=block)
    assert 5 <= took < 5 + 45, f"{took:.0f} s"
    failure = report["start_failure"]
    assert (failure["kind"], failure["reason"]) == ("create", "FailedCreate")
    assert failure["rule"] == "start_timeout_seconds=5"
    assert (
        f"error looking up service account {NS}/no-such-account: serviceaccount "
        '"no-such-account" not found'
    ) in failure["message"]
    assert [f["code"] for f in report["findings"]] == ["pods-cannot-start"]
    admin = control_plane.api()
    wait_for("no Job, pod or Secret", lambda: _nothing_left(admin, report["job"]), 30)
    assert _ready(broker_url, queue_name) == len(ITEMS)


def test_an_image_the_node_cannot_pull_fails_the_run_within_the_grace(
    control_plane: ControlPlane, flow_kube: Path, broker_url: str, queue_name: str
) -> None:
    grace = 3.0
    report, took = _failed_flow(queue=queue_name, image=MISSING, start_grace_seconds=grace)
    assert grace <= took < grace + 15, f"{took:.1f} s"
    failure = report["start_failure"]
    assert failure["reason"] in ("ErrImagePull", "ImagePullBackOff")
    assert failure["image"] == MISSING and failure["rule"] == f"start_grace_seconds={grace:g}"
    assert report["summary"]["left"] == len(ITEMS)
    admin = control_plane.api()
    wait_for("no Job, pod or Secret", lambda: _nothing_left(admin, report["job"]), 30)
    assert _ready(broker_url, queue_name) == len(ITEMS)
