"""The Kubernetes backend's API: create or adopt, wait, failures, logs, deletion (`KubeBackend`)."""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import pydantic
from kubernetes.client import ApiClient, BatchV1Api, CoreV1Api, VersionApi
from kubernetes.client.exceptions import ApiException

from queuejob.flows.adapters.kube.common import CONNECTION_ERRORS, MAX_BACKOFF_S, T
from queuejob.flows.adapters.kube.config import load_api_client
from queuejob.flows.adapters.kube.errors import (
    KubeOp,
    error_from_api_exception,
    error_from_status,
    field_path,
    retry_after_s,
    status_body,
    unreachable,
)
from queuejob.flows.adapters.kube.watch import Event, EventWatch, JobWatch, PodWatch, WatchStats
from queuejob.flows.core.backend import (
    JobHandle,
    PodFailure,
    ProgressCallback,
    Propagation,
    run_id_of,
)
from queuejob.flows.core.errors import (
    InvalidInput,
    JobConflict,
    JobTimeout,
    KubeError,
    KubeNotFound,
    KubeUnavailable,
    QueueJobError,
    RetryableError,
)
from queuejob.flows.core.job_status import JobState, job_state
from queuejob.flows.core.manifest import CONTAINER_NAME, RUN_ID_LABEL, run_labels, run_selector
from queuejob.flows.core.pod_failure import IGNORE, ServerFeatures, match_pod
from queuejob.flows.core.pods import PodTracker, StartLimits

log = logging.getLogger(__name__)

# --- the backend -------------------------------------------------------------------------------


