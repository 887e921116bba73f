"""A kubelet stand-in for the real-control-plane test tier: pods run as local processes.

The control plane (kube-apiserver, kube-controller-manager, etcd) is real; there is no scheduler
and no container runtime. This stand-in does the node's part, and only that:

- registers a Ready ``Node`` whose kubelet endpoint is this process, and renews its ``Lease``;
- binds every unscheduled pod to that node (the scheduler's one job here), unless the pod's
  ``nodeSelector`` asks for labels the node does not have: that pod stays ``Pending`` with the
  scheduler's ``PodScheduled=False``, reason ``Unschedulable`` (its 1.20 message);
- "pulls" images as `tests.images.Puller` says a node does: an image reference the runtime
  cannot parse waits in ``InvalidImageName``; an image a `tests.images.PullFailure` rule given
  when the stand-in starts names goes ``ErrImagePull``, then ``ImagePullBackOff`` with a doubling
  back-off (``ErrImageNeverPull`` under ``imagePullPolicy: Never``), phase ``Pending``, until the
  rule lets the pull succeed; every other image is on the node;
- waits in ``CreateContainerConfigError`` (retried every 2 s) while a Secret, ConfigMap or key
  the container's env names does not exist, as a kubelet does;
- runs each container's ``command`` + ``args`` as a local process (``args`` alone when there is
  no ``command``: what an image without an ENTRYPOINT does, as this project's is), with its ``env``
  (literal values, ``secretKeyRef``, ``configMapKeyRef``, ``fieldRef``, ``envFrom`` and
  ``$(VAR)`` references), in its own process group, stdout and stderr into one log file;
- reports ``Running``, then ``Succeeded`` or ``Failed`` with each container's exit code and the
  reasons a real kubelet uses (``Completed`` / ``Error``), as strategic-merge patches that leave
  the pod conditions it does not own (``DisruptionTarget``) in place, as a real kubelet does;
- kills a pod's processes when the pod is deleted, then finishes the deletion (grace 0), which
  is what lets Job deletion, ``activeDeadlineSeconds`` and garbage collection complete;
- serves ``/containerLogs/{namespace}/{pod}/{container}`` over HTTPS (client certificates
  required, ``tailLines`` and ``limitBytes`` honoured) so ``pods/log`` works through the
  apiserver.

The image is not pulled or used: the "image" is this machine with the PATH given (the checkout's
install). A container with neither ``command`` nor ``args`` (the image's own CMD) cannot run
here and ends as ``Failed`` with reason ``CreateContainerConfigError``. Only the standard
library is used (and `tests.images`, which uses only it).

Run it on its own (``python -m tests.realkube.kubelet --help``) or in-process through `Kubelet`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.images import Puller, PullFailure

log = logging.getLogger("queuejob.tests.kubelet")

LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
RENEW_EVERY_S = 10.0
WATCH_SECONDS = 30  # server-side timeout of each watch request; the watch is then resumed
CONTAINER_ID_PREFIX = "queuejob-local://"
CONFIG_RETRY_S = 2.0  # how often a container waiting for a missing Secret or key is tried again
# The 1.20 scheduler's message for a pod whose nodeSelector matches no node (one node).
UNSCHEDULABLE_MESSAGE = "0/1 nodes are available: 1 node(s) didn't match node selector."


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_micro() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    """An HTTP error answer from the apiserver."""

    def __init__(self, status: int, method: str, path: str, body: bytes) -> None:
        self.status = status
        text = body.decode("utf-8", errors="replace")[:300]
        super().__init__(f"{method} {path}: HTTP {status}: {text}")


@dataclass(frozen=True)
class ApiConfig:
    """Where the apiserver is and how to talk to it (bearer token over verified TLS)."""

    server: str  # https://127.0.0.1:PORT
    token: str
    ca_file: str

    def __repr__(self) -> str:  # never show the token
        return f"ApiConfig(server={self.server!r})"


class Api:
    """A tiny JSON client over `http.client`: one connection per request, so threads share it."""

    def __init__(self, config: ApiConfig, *, timeout_s: float = 10.0) -> None:
        url = urllib.parse.urlsplit(config.server)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 443
        self.token = config.token
        self.timeout_s = timeout_s
        self.ssl = ssl.create_default_context(cafile=config.ca_file)

    def connection(self, timeout_s: float | None = None) -> http.client.HTTPSConnection:
        """A new connection to the apiserver."""
        return http.client.HTTPSConnection(
            self.host, self.port, context=self.ssl, timeout=timeout_s or self.timeout_s
        )

    def headers(self, content_type: str | None = None) -> dict[str, str]:
        """Request headers with the bearer token."""
        out = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if content_type:
            out["Content-Type"] = content_type
        return out

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        content_type: str = "application/json",
        ok_missing: bool = False,
    ) -> dict[str, Any] | None:
        """Send one request; return the JSON answer (None for a tolerated 404)."""
        conn = self.connection()
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers=self.headers(content_type))
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status == 404 and ok_missing:
            return None
        if resp.status >= 400:
            raise ApiError(resp.status, method, path, raw)
        return json.loads(raw) if raw else {}

    def get(self, path: str, *, ok_missing: bool = False) -> dict[str, Any] | None:
        """GET path."""
        return self.request("GET", path, ok_missing=ok_missing)

    def strategic_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """PATCH path with a strategic-merge patch (lists such as a pod's conditions merge by
        their key); None when the object is gone."""
        return self.request(
            "PATCH",
            path,
            body,
            content_type="application/strategic-merge-patch+json",
            ok_missing=True,
        )

    def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """PATCH path with a JSON merge patch; None when the object is gone."""
        return self.request(
            "PATCH", path, body, content_type="application/merge-patch+json", ok_missing=True
        )


# --- containers -------------------------------------------------------------------------------


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known names are replaced, ``$$`` escapes a ``$``, and
    unknown references stay as written."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(sub, value)


_FIELD_INDEX = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: Mapping[str, Any], path: str) -> str:
    """The value of a ``fieldRef.fieldPath`` on a pod (the paths the downward API supports)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP") or "127.0.0.1",
        "status.podIP": status.get("podIP") or "127.0.0.1",
    }
    if path in simple:
        return str(simple[path] or "")
    match = _FIELD_INDEX.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ValueError(f"fieldRef {path!r} is not supported by the kubelet stand-in")


