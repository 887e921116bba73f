"""The fake node: binds pods and runs each pod's container as a local process.

Like the recording's fake kubelet it binds every pod to ``fake-node``, writes the pod status
(Pending -> Running -> Succeeded/Failed with containerStatuses), resolves ``env`` (literal
values, ``secretKeyRef``, ``fieldRef``) and keeps the container's output as the pod log.
Its status writes replace only the conditions a kubelet owns; others (``DisruptionTarget``,
which the Eviction API adds) are kept, as a real kubelet keeps them.

Pods that do not start wait as a real node and scheduler leave them, phase ``Pending``: a pod
whose ``nodeSelector`` matches none of the node's labels is not bound, and gets the scheduler's
``PodScheduled=False`` (reason ``Unschedulable``); an image reference the runtime cannot parse
waits in ``InvalidImageName``; an image a `tests.images.PullFailure` rule names goes
``ErrImagePull`` then ``ImagePullBackOff``, with a kubelet's doubling back-off (or
``ErrImageNeverPull`` under ``imagePullPolicy: Never``), until the rule lets the pull succeed; a
Secret or key the env names that does not exist waits in ``CreateContainerConfigError``, retried
every second.

A pod's process runs in its own session, so deleting the pod (or stopping the server) can kill the
whole process group: SIGTERM, then SIGKILL after a short grace. When a pod's main process ends,
whatever it left in its group is killed too, as a container's processes die with it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.fakekube.objects import (
    NODE_LABELS,
    NODE_NAME,
    ORDER_POD_STATUS,
    UNSCHEDULABLE_MESSAGE,
    ApiError,
    Obj,
    now_str,
    ordered,
)
from tests.fakekube.store import Event, Store
from tests.images import Puller

# Environment a pod process inherits from the test process: enough to run Python and a shell,
# nothing that would leak the test's own configuration into the "container".
_INHERITED_ENV = ("HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "PYTHONPATH", "SYSTEMROOT")
_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")
_TERMINAL = ("Succeeded", "Failed")
# The pod conditions a kubelet writes (and the scheduler's PodScheduled, which it keeps).
# Others belong to someone else (DisruptionTarget: the Eviction API, the scheduler's preemption,
# the taint manager): a kubelet's status write keeps them, as a real one does.
_KUBELET_CONDITIONS = frozenset(
    {"PodScheduled", "Initialized", "Ready", "ContainersReady", "PodReadyToStartContainers"}
)


@dataclass(eq=False)
class PodProcess:
    """A running (or finished) container process and its log."""

    uid: str
    namespace: str
    name: str
    container: str
    log_path: Path
    started_at: str
    container_id: str
    proc: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    killing: bool = False
    reported: threading.Event = field(default_factory=threading.Event)

    def running(self) -> bool:
        """True while the main process has not exited."""
        return self.proc is not None and self.proc.poll() is None


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` is a literal ``$``."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(repl, text)


class EnvError(Exception):
    """The container's environment cannot be built (CreateContainerConfigError)."""


