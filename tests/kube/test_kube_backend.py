"""The Kubernetes backend against recorded API answers and the fake API server.

The first tests translate Status bodies exactly as a v1.32 kube-apiserver returns them (copied
from recorded traces) and need no server. The rest run the real backend, with the real
``kubernetes`` client, against the fake API server, which runs each pod's command as a local
process with Kubernetes 1.31+ Job semantics (interim conditions, back-off, garbage collection).
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient, Configuration

from queuejob.flows.adapters.kube import KubeBackend, KubeOp, error_from_status, load_api_client
from queuejob.flows.core.backend import JobHandle
from queuejob.flows.core.errors import (
    ConfigError,
    InvalidInput,
    JobConflict,
    JobTimeout,
    KubeError,
    KubeForbidden,
    KubeInvalid,
    KubeNotFound,
    KubeUnavailable,
    PermanentError,
    RetryableError,
)
from queuejob.flows.core.job_status import JobPhase, JobState
from queuejob.flows.core.manifest import (
    ITEMS_ANNOTATION,
    RUN_ID_LABEL,
    build_secret,
    run_labels,
    secret_name,
)
from tests.fakekube import FakeKubeServer
from tests.shell_jobs import shell_run

pytestmark = pytest.mark.kube

PASSWORD = "pw-never-shown-7f3a"
BROKER_URL = f"amqp://queuejob:{PASSWORD}@rabbitmq.example.invalid:5672/%2F"


# --- recorded Status bodies (kube-apiserver v1.32, verbatim) -------------------------------------

ALREADY_EXISTS = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": 'jobs.batch "queuejob-0002" already exists',
    "reason": "AlreadyExists",
    "details": {"name": "queuejob-0002", "group": "batch", "kind": "jobs"},
    "code": 409,
}
INVALID_THREE_CAUSES = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": 'Job.batch "queuejob-0006-11" is invalid: [spec.parallelism: Invalid value: -1: '
    "must be greater than or equal to 0, spec.backoffLimit: Invalid value: -1: must be greater "
    "than or equal to 0, spec.template.spec.restartPolicy: Required value: valid values: "
    '"OnFailure", "Never"]',
    "reason": "Invalid",
    "details": {
        "name": "queuejob-0006-11",
        "group": "batch",
        "kind": "Job",
        "causes": [
            {
                "reason": "FieldValueInvalid",
                "message": "Invalid value: -1: must be greater than or equal to 0",
                "field": "spec.parallelism",
            },
            {
                "reason": "FieldValueInvalid",
                "message": "Invalid value: -1: must be greater than or equal to 0",
                "field": "spec.backoffLimit",
            },
            {
                "reason": "FieldValueRequired",
                "message": 'Required value: valid values: "OnFailure", "Never"',
                "field": "spec.template.spec.restartPolicy",
            },
        ],
    },
    "code": 422,
}
NAMESPACE_NOT_FOUND = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": 'namespaces "queuejob-nope" not found',
    "reason": "NotFound",
    "details": {"name": "queuejob-nope", "kind": "namespaces"},
    "code": 404,
}
JOB_NOT_FOUND = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": 'jobs.batch "queuejob-missing" not found',
    "reason": "NotFound",
    "details": {"name": "queuejob-missing", "group": "batch", "kind": "jobs"},
    "code": 404,
}
FORBIDDEN_CREATE = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": 'jobs.batch is forbidden: User "system:serviceaccount:default:queuejob-noperms" '
    'cannot create resource "jobs" in API group "batch" in the namespace "default"',
    "reason": "Forbidden",
    "details": {"group": "batch", "kind": "jobs"},
    "code": 403,
}
FORBIDDEN_LOG = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": 'pods "queuejob-0002-5fl6p" is forbidden: User '
    '"system:serviceaccount:default:queuejob-noperms" cannot get resource "pods/log" in API '
    'group "" in the namespace "default"',
    "reason": "Forbidden",
    "details": {"name": "queuejob-0002-5fl6p", "kind": "pods"},
    "code": 403,
}
UNAUTHORIZED = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": "Unauthorized",
    "reason": "Unauthorized",
    "code": 401,
}
EXPIRED = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": "too old resource version: 1 (324)",
    "reason": "Expired",
    "code": 410,
}


def test_invalid_quotes_every_cause_and_is_permanent() -> None:
    err = error_from_status(
        422, INVALID_THREE_CAUSES, op=KubeOp("create", "jobs", "default", "queuejob-0006-11")
    )
    assert isinstance(err, KubeInvalid) and not err.retryable
    text = str(err)
    assert "Job 'queuejob-0006-11' in namespace 'default'" in text
    assert "spec.parallelism: Invalid value: -1: must be greater than or equal to 0" in text
    assert "spec.backoffLimit: Invalid value: -1" in text
    assert 'spec.template.spec.restartPolicy: Required value: valid values: "OnFailure"' in text


def test_forbidden_names_verb_resource_namespace_and_role() -> None:
    err = error_from_status(403, FORBIDDEN_CREATE, op=KubeOp("create", "jobs", "default", "j"))
    assert isinstance(err, KubeForbidden) and not err.retryable
    text = str(err)
    assert "cannot create jobs in namespace 'default'" in text
    assert "system:serviceaccount:default:queuejob-noperms" in text
    assert "deployments/k8s/rbac.yaml" in text
    # The server's wording wins over the operation's (a subresource is named precisely).
    log_err = error_from_status(403, FORBIDDEN_LOG, op=KubeOp("get", "pods", "default", "p"))
    assert "cannot get pods/log in namespace 'default'" in str(log_err)


def test_not_found_distinguishes_a_missing_namespace() -> None:
    ns_err = error_from_status(
        404, NAMESPACE_NOT_FOUND, op=KubeOp("create", "jobs", "queuejob-nope", "j")
    )
    assert isinstance(ns_err, KubeNotFound)
    assert "namespace 'queuejob-nope' does not exist" in str(ns_err)
    job_err = error_from_status(
        404, JOB_NOT_FOUND, op=KubeOp("get", "jobs", "default", "queuejob-missing")
    )
    assert isinstance(job_err, KubeNotFound)
    assert "jobs 'queuejob-missing' not found in namespace 'default'" in str(job_err)


@pytest.mark.parametrize(
    ("code", "body", "kind", "retryable"),
    [
        (500, {"reason": "InternalError", "message": "etcd leader changed"}, KubeUnavailable, True),
        (503, {"reason": "ServiceUnavailable", "message": "x"}, KubeUnavailable, True),
        (429, {"reason": "TooManyRequests", "message": "slow down"}, KubeUnavailable, True),
        (401, UNAUTHORIZED, ConfigError, False),
        (409, ALREADY_EXISTS, KubeError, False),
        (410, EXPIRED, KubeError, False),
        (400, {"reason": "BadRequest", "message": "bad continue token"}, KubeError, False),
    ],
)
def test_retry_meaning_follows_the_status_code(
    code: int, body: dict[str, Any], kind: type[Exception], retryable: bool
) -> None:
    err = error_from_status(code, body, op=KubeOp("list", "jobs", "default"))
    assert isinstance(err, kind)
    assert err.retryable is retryable
    assert isinstance(err, RetryableError if retryable else PermanentError)


# --- configuration -----------------------------------------------------------------------------


def test_no_configuration_names_the_three_sources(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    with pytest.raises(ConfigError) as info:
        KubeBackend.from_config()
    text = str(info.value)
    assert "KubernetesClusterConfig" in text
    assert "in-cluster" in text
    assert "missing-kubeconfig" in text and "KUBECONFIG" in text


def test_an_explicit_kubeconfig_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        KubeBackend.from_config(kubeconfig=str(tmp_path / "nope.yaml"))


def test_a_broken_cluster_config_block_does_not_echo_its_token() -> None:
    broken = {"apiVersion": "v1", "users": [{"name": "u", "user": {"token": PASSWORD}}]}
    with pytest.raises(ConfigError) as info:
        load_api_client(cluster_config=broken)
    assert PASSWORD not in str(info.value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_server_is_retryable_after_bounded_retries() -> None:
    cfg = Configuration()
    cfg.host = f"http://127.0.0.1:{_free_port()}"
    cfg.retries = False  # no urllib3-level retries: count only the backend's own attempts
    backend = KubeBackend(ApiClient(cfg), request_timeout_s=2, retries=2, retry_base_s=0.01)
    started = time.monotonic()
    with pytest.raises(KubeUnavailable, match="could not reach the API server"):
        backend.find_job(namespace="default", name="queuejob-x", run_id="r")
    assert time.monotonic() - started < 5


def test_a_server_that_never_answers_hits_the_request_timeout() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # connections complete in the kernel; nothing ever answers
        cfg = Configuration()
        cfg.host = f"http://127.0.0.1:{listener.getsockname()[1]}"
        cfg.retries = False
        backend = KubeBackend(ApiClient(cfg), request_timeout_s=0.3, retries=0)
        started = time.monotonic()
        with pytest.raises(KubeUnavailable):
            backend.check_namespace("default")
        assert time.monotonic() - started < 2.0


def test_client_side_schema_errors_never_show_the_broker_url() -> None:
    cfg = Configuration()
    cfg.host = f"http://127.0.0.1:{_free_port()}"
    backend = KubeBackend(ApiClient(cfg), retries=0)
    secret = build_secret(namespace="default", name="s", run_id="r", broker_url=BROKER_URL)
    secret["stringDta"] = {"BROKER_URL": BROKER_URL}  # a typo the client's model rejects
    job = {"metadata": {"name": "j", "namespace": "default"}}
    with pytest.raises(InvalidInput) as info:
        backend.create_or_adopt(secret=secret, job=job, run_id="r")
    assert "stringDta" in str(info.value)
    assert PASSWORD not in str(info.value) and BROKER_URL not in repr(info.value)


# --- against the fake API server ---------------------------------------------------------------


def _run(run_id: str, script: str, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's Secret and Job, with a plain shell command instead of the queuejob worker."""
    kw.setdefault("namespace", "default")
    return shell_run(run_id, script, broker_url=BROKER_URL, **kw)


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def _watch_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kube-watch-")]