class ContainerConfigError(Exception):
    """A container's env cannot be resolved (like a kubelet's CreateContainerConfigError)."""


class StandInLimit(Exception):
    """What this stand-in cannot run at all (an image's own CMD): the container fails."""


@dataclass
class RunningContainer:
    """One container's process and what is reported about it."""

    name: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    waiting: tuple[str, str] | None = None  # (reason, message) while it cannot start yet


@dataclass
class PodRun:
    """What the stand-in runs for one pod."""

    namespace: str
    name: str
    uid: str
    containers: dict[str, RunningContainer] = field(default_factory=dict)
    started_at: str = field(default_factory=_now)
    killed: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)  # set when killed

    def pids(self) -> list[int]:
        """The pids of the pod's processes still running."""
        return [
            c.process.pid
            for c in self.containers.values()
            if c.process is not None and c.process.poll() is None
        ]


# --- the log server ---------------------------------------------------------------------------


def tail_bytes(data: bytes, tail_lines: int | None, limit_bytes: int | None) -> bytes:
    """The last ``tail_lines`` lines of a log, then at most ``limit_bytes`` from its start."""
    if tail_lines is not None:
        if tail_lines <= 0:
            data = b""
        else:
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-tail_lines:])
    if limit_bytes is not None and limit_bytes >= 0:
        data = data[:limit_bytes]
    return data