class Kubelet:
    """Runs the pods bound to ``fake-node`` as local processes."""

    def __init__(
        self,
        store: Store,
        workdir: Path,
        *,
        kill_grace_s: float = 2.0,
        puller: Puller | None = None,
    ) -> None:
        self.store = store
        self.workdir = workdir
        self.kill_grace_s = kill_grace_s
        self.puller = puller or Puller()
        self._procs: dict[str, PodProcess] = {}
        self._retry_at: dict[str, float] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._helpers: list[threading.Thread] = []
        self._lock = threading.Lock()
        store.add_listener(self._on_event)

    # --- lifecycle -----------------------------------------------------------------------------

    def _on_event(self, resource: str, _event: Event) -> None:
        if resource in ("pods", "secrets"):
            self._wake.set()

    def start(self) -> None:
        """Start the sync loop in a background thread."""
        self._thread = threading.Thread(target=self._loop, name="fakekube-kubelet", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and kill every pod process (and its group), then reap them."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            records = list(self._procs.values())
        for rec in records:
            if rec.proc is not None and rec.proc.poll() is None:
                _signal_group(rec.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 0.5
        for rec in records:
            if rec.proc is None:
                continue
            try:
                rec.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(rec.proc.pid, signal.SIGKILL)
                rec.proc.wait()
        for thread in list(self._helpers):
            thread.join(timeout=5)
        for rec in records:
            if rec.proc is not None:
                _wait_group_gone(rec.proc.pid, timeout=2.0)

    def pids(self) -> list[int]:
        """Pids of pod processes still running."""
        with self._lock:
            return [r.proc.pid for r in self._procs.values() if r.proc is not None and r.running()]

    def log_path(self, uid: str) -> Path | None:
        """The log file of the pod with this uid, if its container was started."""
        with self._lock:
            rec = self._procs.get(uid)
        return rec.log_path if rec is not None else None

    def finished(self, uid: str) -> bool:
        """True once the pod's process has exited (or was never started)."""
        with self._lock:
            rec = self._procs.get(uid)
        return rec is None or not rec.running()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(timeout=self._next_timeout())
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._sync_all()
            except Exception:  # pragma: no cover - keep the node alive, like a real kubelet
                import traceback

                traceback.print_exc()

    def _next_timeout(self) -> float:
        if not self._retry_at:
            return 1.0
        return max(0.01, min(1.0, min(self._retry_at.values()) - time.monotonic()))

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._helpers = [t for t in self._helpers if t.is_alive()]
        self._helpers.append(thread)
        thread.start()

    # --- sync ---------------------------------------------------------------------------------

    def _sync_all(self) -> None:
        pods = self.store.items("pods")
        live = {p["metadata"]["uid"] for p in pods}
        for uid in [u for u in self._retry_at if u not in live]:
            del self._retry_at[uid]
            self.puller.forget(uid)
        with self._lock:
            orphans = [r for u, r in self._procs.items() if u not in live and r.running()]
        for rec in orphans:
            # The pod object is gone (removed without a graceful phase): kill what is left.
            if not rec.killing:
                rec.killing = True
                self._spawn(self._kill, rec, 0.0)
        for pod in pods:
            if self._stopping.is_set():
                return
            self._sync_pod(pod)

    def _sync_pod(self, pod: Obj) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        spec = pod.get("spec") or {}
        phase = (pod.get("status") or {}).get("phase")
        with self._lock:
            rec = self._procs.get(uid)
        if meta.get("deletionTimestamp"):
            if rec is not None and rec.running():
                if not rec.killing:
                    rec.killing = True
                    grace = float(meta.get("deletionGracePeriodSeconds") or 0)
                    self._spawn(self._kill, rec, grace)
                return
            if rec is not None and not rec.reported.is_set():
                return  # the terminal status is being written; confirm afterwards
            if meta.get("deletionGracePeriodSeconds"):
                # The kubelet's side of graceful deletion: the containers are gone, delete now.
                with contextlib.suppress(ApiError):
                    self.store.delete(
                        "pods", meta["namespace"], meta["name"], grace_seconds=0, expect_uid=uid
                    )
            return
        if phase in _TERMINAL or rec is not None:
            return
        if not spec.get("nodeName"):
            bound = self._bind(pod)
            if bound is None:
                return
            pod = bound
            spec = pod["spec"]
        if spec.get("nodeName") != NODE_NAME:
            return
        retry = self._retry_at.get(uid)
        if retry is not None and time.monotonic() < retry:
            return
        container = (spec.get("containers") or [{}])[0]
        pull = self.puller.state(
            uid,
            str(container.get("image") or ""),
            container.get("imagePullPolicy"),
            time.monotonic(),
        )
        if not pull.ready:
            # No wake-up: the state cannot change by itself (InvalidImageName, ErrImageNeverPull);
            # the pod is looked at again on the next change anyway.
            self._retry_at[uid] = (
                pull.wake_at if pull.wake_at is not None else time.monotonic() + 3600
            )
            self._write_waiting(pod, container, str(pull.reason), str(pull.message))
            return
        self._start(pod)

    def _unschedulable(self, pod: Obj) -> None:
        """The scheduler's answer for a pod no node fits: not bound, ``PodScheduled=False``."""
        meta = pod["metadata"]

        def mark(draft: Obj) -> None:
            status = dict(draft.get("status") or {})
            old = [c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"]
            if old and old[0].get("reason") == "Unschedulable":
                return  # written once; the scheduler retries only when a node changes
            status["phase"] = "Pending"
            status["conditions"] = [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "lastProbeTime": None,
                    "lastTransitionTime": now_str(),
                    "reason": "Unschedulable",
                    "message": UNSCHEDULABLE_MESSAGE,
                },
                *[c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"],
            ]
            draft["status"] = ordered(status, ORDER_POD_STATUS)

        with contextlib.suppress(ApiError):
            self.store.update(
                "pods",
                meta["namespace"],
                meta["name"],
                mark,
                expect_uid=meta["uid"],
                manager="kube-scheduler",
                subresource="status",
            )

    def _bind(self, pod: Obj) -> Obj | None:
        meta = pod["metadata"]
        selector = (pod.get("spec") or {}).get("nodeSelector") or {}
        if any(NODE_LABELS.get(k) != v for k, v in selector.items()):
            self._unschedulable(pod)
            return None

        def bind(draft: Obj) -> None:
            draft["spec"]["nodeName"] = NODE_NAME
            status = dict(draft.get("status") or {})
            status["conditions"] = [
                {
                    "type": "PodScheduled",
                    "status": "True",
                    "lastProbeTime": None,
                    "lastTransitionTime": now_str(),
                }
            ]
            draft["status"] = ordered(status, ORDER_POD_STATUS)

        try:
            return self.store.update(
                "pods",
                meta["namespace"],
                meta["name"],
                bind,
                expect_uid=meta["uid"],
                manager="kube-scheduler",
            )
        except ApiError:
            return None

    # --- containers ---------------------------------------------------------------------------

    def _resolve_env(self, pod: Obj, container: Obj) -> dict[str, str]:
        meta = pod["metadata"]
        namespace = meta["namespace"]
        env: dict[str, str] = {k: os.environ[k] for k in _INHERITED_ENV if k in os.environ}
        env["PATH"] = os.environ.get("PATH", os.defpath)
        env["HOSTNAME"] = meta["name"]
        user: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            ref = source.get("secretRef")
            if not ref:
                continue
            secret = self.store.get_shared("secrets", namespace, ref.get("name", ""))
            if secret is None:
                if ref.get("optional"):
                    continue
                raise EnvError(f'secret "{ref.get("name")}" not found')
            for key, value in (secret.get("data") or {}).items():
                user[source.get("prefix", "") + key] = base64.b64decode(value).decode()
        for var in container.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                user[name] = expand(str(var.get("value", "")), user)
                continue
            source = var["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = self.store.get_shared("secrets", namespace, ref.get("name", ""))
                if secret is None:
                    if ref.get("optional"):
                        continue
                    raise EnvError(f'secret "{ref.get("name")}" not found')
                data = secret.get("data") or {}
                if ref.get("key") not in data:
                    if ref.get("optional"):
                        continue
                    raise EnvError(
                        f"couldn't find key {ref.get('key')} in Secret "
                        f"{namespace}/{ref.get('name')}"
                    )
                user[name] = base64.b64decode(data[ref["key"]]).decode()
            elif "fieldRef" in source:
                user[name] = _field_value(pod, source["fieldRef"].get("fieldPath", ""))
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                if ref.get("optional"):
                    continue
                # The fake serves no ConfigMaps.
                raise EnvError(f'configmap "{ref.get("name")}" not found')
            elif "resourceFieldRef" in source:
                user[name] = "0"
        env.update(user)
        bindir = os.path.dirname(sys.executable)
        path = env.get("PATH", "")
        if not path.startswith(bindir + os.pathsep):
            env["PATH"] = bindir + os.pathsep + path if path else bindir
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _start(self, pod: Obj) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        container = (pod["spec"].get("containers") or [{}])[0]
        cname = container.get("name", "")
        try:
            env = self._resolve_env(pod, container)
        except EnvError as exc:
            self._retry_at[uid] = time.monotonic() + 1.0
            self._write_waiting(pod, container, "CreateContainerConfigError", str(exc))
            return
        self._retry_at.pop(uid, None)
        argv = [
            expand(str(a), env)
            for a in (container.get("command") or []) + (container.get("args") or [])
        ]
        poddir = self.workdir / uid
        poddir.mkdir(parents=True, exist_ok=True)
        rec = PodProcess(
            uid=uid,
            namespace=meta["namespace"],
            name=meta["name"],
            container=cname,
            log_path=poddir / f"{cname}.log",
            started_at=now_str(),
            container_id=f"fake://{uid}-{cname}",
        )
        rec.log_path.touch()
        if not argv:
            self._fail_start(
                pod,
                rec,
                "fake kubelet: the container has no command; image entrypoints are not emulated",
            )
            return
        log: IO[bytes] = rec.log_path.open("ab")
        try:
            rec.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=poddir,
                start_new_session=True,
            )
        except OSError as exc:
            log.close()
            self._fail_start(pod, rec, f'exec: "{argv[0]}": {exc.strerror or exc}')
            return
        finally:
            if rec.proc is not None:
                log.close()
        with self._lock:
            self._procs[uid] = rec
        try:
            self.store.update(
                "pods",
                rec.namespace,
                rec.name,
                lambda d: self._running_status(d, container, rec),
                expect_uid=uid,
                manager="kubelet",
                subresource="status",
            )
        except ApiError:
            rec.killing = True
            self._spawn(self._kill, rec, 0.0)
        self._spawn(self._wait, rec, container)

    def _fail_start(self, pod: Obj, rec: PodProcess, message: str) -> None:
        rec.exit_code = 128
        rec.reported.set()
        with self._lock:
            self._procs[rec.uid] = rec
        container = (pod["spec"].get("containers") or [{}])[0]
        with contextlib.suppress(ApiError):
            self.store.update(
                "pods",
                rec.namespace,
                rec.name,
                lambda d: self._terminal_status(d, container, rec, "StartError", message),
                expect_uid=rec.uid,
                manager="kubelet",
                subresource="status",
            )

    def _wait(self, rec: PodProcess, container: Obj) -> None:
        assert rec.proc is not None
        pid = rec.proc.pid
        with contextlib.suppress(ChildProcessError, OSError):
            # Wait without reaping, so the group id cannot be reused before it is cleaned up.
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        _signal_group(pid, signal.SIGKILL)
        code = rec.proc.wait()
        rec.exit_code = 128 - code if code < 0 else code
        reason = "Completed" if rec.exit_code == 0 else "Error"
        with contextlib.suppress(ApiError):
            self.store.update(
                "pods",
                rec.namespace,
                rec.name,
                lambda d: self._terminal_status(d, container, rec, reason, None),
                expect_uid=rec.uid,
                manager="kubelet",
                subresource="status",
            )
        rec.reported.set()
        self._wake.set()

    def _kill(self, rec: PodProcess, grace_s: float) -> None:
        if rec.proc is None:
            return
        _signal_group(rec.proc.pid, signal.SIGTERM)
        try:
            rec.proc.wait(timeout=min(grace_s, self.kill_grace_s) if grace_s else 0.2)
        except subprocess.TimeoutExpired:
            _signal_group(rec.proc.pid, signal.SIGKILL)

    # --- pod status ---------------------------------------------------------------------------

    @staticmethod
    def _base_conditions(draft: Obj) -> list[Obj]:
        old = {c["type"]: c for c in (draft.get("status") or {}).get("conditions") or []}
        now = now_str()
        scheduled = old.get("PodScheduled") or {
            "type": "PodScheduled",
            "status": "True",
            "lastProbeTime": None,
            "lastTransitionTime": now,
        }
        initialized = old.get("Initialized") or {
            "type": "Initialized",
            "status": "True",
            "lastProbeTime": None,
            "lastTransitionTime": now,
        }
        return [scheduled, initialized]

    @staticmethod
    def _others(draft: Obj) -> list[Obj]:
        """The conditions this kubelet does not own, kept as they are."""
        return [
            c
            for c in (draft.get("status") or {}).get("conditions") or []
            if c.get("type") not in _KUBELET_CONDITIONS
        ]

    def _running_status(self, draft: Obj, container: Obj, rec: PodProcess) -> None:
        now = rec.started_at
        status = dict(draft.get("status") or {})
        status["phase"] = "Running"
        status["conditions"] = [
            *self._base_conditions(draft),
            {
                "type": "ContainersReady",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": now,
            },
            {"type": "Ready", "status": "True", "lastProbeTime": None, "lastTransitionTime": now},
            *self._others(draft),
        ]
        status.update(_addresses())
        status["startTime"] = status.get("startTime") or now
        status["containerStatuses"] = [
            {
                "name": rec.container,
                "state": {"running": {"startedAt": now}},
                "lastState": {},
                "ready": True,
                "restartCount": 0,
                "image": container.get("image", ""),
                "imageID": f"fake://{container.get('image', '')}",
                "containerID": rec.container_id,
                "started": True,
            }
        ]
        draft["status"] = ordered(status, ORDER_POD_STATUS)

    def _terminal_status(
        self, draft: Obj, container: Obj, rec: PodProcess, reason: str, message: str | None
    ) -> None:
        now = now_str()
        code = rec.exit_code if rec.exit_code is not None else 137
        status = dict(draft.get("status") or {})
        status["phase"] = "Succeeded" if code == 0 else "Failed"
        status["conditions"] = [
            *self._base_conditions(draft),
            {
                "type": "Ready",
                "status": "False",
                "lastProbeTime": None,
                "lastTransitionTime": now,
                "reason": "PodCompleted",
            },
            {
                "type": "ContainersReady",
                "status": "False",
                "lastProbeTime": None,
                "lastTransitionTime": now,
                "reason": "PodCompleted",
            },
            *self._others(draft),
        ]
        status.update(_addresses())
        status["startTime"] = status.get("startTime") or rec.started_at
        terminated: Obj = {"exitCode": code, "reason": reason}
        if message:
            terminated["message"] = message
        terminated.update(
            {"startedAt": rec.started_at, "finishedAt": now, "containerID": rec.container_id}
        )
        status["containerStatuses"] = [
            {
                "name": rec.container,
                "state": {"terminated": terminated},
                "lastState": {},
                "ready": False,
                "restartCount": 0,
                "image": container.get("image", ""),
                "imageID": f"fake://{container.get('image', '')}",
                "containerID": rec.container_id,
                "started": False,
            }
        ]
        draft["status"] = ordered(status, ORDER_POD_STATUS)

    def _write_waiting(self, pod: Obj, container: Obj, reason: str, message: str) -> None:
        meta = pod["metadata"]
        cname = container.get("name", "")

        def waiting(draft: Obj) -> None:
            now = now_str()
            status = dict(draft.get("status") or {})
            unready = f"containers with unready status: [{cname}]"
            status["phase"] = "Pending"
            status["conditions"] = [
                *self._base_conditions(draft),
                {
                    "type": "Ready",
                    "status": "False",
                    "lastProbeTime": None,
                    "lastTransitionTime": now,
                    "reason": "ContainersNotReady",
                    "message": unready,
                },
                {
                    "type": "ContainersReady",
                    "status": "False",
                    "lastProbeTime": None,
                    "lastTransitionTime": now,
                    "reason": "ContainersNotReady",
                    "message": unready,
                },
                *self._others(draft),
            ]
            status.update(_addresses())
            status["startTime"] = status.get("startTime") or now
            status["containerStatuses"] = [
                {
                    "name": cname,
                    "state": {"waiting": {"reason": reason, "message": message}},
                    "lastState": {},
                    "ready": False,
                    "restartCount": 0,
                    "image": container.get("image", ""),
                    "imageID": "",
                    "started": False,
                }
            ]
            old = draft.get("status") or {}
            if old.get("containerStatuses") == status["containerStatuses"]:
                return  # the same error again: no new write
            draft["status"] = ordered(status, ORDER_POD_STATUS)

        with contextlib.suppress(ApiError):
            self.store.update(
                "pods",
                meta["namespace"],
                meta["name"],
                waiting,
                expect_uid=meta["uid"],
                manager="kubelet",
                subresource="status",
            )


def _addresses() -> Obj:
    return {"hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}


def _field_value(pod: Obj, path: str) -> str:
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": (pod.get("spec") or {}).get("nodeName") or NODE_NAME,
        "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName"),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path] or "")
    m = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    return ""


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, from /proc (empty where there is none)."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(name))
    return members


def _wait_group_gone(pgid: int, *, timeout: float) -> None:
    """SIGKILL a pod's process group until nothing in it is left running (signals are async)."""
    deadline = time.monotonic() + timeout
    while _group_members(pgid) and time.monotonic() < deadline:
        _signal_group(pgid, signal.SIGKILL)
        time.sleep(0.02)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
