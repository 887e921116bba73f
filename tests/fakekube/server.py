"""A fake Kubernetes API server over real HTTP, for tests that drive the real kubernetes client.

``FakeKubeServer`` serves discovery, namespaces, Secrets, Pods (with ``log`` and ``status``) and
batch/v1 Jobs (with ``status``) on 127.0.0.1, with bearer-token auth and RBAC-shaped 403s for
limited service accounts. A Job controller, a garbage collector and a kubelet that runs each pod's
command as a local process run in background threads. See ``tests/fakekube/__init__.py``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import queue
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.fakekube import discovery
from tests.fakekube.admission import (
    check_kind,
    check_pod_quota,
    prepare_event_create,
    prepare_event_update,
    prepare_job_create,
    prepare_job_update,
    prepare_namespace_create,
    prepare_pod_create,
    prepare_pod_update,
    prepare_secret_create,
    prepare_secret_update,
)
from tests.fakekube.controller import Controllers
from tests.fakekube.kubelet import Kubelet
from tests.fakekube.objects import (
    ORDER_POD_STATUS,
    ORDER_TOP,
    ORPHAN_WARNING,
    RESOURCES,
    ApiError,
    Obj,
    Resource,
    bad_request,
    dumps,
    expired,
    forbidden,
    method_not_allowed,
    not_found,
    now_str,
    ordered,
    route_not_found,
    status_body,
    success_status,
    unauthorized,
)
from tests.fakekube.patch import PATCH_TYPES, apply_patch
from tests.fakekube.selectors import parse_field_selector, parse_label_selector
from tests.fakekube.store import Event, Store, Subscription, TooOld
from tests.images import Puller, PullFailure

ADMIN_USER = "kubernetes-admin"
ANONYMOUS_USER = "system:anonymous"
_FLOWSCHEMA_UID = "a8ebf996-e97b-425d-8252-3f3b53466a9b"
_PRIORITYLEVEL_UID = "1b416a7e-1c76-4f22-b9ea-147e95f3c9bf"
_PUBLIC_PATHS = ("/version", "/healthz", "/livez", "/readyz")
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")
_GROUP_RESOURCES = {"": ("namespaces", "secrets", "pods", "events"), "batch": ("jobs",)}
_SUBRESOURCES = {
    "pods": ("log", "status", "eviction"),
    "jobs": ("status",),
    "namespaces": ("status",),
}
_FAULT_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Gone",
    429: "TooManyRequests",
    500: "InternalError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def parse_bool(value: str, param: str) -> bool:
    """Go's strconv.ParseBool, which the server uses for query flags like ``watch``."""
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise bad_request(f'strconv.ParseBool: parsing "{value}": invalid syntax for {param}')


@dataclass
class _User:
    name: str
    admin: bool = False
    anonymous: bool = False
    allow: frozenset[tuple[str, str]] = frozenset()

    def may(self, verb: str, resource: str) -> bool:
        if self.admin:
            return True
        if self.anonymous:
            return False
        return any(v in (verb, "*") and r in (resource, "*") for v, r in self.allow)


@dataclass
class _Fault:
    remaining: int
    status: int
    methods: frozenset[str] | None


@dataclass
class _Request:
    """One parsed resource request."""

    method: str
    verb: str
    res: Resource
    namespace: str
    name: str | None
    subresource: str | None
    query: dict[str, str]

    @property
    def rbac_resource(self) -> str:
        return f"{self.res.plural}/{self.subresource}" if self.subresource else self.res.plural


