"""The watches of a wait: background threads that list, watch, resume and re-list.

`JobWatch` follows the Job itself (its status decides the wait); `PodWatch` follows the Job's
pods (what the Job's status does not say: pods Kubernetes disrupted, pods that cannot start);
`EventWatch` follows the Job's events (``FailedCreate``: pods the Job controller cannot create)
and its pods' ``FailedCreatePodSandBox``. All share the loop of `_Watch`: a list for a
resourceVersion, watches with ``timeoutSeconds`` resumed from the last resourceVersion seen, a
re-list on 410 Gone, reconnects with back-off when a stream drops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import urllib3
from kubernetes.client.exceptions import ApiException

from queuejob.flows.adapters.kube.common import (
    CONNECTION_ERRORS,
    HEALTHY_STREAM_S,
    WATCH_READ_SLACK_S,
)
from queuejob.flows.adapters.kube.errors import (
    KubeOp,
    error_from_api_exception,
    error_from_status,
    unreachable,
)
from queuejob.flows.core.backend import JobHandle
from queuejob.flows.core.errors import (
    KubeError,
    KubeUnavailable,
    QueueJobError,
    RetryableError,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from queuejob.flows.adapters.kube.backend import KubeBackend


@dataclass(frozen=True, slots=True)
class WatchStats:
    """How the last `KubeBackend.wait` watched: requests opened, reconnects, re-lists (410)."""

    watches: int = 0
    reconnects: int = 0
    relists: int = 0


# --- the watch thread --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """What a watch thread hands to the waiting thread: a version of the Job (or its deletion,
    or the error that ended the Job's watch), a version of one of its pods (``pod_deleted`` for
    its deletion; ``pods_listed``: the uids a re-list found), one of its events, or the error
    that ended the pods' or the events' watch (which the wait survives)."""

    job: dict[str, Any] | None = None
    deleted: bool = False
    error: BaseException | None = None
    pod: dict[str, Any] | None = None
    pod_deleted: bool = False
    pods_listed: tuple[str, ...] | None = None
    pod_error: BaseException | None = None
    event: dict[str, Any] | None = None
    event_error: BaseException | None = None


class _Watch(threading.Thread):
    """One resource's watch loop; subclasses say what to list, what to watch and what an event
    means."""

    resource = ""

    def __init__(
        self,
        backend: KubeBackend,
        handle: JobHandle,
        *,
        resource_version: str | None,
        deadline: float,
        out: queue.Queue[Event],
    ) -> None:
        super().__init__(name=f"kube-watch-{self.resource}-{handle.name}", daemon=True)
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
                        f"watching the {self.resource} of Job '{self._handle.name}' in "
                        f"namespace '{self._handle.namespace}' failed unexpectedly "
                        f"({type(exc).__name__}: {exc})"
                    )
                self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        raise NotImplementedError

    def _relist(self) -> bool:
        """List afresh (setting the resourceVersion); False when the watch is over."""
        raise NotImplementedError

    def _open(self, timeout: int, read_timeout: float) -> Any:
        """Open one watch request: the resource's list call with ``watch=True`` and
        `_watch_options`."""
        raise NotImplementedError

    def _watch_options(self, timeout: int, read_timeout: float) -> dict[str, Any]:
        """The options every watch request takes besides its selector and ``watch=True``:
        resumed from the last resourceVersion, with bookmarks, streamed, timed out."""
        return {
            "resource_version": self._rv,
            "allow_watch_bookmarks": True,
            "timeout_seconds": timeout,
            "_preload_content": False,
            "_request_timeout": (self._backend.request_timeout_s, read_timeout),
        }

    def _on_object(self, kind: str, obj: dict[str, Any]) -> bool:
        """One ADDED/MODIFIED/DELETED event; False when the watch is over."""
        raise NotImplementedError

    def _op(self) -> KubeOp:
        raise NotImplementedError

    def _loop(self) -> None:
        backend = self._backend
        op = self._op()
        failures = 0
        while not self._stopped.is_set():
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                return  # the waiting thread raises JobTimeout
            if self._rv is None:
                self.relists += 1
                if not self._relist():
                    return
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
                log.debug(
                    "watch of %s of Job %s dropped (%s); reconnecting in %.2fs",
                    self.resource,
                    self._handle.name,
                    exc,
                    delay,
                )
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
        return self._on_object(str(kind), obj)

    def _stream(self, timeout: int, op: KubeOp) -> Generator[dict[str, Any], None, None]:
        backend = self._backend
        read_timeout = timeout + min(backend.request_timeout_s, WATCH_READ_SLACK_S)
        self.watches += 1
        try:
            resp = self._open(timeout, read_timeout)
        except ApiException as exc:
            if exc.status == 410:
                # Some servers and proxies answer an expired resourceVersion with HTTP 410
                # instead of an ERROR event: the same cure, a re-list.
                self._rv = None
                return
            raise error_from_api_exception(exc, op=op) from exc
        except CONNECTION_ERRORS as exc:
            raise unreachable(exc, op) from exc
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
        except CONNECTION_ERRORS as exc:
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


class JobWatch(_Watch):
    """Watches one Job and puts its new versions on a queue until stopped or the deadline; a
    failure ends the wait (`Event.error`)."""

    resource = "job"

    def _op(self) -> KubeOp:
        return KubeOp("watch", "jobs", self._handle.namespace, self._handle.name)

    def _failed(self, exc: BaseException) -> None:
        self._out.put(Event(error=exc))

    def _relist(self) -> bool:
        job, self._rv = self._backend._list_job(self._handle)
        if job is None:
            self._out.put(Event(deleted=True))
            return False
        self._out.put(Event(job=job))
        return True

    def _open(self, timeout: int, read_timeout: float) -> Any:
        return self._backend._batch.list_namespaced_job(
            self._handle.namespace,
            field_selector=f"metadata.name={self._handle.name}",
            watch=True,
            **self._watch_options(timeout, read_timeout),
        )

    def _on_object(self, kind: str, obj: dict[str, Any]) -> bool:
        uid = (obj.get("metadata") or {}).get("uid")
        if kind == "DELETED" or (self._handle.uid and uid and uid != self._handle.uid):
            self._out.put(Event(deleted=True))
            return False
        if kind in ("ADDED", "MODIFIED"):
            self._out.put(Event(job=obj))
        return True


class PodWatch(_Watch):
    """Watches the Job's pods (label ``controller-uid``, which every Kubernetes version sets)
    and puts each version of each pod on the queue, a deleted one included. Its failure does not
    end the wait (`Event.pod_error`): the Job's own watch decides."""

    resource = "pods"

    def _op(self) -> KubeOp:
        return KubeOp("watch", "pods", self._handle.namespace)

    def _selector(self) -> str:
        return f"controller-uid={self._handle.uid}"

    def _failed(self, exc: BaseException) -> None:
        self._out.put(Event(pod_error=exc))

    def _relist(self) -> bool:
        pods, self._rv = self._backend._list_pods(self._handle.namespace, self._selector())
        for pod in pods:
            self._out.put(Event(pod=pod))
        uids = tuple(str((p.get("metadata") or {}).get("uid")) for p in pods)
        self._out.put(Event(pods_listed=uids))
        return True

    def _open(self, timeout: int, read_timeout: float) -> Any:
        return self._backend._core.list_namespaced_pod(
            self._handle.namespace,
            label_selector=self._selector(),
            watch=True,
            **self._watch_options(timeout, read_timeout),
        )

    def _on_object(self, kind: str, obj: dict[str, Any]) -> bool:
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._out.put(Event(pod=obj, pod_deleted=kind == "DELETED"))
        return True