class KubeBackend:
    """The `JobBackend` that runs the run's Job on a Kubernetes cluster.

    ``request_timeout_s`` bounds every API call; ``watch_timeout_s`` is the ``timeoutSeconds`` of
    each watch request (the watch is then resumed); ``retries`` and ``retry_base_s`` set the small
    bounded retry of transient API errors inside each call (see the module docstring).
    """

    def __init__(
        self,
        api_client: ApiClient,
        *,
        request_timeout_s: float = 30.0,
        watch_timeout_s: int = 60,
        retries: int = 4,
        retry_base_s: float = 0.5,
    ) -> None:
        if request_timeout_s <= 0 or watch_timeout_s < 1 or retries < 0 or retry_base_s < 0:
            raise InvalidInput(
                "KubeBackend needs request_timeout_s > 0, watch_timeout_s >= 1, retries >= 0 and "
                "retry_base_s >= 0"
            )
        self.api_client = api_client
        self.request_timeout_s = float(request_timeout_s)
        self.watch_timeout_s = int(watch_timeout_s)
        self.retries = int(retries)
        self.retry_base_s = float(retry_base_s)
        # Typed as Any: the generated methods declare model types for bodies, and this backend
        # deliberately sends camelCase dicts (which the client validates and sends unchanged).
        self._batch: Any = BatchV1Api(api_client)
        self._core: Any = CoreV1Api(api_client)
        self._version: Any = VersionApi(api_client)
        self._last_watch: JobWatch | None = None  # the latest wait's watch, for diagnostics
        self._features: ServerFeatures | None = None

    def __repr__(self) -> str:
        host = getattr(self.api_client.configuration, "host", "?")
        return f"KubeBackend(host={host!r})"

    @classmethod
    def from_config(
        cls,
        *,
        cluster_config: Mapping[str, Any] | None = None,
        context: str | None = None,
        kubeconfig: str | None = None,
        **kw: Any,
    ) -> KubeBackend:
        """A backend from the first Kubernetes configuration found.

        ``cluster_config`` is a prefect-kubernetes ``KubernetesClusterConfig`` block's ``config``
        (``context`` its ``context_name``), or ``KubernetesCredentials.cluster_config``'s; then
        in-cluster config; then ``kubeconfig`` / ``$KUBECONFIG`` / ``~/.kube/config``. Raises
        `ConfigError` naming all three sources when none is usable. ``kw`` goes to ``__init__``.
        """
        client = load_api_client(
            cluster_config=cluster_config, context=context, kubeconfig=kubeconfig
        )
        return cls(client, **kw)

    # --- low level -----------------------------------------------------------------------------

    def _backoff(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based), with jitter."""
        delay = min(self.retry_base_s * (2.0**attempt), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
        retry_after = retry_after_s(exc) if exc is not None else None
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_BACKOFF_S))
        return delay

    def _retrying(self, attempt: Callable[[], T], op: KubeOp) -> T:
        for i in range(self.retries + 1):
            try:
                return attempt()
            except RetryableError as exc:
                if i >= self.retries:
                    raise
                delay = self._backoff(i, exc)
                log.debug("%s: %s; retry %d/%d in %.2fs", op, exc, i + 1, self.retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _raw(
        self,
        fn: Callable[..., Any],
        *args: Any,
        op: KubeOp,
        tolerate: Collection[int] = (),
        **kwargs: Any,
    ) -> tuple[int, bytes]:
        """Call one API method (with bounded retries); return its status and raw body.

        Error statuses in ``tolerate`` are returned instead of raised (their body is the Status).
        """

        def attempt() -> tuple[int, bytes]:
            try:
                resp = fn(
                    *args,
                    _preload_content=False,
                    _request_timeout=self.request_timeout_s,
                    **kwargs,
                )
            except ApiException as exc:
                if exc.status in tolerate:
                    body = exc.body if isinstance(exc.body, str | bytes) else b""
                    return int(exc.status), body.encode() if isinstance(body, str) else body
                raise error_from_api_exception(exc, op=op) from exc
            except pydantic.ValidationError as exc:
                # Never echo the inputs: a Secret body holds the broker URL.
                problems = "; ".join(
                    f"{field_path(e['loc'])}: {e['msg']}"
                    for e in exc.errors(
                        include_url=False, include_context=False, include_input=False
                    )
                )
                raise InvalidInput(
                    f"the object for {op} does not match the Kubernetes schema: {problems}"
                ) from None
            except CONNECTION_ERRORS as exc:
                raise unreachable(exc, op) from exc
            try:
                return int(resp.status), bytes(resp.data)
            except CONNECTION_ERRORS as exc:
                raise unreachable(exc, op) from exc
            finally:
                with contextlib.suppress(Exception):
                    resp.release_conn()

        return self._retrying(attempt, op)

    def _json(
        self,
        fn: Callable[..., Any],
        *args: Any,
        op: KubeOp,
        tolerate: Collection[int] = (),
        **kwargs: Any,
    ) -> tuple[int, dict[str, Any]]:
        status, raw = self._raw(fn, *args, op=op, tolerate=tolerate, **kwargs)
        body = status_body(raw)
        if not body and raw:
            raise KubeError(f"the API server's answer to {op} is not a JSON object")
        return status, body

    def _list_job(self, handle: JobHandle) -> tuple[dict[str, Any] | None, str | None]:
        """The Job (None when gone or replaced by another uid) and the list's resourceVersion."""
        op = KubeOp("list", "jobs", handle.namespace, handle.name)
        _, body = self._json(
            self._batch.list_namespaced_job,
            handle.namespace,
            field_selector=f"metadata.name={handle.name}",
            op=op,
        )
        rv = (body.get("metadata") or {}).get("resourceVersion")
        items = [i for i in body.get("items") or [] if isinstance(i, dict)]
        job = items[0] if items else None
        if job is not None and handle.uid and (job.get("metadata") or {}).get("uid") != handle.uid:
            job = None
        return job, str(rv) if rv else None

    def _list_pods(self, namespace: str, selector: str) -> tuple[list[dict[str, Any]], str | None]:
        """The pods matching a label selector and the list's resourceVersion."""
        _, body = self._json(
            self._core.list_namespaced_pod,
            namespace,
            label_selector=selector,
            op=KubeOp("list", "pods", namespace),
        )
        rv = (body.get("metadata") or {}).get("resourceVersion")
        return [p for p in body.get("items") or [] if isinstance(p, dict)], str(rv) if rv else None

    def _list_events(
        self, namespace: str, field_selector: str
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The namespace's events matching a field selector and the list's resourceVersion."""
        _, body = self._json(
            self._core.list_namespaced_event,
            namespace,
            field_selector=field_selector,
            op=KubeOp("list", "events", namespace),
        )
        rv = (body.get("metadata") or {}).get("resourceVersion")
        return [e for e in body.get("items") or [] if isinstance(e, dict)], str(rv) if rv else None

    def server_features(self) -> ServerFeatures:
        """Which of the Job's failure fields this API server keeps, from its ``/version`` (read
        once per backend). A server that does not say is taken for a current one: an older
        server drops the fields it does not know, and `create_or_adopt` logs that it did."""
        if self._features is None:
            status, body = self._json(
                self._version.get_code, op=KubeOp("get", "version"), tolerate=(403, 404)
            )
            if status != 200:
                log.warning("could not read the API server's /version (%d); assuming 1.29+", status)
                body = {}
            self._features = ServerFeatures.from_version(body)
        return self._features

    def _read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        status, body = self._json(
            self._batch.read_namespaced_job,
            name,
            namespace,
            op=KubeOp("get", "jobs", namespace, name),
            tolerate=(404,),
        )
        if status == 404:
            if (body.get("details") or {}).get("kind") == "namespaces":
                raise error_from_status(404, body, op=KubeOp("get", "jobs", namespace, name))
            return None
        return body

    def _conflict(self, kind: str, namespace: str, name: str, other: str | None) -> JobConflict:
        owner = f"run '{other}'" if other else f"no queuejob run (no {RUN_ID_LABEL} label)"
        return JobConflict(
            f"{kind} '{name}' in namespace '{namespace}' already exists and belongs to {owner}; "
            f"delete it (kubectl delete {kind.lower()} {name} -n {namespace}) or use another "
            "name prefix"
        )

    # --- JobBackend ----------------------------------------------------------------------------

    def create_or_adopt(
        self, *, secret: dict[str, Any], job: dict[str, Any], run_id: str
    ) -> JobHandle:
        """Create the run's Secret, then its Job, then make the Job own the Secret.

        A Secret or Job that already exists with this run's label is reused/adopted (no second
        object is made; the handle says ``adopted=True``); one of another run is a `JobConflict`.
        When the Job cannot be created for a permanent reason, a Secret created by this call is
        deleted again so the broker URL does not linger un-owned.
        """
        job_meta = job.get("metadata") or {}
        sec_meta = secret.get("metadata") or {}
        name, sec_name = job_meta.get("name"), sec_meta.get("name")
        namespace = job_meta.get("namespace") or "default"
        if not name or not sec_name:
            raise InvalidInput("the Job and the Secret both need metadata.name")
        if (sec_meta.get("namespace") or "default") != namespace:
            raise InvalidInput(
                f"Secret '{sec_name}' and Job '{name}' must be in the same namespace (the Job "
                "owns the Secret)"
            )
        label = run_labels(run_id)[RUN_ID_LABEL]

        sec_op = KubeOp("create", "secrets", namespace, sec_name)
        status, _ = self._json(
            self._core.create_namespaced_secret, namespace, secret, op=sec_op, tolerate=(409,)
        )
        created_secret = status != 409
        if not created_secret:
            # Only the metadata is looked at; the body's data (the broker URL) is dropped at once.
            _, existing = self._json(
                self._core.read_namespaced_secret,
                sec_name,
                namespace,
                op=KubeOp("get", "secrets", namespace, sec_name),
            )
            other = run_id_of(existing)
            del existing
            if other != label:
                raise self._conflict("Secret", namespace, sec_name, other)
            log.info("Secret %s/%s already exists for this run; reusing it", namespace, sec_name)

        job_op = KubeOp("create", "jobs", namespace, name)
        try:
            status, body = self._json(
                self._batch.create_namespaced_job, namespace, job, op=job_op, tolerate=(409,)
            )
            adopted = status == 409
            if adopted:
                current = self._read_job(namespace, name)
                if current is None:
                    # Deleted between our create and read: let a task retry create it afresh.
                    raise KubeUnavailable(
                        f"Job '{name}' in namespace '{namespace}' existed and then vanished "
                        "while it was being adopted; retry"
                    )
                other = run_id_of(current)
                if other != label:
                    raise self._conflict("Job", namespace, name, other)
                body = current
                log.info("Job %s/%s already exists for this run; adopting it", namespace, name)
        except QueueJobError as exc:
            if created_secret and not exc.retryable:
                self._delete_secret_quietly(namespace, sec_name)
            raise

        handle = JobHandle.from_job(body, run_id, adopted=adopted)
        self._check_kept(job, body)
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": handle.uid}
        self._json(
            self._core.patch_namespaced_secret,
            sec_name,
            namespace,
            {"metadata": {"ownerReferences": [owner]}},
            op=KubeOp("patch", "secrets", namespace, sec_name),
        )
        return handle

    @staticmethod
    def _check_kept(sent: Mapping[str, Any], stored: Mapping[str, Any]) -> None:
        """Log the failure fields the API server dropped (a feature gate off, an old server)."""
        dropped = [
            key
            for key in ("podFailurePolicy", "podReplacementPolicy")
            if (sent.get("spec") or {}).get(key) is not None
            and (stored.get("spec") or {}).get(key) is None
        ]
        if dropped:
            name = (stored.get("metadata") or {}).get("name")
            log.warning(
                "the API server dropped %s from Job %s (an older server, or its feature gate is "
                "off): every failed pod counts toward backoffLimit",
                " and ".join(dropped),
                name,
            )

    def _delete_secret(self, namespace: str, name: str) -> None:
        self._json(
            self._core.delete_namespaced_secret,
            name,
            namespace,
            op=KubeOp("delete", "secrets", namespace, name),
            tolerate=(404,),
        )

    def _delete_secret_quietly(self, namespace: str, name: str) -> None:
        try:
            self._delete_secret(namespace, name)
        except QueueJobError as exc:
            log.warning(
                "could not delete Secret %s/%s after a failed create: %s", namespace, name, exc
            )

    def find_job(self, *, namespace: str, name: str, run_id: str) -> JobHandle | None:
        """The run's Job if it exists; None when missing; `JobConflict` if another run owns it."""
        job = self._read_job(namespace, name)
        if job is None:
            return None
        other = run_id_of(job)
        if other != run_labels(run_id)[RUN_ID_LABEL]:
            raise self._conflict("Job", namespace, name, other)
        return JobHandle.from_job(job, run_id, adopted=True)

    def wait(
        self,
        handle: JobHandle,
        *,
        timeout_s: float,
        on_update: ProgressCallback | None = None,
        tick_s: float = 1.0,
        start: StartLimits | None = None,
    ) -> JobState:
        """Block until the Job is decided, calling ``on_update`` on every change and every tick.

        Returns as soon as a decisive condition is written (the interim ``SuccessCriteriaMet`` /
        ``FailureTarget`` count). Raises `JobTimeout` after ``timeout_s`` seconds,
        `KubeNotFound` when the Job is deleted meanwhile, and whatever ``on_update`` raises.

        Beside the Job, its pods and its events are watched for what the Job's status does not
        say (`PodTracker`): the pods Kubernetes disrupted (`JobState.disruptions`), and pods that
        cannot start. The state names what holds them (`JobState.pending`), and the wait
        returns, the Job undecided, once the ``start`` limits give up on them
        (`JobState.start_failure`: the caller deletes the Job) or when only pods that never
        started keep a Job whose work is done open (`JobState.held_open`). A failing pod or
        event watch (a Role without ``watch`` on pods, or without ``list``/``watch`` on events)
        is logged once and does not end the wait. The watch threads are stopped before this
        returns or raises.
        """
        now = time.monotonic()
        deadline = now + timeout_s
        job, rv = self._list_job(handle)
        if job is None:
            raise self._gone(handle)
        tracker = PodTracker.for_job(job, limits=start or StartLimits(), now=now)
        base = job_state(job)
        state = tracker.apply(base, now)
        if on_update is not None:
            on_update(state)
        last_notice = time.monotonic()
        self._last_watch = None
        if state.phase.decided:
            return state

        events: queue.Queue[Event] = queue.Queue()
        kw: dict[str, Any] = {"resource_version": None, "deadline": deadline, "out": events}
        watch = JobWatch(self, handle, resource_version=rv, deadline=deadline, out=events)
        watches: list[Any] = [watch]
        if handle.uid:
            watches += [
                PodWatch(self, handle, **kw),
                EventWatch.of_job(self, handle, **kw),
                EventWatch.of_sandboxes(self, handle, **kw),
            ]
        self._last_watch = watch
        for w in watches:
            w.start()
        events_logged = False
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise self._timeout(handle, timeout_s, state)
                try:
                    event = events.get(timeout=max(0.0, min(last_notice + tick_s, deadline) - now))
                except queue.Empty:
                    new = tracker.apply(base, time.monotonic())
                    if new != state:
                        state = new
                    if on_update is not None and time.monotonic() < deadline:
                        on_update(state)  # heartbeat: lets the caller poll the broker
                    last_notice = time.monotonic()
                    if state.settled:
                        return state
                    continue
                now = time.monotonic()
                if event.pod_error is not None:
                    tracker.pods_readable = False
                    log.warning(
                        "stopped watching the pods of Job %s (%s); pods that Kubernetes "
                        "disrupts are not listed in the report, and pods that cannot start are "
                        "found only when start_timeout_seconds runs out",
                        handle.name,
                        event.pod_error,
                    )
                    continue
                if event.event_error is not None:
                    tracker.events_readable = False
                    if not events_logged:
                        events_logged = True
                        log.warning(
                            "not watching the events of Job %s (%s): a pod the Job controller "
                            "cannot create (a quota, a missing service account) shows only as "
                            "no pod, until start_timeout_seconds runs out",
                            handle.name,
                            event.event_error,
                        )
                    continue
                if event.pod is not None:
                    if not tracker.observe(event.pod, now=now, deleted=event.pod_deleted):
                        continue
                elif event.pods_listed is not None:
                    tracker.retain(event.pods_listed)
                elif event.event is not None:
                    if not tracker.observe_event(event.event, now=now):
                        continue
                elif event.error is not None:
                    raise event.error
                elif event.deleted or event.job is None:
                    raise self._gone(handle)
                else:
                    base = job_state(event.job)
                new = tracker.apply(base, now)
                if new != state:
                    state = new
                    if on_update is not None:
                        on_update(state)
                    last_notice = time.monotonic()
                if state.settled:
                    return state
        finally:
            for w in watches:
                w.stop()
            for w in watches:
                if w.is_alive():
                    w.join(timeout=self.request_timeout_s + 1.0)
                if w.is_alive():  # pragma: no cover - a request that ignores its own timeout
                    log.warning(
                        "the %s watch of Job %s did not stop in time", w.resource, handle.name
                    )

    @property
    def last_wait_stats(self) -> WatchStats:
        """Counters of the most recent `wait`'s watch (for logs, benchmarks and tests)."""
        w = self._last_watch
        if w is None:
            return WatchStats()
        return WatchStats(watches=w.watches, reconnects=w.reconnects, relists=w.relists)

    @staticmethod
    def _gone(handle: JobHandle) -> KubeNotFound:
        return KubeNotFound(
            f"Job '{handle.name}' in namespace '{handle.namespace}' was deleted while waiting for "
            "it (by a cleanup, a TTL or by hand); its outcome is unknown: check the run's ledger"
        )

    @staticmethod
    def _timeout(handle: JobHandle, timeout_s: float, state: JobState) -> JobTimeout:
        return JobTimeout(
            f"Job '{handle.name}' in namespace '{handle.namespace}' was not finished after "
            f"{timeout_s:g} s ({state.describe()}); raise the wait timeout or look at its pods "
            f"(kubectl describe job {handle.name} -n {handle.namespace})"
        )

    def failure_details(self, handle: JobHandle, *, tail_lines: int = 20) -> list[PodFailure]:
        """One entry per failed pod of the Job that counted (not one its pod failure policy
        ignored): exit code, reason and the last log lines."""
        current = self._read_job(handle.namespace, handle.name)
        policy = ((current or {}).get("spec") or {}).get("podFailurePolicy")
        op = KubeOp("list", "pods", handle.namespace)
        _, body = self._json(
            self._core.list_namespaced_pod,
            handle.namespace,
            label_selector=f"job-name={handle.name}",
            op=op,
        )
        pods = [
            p for p in body.get("items") or [] if isinstance(p, dict) and self._owned(p, handle)
        ]
        pods.sort(key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""))
        failures: list[PodFailure] = []
        for pod in pods:
            status = pod.get("status") or {}
            if status.get("phase") != "Failed":
                continue
            matched = match_pod(policy, pod) if policy else None
            if matched is not None and matched.action == IGNORE:
                continue
            name = str((pod.get("metadata") or {}).get("name"))
            container, exit_code, reason = self._termination(pod)
            failures.append(
                PodFailure(
                    pod=name,
                    exit_code=exit_code,
                    reason=reason,
                    log_tail=self._log_tail(handle.namespace, name, container, tail_lines),
                )
            )
        return failures

    @staticmethod
    def _owned(pod: Mapping[str, Any], handle: JobHandle) -> bool:
        if not handle.uid:
            return True
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        uids = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
        uids |= {labels.get("batch.kubernetes.io/controller-uid"), labels.get("controller-uid")}
        uids.discard(None)
        # A pod with no owner information at all (orphaned) is attributed by its job-name label.
        return not uids or handle.uid in uids

    @staticmethod
    def _termination(pod: Mapping[str, Any]) -> tuple[str | None, int | None, str | None]:
        """The worker container's name, exit code and reason (the pod's reason as fallback)."""
        status = pod.get("status") or {}
        statuses = [s for s in status.get("containerStatuses") or [] if isinstance(s, dict)]
        chosen = next((s for s in statuses if s.get("name") == CONTAINER_NAME), None)
        if chosen is None and statuses:
            chosen = statuses[0]
        exit_code: int | None = None
        reason: str | None = status.get("reason")
        if chosen is not None:
            for key in ("state", "lastState"):
                term = (chosen.get(key) or {}).get("terminated")
                if term:
                    code = term.get("exitCode")
                    exit_code = int(code) if code is not None else None
                    reason = term.get("reason") or reason
                    break
        containers = ((pod.get("spec") or {}).get("containers")) or []
        name = chosen.get("name") if chosen else (containers[0].get("name") if containers else None)
        return name, exit_code, reason

    def _log_tail(self, namespace: str, pod: str, container: str | None, lines: int) -> str:
        if lines <= 0:
            return ""
        kwargs: dict[str, Any] = {"tail_lines": lines}
        if container:
            kwargs["container"] = container
        try:
            _, raw = self._raw(
                self._core.read_namespaced_pod_log,
                pod,
                namespace,
                op=KubeOp("get", "pods/log", namespace, pod),
                **kwargs,
            )
        except QueueJobError as exc:
            return f"(log unavailable: {exc})"
        return raw.decode("utf-8", errors="replace")

    def delete_job(
        self, *, namespace: str, name: str, propagation: Propagation = "Background"
    ) -> bool:
        """Delete one Job (its pods and owned Secret follow); False when it did not exist."""
        status, _ = self._json(
            self._batch.delete_namespaced_job,
            name,
            namespace,
            body={"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation},
            op=KubeOp("delete", "jobs", namespace, name),
            tolerate=(404,),
        )
        return status != 404

    def delete_run(
        self, *, namespace: str, run_id: str, propagation: Propagation = "Background"
    ) -> int:
        """Delete every Job labelled with the run (pods and owned Secrets follow by garbage
        collection), and any of the run's Secrets left without a Job. Returns the Jobs deleted."""
        selector = run_selector(run_id)
        _, jobs = self._json(
            self._batch.list_namespaced_job,
            namespace,
            label_selector=selector,
            op=KubeOp("list", "jobs", namespace),
        )
        deleted = 0
        for item in jobs.get("items") or []:
            name = (item.get("metadata") or {}).get("name")
            if name and self.delete_job(namespace=namespace, name=name, propagation=propagation):
                deleted += 1
        # A Secret whose Job was never created (or never got the ownerReference) is not garbage
        # collected; it holds the broker URL, so remove it explicitly.
        _, secrets = self._json(
            self._core.list_namespaced_secret,
            namespace,
            label_selector=selector,
            op=KubeOp("list", "secrets", namespace),
        )
        for item in secrets.get("items") or []:
            name = (item.get("metadata") or {}).get("name")
            if name:
                self._delete_secret(namespace, name)
        return deleted

    def check_namespace(self, namespace: str) -> None:
        """Raise `KubeNotFound` when the namespace does not exist.

        Reading a namespace is a cluster-scoped permission a namespaced Role cannot grant; when it
        is forbidden the check is skipped (creating the Job reports a missing namespace anyway).
        """
        op = KubeOp("get", "namespaces", None, namespace)
        status, _ = self._json(self._core.read_namespace, namespace, op=op, tolerate=(403, 404))
        if status == 404:
            raise KubeNotFound(
                f"namespace '{namespace}' does not exist; create it (kubectl create namespace "
                f"{namespace}) or choose an existing namespace in the job template"
            )
        if status == 403:
            log.debug("cannot read namespace %s (forbidden); skipping the check", namespace)