@dataclass(eq=False)
class _Stream:
    """An open watch, so that ``drop_watches`` and ``stop`` can reach it."""

    sub: Subscription
    handler: _Handler
    closed: threading.Event = field(default_factory=threading.Event)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # bursts of connections (many watches, parallel clients)

    def __init__(self, fake: FakeKubeServer) -> None:
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class FakeKubeServer:
    """A Kubernetes API server fake that the real ``kubernetes`` client can talk to.

    ``start()`` serves plain HTTP on ``127.0.0.1:<free port>`` (``url``); requests need
    ``Authorization: Bearer <token>``. ``stop()`` stops everything and kills every pod process.
    ``requests`` logs ``(method, path without query, status)`` for each request answered.

    Options: ``backoff_base_s``/``backoff_max_s`` shorten the pod failure back-off (10 s doubling
    in a real cluster); ``legacy_conditions`` writes only Complete/Failed, as before 1.31;
    ``namespaces`` exist from the start; ``watch_cache_size`` events per resource are kept for
    watches from a resourceVersion (older ones get 410 Expired); ``kill_grace_s`` caps the wait
    between SIGTERM and SIGKILL of a deleted pod's processes; ``gc_delay_s`` is how long the
    garbage collector waits before acting on a deletion; ``pull_failures`` are the images the
    node cannot pull (`tests.images.PullFailure`), with a first back-off of ``pull_backoff_s``
    between attempts (a kubelet's is 10 s).

    Test hooks: ``fail_next``, ``drop_watches``, ``gone_next_watch``, ``open_watches``,
    ``add_service_account``, ``limit_pods`` (a ResourceQuota on pods); inspection:
    ``get_object``, ``list_objects``, ``pod_processes``, ``pod_log``. The bookmark timing of
    watches is tunable through ``bookmark_before_close_s``, ``bookmark_min_timeout_s`` and
    ``bookmark_interval_s``.
    """

    def __init__(
        self,
        *,
        backoff_base_s: float = 0.2,
        backoff_max_s: float = 2.0,
        legacy_conditions: bool = False,
        namespaces: Iterable[str] = ("default",),
        token: str = "test-token",
        watch_cache_size: int = 1000,
        kill_grace_s: float = 2.0,
        gc_delay_s: float = 0.1,
        pull_failures: Iterable[PullFailure] = (),
        pull_backoff_s: float = 10.0,
    ) -> None:
        self.token = token
        self.store = Store(watch_cache_size=watch_cache_size)
        self.requests: list[tuple[str, str, int]] = []
        self.url = ""
        self._accounts: dict[str, _User] = {}
        self._faults: list[_Fault] = []
        self._gone_next: list[str | None] = []
        self._lock = threading.Lock()
        self._streams: set[_Stream] = set()
        self._stopping = threading.Event()
        self._workdir = Path(tempfile.mkdtemp(prefix="fakekube-"))
        self.kubelet = Kubelet(
            self.store,
            self._workdir / "pods",
            kill_grace_s=kill_grace_s,
            puller=Puller(tuple(pull_failures), backoff_s=pull_backoff_s),
        )
        self.controllers = Controllers(
            self.store,
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
            legacy_conditions=legacy_conditions,
            gc_delay_s=gc_delay_s,
        )
        for ns in namespaces:
            self.store.create(
                "namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
                prepare=prepare_namespace_create,
            )
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        # A bookmark is sent this long before a watch's timeout when the watch is long enough.
        self.bookmark_before_close_s = 1.5
        self.bookmark_min_timeout_s = 30
        self.bookmark_interval_s = 60.0

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Serve on a free port in background threads; start the controllers and the kubelet."""
        self._httpd = _HTTPServer(self)
        port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fakekube-http",
            daemon=True,
        )
        self._thread.start()
        self.controllers.start()
        self.kubelet.start()

    def stop(self) -> None:
        """Stop serving, stop the controllers, kill every pod process, remove the work dir."""
        self._stopping.set()
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.sub.events.put(None)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.close_connections()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.controllers.stop()
        self.kubelet.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> FakeKubeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- client configuration ------------------------------------------------------------------

    def kubeconfig_dict(self, *, token: str | None = None, context: str = "fake") -> dict[str, Any]:
        """A kubeconfig as a dict (what a ``KubernetesClusterConfig`` block holds)."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake-cluster", "cluster": {"server": self.url}}],
            "users": [{"name": "fake-user", "user": {"token": token or self.token}}],
            "contexts": [
                {
                    "name": context,
                    "context": {
                        "cluster": "fake-cluster",
                        "user": "fake-user",
                        "namespace": "default",
                    },
                }
            ],
            "current-context": context,
            "preferences": {},
        }

    def write_kubeconfig(
        self, path: Path, *, token: str | None = None, context: str = "fake"
    ) -> Path:
        """Write a kubeconfig for this server (YAML) and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            yaml.safe_dump(self.kubeconfig_dict(token=token, context=context), sort_keys=False)
        )
        return path

    def add_service_account(self, token: str, user: str, allow: set[tuple[str, str]]) -> None:
        """Accept ``token`` as ``user``, allowed only the (verb, resource) pairs in ``allow``.

        Resources are plurals, with subresources as ``pods/log``; ``"*"`` matches any verb or
        resource. Everything else gets the RBAC 403 body.
        """
        self._accounts[token] = _User(user, allow=frozenset(allow))

    def limit_pods(self, namespace: str, pods: int | None, *, name: str = "pods-quota") -> None:
        """A ResourceQuota ``name`` allowing ``pods`` non-terminal pods in ``namespace`` (None
        lifts it): pods beyond it are refused with the quota plugin's 403, so the Job
        controller records ``FailedCreate`` events, as a real one does."""
        if pods is None:
            self.controllers.pod_quotas.pop(namespace, None)
        else:
            self.controllers.pod_quotas[namespace] = (name, pods)
        self.controllers.wake()

    # --- fault injection -------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 500, *, methods: set[str] | None = None) -> None:
        """Answer the next ``n`` requests (with one of ``methods``, if given) with ``status``."""
        with self._lock:
            self._faults.append(
                _Fault(n, status, frozenset(m.upper() for m in methods) if methods else None)
            )

    def drop_watches(self) -> None:
        """Abruptly close every open watch stream: no final chunk, the socket just goes."""
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.sub.dropped = True
            stream.sub.events.put(None)

    def open_watches(self) -> int:
        """How many watch streams are open now (to wait for one before ``drop_watches``)."""
        with self._lock:
            return len(self._streams)

    def gone_next_watch(self, resource: str | None = None) -> None:
        """The next watch (of ``resource``, a plural, when given) answers 200 with a single
        ERROR event (410 Expired), then closes."""
        with self._lock:
            self._gone_next.append(resource)

    def _take_fault(self, method: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and (fault.methods is None or method in fault.methods):
                    fault.remaining -= 1
                    status = fault.status
                    self._faults = [f for f in self._faults if f.remaining > 0]
                    return status
        return None

    def _take_gone(self, resource: str) -> bool:
        with self._lock:
            for i, wanted in enumerate(self._gone_next):
                if wanted in (None, resource):
                    del self._gone_next[i]
                    return True
        return False

    # --- inspection ------------------------------------------------------------------------------

    def get_object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A copy of a stored object (``kind`` is the plural: jobs, pods, secrets, namespaces)."""
        res = RESOURCES[kind]
        return self.store.get(kind, namespace if res.namespaced else "", name)

    def list_objects(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        """Copies of the stored objects of one kind in a namespace."""
        return json.loads(json.dumps(self.store.items(kind, namespace)))  # type: ignore[no-any-return]

    def pod_processes(self) -> list[int]:
        """Pids of pod processes still running."""
        return self.kubelet.pids()

    def pod_log(self, namespace: str, name: str) -> str:
        """The captured output of a pod's container ('' when it never started)."""
        pod = self.store.get_shared("pods", namespace, name)
        if pod is None:
            return ""
        path = self.kubelet.log_path(pod["metadata"]["uid"])
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    # --- request handling (called from handler threads) ------------------------------------------

    def _authenticate(self, header: str | None) -> _User:
        if not header:
            return _User(ANONYMOUS_USER, anonymous=True)
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            raise unauthorized()
        token = value.strip()
        if token == self.token:
            return _User(ADMIN_USER, admin=True)
        account = self._accounts.get(token)
        if account is None:
            raise unauthorized()
        return account

    def handle(self, handler: _Handler, method: str) -> int:
        """Answer one request; returns the HTTP status sent."""
        split = urlsplit(handler.path)
        path = split.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        body = handler.read_body()
        try:
            fault = self._take_fault(method)
            if fault is not None:
                raise _fault_error(fault)
            user = self._authenticate(handler.headers.get("Authorization"))
            return self._route(handler, method, path, query, body, user)
        except ApiError as exc:
            headers = dict(exc.headers)
            if exc.code == 429:
                headers.setdefault("Retry-After", "1")
            return handler.send_json(exc.code, exc.body, headers)

    def _route(
        self, h: _Handler, method: str, path: str, query: dict[str, str], body: bytes, user: _User
    ) -> int:
        if path in _PUBLIC_PATHS:
            if path == "/version":
                return h.send_json(200, discovery.VERSION)
            return h.send_text(200, "ok")
        parts = [p for p in path.split("/") if p]
        nonresource: dict[str, Callable[[], Obj]] = {
            "/api": lambda: discovery.api_versions(f"127.0.0.1:{self.url.rsplit(':', 1)[-1]}"),
            "/apis": discovery.api_group_list,
            "/api/v1": lambda: discovery.CORE_V1,
            "/apis/batch": lambda: discovery.api_group("batch"),
            "/apis/batch/v1": lambda: discovery.BATCH_V1,
            "/apis/authorization.k8s.io": lambda: discovery.api_group("authorization.k8s.io"),
            "/apis/authorization.k8s.io/v1": lambda: discovery.AUTHORIZATION_V1,
        }
        if path in nonresource:
            if user.anonymous:
                raise ApiError(
                    403,
                    status_body(
                        403,
                        "Forbidden",
                        f'forbidden: User "{user.name}" cannot get path "{path}"',
                        {},
                    ),
                    headers={"X-Content-Type-Options": "nosniff"},
                )
            if method != "GET":
                raise method_not_allowed()
            return h.send_json(200, nonresource[path]())
        if path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" and method == "POST":
            return self._ssar(h, body, user)
        if parts[:2] == ["api", "v1"]:
            group, rest = "", parts[2:]
        elif parts[:3] == ["apis", "batch", "v1"]:
            group, rest = "batch", parts[3:]
        else:
            raise route_not_found()
        req = self._parse(method, group, rest, query)
        if not user.may(req.verb, req.rbac_resource):
            raise forbidden(
                req.rbac_resource,
                req.res.group,
                user.name,
                req.verb,
                req.namespace or None,
                req.name,
                req.res.plural,
            )
        return self._dispatch(h, req, body)

    def _parse(self, method: str, group: str, rest: list[str], query: dict[str, str]) -> _Request:
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or rest[0] not in _GROUP_RESOURCES[group]:
            raise route_not_found()
        res = RESOURCES[rest[0]]
        if namespace and not res.namespaced:
            raise route_not_found()
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if len(rest) > 3 or (sub is not None and sub not in _SUBRESOURCES.get(res.plural, ())):
            raise route_not_found()
        if res.namespaced and name is not None and not namespace:
            raise route_not_found()
        if method == "GET":
            if name is None:
                watch = "watch" in query and parse_bool(query["watch"], "watch")
                verb = "watch" if watch else "list"
            else:
                verb = "get"
        else:
            verb = {
                "POST": "create",
                "PUT": "update",
                "PATCH": "patch",
                "DELETE": "delete" if name else "deletecollection",
            }.get(method, "")
            if not verb:
                raise method_not_allowed()
        if verb == "create" and name is not None and sub != "eviction":
            raise method_not_allowed()
        if sub == "eviction" and verb != "create":
            raise method_not_allowed()
        if verb in ("update", "patch") and name is None:
            raise method_not_allowed()
        return _Request(method, verb, res, namespace, name, sub, query)

    def _dispatch(self, h: _Handler, req: _Request, body: bytes) -> int:
        if req.subresource == "eviction":
            return self._evict(h, req, body)
        if req.subresource == "log":
            if req.verb != "get":
                raise method_not_allowed()
            return self._log(h, req)
        if req.verb == "get":
            return h.send_json(200, self._get(req))
        if req.verb == "list":
            return h.send_json(200, self._list(req))
        if req.verb == "watch":
            return self._watch(h, req)
        if req.verb == "create":
            return h.send_json(201, self._create(req, h, body))
        if req.verb in ("update", "patch"):
            return h.send_json(200, self._update(req, h, body))
        if req.verb == "delete":
            return self._delete(h, req, body)
        if req.verb == "deletecollection":
            return self._delete_collection(h, req, body)
        raise method_not_allowed()

    # --- verbs -----------------------------------------------------------------------------------

    def _get(self, req: _Request) -> Obj:
        assert req.name is not None
        obj = self.store.get(req.res.plural, req.namespace, req.name)
        if obj is None:
            raise not_found(req.res, req.name)
        return obj

    def _list(self, req: _Request) -> Obj:
        res = req.res
        label_ok = parse_label_selector(req.query.get("labelSelector"))
        field_ok = parse_field_selector(res.plural, req.query.get("fieldSelector"))
        namespace = req.namespace or None
        rv = req.query.get("resourceVersion", "")
        list_rv = str(self.store.resource_version)
        if req.query.get("resourceVersionMatch") == "Exact" and rv:
            objs = self.store.objects_at(res.plural, namespace, _parse_rv(rv))
            if objs is None:
                raise ApiError(
                    410,
                    status_body(
                        410, "Expired", "The resourceVersion for the provided list is too old."
                    ),
                )
            list_rv = rv
        else:
            objs = self.store.items(res.plural, namespace)
        items = [o for o in objs if label_ok(o["metadata"].get("labels") or {}) and field_ok(o)]
        meta: Obj = {"resourceVersion": list_rv}
        token = req.query.get("continue")
        if token:
            start, token_rv = _decode_continue(token)
            items = [o for o in items if _list_key(o, namespace) >= start]
            meta["resourceVersion"] = str(token_rv)
        limit = int(req.query.get("limit") or 0)
        if limit > 0 and len(items) > limit:
            page, rest = items[:limit], items[limit:]
            meta["continue"] = _encode_continue(
                _list_key(rest[0], namespace), int(meta["resourceVersion"])
            )
            meta["remainingItemCount"] = len(rest)
            items = page
        return {
            "kind": f"{res.kind}List",
            "apiVersion": res.api_version,
            "metadata": meta,
            "items": [
                {k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in items
            ],
        }

    def _create(self, req: _Request, h: _Handler, body: bytes) -> Obj:
        res = req.res
        obj = _parse_body(body, res)
        check_kind(obj, res.plural)
        obj["kind"], obj["apiVersion"] = res.kind, res.api_version
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if res.namespaced:
            if meta.get("namespace") and meta["namespace"] != req.namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the "
                    "namespace sent on the request"
                )
            meta["namespace"] = req.namespace
        prepare = {
            "jobs": prepare_job_create,
            "pods": prepare_pod_create,
            "secrets": prepare_secret_create,
            "namespaces": prepare_namespace_create,
            "events": prepare_event_create,
        }[res.plural]
        dry_run = "dryRun" in req.query
        quota = self.controllers.pod_quotas.get(req.namespace)
        if res.plural == "pods" and quota is not None:
            check_pod_quota(self.store.items("pods", req.namespace), obj, quota)
        return self.store.create(
            res.plural,
            ordered(obj, ORDER_TOP),
            prepare=prepare,
            manager=h.manager(req.query),
            dry_run=dry_run,
        )

    def _update(self, req: _Request, h: _Handler, body: bytes) -> Obj:
        res = req.res
        assert req.name is not None
        name = req.name
        expect_rv: str | None = None
        if req.verb == "patch":
            content_type = h.headers.get("Content-Type", "")
            if content_type.split(";", 1)[0].strip().lower() not in PATCH_TYPES:
                raise ApiError(
                    415, status_body(415, "UnsupportedMediaType", "415: Unsupported Media Type", {})
                )
            patch = _parse_json(body, res, patch=True)
            if isinstance(patch, dict):
                expect_rv = (patch.get("metadata") or {}).get("resourceVersion")
        else:
            new_body = _parse_body(body, res)
            check_kind(new_body, res.plural)
            body_name = (new_body.get("metadata") or {}).get("name")
            if body_name != name:
                raise bad_request(
                    f"the name of the object ({body_name}) does not match the name on the URL "
                    f"({name})"
                )
            expect_rv = (new_body.get("metadata") or {}).get("resourceVersion") or None

        def mutate(old: Obj) -> Obj:
            new = apply_patch(content_type, old, patch) if req.verb == "patch" else new_body
            return _apply_update(res, req.subresource, old, new)

        return self.store.update(
            res.plural,
            req.namespace,
            name,
            mutate,
            expect_rv=expect_rv,
            manager=h.manager(req.query),
            subresource=req.subresource,
        )

    def _delete_options(self, req: _Request, body: bytes) -> tuple[str | None, int | None, Obj]:
        opts: Obj = {}
        if body.strip():
            try:
                opts = json.loads(body)
            except ValueError:
                raise bad_request("the body of the request was in an unknown format") from None
        policy = opts.get("propagationPolicy") or req.query.get("propagationPolicy")
        orphan = opts.get("orphanDependents")
        if orphan is None and "orphanDependents" in req.query:
            orphan = parse_bool(req.query["orphanDependents"], "orphanDependents")
        if policy is None and orphan is not None:
            policy = "Orphan" if orphan else "Background"
        if policy is not None and policy not in ("Orphan", "Background", "Foreground"):
            raise ApiError(
                422,
                status_body(
                    422,
                    "Invalid",
                    'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: '
                    f"Unsupported value: "
                    f'"{policy}": supported values: "Foreground", "Background", "Orphan", "nil"',
                    {"group": "meta.k8s.io", "kind": "DeleteOptions"},
                ),
            )
        grace = opts.get("gracePeriodSeconds")
        if grace is None and req.query.get("gracePeriodSeconds"):
            grace = int(req.query["gracePeriodSeconds"])
        return policy, grace, opts.get("preconditions") or {}

    def _delete(self, h: _Handler, req: _Request, body: bytes) -> int:
        assert req.name is not None
        res = req.res
        policy, grace, pre = self._delete_options(req, body)
        headers: dict[str, str] = {}
        if res.plural == "namespaces":
            self._empty_namespace(req.name)
        if policy is None:
            # batch/v1 Jobs still orphan their pods by default, and say so.
            policy = "Orphan" if res.plural == "jobs" else "Background"
            if res.plural == "jobs":
                headers["Warning"] = ORPHAN_WARNING
        try:
            obj, removed = self.store.delete(
                res.plural,
                req.namespace,
                req.name,
                grace_seconds=grace,
                propagation=None if policy == "Background" else policy,
                expect_uid=pre.get("uid"),
                expect_rv=pre.get("resourceVersion"),
            )
        except ApiError as exc:
            exc.headers.update(headers)
            raise
        if removed and not res.returns_deleted_object:
            return h.send_json(200, success_status(res, req.name, obj["metadata"]["uid"]), headers)
        return h.send_json(200, obj, headers)

    def _empty_namespace(self, namespace: str) -> None:
        """What the namespace controller does before a Namespace goes: delete what is in it."""
        if not self.store.namespace_exists(namespace):
            return
        for plural in ("jobs", "pods", "secrets", "events"):
            for obj in list(self.store.items(plural, namespace)):
                meta = obj["metadata"]
                with contextlib.suppress(ApiError):
                    self.store.delete(plural, namespace, meta["name"], expect_uid=meta["uid"])

    def _delete_collection(self, h: _Handler, req: _Request, body: bytes) -> int:
        listing = self._list(req)
        policy, grace, _pre = self._delete_options(req, body)
        if policy is None:
            policy = "Orphan" if req.res.plural == "jobs" else "Background"
        deleted = []
        for item in listing["items"]:
            meta = item["metadata"]
            with contextlib.suppress(ApiError):
                obj, _ = self.store.delete(
                    req.res.plural,
                    meta.get("namespace", ""),
                    meta["name"],
                    grace_seconds=grace,
                    propagation=None if policy == "Background" else policy,
                    expect_uid=meta["uid"],
                )
                deleted.append({k: v for k, v in obj.items() if k not in ("kind", "apiVersion")})
        listing["items"] = deleted
        return h.send_json(200, listing)

    def _ssar(self, h: _Handler, body: bytes, user: _User) -> int:
        review = _parse_json(body, None)
        if not isinstance(review, dict):
            raise bad_request("the body must be a SelfSubjectAccessReview")
        attrs = ((review.get("spec") or {}).get("resourceAttributes")) or {}
        resource = attrs.get("resource", "")
        if attrs.get("subresource"):
            resource = f"{resource}/{attrs['subresource']}"
        allowed = user.may(attrs.get("verb", ""), resource)
        out = {
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": review.get("spec") or {},
            "status": {"allowed": allowed},
        }
        return h.send_json(201, out)

    # --- watch -----------------------------------------------------------------------------------

    def _watch(self, h: _Handler, req: _Request) -> int:
        res = req.res
        label_ok = parse_label_selector(req.query.get("labelSelector"))
        field_ok = parse_field_selector(res.plural, req.query.get("fieldSelector"))
        rv = req.query.get("resourceVersion", "")
        bookmarks = (
            parse_bool(req.query["allowWatchBookmarks"], "allowWatchBookmarks")
            if ("allowWatchBookmarks" in req.query)
            else False
        )
        initial_events = (
            parse_bool(req.query["sendInitialEvents"], "sendInitialEvents")
            if "sendInitialEvents" in req.query
            else rv in ("", "0")
        )
        timeout = float(req.query["timeoutSeconds"]) if req.query.get("timeoutSeconds") else None
        since = None if initial_events else _parse_rv(rv)
        namespace = req.namespace or None

        def matches(obj: Obj | None) -> bool:
            return (
                obj is not None and label_ok(obj["metadata"].get("labels") or {}) and field_ok(obj)
            )

        def project(event: Event) -> tuple[str, Obj] | None:
            new_ok = matches(event.obj)
            if event.type != "MODIFIED":
                return (event.type, event.obj) if new_ok else None
            old_ok = matches(event.old)
            if new_ok and old_ok:
                return ("MODIFIED", event.obj)
            if new_ok:
                return ("ADDED", event.obj)
            if old_ok:
                return ("DELETED", event.obj)
            return None

        if self._take_gone(res.plural):
            h.start_stream("application/json")
            current = self.store.resource_version
            h.write_chunk(
                _event_line("ERROR", expired(f"too old resource version: {since or 0} ({current})"))
            )
            h.end_stream()
            return 200
        try:
            sub, first, snapshot_rv = self.store.subscribe(res.plural, namespace, since)
        except TooOld as exc:
            h.start_stream("application/json")
            h.write_chunk(_event_line("ERROR", expired(str(exc))))
            h.end_stream()
            return 200
        stream = _Stream(sub, h)
        with self._lock:
            self._streams.add(stream)
        started = time.monotonic()
        deadline = started + timeout if timeout is not None else None
        next_bookmark: float | None = None
        if bookmarks and deadline is not None and (timeout or 0) >= self.bookmark_min_timeout_s:
            next_bookmark = deadline - self.bookmark_before_close_s
        periodic = started + self.bookmark_interval_s if bookmarks else None
        try:
            h.start_stream("application/json")
            for past in first:
                projected = project(past)
                if projected is not None:
                    h.write_chunk(_event_line(*projected))
            if initial_events and bookmarks:
                h.write_chunk(_event_line("BOOKMARK", _bookmark(res, snapshot_rv, initial=True)))
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    h.end_stream()
                    return 200
                waits = [0.25]
                if deadline is not None:
                    waits.append(deadline - now)
                for at in (next_bookmark, periodic):
                    if at is not None:
                        waits.append(at - now)
                try:
                    event = sub.events.get(timeout=max(0.0, min(waits)))
                except queue.Empty:
                    now = time.monotonic()
                    if next_bookmark is not None and now >= next_bookmark:
                        next_bookmark = None
                        h.write_chunk(
                            _event_line("BOOKMARK", _bookmark(res, self.store.resource_version))
                        )
                    if periodic is not None and now >= periodic:
                        periodic = now + self.bookmark_interval_s
                        h.write_chunk(
                            _event_line("BOOKMARK", _bookmark(res, self.store.resource_version))
                        )
                    continue
                if event is None:
                    if sub.dropped:
                        h.abort()
                        return 200
                    if self._stopping.is_set():
                        h.end_stream()
                        return 200
                    continue
                projected = project(event)
                if projected is not None:
                    h.write_chunk(_event_line(*projected))
        except OSError:
            return 200  # the client went away
        finally:
            self.store.unsubscribe(sub)
            with self._lock:
                self._streams.discard(stream)

    # --- the Eviction API ------------------------------------------------------------------------

    def _evict(self, h: _Handler, req: _Request, body: bytes) -> int:
        """``POST pods/<name>/eviction`` (no PodDisruptionBudgets here, so always allowed): the
        pod gets the condition DisruptionTarget, then a graceful delete (p02-02 and the pod
        events around it)."""
        assert req.name is not None
        eviction = _parse_json(body, None) if body.strip() else {}
        if not isinstance(eviction, dict) or eviction.get("kind", "Eviction") != "Eviction":
            raise bad_request("the body must be a policy/v1 Eviction")
        options = eviction.get("deleteOptions") or {}
        pod = self.store.get("pods", req.namespace, req.name)
        if pod is None:
            raise not_found(RESOURCES["pods"], req.name)
        uid = pod["metadata"]["uid"]
        phase = (pod.get("status") or {}).get("phase")
        if phase not in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp"):

            def disrupt(draft: Obj) -> Obj:
                status = dict(draft.get("status") or {})
                conditions = [
                    c for c in status.get("conditions") or [] if c.get("type") != "DisruptionTarget"
                ]
                conditions.append(
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "lastProbeTime": None,
                        "lastTransitionTime": now_str(),
                        "reason": "EvictionByEvictionAPI",
                        "message": "Eviction API: evicting",
                    }
                )
                status["conditions"] = conditions
                out = dict(draft)
                out["status"] = ordered(status, ORDER_POD_STATUS)
                return out

            self.store.update(
                "pods",
                req.namespace,
                req.name,
                disrupt,
                expect_uid=uid,
                manager=h.manager(req.query),
                subresource="status",
            )
        self.store.delete(
            "pods",
            req.namespace,
            req.name,
            grace_seconds=options.get("gracePeriodSeconds"),
            expect_uid=uid,
        )
        return h.send_json(
            201,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "code": 201,
            },
        )

    # --- pod logs --------------------------------------------------------------------------------

    def _log(self, h: _Handler, req: _Request) -> int:
        assert req.name is not None
        pod = self.store.get("pods", req.namespace, req.name)
        if pod is None:
            raise not_found(req.res, req.name)
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        container = req.query.get("container")
        if not container:
            if len(containers) != 1:
                raise bad_request(
                    f"a container name must be specified for pod {req.name}, choose one of: "
                    f"[{' '.join(str(c) for c in containers)}]"
                )
            container = str(containers[0])
        if container not in containers:
            raise bad_request(f"container {container} is not valid for pod {req.name}")
        uid = pod["metadata"]["uid"]
        path = self.kubelet.log_path(uid)
        if path is None or not path.exists():
            waiting = [
                ((s.get("state") or {}).get("waiting") or {}).get("reason")
                for s in (pod.get("status") or {}).get("containerStatuses") or []
            ]
            reason = next((w for w in waiting if w), "ContainerCreating")
            raise bad_request(
                f'container "{container}" in pod "{req.name}" is waiting to start: {reason}'
            )
        raw = path.read_bytes()
        data = raw
        try:
            tail = int(req.query["tailLines"]) if req.query.get("tailLines") else None
            limit = int(req.query.get("limitBytes") or 0)
        except ValueError:
            raise bad_request("tailLines and limitBytes must be integers") from None
        if tail is not None:
            data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail > 0 else b""
        follow = "follow" in req.query and parse_bool(req.query["follow"], "follow")
        if limit and len(data) > limit:
            data = data[:limit]
            follow = False
        h.start_stream("text/plain")
        if data:
            h.write_chunk(data)
        offset = len(raw)  # what follows is whatever the container writes after the first read
        while follow and not self._stopping.is_set():
            done = self.kubelet.finished(uid)
            current = path.read_bytes()
            if len(current) > offset:
                h.write_chunk(current[offset:])
                offset = len(current)
            elif done:
                break
            else:
                time.sleep(0.05)
        h.end_stream()
        return 200