def _get(fake: Any, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    obj: dict[str, Any] | None = fake.get_object(kind, namespace, name)
    return obj


def _condition_types(job: dict[str, Any] | None) -> list[str]:
    if not job:
        return []
    return [
        c["type"]
        for c in (job.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    ]


@pytest.fixture
def backend(fake_kubeconfig: Path) -> Iterator[KubeBackend]:
    """A backend configured from the fake's kubeconfig, with short timeouts and back-offs."""
    kb = KubeBackend.from_config(
        kubeconfig=str(fake_kubeconfig),
        request_timeout_s=5,
        watch_timeout_s=5,
        retries=4,
        retry_base_s=0.05,
    )
    yield kb
    assert not _watch_threads(), "a wait left its watch thread running"


@pytest.fixture
def rid() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


def test_create_makes_secret_then_job_owned_by_it(
    fake_kube: Any, backend: KubeBackend, rid: str
) -> None:
    secret, job = _run(rid, "exit 0")
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    name = job["metadata"]["name"]
    assert handle.name == name and handle.namespace == "default" and handle.uid
    assert handle.adopted is False
    assert handle.annotations and handle.annotations[ITEMS_ANNOTATION] == "1"
    stored_secret = _get(fake_kube, "secrets", "default", secret_name(name))
    assert stored_secret is not None
    owners = stored_secret["metadata"].get("ownerReferences") or []
    assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [("Job", name, handle.uid)]
    stored_job = _get(fake_kube, "jobs", "default", name)
    assert stored_job is not None
    assert BROKER_URL not in str(stored_job), "the broker URL must reach pods via the Secret"
    backend.delete_run(namespace="default", run_id=rid)


def test_create_again_for_the_same_run_adopts(
    fake_kube: Any, backend: KubeBackend, rid: str
) -> None:
    secret, job = _run(rid, "sleep 30")
    first = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    again = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    assert again.adopted is True and again.uid == first.uid
    found = backend.find_job(namespace="default", name=first.name, run_id=rid)
    assert found is not None and found.uid == first.uid
    selector_value = run_labels(rid)[RUN_ID_LABEL]
    jobs = [
        j
        for j in fake_kube.list_objects("jobs", "default")
        if j["metadata"].get("labels", {}).get(RUN_ID_LABEL) == selector_value
    ]
    secrets = [
        s
        for s in fake_kube.list_objects("secrets", "default")
        if s["metadata"].get("labels", {}).get(RUN_ID_LABEL) == selector_value
    ]
    assert len(jobs) == 1 and len(secrets) == 1
    assert backend.delete_run(namespace="default", run_id=rid) == 1


def test_a_job_of_another_run_is_a_conflict(fake_kube: Any, backend: KubeBackend, rid: str) -> None:
    secret_a, job_a = _run(rid, "sleep 30")
    backend.create_or_adopt(secret=secret_a, job=job_a, run_id=rid)
    other = f"run-{uuid.uuid4().hex[:12]}"
    secret_b, job_b = _run(other, "exit 0")
    job_b["metadata"]["name"] = job_a["metadata"]["name"]  # the same name, another run
    with pytest.raises(JobConflict) as info:
        backend.create_or_adopt(secret=secret_b, job=job_b, run_id=other)
    assert rid in str(info.value) and job_a["metadata"]["name"] in str(info.value)
    # The other run's Secret, created before the Job's 409, does not linger.
    assert _get(fake_kube, "secrets", "default", secret_b["metadata"]["name"]) is None
    with pytest.raises(JobConflict):
        backend.find_job(namespace="default", name=job_a["metadata"]["name"], run_id=other)
    backend.delete_run(namespace="default", run_id=rid)


def test_invalid_job_quotes_causes_and_removes_the_secret(
    fake_kube: Any, backend: KubeBackend, rid: str
) -> None:
    secret, job = _run(rid, "exit 0")
    job["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    with pytest.raises(KubeInvalid) as info:
        backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    assert "spec.template.spec.restartPolicy" in str(info.value)
    assert PASSWORD not in str(info.value)
    assert _get(fake_kube, "secrets", "default", secret["metadata"]["name"]) is None


def test_forbidden_says_which_verb_on_which_resource(
    fake_kube: Any, tmp_path: Path, rid: str
) -> None:
    token = f"token-{uuid.uuid4().hex}"
    fake_kube.add_service_account(
        token, "system:serviceaccount:default:queuejob-limited", {("create", "secrets")}
    )
    path = fake_kube.write_kubeconfig(tmp_path / "limited.yaml", token=token)
    limited = KubeBackend.from_config(kubeconfig=str(path), request_timeout_s=5, retries=0)
    secret, job = _run(rid, "exit 0")
    with pytest.raises(KubeForbidden) as info:
        limited.create_or_adopt(secret=secret, job=job, run_id=rid)
    text = str(info.value)
    assert "cannot create jobs in namespace 'default'" in text
    assert "deployments/k8s/rbac.yaml" in text


def test_missing_namespace_is_named(backend: KubeBackend, rid: str) -> None:
    secret, job = _run(rid, "exit 0", namespace="queuejob-nope")
    with pytest.raises(KubeNotFound, match="namespace 'queuejob-nope' does not exist"):
        backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    with pytest.raises(KubeNotFound, match="namespace 'queuejob-nope' does not exist"):
        backend.check_namespace("queuejob-nope")
    backend.check_namespace("default")


def test_wait_success_reports_counts_heartbeats_and_latency(
    fake_kube: Any, backend: KubeBackend, rid: str
) -> None:
    secret, job = _run(rid, "sleep 0.3", completions=3, parallelism=2)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    name = handle.name

    # Note when the decisive condition is first stored, polling the fake from outside the
    # backend. Under heavy load the observer may see it only after wait() returned (a negative
    # latency); a slow waiter (prefect-kubernetes polls every 5 s) is still caught.
    decided_at: list[float] = []
    stop = threading.Event()

    def observe() -> None:
        deadline = time.monotonic() + 40
        while not stop.is_set() and time.monotonic() < deadline:
            if {"SuccessCriteriaMet", "Complete"} & set(
                _condition_types(_get(fake_kube, "jobs", "default", name))
            ):
                decided_at.append(time.monotonic())
                return
            time.sleep(0.002)

    observer = threading.Thread(target=observe, daemon=True)
    observer.start()
    updates: list[tuple[float, JobState]] = []
    try:
        state = backend.wait(
            handle,
            timeout_s=30,
            on_update=lambda s: updates.append((time.monotonic(), s)),
            tick_s=0.2,
        )
        returned_at = time.monotonic()
        observer.join(5)  # it sees the condition at the latest now
    finally:
        stop.set()
        observer.join(5)
    assert state.phase is JobPhase.SUCCEEDED
    assert state.condition in ("SuccessCriteriaMet", "Complete")
    assert state.counts.succeeded + state.counts.active >= 2
    assert any(s.counts.active > 0 for _, s in updates), "running counts were reported"
    assert updates[-1][1] == state
    # Heartbeats: no gap between callbacks much longer than tick_s.
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(updates)]
    assert max(gaps) < 0.2 + 0.6
    assert decided_at, "the observer never saw the decisive condition"
    latency = returned_at - decided_at[0]
    assert latency < 1.5, f"decision seen {latency:.3f} s after the condition was written"
    backend.delete_run(namespace="default", run_id=rid)


def test_wait_back_off_failure_and_failure_details(
    fake_kube: Any, backend: KubeBackend, rid: str
) -> None:
    script = "for i in 1 2 3 4 5; do echo line-$i; done; echo oops >&2; exit 3"
    secret, job = _run(rid, script, backoff_limit=1)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    state = backend.wait(handle, timeout_s=30, tick_s=0.5)
    assert state.phase is JobPhase.FAILED
    assert state.condition in ("FailureTarget", "Failed")
    assert state.reason == "BackoffLimitExceeded"

    def both_failed_pods_listed() -> bool:
        return len(backend.failure_details(handle, tail_lines=2)) == 2

    _wait_for("two failed pods", both_failed_pods_listed)
    details = backend.failure_details(handle, tail_lines=2)
    assert len({f.pod for f in details}) == 2
    for failure in details:
        assert failure.exit_code == 3
        assert failure.reason == "Error"
        assert "line-5" in failure.log_tail and "oops" in failure.log_tail
        assert "line-4" not in failure.log_tail, "only the tail is fetched"
    backend.delete_run(namespace="default", run_id=rid)


def test_wait_deadline_raises_job_timeout_and_stops_the_watch(
    backend: KubeBackend, rid: str
) -> None:
    secret, job = _run(rid, "sleep 30")
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    started = time.monotonic()
    with pytest.raises(JobTimeout) as info:
        backend.wait(handle, timeout_s=1.0, tick_s=0.2)
    assert 0.9 < time.monotonic() - started < 3.0
    assert handle.name in str(info.value) and "Running" in str(info.value)
    assert not _watch_threads()
    backend.delete_run(namespace="default", run_id=rid)


def test_active_deadline_is_a_failure_with_its_reason(backend: KubeBackend, rid: str) -> None:
    secret, job = _run(rid, "sleep 30", active_deadline_seconds=1)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    state = backend.wait(handle, timeout_s=15, tick_s=0.5)
    assert state.phase is JobPhase.FAILED and state.reason == "DeadlineExceeded"
    backend.delete_run(namespace="default", run_id=rid)


def _job_collection_gets(fake: Any) -> int:
    """GETs on the jobs collection (lists and watches; the fake logs paths without queries)."""
    return sum(
        1
        for method, path, _ in list(fake.requests)
        if method == "GET" and path.rstrip("/") == "/apis/batch/v1/namespaces/default/jobs"
    )


def test_watch_drop_resumes_from_the_last_resource_version(
    fake_kube: Any, backend: KubeBackend, rid: str
) -> None:
    secret, job = _run(rid, "sleep 1.5", completions=1)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    drops: list[float] = []

    def drop_while_running(state: JobState) -> None:
        # Called on changes and every tick: drop whatever stream is open, a few times over.
        # Only drop a stream that is open: the first callback can come from the initial list.
        if state.counts.active and len(drops) < 3 and fake_kube.open_watches():
            drops.append(time.monotonic())
            fake_kube.drop_watches()

    before = _job_collection_gets(fake_kube)
    state = backend.wait(handle, timeout_s=30, on_update=drop_while_running, tick_s=0.2)
    assert state.phase is JobPhase.SUCCEEDED
    assert drops
    stats = backend.last_wait_stats
    assert stats.watches >= 2 and stats.reconnects >= 1, stats
    assert stats.relists == 0, "a dropped stream resumes from its resourceVersion, no re-list"
    # One initial list plus the watches, nothing else (the last watch may not be logged yet:
    # the fake logs a request once it has finished answering it).
    assert _job_collection_gets(fake_kube) - before in (stats.watches, 1 + stats.watches)
    backend.delete_run(namespace="default", run_id=rid)


def test_gone_410_relists_and_carries_on(fake_kube: Any, backend: KubeBackend, rid: str) -> None:
    secret, job = _run(rid, "sleep 1", completions=1)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    fake_kube.gone_next_watch("jobs")  # not the pods' watch, which runs beside it
    before = _job_collection_gets(fake_kube)
    state = backend.wait(handle, timeout_s=30, tick_s=0.2)
    assert state.phase is JobPhase.SUCCEEDED
    stats = backend.last_wait_stats
    assert stats.relists == 1 and stats.watches >= 2, stats
    expected = 1 + stats.relists + stats.watches
    assert _job_collection_gets(fake_kube) - before in (expected - 1, expected)
    backend.delete_run(namespace="default", run_id=rid)


def test_transient_5xx_and_429_are_retried(fake_kube: Any, backend: KubeBackend, rid: str) -> None:
    secret, job = _run(rid, "sleep 2.5", completions=1)
    fake_kube.fail_next(2, status=500)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    assert handle.uid and not handle.adopted
    injected: list[bool] = []

    def faults_seen() -> bool:
        statuses = {status for _, _, status in list(fake_kube.requests)}
        return {429, 503} <= statuses

    def burst_while_running(state: JobState) -> None:
        if not state.counts.active or not backend.last_wait_stats.watches:
            return
        if not injected:
            injected.append(True)
            fake_kube.fail_next(1, status=429)  # answered with Retry-After: 1, honoured
            fake_kube.fail_next(2, status=503)
        if not faults_seen():
            fake_kube.drop_watches()  # the reconnects meet the faults

    state = backend.wait(handle, timeout_s=30, on_update=burst_while_running, tick_s=0.2)
    assert state.phase is JobPhase.SUCCEEDED
    assert injected and faults_seen()
    assert 500 in {status for _, _, status in list(fake_kube.requests)}
    backend.delete_run(namespace="default", run_id=rid)


def test_persistent_5xx_surfaces_as_retryable(fake_kube: Any, fake_kubeconfig: Path) -> None:
    kb = KubeBackend.from_config(
        kubeconfig=str(fake_kubeconfig), request_timeout_s=5, retries=1, retry_base_s=0.01
    )
    fake_kube.fail_next(5, status=503)
    with pytest.raises(KubeUnavailable):
        kb.find_job(namespace="default", name="queuejob-none", run_id="r")
    fake_kube.fail_next(0)


def test_deleting_the_job_collects_pods_and_secret(
    fake_kube: Any, backend: KubeBackend, rid: str
) -> None:
    secret, job = _run(rid, "sleep 600", completions=2, parallelism=2)
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    _wait_for("two running pods", lambda: len(fake_kube.pod_processes()) >= 2)
    assert backend.delete_run(namespace="default", run_id=rid) == 1
    _wait_for("the Job to go", lambda: _get(fake_kube, "jobs", "default", handle.name) is None)
    _wait_for("the pods to go", lambda: not fake_kube.list_objects("pods", "default"))
    _wait_for("the pod processes to end", lambda: not fake_kube.pod_processes())
    _wait_for(
        "the Secret to go",
        lambda: _get(fake_kube, "secrets", "default", secret["metadata"]["name"]) is None,
    )
    assert backend.delete_run(namespace="default", run_id=rid) == 0
    assert backend.delete_job(namespace="default", name=handle.name) is False


def test_foreground_delete_by_name(fake_kube: Any, backend: KubeBackend, rid: str) -> None:
    secret, job = _run(rid, "sleep 600")
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)
    _wait_for("a running pod", lambda: bool(fake_kube.pod_processes()))
    assert backend.delete_job(namespace="default", name=handle.name, propagation="Foreground")
    _wait_for("the Job to go", lambda: _get(fake_kube, "jobs", "default", handle.name) is None)
    _wait_for("the pod processes to end", lambda: not fake_kube.pod_processes())


def test_wait_on_a_deleted_job_says_so(fake_kube: Any, backend: KubeBackend, rid: str) -> None:
    secret, job = _run(rid, "sleep 600")
    handle = backend.create_or_adopt(secret=secret, job=job, run_id=rid)

    def delete_soon(state: JobState) -> None:
        backend.delete_job(namespace="default", name=handle.name)

    with pytest.raises(KubeNotFound, match="was deleted while waiting"):
        backend.wait(handle, timeout_s=20, on_update=delete_soon, tick_s=0.2)
    gone = JobHandle(name=handle.name, namespace="default", uid=handle.uid, run_id=rid)
    with pytest.raises(KubeNotFound):
        backend.wait(gone, timeout_s=5)


def test_older_clusters_terminal_conditions_only(tmp_path: Path, rid: str) -> None:
    legacy = FakeKubeServer(legacy_conditions=True)
    legacy.start()
    try:
        kb = KubeBackend.from_config(
            kubeconfig=str(legacy.write_kubeconfig(tmp_path / "legacy.yaml")),
            request_timeout_s=5,
            retry_base_s=0.05,
        )
        secret, job = _run(rid, "exit 0")
        state = kb.wait(kb.create_or_adopt(secret=secret, job=job, run_id=rid), timeout_s=20)
        assert state.phase is JobPhase.SUCCEEDED and state.condition == "Complete"
        assert state.terminal
    finally:
        legacy.stop()
    assert not _watch_threads()


def test_configured_from_a_cluster_config_block_dict(fake_kube: Any) -> None:
    kb = KubeBackend.from_config(cluster_config=fake_kube.kubeconfig_dict(), context="fake")
    kb.check_namespace("default")
    assert kb.find_job(namespace="default", name="queuejob-none", run_id="r") is None


def test_a_rejected_token_is_a_configuration_error(fake_kube: Any) -> None:
    config = fake_kube.kubeconfig_dict(token="not-a-valid-token")
    kb = KubeBackend.from_config(cluster_config=config, retries=0)
    with pytest.raises(ConfigError, match="401 Unauthorized") as info:
        kb.find_job(namespace="default", name="queuejob-none", run_id="r")
    assert "not-a-valid-token" not in str(info.value)


def _role_permissions() -> set[tuple[str, str]]:
    """(verb, resource) pairs granted by the Role in deployments/k8s/rbac.yaml."""
    path = Path(__file__).resolve().parents[2] / "deployments" / "k8s" / "rbac.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    role = next(d for d in docs if d.get("kind") == "Role")
    return {
        (verb, resource)
        for rule in role["rules"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_documented_role_is_enough_for_a_whole_run(
    fake_kube: Any, tmp_path: Path, rid: str
) -> None:
    token = f"token-{uuid.uuid4().hex}"
    fake_kube.add_service_account(
        token, "system:serviceaccount:default:queuejob-flow", _role_permissions()
    )
    path = fake_kube.write_kubeconfig(tmp_path / "flow.yaml", token=token)
    kb = KubeBackend.from_config(kubeconfig=str(path), request_timeout_s=5, retry_base_s=0.05)
    kb.check_namespace("default")  # cluster-scoped: forbidden for a Role, so skipped
    secret, job = _run(rid, "echo bad; exit 2")
    handle = kb.create_or_adopt(secret=secret, job=job, run_id=rid)
    assert kb.create_or_adopt(secret=secret, job=job, run_id=rid).adopted
    assert kb.find_job(namespace="default", name=handle.name, run_id=rid) is not None
    state = kb.wait(handle, timeout_s=20, tick_s=0.5)
    assert state.phase is JobPhase.FAILED
    _wait_for("the failed pod", lambda: bool(kb.failure_details(handle)))
    (failure,) = kb.failure_details(handle)
    assert failure.exit_code == 2 and "bad" in failure.log_tail
    assert kb.delete_run(namespace="default", run_id=rid) == 1
    forbidden = [r for r in list(fake_kube.requests) if r[2] == 403]
    assert forbidden == [("GET", "/api/v1/namespaces/default", 403)]