class _LogServer(ThreadingHTTPServer):
    daemon_threads = True
    # Connections are TLS-wrapped in the handler thread, so a client that never finishes its
    # handshake cannot stall the accept loop.
    ssl_context: ssl.SSLContext
    kubelet: Kubelet

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.debug("TLS handshake from %s failed: %s", client_address, exc)
            return
        super().finish_request(tls, client_address)


class _LogHandler(BaseHTTPRequestHandler):
    server: _LogServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("log server: " + format, *args)

    def _send(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["healthz"]:
            self._send(200, b"ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._send(404, b"not found: the kubelet stand-in serves /containerLogs only\n")
            return
        _, namespace, pod, container = parts
        query = urllib.parse.parse_qs(url.query)

        def number(key: str) -> int | None:
            values = query.get(key)
            return int(values[0]) if values else None

        try:
            tail_lines, limit_bytes = number("tailLines"), number("limitBytes")
        except ValueError:
            self._send(400, b"tailLines and limitBytes must be integers\n")
            return
        found = self.server.kubelet.container_log(namespace, pod, container)
        if isinstance(found, str):
            self._send(400, found.encode() + b"\n")
            return
        self._send(200, tail_bytes(found, tail_lines, limit_bytes))


# --- the kubelet ------------------------------------------------------------------------------


class Kubelet:
    """The node: registers itself, binds and runs pods, reports their status, serves logs.

    ``path`` is the PATH pods' processes see (put the directory holding the project's console
    scripts first); ``extra_env`` is added to every container's environment, under the
    container's own ``env``.
    """

    def __init__(
        self,
        api: ApiConfig,
        *,
        node_name: str,
        workdir: Path,
        serving_cert: str,
        serving_key: str,
        client_ca: str,
        port: int = 0,
        path: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        pull_failures: tuple[PullFailure, ...] = (),
        pull_backoff_s: float = 10.0,
    ) -> None:
        self.api = Api(api)
        self.node_name = node_name
        self.labels = {
            "kubernetes.io/hostname": node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }
        self.puller = Puller(pull_failures, backoff_s=pull_backoff_s)
        self.workdir = Path(workdir)
        self.path = path or os.environ.get("PATH", "/usr/bin:/bin")
        self.extra_env = dict(extra_env or {})
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._runs: dict[str, PodRun] = {}  # by pod uid
        self._bound: set[str] = set()
        self._finishing: set[str] = set()  # uids whose deletion is being finished
        self._threads: list[threading.Thread] = []
        self._watch_conn: http.client.HTTPSConnection | None = None
        self._serving = False
        self.errors: list[str] = []  # unexpected failures, for tests to assert on

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(serving_cert, serving_key)
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED  # only the apiserver (a CA-signed client) may read
        self._server = _LogServer(("127.0.0.1", port), _LogHandler)
        self._server.ssl_context = ctx
        self._server.kubelet = self
        self.port = int(self._server.server_address[1])

    def __repr__(self) -> str:
        return f"Kubelet(node={self.node_name!r}, port={self.port})"

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Kubelet:
        """Register the node and start serving; returns once the node is Ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._serving = True
        self._spawn("kubelet-logs", self._server.serve_forever)
        self._register_node()
        self._renew_lease()
        self._spawn("kubelet-lease", self._lease_loop)
        self._spawn("kubelet-pods", self._watch_loop)
        return self

    def stop(self, *, delete_node: bool = True, timeout_s: float = 10.0) -> None:
        """Kill every pod process, stop the threads and the log server; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._lock:
            runs = list(self._runs.values())
            conn = self._watch_conn
        for run in runs:
            self._kill(run, grace_s=0.0)
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        if self._serving:  # shutdown() would wait forever for a loop that never ran
            self._server.shutdown()
        self._server.server_close()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for run in runs:
            run.done.wait(max(0.0, deadline - time.monotonic()))
        if delete_node:
            with contextlib.suppress(Exception):
                self.api.request("DELETE", f"/api/v1/nodes/{self.node_name}", ok_missing=True)

    def __enter__(self) -> Kubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pod_processes(self) -> dict[str, list[int]]:
        """Running processes by ``namespace/pod``: what tests check after a deletion."""
        with self._lock:
            runs = list(self._runs.values())
        out = {f"{r.namespace}/{r.name}": r.pids() for r in runs}
        return {k: v for k, v in out.items() if v}

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception as exc:  # keep the node alive; tests see the error list
                if not self._stop.is_set():
                    log.exception("%s failed", name)
                    self.errors.append(f"{name}: {exc}")

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    # --- node and lease -----------------------------------------------------------------------

    def _node_status(self) -> dict[str, Any]:
        now = _now()
        conditions = [
            ("Ready", "True", "KubeletReady", "kubelet stand-in is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", ""),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", ""),
            ("PIDPressure", "False", "KubeletHasSufficientPID", ""),
        ]
        return {
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": r,
                    "message": m,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
                for t, s, r, m in conditions
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "1000"},
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "1000"},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": os.uname().release,
                "osImage": "queuejob kubelet stand-in",
                "containerRuntimeVersion": "local-process://1",
                "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def _register_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": dict(self.labels)},
            "spec": {},
        }
        try:
            self.api.request("POST", "/api/v1/nodes", node)
        except ApiError as exc:
            if exc.status != 409:
                raise
        # Status is a subresource: write it explicitly, whatever create kept.
        self.api.merge_patch(
            f"/api/v1/nodes/{self.node_name}/status", {"status": self._node_status()}
        )
        # Admission taints a new node not-ready; the node lifecycle controller (not run here)
        # would lift it once the node reports Ready.
        self.api.merge_patch(f"/api/v1/nodes/{self.node_name}", {"spec": {"taints": None}})

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        spec = {
            "holderIdentity": self.node_name,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": _now_micro(),
        }
        if self.api.merge_patch(f"{path}/{self.node_name}", {"spec": spec}) is None:
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.node_name, "namespace": LEASE_NAMESPACE},
                "spec": spec,
            }
            self.api.request("POST", path, lease)

    def _lease_loop(self) -> None:
        beats = 0
        while not self._stop.wait(RENEW_EVERY_S):
            try:
                self._renew_lease()
                beats += 1
                if beats % 4 == 0:  # the node's own heartbeat, less often (as a kubelet does)
                    self.api.merge_patch(
                        f"/api/v1/nodes/{self.node_name}/status", {"status": self._node_status()}
                    )
            except (ApiError, OSError) as exc:
                log.warning("lease renewal failed: %s", exc)

    # --- the pod watch ------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    listing = self.api.get("/api/v1/pods") or {}
                    rv = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                    for pod in listing.get("items") or []:
                        self._on_pod("ADDED", pod)
                for kind, obj in self._watch("/api/v1/pods", rv):
                    if kind == "ERROR":
                        code = obj.get("code")
                        rv = None if code == 410 else rv
                        break
                    meta = obj.get("metadata") or {}
                    rv = str(meta.get("resourceVersion") or rv)
                    if kind != "BOOKMARK":
                        self._on_pod(kind, obj)
            except (ApiError, OSError, http.client.HTTPException, ValueError) as exc:
                if self._stop.is_set():
                    return
                if isinstance(exc, ApiError) and exc.status == 410:
                    rv = None
                log.info("pod watch interrupted (%s); resuming", exc)
                self._stop.wait(0.2)

    def _watch(self, path: str, rv: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
        query = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": WATCH_SECONDS}
        if rv:
            query["resourceVersion"] = rv
        conn = self.api.connection(timeout_s=WATCH_SECONDS + 15)
        with self._lock:
            self._watch_conn = conn
        try:
            conn.request(
                "GET", f"{path}?{urllib.parse.urlencode(query)}", headers=self.api.headers()
            )
            resp = conn.getresponse()
            if resp.status >= 400:
                raise ApiError(resp.status, "WATCH", path, resp.read())
            while not self._stop.is_set():
                line = resp.readline()
                if not line:
                    return
                if line.strip():
                    event = json.loads(line)
                    yield str(event.get("type")), event.get("object") or {}
        finally:
            with self._lock:
                self._watch_conn = None
            conn.close()

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        uid = str(meta.get("uid"))
        with self._lock:
            run = self._runs.get(uid)
        if kind == "DELETED":
            if run is not None:
                self._kill(run, grace_s=0.0)
            return
        node = spec.get("nodeName")
        deleting = meta.get("deletionTimestamp") is not None
        if not node:
            if not deleting and uid not in self._bound:
                self._bound.add(uid)
                self._bind(pod)
            return
        if node != self.node_name:
            return
        if deleting:
            with self._lock:
                if uid in self._finishing:
                    return
                self._finishing.add(uid)
            grace = meta.get("deletionGracePeriodSeconds")
            grace_s = min(float(grace), 5.0) if grace is not None else 5.0
            self._spawn(f"kubelet-delete-{meta.get('name')}", lambda: self._finish(pod, grace_s))
            return
        phase = (pod.get("status") or {}).get("phase")
        if run is None and phase not in ("Succeeded", "Failed"):
            self._start_pod(pod)

    def _bind(self, pod: Mapping[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        ns, name = meta.get("namespace"), meta.get("name")
        selector = (pod.get("spec") or {}).get("nodeSelector") or {}
        if any(self.labels.get(k) != v for k, v in selector.items()):
            self._unschedulable(pod)
            return
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": ns, "uid": meta.get("uid")},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            self.api.request("POST", f"/api/v1/namespaces/{ns}/pods/{name}/binding", binding)
        except ApiError as exc:
            # 409: already bound (a replay of the same event); 404: deleted meanwhile.
            if exc.status not in (404, 409):
                self.errors.append(f"bind {ns}/{name}: {exc}")

    def _unschedulable(self, pod: Mapping[str, Any]) -> None:
        """The scheduler's answer for a pod no node fits: not bound, ``PodScheduled=False``."""
        meta = pod.get("metadata") or {}
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "lastProbeTime": None,
            "lastTransitionTime": _now(),
            "reason": "Unschedulable",
            "message": UNSCHEDULABLE_MESSAGE,
        }
        path = f"/api/v1/namespaces/{meta.get('namespace')}/pods/{meta.get('name')}/status"
        body = {"metadata": {"uid": meta.get("uid")}, "status": {"conditions": [condition]}}
        try:
            self.api.strategic_patch(path, body)
        except ApiError as exc:
            if exc.status != 409:
                self.errors.append(f"unschedulable {meta.get('name')}: {exc}")

    # --- running pods -------------------------------------------------------------------------

    def _resolve_env(self, pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
        ns = str((pod.get("metadata") or {}).get("namespace"))
        cache: dict[tuple[str, str], dict[str, Any] | None] = {}

        def source(kind: str, name: str, optional: bool) -> dict[str, str] | None:
            plural = "secrets" if kind == "Secret" else "configmaps"
            if (kind, name) not in cache:
                cache[(kind, name)] = self.api.get(
                    f"/api/v1/namespaces/{ns}/{plural}/{name}", ok_missing=True
                )
            obj = cache[(kind, name)]
            if obj is None:
                if optional:
                    return None
                raise ContainerConfigError(f'{kind.lower()} "{name}" not found')
            if kind == "Secret":
                return {
                    k: base64.b64decode(v).decode("utf-8", errors="replace")
                    for k, v in (obj.get("data") or {}).items()
                }
            return {str(k): str(v) for k, v in (obj.get("data") or {}).items()}

        env: dict[str, str] = {}
        for ref in container.get("envFrom") or []:
            prefix = str(ref.get("prefix") or "")
            for key, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                if key in ref:
                    found = source(kind, ref[key]["name"], bool(ref[key].get("optional")))
                    env.update({prefix + k: v for k, v in (found or {}).items()})
        for item in container.get("env") or []:
            name = str(item["name"])
            if "valueFrom" not in item:
                env[name] = expand(str(item.get("value") or ""), env)
                continue
            vf = item["valueFrom"]
            if "fieldRef" in vf:
                env[name] = field_value(pod, vf["fieldRef"]["fieldPath"])
                continue
            for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                if key in vf:
                    ref = vf[key]
                    optional = bool(ref.get("optional"))
                    data = source(kind, ref["name"], optional)
                    if data is None:
                        break
                    if ref["key"] not in data:
                        if optional:
                            break
                        raise ContainerConfigError(
                            f"couldn't find key {ref['key']} in {kind} {ns}/{ref['name']}"
                        )
                    env[name] = data[ref["key"]]
                    break
            else:
                raise ContainerConfigError(f"env {name}: unsupported valueFrom {sorted(vf)}")
        return env

    def _start_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        run = PodRun(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])
        with self._lock:
            if self._stop.is_set() or run.uid in self._runs:
                return
            self._runs[run.uid] = run
        self._spawn(f"kubelet-pod-{run.name}", lambda: self._run_pod(pod, run))

    def _waiting(
        self, pod: Mapping[str, Any], container: Mapping[str, Any]
    ) -> tuple[str, str, float] | None:
        """Why a container cannot start yet, and when to look again (None: it can)."""
        uid = str((pod.get("metadata") or {}).get("uid"))
        now = time.monotonic()
        pull = self.puller.state(
            f"{uid}/{container['name']}",
            str(container.get("image") or ""),
            container.get("imagePullPolicy"),
            now,
        )
        if not pull.ready:
            wake = pull.wake_at if pull.wake_at is not None else now + 3600.0
            return str(pull.reason), str(pull.message), wake
        try:
            self._resolve_env(pod, container)
        except (ContainerConfigError, ApiError) as exc:
            return "CreateContainerConfigError", str(exc), now + CONFIG_RETRY_S
        return None

    def _run_pod(self, pod: dict[str, Any], run: PodRun) -> None:
        """Pull and wait as a kubelet does, then start the containers and reap them."""
        poddir = self.workdir / "pods" / run.uid
        poddir.mkdir(parents=True, exist_ok=True)
        containers = (pod.get("spec") or {}).get("containers") or []
        for container in containers:
            name = str(container["name"])
            run.containers[name] = RunningContainer(name=name, log_path=poddir / f"{name}.log")
            run.containers[name].log_path.touch()
        try:
            while True:
                waits = {str(c["name"]): self._waiting(pod, c) for c in containers}
                if not any(waits.values()) or run.killed or self._stop.is_set():
                    break
                for name, wait in waits.items():
                    run.containers[name].waiting = (wait[0], wait[1]) if wait else None
                self._post_status(pod, run)
                wake = min(w[2] for w in waits.values() if w)
                run.wake.wait(max(0.05, wake - time.monotonic()))
            if run.killed or self._stop.is_set():
                return
            for container in containers:
                self._start_container(pod, run, container, poddir)
            if run.killed:  # deleted while its processes were being started
                self._kill(run, grace_s=0.0)
            self._post_status(pod, run)
            self._reap(pod, run)
        finally:
            for name in run.containers:
                self.puller.forget(f"{run.uid}/{name}")
            run.done.set()

    def _start_container(
        self, pod: dict[str, Any], run: PodRun, container: Mapping[str, Any], poddir: Path
    ) -> None:
        rc = run.containers[str(container["name"])]
        rc.waiting = None
        # An image without an ENTRYPOINT (this project's Dockerfile): `args` alone run as the
        # command, as Prefect's flow-run Job sets them.
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        try:
            if not argv:
                raise StandInLimit(
                    "the kubelet stand-in runs only containers that set 'command' or "
                    "'args' (images are not pulled, so an image's own CMD cannot run)"
                )
            cenv = self._resolve_env(pod, container)
            argv = [expand(a, cenv) for a in argv]
            env = {
                "PATH": self.path,
                "HOME": str(poddir),
                "HOSTNAME": run.name,
                **self.extra_env,
                **cenv,
            }
            with rc.log_path.open("ab") as out:
                rc.process = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=poddir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own group: kill reaches its children
                )
            rc.started_at = _now()
        except (StandInLimit, ContainerConfigError, ValueError, OSError, ApiError) as exc:
            rc.exit_code = 128
            rc.reason = (
                "CreateContainerConfigError"
                if isinstance(exc, StandInLimit | ContainerConfigError | ApiError)
                else "ContainerCannotRun"
            )
            rc.message = str(exc)
            rc.started_at = rc.finished_at = _now()

    def _reap(self, pod: dict[str, Any], run: PodRun) -> None:
        for rc in run.containers.values():
            if rc.process is not None:
                code = rc.process.wait()
                rc.finished_at = _now()
                # A signal shows as 128+N, as a container runtime reports it.
                rc.exit_code = 128 - code if code < 0 else code
                rc.reason = "Completed" if rc.exit_code == 0 else "Error"
        if not self._stop.is_set():
            self._post_status(pod, run)

    def _container_status(self, container: Mapping[str, Any], rc: RunningContainer | None) -> Any:
        name = str(container["name"])
        image = str(container.get("image") or "")
        status: dict[str, Any] = {
            "name": name,
            "image": image,
            "imageID": f"{CONTAINER_ID_PREFIX}{image}",
            "restartCount": 0,
            "ready": False,
            "started": False,
        }
        if rc is None or (rc.process is None and rc.exit_code is None):
            # Not started yet: pulling, or waiting for what it needs (no image, no container).
            reason, message = (rc.waiting if rc is not None else None) or ("ContainerCreating", "")
            status["imageID"] = ""
            status["state"] = {
                "waiting": {"reason": reason, **({"message": message} if message else {})}
            }
            return status
        status["containerID"] = f"{CONTAINER_ID_PREFIX}{rc.process.pid if rc.process else 0}"
        if rc.exit_code is None:
            status.update(ready=True, started=True)
            status["state"] = {"running": {"startedAt": rc.started_at}}
        else:
            term: dict[str, Any] = {
                "exitCode": rc.exit_code,
                "reason": rc.reason,
                "startedAt": rc.started_at,
                "finishedAt": rc.finished_at,
                "containerID": status["containerID"],
            }
            if rc.message:
                term["message"] = rc.message
            status["state"] = {"terminated": term}
        return status

    def _post_status(self, pod: Mapping[str, Any], run: PodRun) -> None:
        containers = (pod.get("spec") or {}).get("containers") or []
        statuses = [self._container_status(c, run.containers.get(c["name"])) for c in containers]
        codes = [rc.exit_code for rc in run.containers.values()]
        ended = all(code is not None for code in codes)
        if ended:
            phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        elif any(rc.process is not None for rc in run.containers.values()):
            phase = "Running"
        else:
            phase = "Pending"
        ready = "True" if phase == "Running" else "False"
        now = _now()
        conditions = [
            {"type": "Initialized", "status": "True", "lastTransitionTime": run.started_at},
            {"type": "Ready", "status": ready, "lastTransitionTime": now},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": now},
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": run.started_at},
        ]
        if ready == "False":
            for cond in conditions[1:3]:
                cond["reason"] = "PodCompleted" if ended else "ContainersNotReady"
        status = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": run.started_at,
            "containerStatuses": statuses,
            "qosClass": "BestEffort",
        }
        path = f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status"
        try:
            # A strategic-merge patch, as a real kubelet sends: it replaces the conditions the
            # kubelet owns (by type) and keeps the others, such as the DisruptionTarget that an
            # eviction adds (a JSON merge patch would replace the whole list and lose it).
            self.api.strategic_patch(path, {"metadata": {"uid": run.uid}, "status": status})
        except ApiError as exc:
            # 409: the uid precondition failed (a new pod of the same name); nothing to report.
            if exc.status != 409:
                self.errors.append(f"status {run.namespace}/{run.name}: {exc}")

    def _kill(self, run: PodRun, *, grace_s: float) -> None:
        """SIGTERM the pod's process groups, SIGKILL after ``grace_s``."""
        run.killed = True
        run.wake.set()  # a pod still waiting to start stops waiting
        procs = [c.process for c in run.containers.values() if c.process is not None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, sig)
            if sig == signal.SIGTERM:
                deadline = time.monotonic() + grace_s
                while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                    time.sleep(0.05)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def _finish(self, pod: Mapping[str, Any], grace_s: float) -> None:
        """Finish a graceful deletion: stop the processes, then delete the pod with grace 0."""
        meta = pod.get("metadata") or {}
        uid = str(meta.get("uid"))
        with self._lock:
            run = self._runs.get(uid)
        if run is not None:
            self._kill(run, grace_s=grace_s)
            run.done.wait(10)
        ns, name = meta.get("namespace"), meta.get("name")
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": uid},
        }
        try:
            self.api.request(
                "DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", options, ok_missing=True
            )
        except ApiError as exc:
            if exc.status != 409:  # 409: a newer pod of the same name
                self.errors.append(f"delete {ns}/{name}: {exc}")

    # --- logs ---------------------------------------------------------------------------------

    def container_log(self, namespace: str, pod: str, container: str) -> bytes | str:
        """The container's log bytes, or an error message (as a kubelet's 400 says it)."""
        with self._lock:
            run = next(
                (r for r in self._runs.values() if r.namespace == namespace and r.name == pod),
                None,
            )
        if run is None:
            return f'pod "{pod}" in namespace "{namespace}" is not running on this node'
        rc = run.containers.get(container)
        if rc is None:
            return f'container "{container}" in pod "{pod}" is not available'
        try:
            return rc.log_path.read_bytes()
        except OSError as exc:
            return f"cannot read the log of {container}: {exc}"