# --- helpers ---------------------------------------------------------------------------------


def _apply_update(res: Resource, subresource: str | None, old: Obj, new: Obj) -> Obj:
    """The strategy's update rules: status only via /status, metadata merged, then validation."""
    if not isinstance(new, dict):
        raise bad_request("the body must be an object")
    new_meta = new.get("metadata") or {}
    if subresource == "status":
        out = dict(old)
        out["status"] = new.get("status") or {}
        return out
    merged = dict(new)
    merged["kind"], merged["apiVersion"] = res.kind, res.api_version
    meta = dict(old["metadata"])
    for key in ("labels", "annotations", "ownerReferences", "finalizers"):
        if new_meta.get(key) is not None:
            meta[key] = new_meta[key]
        else:
            meta.pop(key, None)
    merged["metadata"] = meta
    if res.plural == "jobs":
        return prepare_job_update(old, merged)
    if res.plural == "pods":
        return prepare_pod_update(old, merged)
    if res.plural == "secrets":
        return prepare_secret_update(old, merged)
    if res.plural == "events":
        return prepare_event_update(old, merged)
    out = dict(old)
    out["metadata"] = meta
    return out


def _fault_error(status: int) -> ApiError:
    reason = _FAULT_REASONS.get(status, "InternalError")
    if status == 429:
        body = status_body(
            429, reason, "Too many requests, please try again later.", {"retryAfterSeconds": 1}
        )
        return ApiError(429, body, headers={"Retry-After": "1"})
    if status >= 500:
        message = (
            "Internal error occurred: injected fault"
            if status == 500
            else (f"injected fault ({status})")
        )
        return ApiError(
            status,
            status_body(status, reason, message, {"causes": [{"message": "injected fault"}]}),
        )
    return ApiError(status, status_body(status, reason, f"injected fault ({status})"))


