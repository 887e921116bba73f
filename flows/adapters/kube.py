"""The Kubernetes backend: create or adopt the run's Secret and Job, watch it, explain, delete.

This adapter is the only place that talks to the Kubernetes API (the official sync client,
``kubernetes>=37,<38``). It sends plain camelCase dict bodies and reads plain dicts back
(``_preload_content=False`` + ``json.loads``), so the client's typed models never see fields they
do not know, and every library exception leaves here translated into a ``flows.core.errors`` type:

- 429, 5xx and connection errors -> `KubeUnavailable` (a `RetryableError`);
- 401 -> `ConfigError` (the credentials are wrong, not the RBAC);
- 403 -> `KubeForbidden` naming the verb, the resource and the namespace;
- 404 -> `KubeNotFound` (a missing namespace says so);
- 422 -> `KubeInvalid` quoting the server's causes (field: message);
- anything else -> `KubeError`.

Retry policy. The flow's tasks retry `RetryableError` with Prefect's back-off; on top of that every
API call here is retried a few times (``retries``, exponential back-off from ``retry_base_s``,
honouring ``Retry-After``) when it fails with a `RetryableError`. That is safe because every call
this backend makes is idempotent by design: reads and deletes trivially; the ownerReference patch
sets the same value again; and a create that is repeated after a lost answer meets a 409 for an
object carrying this run's label, which is adopted. A short burst of 500s or 429s therefore costs
seconds inside one task attempt instead of a whole task retry (which would redo the create and lose
the watch position). Permanent errors are never retried.

Waiting. `KubeBackend.wait` lists the Job once (its state and a resourceVersion), then a background
thread watches it (``fieldSelector=metadata.name=<job>``), resuming from the last resourceVersion
seen (events and BOOKMARKs), with ``timeoutSeconds`` on each watch, a re-list when the server
answers 410 Gone (as an ERROR event in an HTTP 200 stream), and a reconnect when a stream drops.
Events reach the caller's thread through a queue, so a decisive condition is seen within
milliseconds of its write, and the caller gets a heartbeat every ``tick_s`` to poll the broker.

Secrets: the broker URL travels only in the Secret body; it never appears in a message, a log line
or an exception raised here (client-side validation errors are re-raised without their inputs).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import os
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import pydantic
import urllib3
from kubernetes.client import ApiClient, BatchV1Api, CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from flows.core.backend import JobHandle, PodFailure, ProgressCallback, Propagation, run_id_of
from flows.core.errors import (
    ConfigError,
    InvalidInput,
    JobConflict,
    JobTimeout,
    KubeError,
    KubeForbidden,
    KubeInvalid,
    KubeNotFound,
    KubeUnavailable,
    QueueJobError,
    RetryableError,
)
from flows.core.job_status import JobState, job_state
from flows.core.manifest import CONTAINER_NAME, RUN_ID_LABEL, run_labels, run_selector

log = logging.getLogger(__name__)

# The config loaders are untyped; one Any-typed alias keeps that out of the typed code below.
_kube_config: Any = kubernetes.config

T = TypeVar("T")

RBAC_HINT = "deployments/k8s/rbac.yaml"
# A single back-off step never waits longer than this, whatever Retry-After says.
MAX_BACKOFF_S = 8.0
# Extra read time granted to a watch beyond its timeoutSeconds, so the server's clean close (not
# our socket timeout) normally ends it, while a silent dead connection still cannot hang us.
WATCH_READ_SLACK_S = 5.0
# A watch stream open this long before it dropped counts as healthy (resets the failure count).
HEALTHY_STREAM_S = 1.0

_FORBIDDEN = re.compile(
    r'User "(?P<user>[^"]*)" cannot (?P<verb>\S+) resource "(?P<resource>[^"]+)"'
    r'(?: in API group "(?P<group>[^"]*)")?'
)
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    urllib3.exceptions.HTTPError,  # MaxRetryError, ProtocolError, ReadTimeoutError, ...
    http.client.HTTPException,
    OSError,  # ConnectionResetError, socket.timeout, ...
)


# --- error translation -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KubeOp:
    """One API operation, for messages: ``create jobs 'x' in namespace 'ns'``."""

    verb: str
    resource: str
    namespace: str | None = None
    name: str | None = None

    def __str__(self) -> str:
        what = f"{self.verb} {self.resource}"
        if self.name:
            what += f" '{self.name}'"
        if self.namespace:
            what += f" in namespace '{self.namespace}'"
        return what


def _status_body(raw: str | bytes | None) -> dict[str, Any]:
    """The Status object in an error response body, or {} when it is not one."""
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def error_from_status(code: int, status: Mapping[str, Any] | None, *, op: KubeOp) -> QueueJobError:
    """Translate an API error (HTTP code and ``Status`` body) into a queuejob error.

    Used for error responses and for ``ERROR`` events inside a watch stream alike.
    """
    body = status or {}
    message = str(body.get("message") or "").strip()
    reason = str(body.get("reason") or "")
    details = body.get("details") or {}
    ns = op.namespace or "default"
    if code == 401:
        return ConfigError(
            f"the API server rejected the credentials (401 Unauthorized) for {op}; the token in "
            "the Kubernetes credentials block or kubeconfig is invalid or expired: refresh it"
        )
    if code == 403:
        verb, resource, who = op.verb, op.resource, ""
        match = _FORBIDDEN.search(message)
        if match:
            verb, resource = match["verb"], match["resource"]
            group = match["group"]
            who = f' (user "{match["user"]}"'
            who += f', API group "{group}")' if group else ")"
        return KubeForbidden(
            f"the service account cannot {verb} {resource} in namespace '{ns}'{who}; grant it "
            f"with a Role like {RBAC_HINT}"
        )
    if code == 404:
        if details.get("kind") == "namespaces":
            missing = details.get("name") or ns
            return KubeNotFound(
                f"namespace '{missing}' does not exist; create it (kubectl create namespace "
                f"{missing}) or choose an existing namespace in the job template"
            )
        kind = details.get("kind") or op.resource
        name = details.get("name") or op.name or "?"
        return KubeNotFound(
            f"{kind} '{name}' not found in namespace '{ns}' (during {op}); it was deleted or "
            "never created"
        )
    if code == 422:
        causes = [
            f"{c.get('field')}: {c.get('message')}" if c.get("field") else str(c.get("message"))
            for c in details.get("causes") or []
            if isinstance(c, Mapping)
        ]
        kind = details.get("kind") or op.resource
        name = details.get("name") or op.name or "?"
        why = "; ".join(causes) if causes else message or reason or "no causes given"
        return KubeInvalid(
            f"the API server rejected {kind} '{name}' in namespace '{ns}' as invalid: {why}; "
            "fix the job template and run again"
        )
    if code == 429:
        return KubeUnavailable(
            f"the API server is throttling requests (429 TooManyRequests) for {op}; retry later"
        )
    if code >= 500:
        return KubeUnavailable(
            f"the API server answered {code} {reason or 'error'} for {op}: "
            f"{message or 'no message'}; retry later"
        )
    if code == 0:
        # The client reports TLS failures as status 0: the CA or server address is wrong.
        return KubeError(
            f"{op} failed before reaching the API server ({message or reason}); check the "
            "cluster's server address and CA in the Kubernetes configuration"
        )
    return KubeError(
        f"the API server refused {op} with {code} {reason or 'error'}: {message or 'no message'}"
    )


def error_from_api_exception(exc: ApiException, *, op: KubeOp) -> QueueJobError:
    """Translate a client `ApiException` (its status and JSON ``Status`` body)."""
    body = _status_body(exc.body)
    if not body and exc.reason:
        body = {"message": str(exc.reason)}
    return error_from_status(int(exc.status or 0), body, op=op)


def _field_path(loc: tuple[int | str, ...]) -> str:
    """A validation error's location inside the body (without the argument's position)."""
    if loc and (isinstance(loc[0], int) or loc[0] == "body"):
        loc = loc[1:]
    return ".".join(str(part) for part in loc) or "body"


def _unreachable(exc: BaseException, op: KubeOp) -> KubeUnavailable:
    return KubeUnavailable(
        f"could not reach the API server for {op} ({type(exc).__name__}: {exc}); check that "
        "the cluster is up and reachable, then retry"
    )


def _retry_after_s(exc: BaseException) -> float | None:
    """The Retry-After header of the response behind a translated error, if any."""
    cause = exc.__cause__
    headers = getattr(cause, "headers", None) if isinstance(cause, ApiException) else None
    if not headers:
        return None
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


# --- configuration -----------------------------------------------------------------------------


def load_api_client(
    *,
    cluster_config: Mapping[str, Any] | None = None,
    context: str | None = None,
    kubeconfig: str | None = None,
) -> ApiClient:
    """An API client from the first configuration found.

    Order: ``cluster_config`` (the ``config`` dict of a prefect-kubernetes
    ``KubernetesClusterConfig`` block, with ``context`` its ``context_name``); else in-cluster
    service-account config; else ``kubeconfig`` or ``$KUBECONFIG`` or ``~/.kube/config``. An
    explicitly given ``cluster_config`` or ``kubeconfig`` that cannot be loaded is an error, not a
    reason to try the next source. Raises `ConfigError` naming every source tried.
    """
    if cluster_config is not None:
        try:
            client: ApiClient = _kube_config.new_client_from_config_dict(
                dict(cluster_config), context=context, persist_config=False
            )
        except ConfigException as exc:
            raise ConfigError(
                f"the Kubernetes cluster config block could not be loaded: {exc}; check the "
                "block's config (a kubeconfig as a dict) and its context name"
            ) from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # No str(exc): a malformed dict may echo a token back.
            raise ConfigError(
                "the Kubernetes cluster config block is not a usable kubeconfig "
                f"({type(exc).__name__}); save a complete kubeconfig in the block"
            ) from None
        return client
    if kubeconfig is not None:
        return _from_kubeconfig(kubeconfig, context, explicit=True)

    tried = ["a KubernetesClusterConfig / KubernetesCredentials block (none given)"]
    configuration = kubernetes.client.Configuration()
    try:
        _kube_config.load_incluster_config(client_configuration=configuration)
    except ConfigException as exc:
        tried.append(f"in-cluster service account ({exc})")
    else:
        return ApiClient(configuration)

    path = os.environ.get("KUBECONFIG") or "~/.kube/config"
    if _any_kubeconfig_exists(path):
        return _from_kubeconfig(path, context, explicit=False)
    where = f"$KUBECONFIG={path}" if os.environ.get("KUBECONFIG") else "~/.kube/config"
    tried.append(f"kubeconfig {where} (no such file)")
    raise ConfigError(
        "no Kubernetes configuration found; tried: "
        + "; ".join(f"({i}) {t}" for i, t in enumerate(tried, 1))
        + ". Pass a KubernetesClusterConfig or KubernetesCredentials block, run the flow inside "
        "the cluster, or set KUBECONFIG"
    )


def _any_kubeconfig_exists(paths: str) -> bool:
    return any(Path(p).expanduser().is_file() for p in paths.split(os.pathsep) if p)


def _from_kubeconfig(path: str, context: str | None, *, explicit: bool) -> ApiClient:
    if explicit and not _any_kubeconfig_exists(path):
        raise ConfigError(f"kubeconfig {path} does not exist; pass the path of a kubeconfig file")
    try:
        client: ApiClient = _kube_config.new_client_from_config(
            config_file=path, context=context, persist_config=False
        )
    except ConfigException as exc:
        raise ConfigError(
            f"kubeconfig {path} could not be loaded: {exc}; check its current context"
        ) from None
    except (KeyError, TypeError, ValueError, AttributeError, OSError) as exc:
        raise ConfigError(
            f"kubeconfig {path} is not a usable kubeconfig ({type(exc).__name__}); check the file"
        ) from None
    return client


@dataclass(frozen=True, slots=True)
class WatchStats:
    """How the last `KubeBackend.wait` watched: requests opened, reconnects, re-lists (410)."""

    watches: int = 0
    reconnects: int = 0
    relists: int = 0


# --- the watch thread --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Event:
    """What the watch thread hands to the waiting thread."""

    job: dict[str, Any] | None = None
    deleted: bool = False
    error: BaseException | None = None


class _JobWatch(threading.Thread):
    """Watches one Job and puts its new versions on a queue until stopped or the deadline."""

    def __init__(
        self,
        backend: KubeBackend,
        handle: JobHandle,
        *,
        resource_version: str | None,
        deadline: float,
        out: queue.Queue[_Event],
    ) -> None:
        super().__init__(name=f"kube-watch-{handle.name}", daemon=True)
        self._backend = backend
        self._handle = handle
        self._rv = resource_version
        self._deadline = deadline
        self._out = out
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._resp: urllib3.response.BaseHTTPResponse | None = None
        # How often the watch was opened, re-opened and re-listed (see `WatchStats`).
        self.watches = 0
        self.reconnects = 0
        self.relists = 0

    def stop(self) -> None:
        """Ask the thread to end, and unblock a read in progress."""
        self._stopped.set()
        with self._lock:
            resp = self._resp
        if resp is not None:
            # Shutting the socket down wakes a blocked read at once; close() alone may not.
            with contextlib.suppress(Exception):
                resp.shutdown()

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            if not self._stopped.is_set():
                if not isinstance(exc, QueueJobError):
                    exc = KubeError(
                        f"watching Job '{self._handle.name}' in namespace "
                        f"'{self._handle.namespace}' failed unexpectedly "
                        f"({type(exc).__name__}: {exc})"
                    )
                self._out.put(_Event(error=exc))

    def _loop(self) -> None:
        backend, h = self._backend, self._handle
        op = KubeOp("watch", "jobs", h.namespace, h.name)
        failures = 0
        while not self._stopped.is_set():
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                return  # the waiting thread raises JobTimeout
            if self._rv is None:
                self.relists += 1
                job, self._rv = backend._list_job(h)
                if job is None:
                    self._out.put(_Event(deleted=True))
                    return
                self._out.put(_Event(job=job))
            timeout = max(1, min(backend.watch_timeout_s, math.ceil(remaining)))
            started = time.monotonic()
            events = 0
            try:
                stream = self._stream(timeout, op)
                with contextlib.closing(stream):
                    for event in stream:
                        events += 1
                        if not self._handle_event(event, op):
                            return
                        if self._rv is None:
                            break  # 410 Gone: re-list
            except RetryableError as exc:
                if self._stopped.is_set():
                    return
                # Only failures in a row count: a stream that delivered events or lived a while
                # before it dropped was healthy (proxies cut idle connections), not a failure.
                healthy = events > 0 or time.monotonic() - started > HEALTHY_STREAM_S
                failures = 1 if healthy else failures + 1
                if failures > backend.retries:
                    raise
                self.reconnects += 1
                delay = backend._backoff(failures - 1, exc)
                log.debug("watch of Job %s dropped (%s); reconnecting in %.2fs", h.name, exc, delay)
                self._stopped.wait(delay)
                continue
            if self._stopped.is_set():
                return
            if events or time.monotonic() - started > HEALTHY_STREAM_S:
                failures = 0
            if self._rv is not None:
                self.reconnects += 1
                # A stream that the server closed long before its timeout without a single event
                # is a dropped connection; do not reconnect in a hot loop.
                if events == 0 and time.monotonic() - started < min(1.0, timeout / 2):
                    self._stopped.wait(min(0.2, backend.retry_base_s))

    def _handle_event(self, event: Mapping[str, Any], op: KubeOp) -> bool:
        """Apply one watch event; False when the watch is over (the Job was deleted)."""
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            return True
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            if code == 410:
                self._rv = None  # too old resource version: re-list, then watch from there
                return True
            raise error_from_status(code, obj, op=op)
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if rv:
            self._rv = str(rv)
        if kind == "BOOKMARK":
            return True
        uid = (obj.get("metadata") or {}).get("uid")
        if kind == "DELETED" or (self._handle.uid and uid and uid != self._handle.uid):
            self._out.put(_Event(deleted=True))
            return False
        if kind in ("ADDED", "MODIFIED"):
            self._out.put(_Event(job=obj))
        return True

    def _stream(self, timeout: int, op: KubeOp) -> Generator[dict[str, Any], None, None]:
        backend, h = self._backend, self._handle
        read_timeout = timeout + min(backend.request_timeout_s, WATCH_READ_SLACK_S)
        self.watches += 1
        try:
            resp = backend._batch.list_namespaced_job(
                h.namespace,
                field_selector=f"metadata.name={h.name}",
                resource_version=self._rv,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                watch=True,
                _preload_content=False,
                _request_timeout=(backend.request_timeout_s, read_timeout),
            )
        except ApiException as exc:
            if exc.status == 410:
                # Some servers and proxies answer an expired resourceVersion with HTTP 410
                # instead of an ERROR event: the same cure, a re-list.
                self._rv = None
                return
            raise error_from_api_exception(exc, op=op) from exc
        except _CONNECTION_ERRORS as exc:
            raise _unreachable(exc, op) from exc
        with self._lock:
            self._resp = resp
        try:
            if self._stopped.is_set():
                return
            for line in _iter_lines(resp):
                if self._stopped.is_set():
                    return
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    yield event
        except _CONNECTION_ERRORS as exc:
            if self._stopped.is_set():
                return
            raise KubeUnavailable(
                f"the watch stream for {op} dropped ({type(exc).__name__}); reconnecting"
            ) from exc
        finally:
            with self._lock:
                self._resp = None
            resp.close()
            with contextlib.suppress(Exception):
                resp.release_conn()


def _iter_lines(resp: Any) -> Iterator[bytes]:
    """The newline-separated events of a watch response, as soon as each arrives."""
    if getattr(resp, "chunked", False):
        chunks: Iterator[bytes] = resp.stream(amt=None, decode_content=True)
    else:
        # Not chunked (a proxy or a minimal server): read what is there, never wait for EOF.
        chunks = iter(lambda: bytes(resp.read1(65536)), b"")
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


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
        self._last_watch: _JobWatch | None = None  # the latest wait's watch, for diagnostics

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
        retry_after = _retry_after_s(exc) if exc is not None else None
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
                    f"{_field_path(e['loc'])}: {e['msg']}"
                    for e in exc.errors(
                        include_url=False, include_context=False, include_input=False
                    )
                )
                raise InvalidInput(
                    f"the object for {op} does not match the Kubernetes schema: {problems}"
                ) from None
            except _CONNECTION_ERRORS as exc:
                raise _unreachable(exc, op) from exc
            try:
                return int(resp.status), bytes(resp.data)
            except _CONNECTION_ERRORS as exc:
                raise _unreachable(exc, op) from exc
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
        body = _status_body(raw)
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
        owner = {"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": handle.uid}
        self._json(
            self._core.patch_namespaced_secret,
            sec_name,
            namespace,
            {"metadata": {"ownerReferences": [owner]}},
            op=KubeOp("patch", "secrets", namespace, sec_name),
        )
        return handle

    def _delete_secret_quietly(self, namespace: str, name: str) -> None:
        try:
            self._json(
                self._core.delete_namespaced_secret,
                name,
                namespace,
                op=KubeOp("delete", "secrets", namespace, name),
                tolerate=(404,),
            )
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
    ) -> JobState:
        """Block until the Job is decided, calling ``on_update`` on every change and every tick.

        Returns as soon as a decisive condition is written (the interim ``SuccessCriteriaMet`` /
        ``FailureTarget`` count). Raises `JobTimeout` after ``timeout_s`` seconds,
        `KubeNotFound` when the Job is deleted meanwhile, and whatever ``on_update`` raises. The
        watch thread is stopped before this returns or raises.
        """
        deadline = time.monotonic() + timeout_s
        job, rv = self._list_job(handle)
        if job is None:
            raise self._gone(handle)
        state = job_state(job)
        if on_update is not None:
            on_update(state)
        last_notice = time.monotonic()
        self._last_watch = None
        if state.phase.decided:
            return state

        events: queue.Queue[_Event] = queue.Queue()
        watch = _JobWatch(self, handle, resource_version=rv, deadline=deadline, out=events)
        self._last_watch = watch
        watch.start()
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise self._timeout(handle, timeout_s, state)
                try:
                    event = events.get(timeout=max(0.0, min(last_notice + tick_s, deadline) - now))
                except queue.Empty:
                    if on_update is not None and time.monotonic() < deadline:
                        on_update(state)  # heartbeat: lets the caller poll the broker
                    last_notice = time.monotonic()
                    continue
                if event.error is not None:
                    raise event.error
                if event.deleted or event.job is None:
                    raise self._gone(handle)
                new = job_state(event.job)
                if new != state:
                    state = new
                    if on_update is not None:
                        on_update(state)
                    last_notice = time.monotonic()
                if state.phase.decided:
                    return state
        finally:
            watch.stop()
            watch.join(timeout=self.request_timeout_s + 1.0)
            if watch.is_alive():  # pragma: no cover - a request that ignores its own timeout
                log.warning("the watch of Job %s did not stop in time", handle.name)

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
        """One entry per failed pod of the Job: exit code, reason and the last log lines."""
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
                self._json(
                    self._core.delete_namespaced_secret,
                    name,
                    namespace,
                    op=KubeOp("delete", "secrets", namespace, name),
                    tolerate=(404,),
                )
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