def main(argv: list[str] | None = None) -> int:
    """Run the stand-in until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="https://127.0.0.1:PORT")
    parser.add_argument("--token-file", required=True, help="file holding a bearer token")
    parser.add_argument("--ca", required=True, help="CA of the apiserver and its clients")
    parser.add_argument("--cert", required=True, help="serving certificate for the log server")
    parser.add_argument("--key", required=True, help="its private key")
    parser.add_argument("--node-name", default="queuejob-node")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--cannot-pull",
        action="append",
        default=[],
        metavar="PATTERN",
        help="images matching this shell pattern cannot be pulled (repeatable)",
    )
    parser.add_argument(
        "--pull-backoff", type=float, default=10.0, help="first back-off between pulls, seconds"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    token = Path(args.token_file).read_text().strip()
    kubelet = Kubelet(
        ApiConfig(server=args.server, token=token, ca_file=args.ca),
        node_name=args.node_name,
        workdir=Path(args.workdir),
        serving_cert=args.cert,
        serving_key=args.key,
        client_ca=args.ca,
        port=args.port,
        pull_failures=tuple(PullFailure(pattern) for pattern in args.cannot_pull),
        pull_backoff_s=args.pull_backoff,
    )
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    kubelet.start()
    log.info("node %s ready; logs served on 127.0.0.1:%d", args.node_name, kubelet.port)
    stopped.wait()
    kubelet.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