def _go_char(ch: str) -> str:
    if ch == "'":
        return "'\\''"
    if ch == '"':
        return "'\"'"
    if ch.isprintable() and ord(ch) < 0x7F:
        return f"'{ch}'"
    return f"'\\u{ord(ch):04x}'"


def _json_error(exc: json.JSONDecodeError, text: str) -> str:
    if exc.pos >= len(text.rstrip()):
        return "unexpected end of JSON input"
    return f"invalid character {_go_char(text[exc.pos])} looking for beginning of value"


def _parse_json(body: bytes, res: Resource | None, *, patch: bool = False) -> Any:
    text = body.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        snippet = text[:30] + (" ..." if len(text) > 30 else "")
        if patch or res is None:
            raise bad_request(f"error decoding patch: {_json_error(exc, text)}") from None
        raise bad_request(
            f"the object provided is unrecognized (must be of type {res.kind}): couldn't get "
            f"version/kind; json parse error: {_json_error(exc, text)} ({snippet})"
        ) from None


def _parse_body(body: bytes, res: Resource) -> Obj:
    obj = _parse_json(body, res)
    if not isinstance(obj, dict):
        raise bad_request(
            f"the object provided is unrecognized (must be of type {res.kind}): couldn't get "
            "version/kind; json parse error: json: cannot unmarshal array into Go value of type "
            'struct { APIVersion string "json:\\"apiVersion,omitempty\\""; Kind string '
            '"json:\\"kind,omitempty\\"" }'
        )
    return obj