class EventWatch(_Watch):
    """Watches core/v1 Events in the Job's namespace that match a field selector, and puts each
    on the queue. Its failure (a Role without ``list``/``watch`` on events) does not end the
    wait (`Event.event_error`): the pods tell the rest."""

    resource = "events"

    def __init__(self, *args: Any, field_selector: str, **kwargs: Any) -> None:
        self.field_selector = field_selector
        super().__init__(*args, **kwargs)

    @classmethod
    def of_job(cls, backend: KubeBackend, handle: JobHandle, **kwargs: Any) -> EventWatch:
        """The Job's own events (``FailedCreate``, ``SuccessfulCreate``, ...)."""
        return cls(backend, handle, field_selector=f"involvedObject.uid={handle.uid}", **kwargs)

    @classmethod
    def of_sandboxes(cls, backend: KubeBackend, handle: JobHandle, **kwargs: Any) -> EventWatch:
        """The namespace's ``FailedCreatePodSandBox`` events (a kubelet's, on a pod): the
        tracker keeps those of the Job's pods."""
        selector = "involvedObject.kind=Pod,reason=FailedCreatePodSandBox"
        return cls(backend, handle, field_selector=selector, **kwargs)

    def _op(self) -> KubeOp:
        return KubeOp("watch", "events", self._handle.namespace)

    def _failed(self, exc: BaseException) -> None:
        self._out.put(Event(event_error=exc))

    def _relist(self) -> bool:
        events, self._rv = self._backend._list_events(self._handle.namespace, self.field_selector)
        for event in events:
            self._out.put(Event(event=event))
        return True

    def _open(self, timeout: int, read_timeout: float) -> Any:
        return self._backend._core.list_namespaced_event(
            self._handle.namespace,
            field_selector=self.field_selector,
            watch=True,
            **self._watch_options(timeout, read_timeout),
        )

    def _on_object(self, kind: str, obj: dict[str, Any]) -> bool:
        if kind in ("ADDED", "MODIFIED"):  # a DELETED event has expired: nothing new
            self._out.put(Event(event=obj))
        return True


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
