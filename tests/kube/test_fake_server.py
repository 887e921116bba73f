"""The fake API server's own behaviour, through the real kubernetes client where it matters.

The contract tests hold the fake to the recorded traces; these cover what the traces do not show
but the backend's tests rely on: the kubelet's environment and process handling, fault injection,
the pre-1.31 condition order, fine mode (completions unset), back-off, selectors and auth.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.fakekube import FakeKubeServer
from tests.fakekube.rawhttp import WatchRecorder, call, wait_until

pytestmark = pytest.mark.kube
NS = "default"


def job_body(
    name: str,
    command: list[str],
    *,
    completions: int | None = 1,
    parallelism: int = 1,
    backoff_limit: int = 0,
    env: list[dict[str, Any]] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "queuejob"}},
        "spec": {
            "parallelism": parallelism,
            "backoffLimit": backoff_limit,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "queuejob"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "worker",
                            "image": "registry.example.invalid/w:1",
                            "command": command,
                            "env": env or [],
                        }
                    ],
                },
            },
            **spec,
        },
    }
    if completions is not None:
        body["spec"]["completions"] = completions
    return body


@pytest.fixture
def api(fake_kube_client: Any) -> tuple[client.CoreV1Api, client.BatchV1Api]:
    return client.CoreV1Api(fake_kube_client), client.BatchV1Api(fake_kube_client)


def conditions(job: dict[str, Any] | None) -> list[tuple[str, str]]:
    status = (job or {}).get("status") or {}
    return [(c["type"], c["reason"]) for c in status.get("conditions") or []]


def wait_job(fake: FakeKubeServer, name: str, cond: str, timeout: float = 15) -> dict[str, Any]:
    return wait_until(  # type: ignore[no-any-return]
        lambda: (j := fake.get_object("jobs", NS, name)) and cond in dict(conditions(j)) and j,
        timeout,
        f"Job {name} to get {cond}",
    )


def pods_of(fake: FakeKubeServer, job: str) -> list[dict[str, Any]]:
    return [
        p for p in fake.list_objects("pods", NS) if p["metadata"]["labels"].get("job-name") == job
    ]


# --- the real client against typed models --------------------------------------------------------


def test_typed_round_trip_with_the_real_client(
    fake_kube: FakeKubeServer, api: tuple[client.CoreV1Api, client.BatchV1Api], tmp_path: Path
) -> None:
    core, batch = api
    secret = core.create_namespaced_secret(
        NS,
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"K": "v"}},
    )
    assert secret.data == {"K": "dg=="} and secret.type == "Opaque"
    job = batch.create_namespaced_job(NS, job_body("typed", ["sh", "-c", "exit 0"]))
    assert job.spec.selector.match_labels == {
        "batch.kubernetes.io/controller-uid": job.metadata.uid
    }
    wait_job(fake_kube, "typed", "Complete")
    read = batch.read_namespaced_job("typed", NS)
    assert [c.type for c in read.status.conditions] == ["SuccessCriteriaMet", "Complete"]
    assert batch.read_namespaced_job_status("typed", NS).status.succeeded == 1
    pods = core.list_namespaced_pod(NS, label_selector="job-name=typed")
    pod = pods.items[0]
    assert pod.status.container_statuses[0].state.terminated.reason == "Completed"
    assert pod.spec.volumes[0].projected.sources[0].service_account_token.path == "token"
    namespaces = core.list_namespace()
    assert [n.metadata.name for n in namespaces.items] == ["default"]
    created = core.create_namespace({"metadata": {"name": "other"}})
    assert created.status.phase == "Active"
    assert created.metadata.labels == {"kubernetes.io/metadata.name": "other"}
    status = batch.delete_namespaced_job("typed", NS, propagation_policy="Background")
    assert status["status"] == "Success" and status["details"]["uid"] == job.metadata.uid
    assert client.VersionApi(core.api_client).get_code().minor == "32"
    # A kubeconfig file works with the client's loader too.
    path = fake_kube.write_kubeconfig(tmp_path / "kc.yaml")
    loaded = config.new_client_from_config(config_file=str(path), context="fake")
    assert client.BatchV1Api(loaded).list_namespaced_job(NS).items == []
    loaded.close()


def test_dry_run_create_stores_nothing(
    fake_kube: FakeKubeServer, api: tuple[client.CoreV1Api, client.BatchV1Api]
) -> None:
    _core, batch = api
    job = batch.create_namespaced_job(NS, job_body("dry", ["true"]), dry_run="All")
    assert job.spec.parallelism == 1
    assert fake_kube.get_object("jobs", NS, "dry") is None
    with pytest.raises(ApiException) as exc:
        batch.create_namespaced_job(NS, job_body("Bad_Name", ["true"]), dry_run="All")
    assert exc.value.status == 422


# --- the kubelet ---------------------------------------------------------------------------------


def test_pod_environment_and_log(fake_kube: FakeKubeServer) -> None:
    core_secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "broker"},
        "data": {"URL": "YW1xcDovL3UxOnB3QGgvJTJG"},  # base64 of amqp://u1:pw@h/%2F
        "stringData": {"EXTRA": "plain"},
    }
    assert (
        call(
            fake_kube.url,
            "POST",
            f"/api/v1/namespaces/{NS}/secrets",
            token=fake_kube.token,
            body=core_secret,
        ).status
        == 201
    )
    script = (
        "import os, sys; e = os.environ;"
        "print(sys.executable == os.path.realpath(sys.executable) or sys.executable);"
        "print(e['PATH'].split(os.pathsep)[0]);"
        "print(e['PYTHONUNBUFFERED'], e['URL'], e['EXTRA'], e['POD'], e['NS'], e['LIT']);"
        "print(sys.argv[1:])"
    )
    env = [
        {"name": "URL", "valueFrom": {"secretKeyRef": {"name": "broker", "key": "URL"}}},
        {"name": "EXTRA", "valueFrom": {"secretKeyRef": {"name": "broker", "key": "EXTRA"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "LIT", "value": "x-$(NS)"},
        {
            "name": "OPT",
            "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
        },
    ]
    body = job_body("envjob", ["python", "-c", script], env=env)
    body["spec"]["template"]["spec"]["containers"][0]["args"] = ["$(POD)", "$$(POD)"]
    assert (
        call(
            fake_kube.url,
            "POST",
            f"/apis/batch/v1/namespaces/{NS}/jobs",
            token=fake_kube.token,
            body=body,
        ).status
        == 201
    )
    wait_job(fake_kube, "envjob", "Complete")
    pod = pods_of(fake_kube, "envjob")[0]["metadata"]["name"]
    lines = call(
        fake_kube.url, "GET", f"/api/v1/namespaces/{NS}/pods/{pod}/log", token=fake_kube.token
    ).text.splitlines()
    assert lines[1] == os.path.dirname(sys.executable)  # the venv's bin dir comes first
    assert lines[2] == f"1 amqp://u1:pw@h/%2F plain {pod} {NS} x-{NS}"
    assert lines[3] == str([pod, "$(POD)"])
    assert fake_kube.pod_log(NS, pod).splitlines() == lines


def test_missing_secret_waits_then_starts(fake_kube: FakeKubeServer) -> None:
    env = [{"name": "URL", "valueFrom": {"secretKeyRef": {"name": "late", "key": "URL"}}}]
    call(
        fake_kube.url,
        "POST",
        f"/apis/batch/v1/namespaces/{NS}/jobs",
        token=fake_kube.token,
        body=job_body("late", ["sh", "-c", "echo $URL"], env=env),
    )
    pod = wait_until(
        lambda: [p for p in pods_of(fake_kube, "late") if p["status"].get("containerStatuses")],
        5,
        "a waiting pod",
    )[0]
    state = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert state == {"reason": "CreateContainerConfigError", "message": 'secret "late" not found'}
    assert pod["status"]["phase"] == "Pending"
    log = call(
        fake_kube.url,
        "GET",
        f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}/log",
        token=fake_kube.token,
    )
    assert (
        log.status == 400
        and "is waiting to start: CreateContainerConfigError" in log.json["message"]
    )
    call(
        fake_kube.url,
        "POST",
        f"/api/v1/namespaces/{NS}/secrets",
        token=fake_kube.token,
        body={"metadata": {"name": "late"}, "stringData": {"URL": "amqp://late"}},
    )
    wait_job(fake_kube, "late", "Complete")
    assert fake_kube.pod_log(NS, pod["metadata"]["name"]) == "amqp://late\n"


def test_start_errors_fail_the_pod(fake_kube: FakeKubeServer) -> None:
    body = job_body("noexec", ["/nonexistent/program"])
    call(
        fake_kube.url,
        "POST",
        f"/apis/batch/v1/namespaces/{NS}/jobs",
        token=fake_kube.token,
        body=body,
    )
    wait_job(fake_kube, "noexec", "Failed")
    term = pods_of(fake_kube, "noexec")[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 128 and term["reason"] == "StartError"
    assert "/nonexistent/program" in term["message"]


def _descendants(pids: list[int]) -> list[psutil.Process]:
    """The processes and all their children (Process objects notice pid reuse)."""
    out: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc = psutil.Process(pid)
            out += [proc, *proc.children(recursive=True)]
    return out


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def test_deleting_a_pod_kills_its_process_group(fake_kube: FakeKubeServer) -> None:
    call(
        fake_kube.url,
        "POST",
        f"/apis/batch/v1/namespaces/{NS}/jobs",
        token=fake_kube.token,
        body=job_body("sleeper", ["sh", "-c", "sleep 600 & sleep 600 & wait"]),
    )
    wait_until(lambda: len(_descendants(fake_kube.pod_processes())) >= 3, 5, "3 processes")
    pids = _descendants(fake_kube.pod_processes())
    pod = pods_of(fake_kube, "sleeper")[0]["metadata"]["name"]
    reply = call(
        fake_kube.url, "DELETE", f"/api/v1/namespaces/{NS}/pods/{pod}", token=fake_kube.token
    )
    assert reply.status == 200 and reply.json["metadata"]["deletionGracePeriodSeconds"] == 30
    wait_until(lambda: not _alive(pids), 5, f"the pod's processes to die: {_alive(pids)}")
    # A pod deleted by hand counts as failed for its Job (the Job has backoffLimit 0).
    job = wait_job(fake_kube, "sleeper", "Failed")
    assert job["status"]["failed"] == 1


def test_sigterm_ignored_gets_sigkill(tmp_path: Path) -> None:
    fake = FakeKubeServer(kill_grace_s=0.3)
    fake.start()
    try:
        call(
            fake.url,
            "POST",
            f"/apis/batch/v1/namespaces/{NS}/jobs",
            token=fake.token,
            body=job_body(
                "stubborn", ["sh", "-c", "trap '' TERM; sleep 600"], activeDeadlineSeconds=1
            ),
        )
        job = wait_job(fake, "stubborn", "Failed", timeout=10)
        assert dict(conditions(job))["FailureTarget"] == "DeadlineExceeded"
        assert not fake.pod_processes()
    finally:
        fake.stop()


def test_stop_kills_every_pod_process() -> None:
    fake = FakeKubeServer()
    fake.start()
    try:
        call(
            fake.url,
            "POST",
            f"/apis/batch/v1/namespaces/{NS}/jobs",
            token=fake.token,
            body=job_body(
                "forever", ["sh", "-c", "sleep 600 & sleep 600"], completions=2, parallelism=2
            ),
        )
        wait_until(lambda: len(_descendants(fake.pod_processes())) >= 4, 5, "pod processes")
        pids = _descendants(fake.pod_processes())
    finally:
        fake.stop()
    assert not _alive(pids), _alive(pids)
    assert fake.pod_processes() == []


def test_follow_log_streams_until_the_container_ends(fake_kube: FakeKubeServer) -> None:
    call(
        fake_kube.url,
        "POST",
        f"/apis/batch/v1/namespaces/{NS}/jobs",
        token=fake_kube.token,
        body=job_body("talker", ["sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.2; done"]),
    )
    pod = wait_until(
        lambda: [p for p in pods_of(fake_kube, "talker") if p["status"]["phase"] == "Running"],
        5,
        "running",
    )[0]
    reply = call(
        fake_kube.url,
        "GET",
        f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}/log?follow=true",
        token=fake_kube.token,
    )
    assert reply.text == "line 1\nline 2\nline 3\n"


# --- Job controller ------------------------------------------------------------------------------


def test_legacy_conditions_write_only_terminal_ones() -> None:
    fake = FakeKubeServer(legacy_conditions=True, backoff_base_s=0.05)
    fake.start()
    try:
        for name, cmd in (("ok", "exit 0"), ("bad", "exit 1")):
            call(
                fake.url,
                "POST",
                f"/apis/batch/v1/namespaces/{NS}/jobs",
                token=fake.token,
                body=job_body(name, ["sh", "-c", cmd]),
            )
        assert conditions(wait_job(fake, "ok", "Complete")) == [("Complete", "CompletionsReached")]
        failed = wait_job(fake, "bad", "Failed")
        assert conditions(failed) == [("Failed", "BackoffLimitExceeded")]
        assert failed["status"]["failed"] == 1 and "completionTime" not in failed["status"]
        assert "completionTime" in fake.get_object("jobs", NS, "ok")["status"]  # type: ignore
    finally:
        fake.stop()


def test_fine_mode_without_completions(fake_kube: FakeKubeServer, tmp_path: Path) -> None:
    """completions unset: done once a pod succeeded and all ended; no pod after a success."""
    # The first pod to take the lock exits at once; the other waits for the test's go-ahead.
    cmd = (
        f"if mkdir {tmp_path}/first 2>/dev/null; then exit 0; else "
        f"while [ ! -e {tmp_path}/go ]; do sleep 0.02; done; fi"
    )
    reply = call(
        fake_kube.url,
        "POST",
        f"/apis/batch/v1/namespaces/{NS}/jobs",
        token=fake_kube.token,
        body=job_body("fine", ["sh", "-c", cmd], completions=None, parallelism=2),
    )
    assert "completions" not in reply.json["spec"] and reply.json["spec"]["parallelism"] == 2
    first_success = wait_until(
        lambda: (
            (j := fake_kube.get_object("jobs", NS, "fine"))
            and j["status"].get("succeeded") == 1
            and j
        ),
        10,
        "the first success",
    )
    assert conditions(first_success) == []  # another pod still runs
    assert first_success["status"]["active"] == 1
    (tmp_path / "go").touch()
    job = wait_job(fake_kube, "fine", "Complete")
    assert conditions(job) == [
        ("SuccessCriteriaMet", "CompletionsReached"),
        ("Complete", "CompletionsReached"),
    ]
    assert job["status"]["succeeded"] == 2 and len(pods_of(fake_kube, "fine")) == 2


def _failure_gaps(base_s: float, max_s: float, failures: int) -> list[float]:
    """Seconds from each pod's failure to the next pod's creation, seen through a pods watch."""
    fake = FakeKubeServer(backoff_base_s=base_s, backoff_max_s=max_s)
    fake.start()
    try:
        rv = call(fake.url, "GET", f"/api/v1/namespaces/{NS}/pods", token=fake.token).json[
            "metadata"
        ]["resourceVersion"]
        recorder = WatchRecorder(
            fake.url,
            f"/api/v1/namespaces/{NS}/pods?watch=1&resourceVersion={rv}&timeoutSeconds=20",
            token=fake.token,
        )
        recorder.start()
        recorder.wait_open()
        call(
            fake.url,
            "POST",
            f"/apis/batch/v1/namespaces/{NS}/jobs",
            token=fake.token,
            body=job_body("flaky", ["sh", "-c", "exit 3"], backoff_limit=failures - 1),
        )
        job = wait_job(fake, "flaky", "Failed", timeout=15)
        assert job["status"]["failed"] == failures
        assert conditions(job) == [
            ("FailureTarget", "BackoffLimitExceeded"),
            ("Failed", "BackoffLimitExceeded"),
        ]
        events = recorder.stop().events
    finally:
        fake.stop()
    failed_at: dict[str, float] = {}
    added: list[float] = []
    for t, event in events:
        name = event["object"]["metadata"]["name"]
        if event["type"] == "ADDED":
            added.append(t)
        elif event["object"]["status"].get("phase") == "Failed":
            failed_at.setdefault(name, t)
    fails = sorted(failed_at.values())
    return [nxt - fail for fail, nxt in zip(fails, added[1:], strict=False)]


def test_pod_failure_back_off_doubles() -> None:
    gaps = _failure_gaps(0.2, 10.0, 4)
    assert len(gaps) == 3
    # Measured from the client's side of the watch: allow 50 ms of event delivery jitter.
    assert gaps[0] >= 0.15 and gaps[1] >= 0.35 and gaps[2] >= 0.75, gaps


def test_pod_failure_back_off_is_capped() -> None:
    gaps = _failure_gaps(0.25, 0.25, 5)
    assert len(gaps) == 4 and min(gaps) >= 0.2, gaps
    # Uncapped the last gap would be 2.0 s: the margin absorbs a loaded machine's delays.
    assert gaps[3] < 1.5, gaps


def test_ttl_after_finished_deletes_the_job(fake_kube: FakeKubeServer) -> None:
    call(
        fake_kube.url,
        "POST",
        f"/apis/batch/v1/namespaces/{NS}/jobs",
        token=fake_kube.token,
        body=job_body("ttl", ["true"], ttlSecondsAfterFinished=0),
    )
    wait_until(
        lambda: fake_kube.get_object("jobs", NS, "ttl") is None and not pods_of(fake_kube, "ttl"),
        10,
        "the finished Job and its pods to be collected",
    )


def test_put_and_patch_rules(
    fake_kube: FakeKubeServer, api: tuple[client.CoreV1Api, client.BatchV1Api]
) -> None:
    _core, batch = api
    batch.create_namespaced_job(NS, job_body("rules", ["sleep", "600"], suspend=True))
    # The controller answers the create with a status write (the Suspended condition), which
    # moves the resourceVersion on: read the Job to PUT only once that write is in, or the PUT
    # races it and gets a 409. A suspended Job's status then stays as it is.
    wait_job(fake_kube, "rules", "Suspended")
    current = call(
        fake_kube.url, "GET", f"/apis/batch/v1/namespaces/{NS}/jobs/rules", token=fake_kube.token
    ).json
    current["metadata"]["labels"]["touched"] = "yes"
    put = call(
        fake_kube.url,
        "PUT",
        f"/apis/batch/v1/namespaces/{NS}/jobs/rules",
        token=fake_kube.token,
        body=current,
    )
    assert put.status == 200 and put.json["metadata"]["generation"] == 1
    assert put.json["status"] == current["status"]  # PUT on the main resource keeps status
    stale = call(
        fake_kube.url,
        "PUT",
        f"/apis/batch/v1/namespaces/{NS}/jobs/rules",
        token=fake_kube.token,
        body=current,
    )
    assert stale.status == 409 and stale.json["reason"] == "Conflict"
    patched = batch.patch_namespaced_job("rules", NS, {"spec": {"parallelism": 3}})
    assert patched.metadata.generation == 2 and patched.spec.parallelism == 3
    json_patch = call(
        fake_kube.url,
        "PATCH",
        f"/apis/batch/v1/namespaces/{NS}/jobs/rules",
        token=fake_kube.token,
        body=[
            {"op": "replace", "path": "/spec/backoffLimit", "value": 4},
            {"op": "add", "path": "/metadata/labels/x", "value": "1"},
        ],
        headers={"Content-Type": "application/json-patch+json"},
    )
    assert json_patch.status == 200 and json_patch.json["spec"]["backoffLimit"] == 4
    assert json_patch.json["metadata"]["generation"] == 3
    with pytest.raises(ApiException) as exc:
        batch.patch_namespaced_job("rules", NS, {"spec": {"completions": 2}})
    assert exc.value.status == 422
    # A suspended Job that never started may change its pod scheduling, as in 1.32.
    ok = batch.patch_namespaced_job(
        "rules", NS, {"spec": {"template": {"spec": {"nodeSelector": {"disk": "ssd"}}}}}
    )
    assert ok.spec.template.spec.node_selector == {"disk": "ssd"}


# --- fault injection -----------------------------------------------------------------------------


def test_fail_next_answers_errors_then_recovers(
    fake_kube: FakeKubeServer, api: tuple[client.CoreV1Api, client.BatchV1Api]
) -> None:
    _core, batch = api
    fake_kube.fail_next(2, 500)
    for _ in range(2):
        with pytest.raises(ApiException) as exc:
            batch.list_namespaced_job(NS)
        assert exc.value.status == 500 and "InternalError" in exc.value.body
    assert batch.list_namespaced_job(NS).items == []
    fake_kube.fail_next(1, 429, methods={"POST"})
    assert batch.list_namespaced_job(NS).items == []  # a GET is not affected
    reply = call(
        fake_kube.url,
        "POST",
        f"/apis/batch/v1/namespaces/{NS}/jobs",
        token=fake_kube.token,
        body=job_body("f", ["true"]),
    )
    assert reply.status == 429 and reply.headers["Retry-After"] == "1"
    assert reply.json["reason"] == "TooManyRequests"
    assert batch.create_namespaced_job(NS, job_body("f", ["true"])).metadata.name == "f"
    statuses = [s for m, p, s in fake_kube.requests if p.endswith("/jobs")]
    assert statuses[:4] == [500, 500, 200, 200] and 429 in statuses


def test_drop_watches_breaks_the_stream(
    fake_kube: FakeKubeServer, api: tuple[client.CoreV1Api, client.BatchV1Api]
) -> None:
    _core, batch = api
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in watch.Watch().stream(
                batch.list_namespaced_job, NS, timeout_seconds=10, _request_timeout=15
            ):
                pass
        except BaseException as exc:  # recorded for the assertion below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: fake_kube.open_watches() == 1, 5, "an open watch")
    fake_kube.drop_watches()
    thread.join(timeout=5)
    assert errors and isinstance(errors[0], urllib3.exceptions.ProtocolError)
    wait_until(lambda: fake_kube.open_watches() == 0, 2, "the stream to be forgotten")


def test_gone_next_watch_sends_410_once(
    fake_kube: FakeKubeServer, api: tuple[client.CoreV1Api, client.BatchV1Api]
) -> None:
    _core, batch = api
    rv = batch.list_namespaced_job(NS).metadata.resource_version
    fake_kube.gone_next_watch()
    with pytest.raises(ApiException) as exc:
        for _ in watch.Watch().stream(
            batch.list_namespaced_job, NS, resource_version=rv, timeout_seconds=2
        ):
            pass
    assert exc.value.status == 410 and "Expired" in str(exc.value.reason)
    events = list(
        watch.Watch().stream(batch.list_namespaced_job, NS, resource_version=rv, timeout_seconds=1)
    )
    assert events == []


# --- selectors, watches, auth --------------------------------------------------------------------


def test_label_and_field_selectors(fake_kube: FakeKubeServer) -> None:
    for name, labels in (
        ("a", {"app": "a", "tier": "web"}),
        ("b", {"app": "b"}),
        ("c", {"app": "c", "tier": "db"}),
    ):
        call(
            fake_kube.url,
            "POST",
            f"/api/v1/namespaces/{NS}/secrets",
            token=fake_kube.token,
            body={"metadata": {"name": name, "labels": labels}},
        )

    def names(query: str) -> list[str] | int:
        reply = call(
            fake_kube.url, "GET", f"/api/v1/namespaces/{NS}/secrets?{query}", token=fake_kube.token
        )
        if reply.status != 200:
            return reply.status
        return [i["metadata"]["name"] for i in reply.json["items"]]

    assert names("labelSelector=app%20in%20(a,b)") == ["a", "b"]
    assert names("labelSelector=app%20notin%20(a)") == ["b", "c"]
    assert names("labelSelector=tier!=web") == ["b", "c"]
    assert names("labelSelector=tier") == ["a", "c"]
    assert names("labelSelector=!tier") == ["b"]
    assert names("labelSelector=app==a,tier=web") == ["a"]
    assert names("fieldSelector=metadata.name%3Dc") == ["c"]
    assert names("fieldSelector=metadata.name!=c") == ["a", "b"]
    assert names("fieldSelector=spec.nope%3Dx") == 400
    assert names("labelSelector=app%20in%20a") == 400


def test_watch_turns_label_changes_into_added_and_deleted(fake_kube: FakeKubeServer) -> None:
    call(
        fake_kube.url,
        "POST",
        f"/api/v1/namespaces/{NS}/secrets",
        token=fake_kube.token,
        body={"metadata": {"name": "moving", "labels": {"app": "a"}}},
    )
    api_client = config.new_client_from_config_dict(fake_kube.kubeconfig_dict())
    core = client.CoreV1Api(api_client)
    rv = core.list_namespaced_secret(NS).metadata.resource_version
    seen: list[str] = []

    def run() -> None:
        for event in watch.Watch().stream(
            core.list_namespaced_secret,
            NS,
            label_selector="app=a",
            resource_version=rv,
            timeout_seconds=2,
        ):
            seen.append(event["type"])

    thread = threading.Thread(target=run)
    thread.start()
    for value in ("b", "a"):
        core.patch_namespaced_secret("moving", NS, {"metadata": {"labels": {"app": value}}})
    thread.join(timeout=5)
    api_client.close()
    assert seen == ["DELETED", "ADDED"]


def test_tokens_and_service_accounts(fake_kube: FakeKubeServer) -> None:
    url = fake_kube.url
    assert call(url, "GET", "/version", token=None).status == 200
    anon = call(url, "GET", "/api", token=None)
    assert anon.status == 403 and anon.json["message"] == (
        'forbidden: User "system:anonymous" cannot get path "/api"'
    )
    assert call(url, "GET", "/api/v1/namespaces/default/pods", token="wrong").status == 401
    fake_kube.add_service_account(
        "t1",
        "system:serviceaccount:default:runner",
        {("list", "jobs"), ("get", "jobs"), ("get", "pods/log")},
    )
    assert call(url, "GET", "/apis/batch/v1/namespaces/default/jobs", token="t1").status == 200
    assert call(url, "GET", "/apis/batch/v1", token="t1").status == 200  # discovery is allowed
    denied = call(url, "DELETE", "/apis/batch/v1/namespaces/default/jobs/x", token="t1")
    assert denied.status == 403 and denied.json["message"] == (
        'jobs.batch "x" is forbidden: User "system:serviceaccount:default:runner" cannot delete '
        'resource "jobs" in API group "batch" in the namespace "default"'
    )
    review = call(
        url,
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        token="t1",
        body={
            "spec": {
                "resourceAttributes": {
                    "verb": "get",
                    "resource": "pods",
                    "subresource": "log",
                    "namespace": "default",
                }
            }
        },
    )
    assert review.status == 201 and review.json["status"] == {"allowed": True}


def test_namespaces_collections_and_request_log(fake_kube: FakeKubeServer) -> None:
    url, token = fake_kube.url, fake_kube.token
    assert (
        call(
            url, "POST", "/api/v1/namespaces", token=token, body={"metadata": {"name": "team"}}
        ).status
        == 201
    )
    for ns in ("default", "team"):
        assert (
            call(
                url,
                "POST",
                f"/apis/batch/v1/namespaces/{ns}/jobs",
                token=token,
                body=job_body("j", ["true"], suspend=True),
            ).status
            == 201
        )
    everywhere = call(url, "GET", "/apis/batch/v1/jobs", token=token).json
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in everywhere["items"]] == [
        ("default", "j"),
        ("team", "j"),
    ]
    for i in range(3):
        call(
            url,
            "POST",
            "/api/v1/namespaces/team/secrets",
            token=token,
            body={"metadata": {"name": f"s{i}", "labels": {"run": "r1" if i < 2 else "r2"}}},
        )
    gone = call(
        url, "DELETE", "/api/v1/namespaces/team/secrets?labelSelector=run%3Dr1", token=token
    )
    assert gone.status == 200 and len(gone.json["items"]) == 2
    assert [s["metadata"]["name"] for s in fake_kube.list_objects("secrets", "team")] == ["s2"]
    assert ("DELETE", "/api/v1/namespaces/team/secrets", 200) in fake_kube.requests
    assert call(url, "DELETE", "/api/v1/namespaces/team", token=token).status == 200
    assert fake_kube.get_object("namespaces", "", "team") is None
    assert fake_kube.list_objects("jobs", "team") == fake_kube.list_objects("secrets", "team") == []
    missing = call(
        url,
        "POST",
        "/api/v1/namespaces/team/secrets",
        token=token,
        body={"metadata": {"name": "late"}},
    )
    assert missing.status == 404 and missing.json["details"] == {
        "name": "team",
        "kind": "namespaces",
    }


def test_long_watches_get_a_bookmark_before_the_close(fake_kube: FakeKubeServer) -> None:
    """As recorded for 30 s+ watches: a BOOKMARK shortly before the server's clean close."""
    fake_kube.bookmark_min_timeout_s = 1
    fake_kube.bookmark_before_close_s = 0.4
    rv = call(
        fake_kube.url, "GET", "/apis/batch/v1/namespaces/default/jobs", token=fake_kube.token
    ).json["metadata"]["resourceVersion"]
    recorder = WatchRecorder(
        fake_kube.url,
        f"/apis/batch/v1/namespaces/default/jobs?watch=true&resourceVersion={rv}"
        "&allowWatchBookmarks=true&timeoutSeconds=1",
        token=fake_kube.token,
    )
    recorder.start()
    recorder.join(timeout=5)
    record = recorder.record
    assert [e["type"] for e in record.of_type()] == ["BOOKMARK"]
    assert record.events[0][0] >= 0.4 and record.clean_end is True
    bookmark = record.events[0][1]["object"]
    assert bookmark["metadata"] == {"resourceVersion": rv, "creationTimestamp": None}