def _parse_rv(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise bad_request(
            f'resourceVersion: Invalid value: "{value}": strconv.ParseUint: parsing '
            f'"{value}": invalid syntax'
        ) from None


def _list_key(obj: Obj, namespace: str | None) -> str:
    meta = obj["metadata"]
    if namespace is None and meta.get("namespace"):
        return f"/{meta['namespace']}/{meta['name']}"
    return f"/{meta['name']}"


def _encode_continue(start: str, rv: int) -> str:
    raw = json.dumps(
        {"v": "meta.k8s.io/v1", "rv": rv, "start": start + "\x00"}, separators=(",", ":")
    )
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[str, int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise bad_request(
            "invalid continue token: continue key is not valid: illegal base64 data"
        ) from None
    text = raw.decode("latin-1")
    try:
        data = json.loads(text)
        start = str(data["start"])
        rv = int(data["rv"])
        if data.get("v") != "meta.k8s.io/v1":
            raise ValueError("version")
    except json.JSONDecodeError as exc:
        raise bad_request(
            f"invalid continue token: continue key is not valid: {_json_error(exc, text)}"
        ) from None
    except (KeyError, TypeError, ValueError):
        raise bad_request(
            "invalid continue token: continue key is not valid: "
            "continue key version is not supported"
        ) from None
    return start.rstrip("\x00"), rv


def _event_line(type_: str, obj: Obj) -> bytes:
    return dumps({"type": type_, "object": obj}) + b"\n"


_BLUEPRINT_SKELETON = {
    "jobs": {
        "spec": {
            "template": {"metadata": {"creationTimestamp": None}, "spec": {"containers": None}}
        },
        "status": {},
    },
    "pods": {"spec": {"containers": None}, "status": {}},
    "namespaces": {"spec": {}, "status": {}},
    "secrets": {},
    "events": {"involvedObject": {}, "source": {}, "firstTimestamp": None, "lastTimestamp": None},
}


def _bookmark(res: Resource, rv: int, *, initial: bool = False) -> Obj:
    meta: Obj = {"resourceVersion": str(rv), "creationTimestamp": None}
    if initial:
        blueprint = (
            dumps(
                {
                    "kind": f"{res.kind}List",
                    "apiVersion": res.api_version,
                    "metadata": {},
                    "items": None,
                }
            )
            + b"\n"
        )
        meta["annotations"] = {
            "k8s.io/initial-events-end": "true",
            "kubernetes.io/initial-events-list-blueprint": base64.b64encode(blueprint).decode(),
        }
    return {
        "kind": res.kind,
        "apiVersion": res.api_version,
        "metadata": meta,
        **json.loads(json.dumps(_BLUEPRINT_SKELETON[res.plural])),
    }


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; JSON bodies with Content-Length, streams chunked."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the fake's request log is ``FakeKubeServer.requests``."""

    def _handle(self, method: str) -> None:
        self._method = method
        self._logged = False
        try:
            self.server.fake.handle(self, method)
        except OSError:
            self.close_connection = True
        finally:
            self._log_request(500)  # only if nothing was sent (the client went away)

    def _log_request(self, code: int) -> None:
        """Log the request once, before its answer leaves, so a client that has the answer
        also finds it in ``FakeKubeServer.requests``."""
        if not getattr(self, "_logged", True):
            self._logged = True
            self.server.fake.requests.append((self._method, urlsplit(self.path).path, code))

    def do_GET(self) -> None:
        """GET."""
        self._handle("GET")

    def do_POST(self) -> None:
        """POST."""
        self._handle("POST")

    def do_PUT(self) -> None:
        """PUT."""
        self._handle("PUT")

    def do_PATCH(self) -> None:
        """PATCH."""
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        """DELETE."""
        self._handle("DELETE")

    # --- reading and writing ---------------------------------------------------------------------

    def read_body(self) -> bytes:
        """The request body (Content-Length or chunked)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def manager(self, query: dict[str, str]) -> str:
        """The field manager: ``fieldManager``, else the User-Agent's product name."""
        if query.get("fieldManager"):
            return query["fieldManager"]
        agent = self.headers.get("User-Agent") or "unknown"
        return agent.split("/", 1)[0] or "unknown"

    def _common_headers(self, content_type: str, extra: dict[str, str] | None) -> None:
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Content-Type", content_type)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("X-Kubernetes-Pf-Flowschema-Uid", _FLOWSCHEMA_UID)
        self.send_header("X-Kubernetes-Pf-Prioritylevel-Uid", _PRIORITYLEVEL_UID)
        self.send_header("Date", self.date_time_string())

    def send_json(self, code: int, body: Any, headers: dict[str, str] | None = None) -> int:
        """A complete JSON response."""
        data = dumps(body)
        self._log_request(code)
        self.send_response_only(code)
        self._common_headers("application/json", headers)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        return code

    def send_text(self, code: int, text: str) -> int:
        """A complete text/plain response."""
        data = text.encode()
        self._log_request(code)
        self.send_response_only(code)
        self._common_headers("text/plain; charset=utf-8", None)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return code

    def start_stream(self, content_type: str) -> None:
        """200 with ``Transfer-Encoding: chunked``."""
        self._log_request(200)
        self.send_response_only(200)
        self._common_headers(content_type, None)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, data: bytes) -> None:
        """One chunk, flushed at once (a watch event must not sit in a buffer)."""
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_stream(self) -> None:
        """The final zero-length chunk: a clean end."""
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def abort(self) -> None:
        """Drop the connection mid-stream, without the final chunk."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
