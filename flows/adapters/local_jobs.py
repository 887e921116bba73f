"""The local Job backend: runs a batch/v1 Job's pods as local processes, with Job semantics.

This is how queuejob runs with no cluster (``make demo``, a laptop, CI). It takes the same Secret
and Job dicts the manifest builder makes for Kubernetes and behaves like the Job controller, so the
flow's wait and caveat logic cannot tell the two backends apart:

- pods run the container's ``command`` + ``args`` with its ``env`` (literal values,
  ``secretKeyRef`` resolved from the run's Secret, ``fieldRef`` to the pod's name/namespace) and
  Kubernetes' ``$(VAR)`` expansion; ``queuejob worker ...`` runs as ``python -m flows.worker ...``
  with this interpreter;
- ``completions`` / ``parallelism`` as for a NonIndexed Job (completions unset: done when one pod
  has succeeded and all have ended, no new pod after a success), ``backoffLimit`` with an
  exponential pod back-off (``backoff_base_s * 2**(n-1)``, capped), ``activeDeadlineSeconds``
  (running pods are killed), ``ttlSecondsAfterFinished``;
- the status has the shape and the condition order of Kubernetes 1.31+ (``SuccessCriteriaMet`` then
  ``Complete``; ``FailureTarget`` then ``Failed``) with the same reasons and messages.

How it is built. Each Job has a small supervisor process of its own (``python -m
flows.adapters.local_jobs supervise <state file>``, detached from the caller), so the Job outlives
the flow's process just as a Kubernetes Job does. The supervisor is the only writer of the Job's
state file ``<state_dir>/<namespace>/<job>.json`` (the Job object plus a ``local`` section with pod
pids, exit codes and back-off bookkeeping), replaced atomically on every change; ``wait`` polls it.
Pod output (stdout and stderr together, as ``kubectl logs`` shows it) goes to
``<job>.logs/<pod>.log``. Secrets are kept apart in ``secrets/<name>.json`` with mode 0600, and the
broker URL they hold is never written to a state file or a log line of ours; log tails handed out
are scrubbed of Secret values.

Nothing is left running:

- every process of a Job carries the environment markers ``QUEUEJOB_LOCAL_JOB_UID``,
  ``QUEUEJOB_LOCAL_RUN`` and (pods) ``QUEUEJOB_LOCAL_POD_UID``, so ``delete_run`` finds them from
  any process (on Linux through ``/proc``, also when the state file is gone) and stops them:
  SIGTERM to each process group, then SIGKILL after the grace period;
- every pod runs in its own process group (the container); when its main process ends, whatever
  it left behind is killed, in its group or not (the worker runs commands in a session of their
  own), as a container's processes die with it;
- pods get ``PR_SET_PDEATHSIG`` (Linux), and a watchdog process forked by the supervisor stops the
  Job's process groups when the supervisor dies (even by SIGKILL);
- an exclusive ``flock`` on ``<job>.lock``, held by the supervisor and its watchdog, guarantees one
  controller per Job; ``create_or_adopt`` and ``wait`` start a new supervisor when the old one is
  gone before the Job finished (pods it lost count as failed), like a restarted controller.

Differences from Kubernetes, on purpose: the image and scheduling fields are ignored; a missing
Secret or a command that cannot start fails the pod (``CreateContainerConfigError`` /
``StartError``) instead of leaving it pending; deletion waits until the processes are gone, whatever
the propagation policy.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.core.backend import JobHandle, PodFailure, ProgressCallback, Propagation, run_id_of
from flows.core.errors import (
    InvalidInput,
    JobConflict,
    JobTimeout,
    KubeNotFound,
    RetryableError,
)
from flows.core.job_status import JobState, job_state
from flows.core.manifest import RUN_ID_LABEL, check_dns1123_label, run_labels

STATE_DIR_ENV = "QUEUEJOB_STATE_DIR"
JOB_UID_ENV = "QUEUEJOB_LOCAL_JOB_UID"
RUN_ENV = "QUEUEJOB_LOCAL_RUN"
POD_ENV = "QUEUEJOB_LOCAL_POD_UID"
LOG_TAIL_LINES = 50
POLL_S = 0.05
SUPERVISOR_START_TIMEOUT_S = 30.0
KILL_WAIT_S = 5.0  # after SIGKILL: how long to wait for the kernel to reap the processes

SUCCESS_REASON = "CompletionsReached"
SUCCESS_MESSAGE = "Reached expected number of succeeded pods"
BACKOFF_REASON = "BackoffLimitExceeded"
BACKOFF_MESSAGE = "Job has reached the specified backoff limit"
DEADLINE_REASON = "DeadlineExceeded"
DEADLINE_MESSAGE = "Job was active longer than specified deadline"

# The environment a pod inherits from the machine; everything else comes from the Job's env, as
# in a container (so a flow's own settings and credentials do not leak into pods).
_INHERITED_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)
_POD_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the one Kubernetes uses for generateName
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_FIELD_LABEL = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")
_SUPPORTED_FIELDS = (
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.podIP",
    "status.hostIP",
)
_UNSUPPORTED_JOB_FIELDS = (
    "podFailurePolicy",
    "successPolicy",
    "backoffLimitPerIndex",
    "maxFailedIndexes",
)
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)
_PR_SET_PDEATHSIG = 1

# --- small helpers -------------------------------------------------------------------------------


def _run_marker(namespace: str, label: str) -> str:
    """The value of the run marker on a Job's processes: a run's Jobs live in one namespace."""
    return f"{namespace}/{label}"


def _iso(epoch: float) -> str:
    """A Kubernetes timestamp: RFC 3339, second precision, UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def default_state_dir() -> Path:
    """``$QUEUEJOB_STATE_DIR``, else ``~/.cache/queuejob/local-jobs``."""
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "queuejob" / "local-jobs"


def _mkdir_private(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        path.chmod(0o700)


def _write_json(path: Path, obj: Any, *, exclusive: bool = False) -> None:
    """Write JSON atomically with mode 0600: readers see the old or the new file, never half.

    With ``exclusive`` the file must not exist yet (FileExistsError otherwise).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, separators=(",", ":"))
        if exclusive:
            os.link(tmp, path)  # atomic create-if-absent
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _tail(path: Path, lines: int, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    if lines <= 0:
        return ""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            start = max(0, size - max_bytes)
            fh.seek(start)
            data = fh.read()
    except OSError:
        return ""
    parts = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and parts:
        parts = parts[1:]  # the first line was cut by the byte limit
    return "\n".join(parts[-lines:])


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][-._A-Za-z0-9]*)\)")


def _expand(text: str, defined: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in command, args and env values: a variable the
    container defines is replaced, an unknown reference stays as written, ``$$`` is ``$``."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return defined[name] if name in defined else match.group(0)

    return _VAR_REF.sub(sub, text)


def _secret_value(secret: Mapping[str, Any], key: str) -> str | None:
    """A key of a Secret, from ``stringData`` (which wins, as on the API server) or ``data``."""
    string_data = secret.get("stringData") or {}
    if key in string_data:
        return str(string_data[key])
    data = secret.get("data") or {}
    if key in data:
        try:
            return base64.b64decode(str(data[key]), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def _sensitive_strings(secrets: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every Secret value worth scrubbing from logs, and the password inside a URL value."""
    out: set[str] = set()
    for secret in secrets:
        keys = set(secret.get("stringData") or {}) | set(secret.get("data") or {})
        for key in keys:
            value = _secret_value(secret, key)
            if not value:
                continue
            out.add(value)
            with contextlib.suppress(ValueError):
                password = urllib.parse.urlsplit(value).password
                if password:
                    out.add(password)
                    out.add(urllib.parse.unquote(password))
    # Very short values would blank out ordinary words; longest first so a URL goes as a whole.
    return sorted((s for s in out if len(s) >= 4), key=len, reverse=True)


def _scrub(text: str, sensitive: Sequence[str]) -> str:
    for value in sensitive:
        text = text.replace(value, "<redacted>")
    return text


# --- processes ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Proc:
    pid: int
    pgid: int
    start: str  # kernel start time (clock ticks since boot): tells a reused pid apart
    job_uid: str | None
    run: str | None
    pod_uid: str | None


def _proc_stat(pid: int) -> tuple[str, int, str] | None:
    """(state, pgid, start time) of a process from /proc, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    if len(rest) < 20:
        return None
    return rest[0], int(rest[2]), rest[19]


_MARKER_KEYS = (JOB_UID_ENV.encode(), RUN_ENV.encode(), POD_ENV.encode())


def _proc_markers(pid: int) -> dict[bytes, str]:
    """Our marker variables in a process's (initial) environment."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    if b"QUEUEJOB_LOCAL_" not in environ:
        return {}
    found: dict[bytes, str] = {}
    for entry in environ.split(b"\0"):
        key, _, value = entry.partition(b"=")
        if key in _MARKER_KEYS:
            found[key] = value.decode("utf-8", errors="replace")
    return found


def _proc_table() -> dict[int, _Proc] | None:
    """Every live (non-zombie) process we can see, with its markers; None without /proc."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    table: dict[int, _Proc] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        markers = _proc_markers(pid)
        table[pid] = _Proc(
            pid=pid,
            pgid=stat[1],
            start=stat[2],
            job_uid=markers.get(_MARKER_KEYS[0]),
            run=markers.get(_MARKER_KEYS[1]),
            pod_uid=markers.get(_MARKER_KEYS[2]),
        )
    return table


def _proc_start(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[2] if stat else None


def _pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[0] not in ("Z", "X")
    if Path("/proc/self/stat").exists():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    if pgid <= 1 or pgid == os.getpgrp():
        return  # never our own group (or init's)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _signal_pid(pid: int, sig: int) -> None:
    if pid <= 1 or pid == os.getpid():
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@dataclass(frozen=True, slots=True)
class _Targets:
    """What to stop: processes by marker, and recorded process groups/pids as a fallback."""

    job_uids: frozenset[str] = frozenset()
    run: str | None = None
    pod_uids: frozenset[str] = frozenset()
    groups: tuple[tuple[int, str | None], ...] = ()  # (pgid, leader's start time when known)
    pids: tuple[tuple[int, str | None], ...] = ()  # (pid, start time when known)
    exclude: frozenset[int] = frozenset()

    def resolve(self) -> tuple[set[int], set[int]]:
        """(live pids to wait for, process groups to signal) right now."""
        exclude = self.exclude | {os.getpid()}
        table = _proc_table()
        if table is None:  # no /proc (macOS): trust the recorded ids where they still match
            pids = {p for p, _ in self.pids if p not in exclude and _pid_alive(p)}
            groups: set[int] = set()
            for pgid, _ in self.groups:
                with contextlib.suppress(OSError):
                    if os.getpgid(pgid) == pgid:
                        groups.add(pgid)
            return pids | groups, groups
        marked = {
            p.pid
            for p in table.values()
            if (p.job_uid is not None and p.job_uid in self.job_uids)
            or (self.run is not None and p.run == self.run)
            or (p.pod_uid is not None and p.pod_uid in self.pod_uids)
        }
        for pid, start in self.pids:
            proc = table.get(pid)
            if proc is not None and (start is None or proc.start == start):
                marked.add(pid)
        marked -= exclude
        groups = {table[p].pgid for p in marked}
        for pgid, start in self.groups:
            members = [p for p in table.values() if p.pgid == pgid]
            if not members:
                continue
            leader = table.get(pgid)
            # A recorded group is ours when its leader is the very process we started, or one of
            # its members carries our marker (a pid is not reused while its group has members).
            if (leader is not None and start is not None and leader.start == start) or any(
                p.pid in marked for p in members
            ):
                groups.add(pgid)
        groups.discard(os.getpgrp())
        alive = marked | {p.pid for p in table.values() if p.pgid in groups}
        return alive - exclude, groups


def _stop_processes(targets: _Targets, *, grace_s: float) -> list[int]:
    """SIGTERM every target group and process, SIGKILL what is left after ``grace_s``.

    Returns the pids still alive at the end (empty unless the kernel could not kill them).
    """
    alive, groups = targets.resolve()
    if not alive and not groups:
        return []
    termed_groups: set[int] = set()
    termed: set[int] = set()
    deadline = time.monotonic() + grace_s
    while True:
        # Each group and process gets one SIGTERM, also those born meanwhile (a pod started just
        # before its supervisor stopped); a second one could cut a graceful shutdown short.
        for pgid in groups - termed_groups:
            _signal_group(pgid, signal.SIGTERM)
        for pid in alive - termed:
            _signal_pid(pid, signal.SIGTERM)
        termed_groups |= groups
        termed |= alive
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
        alive, groups = targets.resolve()
        if not alive:
            return []
    deadline = time.monotonic() + KILL_WAIT_S
    while True:
        alive, groups = targets.resolve()
        if not alive:
            return []
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)
        for pid in alive:
            _signal_pid(pid, signal.SIGKILL)
        if time.monotonic() >= deadline:
            return sorted(alive)
        time.sleep(POLL_S)


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl: Callable[..., int] = libc.prctl
    return prctl


# --- paths and locks ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Paths:
    """Where one Job's files live."""

    ns_dir: Path
    name: str

    @property
    def job(self) -> Path:
        return self.ns_dir / f"{self.name}.json"

    @property
    def lock(self) -> Path:
        return self.ns_dir / f"{self.name}.lock"

    @property
    def tombstone(self) -> Path:
        return self.ns_dir / f"{self.name}.deleting"

    @property
    def logs(self) -> Path:
        return self.ns_dir / f"{self.name}.logs"

    @property
    def supervisor_log(self) -> Path:
        return self.logs / "supervisor.log"

    @property
    def secrets(self) -> Path:
        return self.ns_dir / "secrets"

    def secret(self, name: str) -> Path:
        return self.secrets / f"{name}.json"

    @classmethod
    def for_job_file(cls, path: Path) -> _Paths:
        return cls(ns_dir=path.parent, name=path.name.removesuffix(".json"))


def _lock_is_free(path: Path) -> bool:
    """True when no supervisor (or its watchdog) holds the Job's lock."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True  # never taken: the supervisor creates it
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the lock if we took it
    return True


def _remove_job_files(paths: _Paths) -> None:
    shutil.rmtree(paths.logs, ignore_errors=True)
    for path in (paths.job, paths.lock):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _job_targets(job: Mapping[str, Any], *, exclude: Collection[int] = ()) -> _Targets:
    """Every process a Job's state knows of, and its markers."""
    meta = job.get("metadata") or {}
    local = job.get("local") or {}
    uid = str(meta.get("uid") or "")
    groups = [
        (int(p["pgid"]), p.get("procStart"))
        for p in local.get("pods") or []
        if p.get("pgid") and p.get("phase") == "Running"
    ]
    pids: list[tuple[int, str | None]] = []
    sup = local.get("supervisor") or {}
    for key in ("pid", "watchdogPid"):
        if sup.get(key):
            pids.append((int(sup[key]), sup.get(f"{key}Start")))
    return _Targets(
        job_uids=frozenset({uid}) if uid else frozenset(),
        groups=tuple(groups),
        pids=tuple(pids),
        exclude=frozenset(exclude),
    )


# --- validation ---------------------------------------------------------------------------------


def _unsupported(what: str) -> InvalidInput:
    return InvalidInput(
        f"{what} is not supported by the local backend; remove it or run on Kubernetes"
    )


def _check_env(container: Mapping[str, Any], job_name: str) -> None:
    if container.get("envFrom"):
        raise _unsupported(f"Job '{job_name}': envFrom")
    for entry in container.get("env") or []:
        name = entry.get("name")
        if not name:
            raise InvalidInput(f"Job '{job_name}': every env entry needs a name")
        if "value" in entry and "valueFrom" in entry:
            raise InvalidInput(f"Job '{job_name}': env {name} has both value and valueFrom")
        source = entry.get("valueFrom")
        if source is None:
            continue
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"] or {}
            if not ref.get("name") or not ref.get("key"):
                raise InvalidInput(
                    f"Job '{job_name}': env {name}: secretKeyRef needs a name and a key"
                )
        elif "fieldRef" in source:
            path = str((source["fieldRef"] or {}).get("fieldPath") or "")
            if path not in _SUPPORTED_FIELDS and not _FIELD_LABEL.match(path):
                raise _unsupported(f"Job '{job_name}': env {name}: fieldRef {path!r}")
        else:
            kinds = ", ".join(sorted(source)) or "an empty valueFrom"
            raise _unsupported(f"Job '{job_name}': env {name}: {kinds}")


def _count(spec: Mapping[str, Any], key: str, job_name: str) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(
            f"Job '{job_name}': spec.{key} must be a whole number >= 0 (got {value!r})"
        )
    return value


def _prepare_job(job: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """A validated, defaulted deep copy of a Job dict (as the API server would store it)."""
    if job.get("kind", "Job") != "Job" or job.get("apiVersion", "batch/v1") != "batch/v1":
        raise InvalidInput("the local backend runs batch/v1 Jobs only")
    out: dict[str, Any] = json.loads(json.dumps(job))
    meta = out.setdefault("metadata", {})
    name = meta.get("name")
    if not name:
        raise _unsupported("a Job without metadata.name (generateName)")
    check_dns1123_label(str(name), "Job name")
    namespace = meta.setdefault("namespace", "default")
    check_dns1123_label(str(namespace), "namespace")
    labels = meta.setdefault("labels", {})
    for key, value in run_labels(run_id).items():
        if labels.setdefault(key, value) != value:
            raise InvalidInput(
                f"Job '{name}' carries {key}={labels[key]!r} but is created for run {run_id!r}; "
                "build it with this run's id"
            )
    spec = out.setdefault("spec", {})
    for key in _UNSUPPORTED_JOB_FIELDS:
        if spec.get(key) is not None:
            raise _unsupported(f"Job '{name}': spec.{key}")
    if spec.get("completionMode", "NonIndexed") != "NonIndexed":
        raise _unsupported(f"Job '{name}': completionMode {spec['completionMode']!r}")
    if spec.get("suspend"):
        raise _unsupported(f"Job '{name}': spec.suspend")
    completions = _count(spec, "completions", name)
    parallelism = _count(spec, "parallelism", name)
    backoff = _count(spec, "backoffLimit", name)
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and (not isinstance(deadline, int) or deadline < 1):
        raise InvalidInput(f"Job '{name}': activeDeadlineSeconds must be >= 1 (got {deadline!r})")
    if completions is None and parallelism is None:
        spec["completions"] = 1
    spec["parallelism"] = 1 if parallelism is None else parallelism
    spec["backoffLimit"] = 6 if backoff is None else backoff
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")

    template = spec.get("template") or {}
    pod_spec = template.get("spec") or {}
    for key in ("initContainers", "ephemeralContainers"):
        if pod_spec.get(key):
            raise _unsupported(f"Job '{name}': {key}")
    restart = pod_spec.get("restartPolicy")
    if restart != "Never":
        if restart == "OnFailure":
            raise _unsupported(f"Job '{name}': restartPolicy OnFailure")
        raise InvalidInput(
            f"Job '{name}': spec.template.spec.restartPolicy must be 'Never' (got {restart!r})"
        )
    containers = pod_spec.get("containers") or []
    if len(containers) != 1:
        raise _unsupported(f"Job '{name}': {len(containers)} containers (it runs exactly one)")
    container = containers[0]
    command = container.get("command")
    if not command or not all(isinstance(c, str) for c in command):
        raise InvalidInput(
            f"Job '{name}': the container needs an explicit command (a list of strings); the "
            "local backend has no image entrypoint to fall back on"
        )
    if not all(isinstance(a, str) for a in container.get("args") or []):
        raise InvalidInput(f"Job '{name}': container args must be strings")
    _check_env(container, name)
    return out


def _prepare_secret(secret: Mapping[str, Any], namespace: str, run_id: str) -> dict[str, Any]:
    if secret.get("kind", "Secret") != "Secret":
        raise InvalidInput("the secret argument must be a v1 Secret")
    out: dict[str, Any] = json.loads(json.dumps(secret))
    meta = out.setdefault("metadata", {})
    name = str(meta.get("name") or "")
    if not name or len(name) > 253 or not _SECRET_NAME.match(name):
        raise InvalidInput(
            f"Secret name {name!r} is not a valid DNS-1123 subdomain (lower-case letters, "
            "digits, '-' and '.')"
        )
    if meta.setdefault("namespace", namespace) != namespace:
        raise InvalidInput(
            f"Secret '{name}' and its Job must be in the same namespace (got "
            f"{meta['namespace']!r} and {namespace!r})"
        )
    labels = meta.setdefault("labels", {})
    for key, value in run_labels(run_id).items():
        labels.setdefault(key, value)
    return out


# --- the backend ----------------------------------------------------------------------------------


class LocalBackend:
    """A `JobBackend` that runs each pod of a Job as a local process (see the module docstring).

    ``state_dir`` holds the Jobs' state, logs and Secrets (default ``$QUEUEJOB_STATE_DIR`` or
    ``~/.cache/queuejob/local-jobs``); every process that uses the same directory sees the same
    Jobs. ``backoff_base_s``/``backoff_max_s`` set the pod failure back-off (Kubernetes: 10 s and
    6 min; short here so local runs stay quick) and ``grace_s`` the time between SIGTERM and
    SIGKILL when pods are stopped.
    """

    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 10.0,
        grace_s: float = 5.0,
    ) -> None:
        if backoff_base_s < 0 or backoff_max_s < 0 or grace_s < 0:
            raise InvalidInput("backoff_base_s, backoff_max_s and grace_s must be >= 0")
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.grace_s = float(grace_s)

    def __repr__(self) -> str:
        return f"LocalBackend(state_dir={str(self.state_dir)!r})"

    # --- lookups ----------------------------------------------------------------------------

    def _paths(self, namespace: str, name: str) -> _Paths:
        check_dns1123_label(namespace, "namespace")
        check_dns1123_label(name, "Job name")
        return _Paths(ns_dir=self.state_dir / namespace, name=name)

    def read_job(self, *, namespace: str, name: str) -> dict[str, Any] | None:
        """The Job object as last written by its supervisor (metadata, spec, status and the
        ``local`` pod bookkeeping), or None when there is no such Job."""
        return _read_json(self._paths(namespace, name).job)

    @staticmethod
    def _conflict(kind: str, namespace: str, name: str, other: str | None) -> JobConflict:
        owner = f"run '{other}'" if other else "no queuejob run"
        return JobConflict(
            f"{kind} '{name}' in namespace '{namespace}' already exists on the local backend and "
            f"belongs to {owner}; delete that run's objects (delete_run) or use another name "
            "prefix"
        )

    def find_job(self, *, namespace: str, name: str, run_id: str) -> JobHandle | None:
        """The run's Job if it exists; None when missing; `JobConflict` if another run owns it."""
        job = self.read_job(namespace=namespace, name=name)
        if job is None:
            return None
        other = run_id_of(job)
        if other != run_labels(run_id)[RUN_ID_LABEL]:
            raise self._conflict("Job", namespace, name, other)
        return JobHandle.from_job(job, run_id, adopted=True)

    # --- create ------------------------------------------------------------------------------

    def create_or_adopt(
        self, *, secret: dict[str, Any], job: dict[str, Any], run_id: str
    ) -> JobHandle:
        """Store the Secret, create the Job and start its supervisor; adopt the Job when it
        exists for the same run (restarting its supervisor if that one is gone).

        Raises `JobConflict` when the Job or the Secret belongs to another run, `InvalidInput`
        for a spec the local backend cannot run.
        """
        prepared = _prepare_job(job, run_id)
        meta = prepared["metadata"]
        namespace, name = str(meta["namespace"]), str(meta["name"])
        label = run_labels(run_id)[RUN_ID_LABEL]
        sec = _prepare_secret(secret, namespace, run_id)
        paths = self._paths(namespace, name)
        _mkdir_private(paths.ns_dir)
        _mkdir_private(paths.secrets)
        self._await_deletion(paths)

        # The Secret first, as on Kubernetes: one of this run is reused, another run's refused.
        sec_name = str(sec["metadata"]["name"])
        sec_path = paths.secret(sec_name)
        old_secret = _read_json(sec_path)
        if old_secret is not None and run_id_of(old_secret) != label:
            raise self._conflict("Secret", namespace, sec_name, run_id_of(old_secret))
        created_secret = old_secret is None
        del old_secret
        if created_secret:
            self._check_secret_refs(paths, prepared, {sec_name: sec})
            _write_json(sec_path, sec)
        try:
            return self._create_job(paths, prepared, run_id)
        except Exception as exc:
            if created_secret and not getattr(exc, "retryable", False):
                # Do not leave the broker URL behind for a Job that will never exist.
                with contextlib.suppress(FileNotFoundError):
                    sec_path.unlink()
            raise

    def _create_job(self, paths: _Paths, prepared: dict[str, Any], run_id: str) -> JobHandle:
        existing = _read_json(paths.job)
        if existing is not None:
            return self._adopt(paths, existing, run_id)
        self._check_secret_refs(paths, prepared, {})
        meta = prepared["metadata"]
        namespace, name = str(meta["namespace"]), str(meta["name"])
        now = time.time()
        uid = str(uuid.uuid4())
        meta.update(uid=uid, creationTimestamp=_iso(now), generation=1, resourceVersion="1")
        spec = prepared["spec"]
        selector = {"batch.kubernetes.io/controller-uid": uid}
        spec.setdefault("selector", {"matchLabels": selector})
        spec.setdefault("manualSelector", False)
        tmpl_meta = spec["template"].setdefault("metadata", {})
        tmpl_labels = tmpl_meta.setdefault("labels", {})
        tmpl_labels.update(
            {
                "batch.kubernetes.io/controller-uid": uid,
                "batch.kubernetes.io/job-name": name,
                "controller-uid": uid,
                "job-name": name,
            }
        )
        prepared["status"] = {}
        prepared["local"] = {
            "version": 1,
            "createdEpoch": now,
            "settings": {
                "backoffBaseSeconds": self.backoff_base_s,
                "backoffMaxSeconds": self.backoff_max_s,
                "graceSeconds": self.grace_s,
            },
            "supervisor": None,
            "pods": [],
        }
        try:
            _write_json(paths.job, prepared, exclusive=True)
        except FileExistsError:
            # Another process created it between our read and write: same rules as an adopt.
            current = _read_json(paths.job)
            if current is None:
                raise RetryableError(
                    f"Job '{name}' in namespace '{namespace}' appeared and vanished while being "
                    "created on the local backend; retry"
                ) from None
            return self._adopt(paths, current, run_id)
        self._start_supervisor(paths, previous_pid=None)
        return JobHandle.from_job(prepared, run_id, adopted=False)

    def _adopt(self, paths: _Paths, job: dict[str, Any], run_id: str) -> JobHandle:
        other = run_id_of(job)
        meta = job.get("metadata") or {}
        if other != run_labels(run_id)[RUN_ID_LABEL]:
            raise self._conflict("Job", str(meta.get("namespace")), paths.name, other)
        self._ensure_supervisor(paths, job)
        return JobHandle.from_job(job, run_id, adopted=True)

    def _await_deletion(self, paths: _Paths) -> None:
        """A Job being deleted cannot be re-created until its processes are gone."""
        deadline = time.monotonic() + self.grace_s + KILL_WAIT_S + 5.0
        while paths.tombstone.exists():
            if time.monotonic() >= deadline:
                raise RetryableError(
                    f"Job '{paths.name}' in namespace '{paths.ns_dir.name}' is still being "
                    "deleted on the local backend; retry in a few seconds"
                )
            time.sleep(POLL_S)

    @staticmethod
    def _check_secret_refs(
        paths: _Paths, job: Mapping[str, Any], pending: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """Every required secretKeyRef must resolve (Kubernetes would leave the pods pending)."""
        container = job["spec"]["template"]["spec"]["containers"][0]
        for entry in container.get("env") or []:
            ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
            if not ref or ref.get("optional"):
                continue
            secret = pending.get(str(ref["name"])) or _read_json(paths.secret(str(ref["name"])))
            if secret is None or _secret_value(secret, str(ref["key"])) is None:
                raise InvalidInput(
                    f"Job '{paths.name}': env {entry['name']} refers to key {ref['key']!r} of "
                    f"Secret '{ref['name']}', which does not exist; pass that Secret to "
                    "create_or_adopt"
                )

    def _ensure_supervisor(self, paths: _Paths, job: Mapping[str, Any]) -> None:
        """Start a supervisor for an unfinished Job that has none (a restarted controller)."""
        if paths.tombstone.exists() or job_state(job).terminal:
            return
        if _lock_is_free(paths.lock):
            previous = ((job.get("local") or {}).get("supervisor") or {}).get("pid")
            self._start_supervisor(paths, previous_pid=previous)

    def _start_supervisor(self, paths: _Paths, *, previous_pid: int | None) -> None:
        """Launch the Job's supervisor, detached, and wait until it has taken the Job over."""
        _mkdir_private(paths.logs)
        job = _read_json(paths.job) or {}
        meta = job.get("metadata") or {}
        env = {k: v for k, v in os.environ.items() if k in _INHERITED_ENV or k.startswith("LC_")}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p
        )
        env[JOB_UID_ENV] = str(meta.get("uid") or "")
        env[RUN_ENV] = _run_marker(paths.ns_dir.name, str(run_id_of(job) or ""))
        fd = os.open(paths.supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "flows.adapters.local_jobs", "supervise", str(paths.job)],
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                env=env,
                start_new_session=True,
            )
        finally:
            os.close(fd)
        # The launcher forks the supervisor off and exits at once, so the supervisor is nobody's
        # child here: no zombie is left in the flow's process whatever happens to it.
        try:
            rc = launcher.wait(timeout=SUPERVISOR_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
            rc = -9
        if rc != 0:
            raise RetryableError(
                f"the supervisor of Job '{paths.name}' in namespace '{paths.ns_dir.name}' did not "
                f"start (exit code {rc}); see {paths.supervisor_log}"
            )
        deadline = time.monotonic() + SUPERVISOR_START_TIMEOUT_S
        while time.monotonic() < deadline:
            current = _read_json(paths.job)
            if current is None or paths.tombstone.exists():
                return  # deleted meanwhile: wait() will say so
            sup = (current.get("local") or {}).get("supervisor") or {}
            if (sup.get("pid") and sup.get("pid") != previous_pid) or job_state(current).terminal:
                return
            if previous_pid is not None and not _lock_is_free(paths.lock):
                return  # someone else's supervisor (or the old watchdog) holds the Job
            time.sleep(POLL_S)
        raise RetryableError(
            f"the supervisor of Job '{paths.name}' in namespace '{paths.ns_dir.name}' did not "
            f"take the Job over within {SUPERVISOR_START_TIMEOUT_S:g} s; see "
            f"{paths.supervisor_log}"
        )

    # --- wait --------------------------------------------------------------------------------

    def _gone(self, handle: JobHandle) -> KubeNotFound:
        return KubeNotFound(
            f"Job '{handle.name}' in namespace '{handle.namespace}' was deleted while waiting for "
            "it (by a cleanup, a TTL or by hand); its outcome is unknown: check the run's ledger"
        )

    def _read_handle(self, handle: JobHandle) -> dict[str, Any] | None:
        job = _read_json(self._paths(handle.namespace, handle.name).job)
        if job is None:
            return None
        if handle.uid and (job.get("metadata") or {}).get("uid") != handle.uid:
            return None  # a new Job with the same name is not the one we waited for
        return job

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
        ``FailureTarget`` count). Raises `JobTimeout` after ``timeout_s`` seconds, `KubeNotFound`
        when the Job is deleted meanwhile, and whatever ``on_update`` raises. A supervisor found
        dead before the Job finished is replaced.
        """
        paths = self._paths(handle.namespace, handle.name)
        start = time.monotonic()
        deadline = start + timeout_s
        last_sig: tuple[int, int, int] | None = None
        state: JobState | None = None
        last_notice = 0.0
        last_check = start
        while True:
            try:
                st = paths.job.stat()
                sig: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                sig = None
            if sig is None:
                raise self._gone(handle)
            if sig != last_sig:
                job = self._read_handle(handle)
                if job is None:
                    raise self._gone(handle)
                last_sig = sig
                new = job_state(job)
                if new != state:
                    state = new
                    if on_update is not None:
                        on_update(state)
                    last_notice = time.monotonic()
                if state.phase.decided:
                    return state
            assert state is not None
            now = time.monotonic()
            if now >= deadline:
                raise JobTimeout(
                    f"Job '{handle.name}' in namespace '{handle.namespace}' was not finished "
                    f"after {timeout_s:g} s ({state.describe()}); raise the wait timeout or look "
                    f"at its pod logs under {paths.logs}"
                )
            if on_update is not None and now - last_notice >= tick_s:
                on_update(state)  # heartbeat: lets the caller poll the broker
                last_notice = time.monotonic()
            if now - last_check >= 1.0:
                last_check = now
                current = self._read_handle(handle)
                if current is None:
                    raise self._gone(handle)
                self._ensure_supervisor(paths, current)
            time.sleep(max(0.0, min(POLL_S, deadline - time.monotonic())))

    # --- pods and logs -----------------------------------------------------------------------

    def _sensitive(self, paths: _Paths, job: Mapping[str, Any]) -> list[str]:
        containers = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
            "containers"
        ) or []
        names = {
            str(ref["name"])
            for c in containers
            for e in c.get("env") or []
            if (ref := (e.get("valueFrom") or {}).get("secretKeyRef")) and ref.get("name")
        }
        secrets = [s for n in sorted(names) if (s := _read_json(paths.secret(n))) is not None]
        return _sensitive_strings(secrets)

    def failure_details(self, handle: JobHandle, *, tail_lines: int = 20) -> list[PodFailure]:
        """One entry per failed pod, in start order: exit code, reason and the last log lines
        (Secret values scrubbed)."""
        paths = self._paths(handle.namespace, handle.name)
        job = self._read_handle(handle)
        if job is None:
            return []
        sensitive = self._sensitive(paths, job)
        out: list[PodFailure] = []
        for pod in (job.get("local") or {}).get("pods") or []:
            if pod.get("phase") != "Failed":
                continue
            log_path = paths.logs / f"{pod['name']}.log"
            text = _tail(log_path, tail_lines) if log_path.exists() else ""
            if not text and tail_lines > 0:
                text = "\n".join((pod.get("logTail") or [])[-tail_lines:])
            out.append(
                PodFailure(
                    pod=str(pod["name"]),
                    exit_code=pod.get("exitCode"),
                    reason=pod.get("reason"),
                    log_tail=_scrub(text, sensitive),
                )
            )
        return out

    def pod_logs(self, handle: JobHandle) -> dict[str, str]:
        """Pod name -> the last lines of its output (stdout and stderr), Secret values
        scrubbed; for the ledger. Pods are in start order."""
        paths = self._paths(handle.namespace, handle.name)
        job = self._read_handle(handle)
        if job is None:
            return {}
        sensitive = self._sensitive(paths, job)
        return {
            str(pod["name"]): _scrub(
                _tail(paths.logs / f"{pod['name']}.log", LOG_TAIL_LINES), sensitive
            )
            for pod in (job.get("local") or {}).get("pods") or []
        }

    # --- delete ------------------------------------------------------------------------------

    def delete_run(
        self, *, namespace: str, run_id: str, propagation: Propagation = "Background"
    ) -> int:
        """Delete every Job labelled with the run, its pods and the run's Secrets.

        Works from any process: the supervisors and every pod process group are stopped (SIGTERM,
        then SIGKILL after the grace period) and this returns only once they are gone, whatever
        ``propagation`` says. Processes still marked with the run are stopped as well, even when
        their state file is missing. Returns how many Jobs were deleted; missing ones are not an
        error.
        """
        del propagation  # both policies end with every process gone before this returns
        check_dns1123_label(namespace, "namespace")
        label = run_labels(run_id)[RUN_ID_LABEL]
        ns_dir = self.state_dir / namespace
        found: list[tuple[_Paths, dict[str, Any]]] = []
        if ns_dir.is_dir():
            for path in sorted(ns_dir.glob("*.json")):
                job = _read_json(path)
                if job is not None and run_id_of(job) == label:
                    found.append((_Paths.for_job_file(path), job))
        for paths, _ in found:
            paths.tombstone.touch(mode=0o600, exist_ok=True)  # no supervisor may (re)start now
        uids: set[str] = set()
        groups: list[tuple[int, str | None]] = []
        pids: list[tuple[int, str | None]] = []
        for _, job in found:
            t = _job_targets(job)
            uids |= t.job_uids
            groups += t.groups
            pids += t.pids
        targets = _Targets(
            job_uids=frozenset(uids),
            run=_run_marker(namespace, label),
            groups=tuple(groups),
            pids=tuple(pids),
        )
        left = _stop_processes(targets, grace_s=self.grace_s)
        if left:
            raise RetryableError(
                f"{len(left)} process(es) of run '{label}' in namespace '{namespace}' did not "
                f"exit after SIGKILL (pids {left[:10]}); retry the delete"
            )
        for paths, _ in found:
            _remove_job_files(paths)
        secrets_dir = ns_dir / "secrets"
        if secrets_dir.is_dir():
            for path in secrets_dir.glob("*.json"):
                secret = _read_json(path)
                if secret is not None and run_id_of(secret) == label:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
        for paths, _ in found:
            with contextlib.suppress(FileNotFoundError):
                paths.tombstone.unlink()
        return len(found)


# --- the supervisor (the Job controller of one Job) -----------------------------------------------


class _Supervisor:
    """Runs one Job's pods with Job semantics and keeps its state file up to date."""

    def __init__(self, job_file: Path) -> None:
        self.paths = _Paths.for_job_file(job_file)
        self.job: dict[str, Any] = {}
        self.popens: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.watchdog_pid: int | None = None
        self.watchdog_w: int | None = None
        self.lock_fd: int | None = None
        self.prctl = _libc_prctl()
        self.dirty = False
        self.rv = 1
        self.supervisor_pid = os.getpid()
        self.written: tuple[int, int, int] | None = None
        self.wake_r: int | None = None

    # --- setup ---

    def _take_lock(self) -> bool:
        self.lock_fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        # Another process may hold the lock for an instant to probe it: retry briefly.
        deadline = time.monotonic() + 2.0
        while True:
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_signal_child(self, signum: int, frame: object) -> None:
        """Nothing to do: the wakeup pipe has already woken the loop."""

    def _nap(self, seconds: float) -> None:
        """Sleep up to ``seconds``, less when a signal (a pod's exit) arrives."""
        if self.wake_r is None:
            time.sleep(seconds)
            return
        select.select([self.wake_r], [], [], seconds)
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 4096)

    def _start_watchdog(self) -> None:
        """Fork the watchdog: when the supervisor dies, it stops the Job's process groups."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the watchdog
            try:
                os.close(write_fd)
                os.setsid()  # its own session: killing the supervisor's group spares it
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                _watchdog(read_fd, self.paths, self.uid, self.grace_s)
            finally:
                os._exit(0)
        os.close(read_fd)
        if self.watchdog_w is not None:
            os.close(self.watchdog_w)
        self.watchdog_w = write_fd
        self.watchdog_pid = pid
        sup = self.local.setdefault("supervisor", {}) or {}
        sup["watchdogPid"] = pid
        sup["watchdogPidStart"] = _proc_start(pid)
        self.local["supervisor"] = sup
        self.dirty = True

    def _check_watchdog(self) -> None:
        if self.watchdog_pid is None or self.stopping:
            return
        try:
            done, _ = os.waitpid(self.watchdog_pid, os.WNOHANG)
        except ChildProcessError:
            done = self.watchdog_pid
        if done:
            self._say("the watchdog exited; starting a new one")
            self._start_watchdog()

    # --- accessors ---

    @property
    def local(self) -> dict[str, Any]:
        local: dict[str, Any] = self.job["local"]
        return local

    @property
    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.job["spec"]
        return spec

    @property
    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.job.setdefault("status", {})
        return status

    @property
    def uid(self) -> str:
        return str(self.job["metadata"]["uid"])

    @property
    def grace_s(self) -> float:
        return float(self.local["settings"]["graceSeconds"])

    @property
    def pods(self) -> list[dict[str, Any]]:
        pods: list[dict[str, Any]] = self.local.setdefault("pods", [])
        return pods

    def _running(self) -> list[dict[str, Any]]:
        return [p for p in self.pods if p["phase"] == "Running"]

    def _conditions(self) -> list[dict[str, Any]]:
        conds: list[dict[str, Any]] = self.status.get("conditions") or []
        return conds

    def _has(self, kind: str) -> dict[str, Any] | None:
        return next((c for c in self._conditions() if c["type"] == kind), None)

    def _decided(self) -> dict[str, Any] | None:
        return self._has("FailureTarget") or self._has("SuccessCriteriaMet")

    def _terminal(self) -> bool:
        return bool(self._has("Failed") or self._has("Complete"))

    def _add_condition(self, kind: str, reason: str, message: str, now: float) -> None:
        stamp = _iso(now)
        conds = self._conditions()
        conds.append(
            {
                "type": kind,
                "status": "True",
                "lastProbeTime": stamp,
                "lastTransitionTime": stamp,
                "reason": reason,
                "message": message,
            }
        )
        self.status["conditions"] = conds
        self.dirty = True

    def _still_ours(self) -> bool:
        """False when the state file was removed or replaced since our last write (the Job was
        deleted, perhaps re-created under the same name): then it must not be written again."""
        if self.written is None:
            return self.paths.job.exists()
        try:
            st = self.paths.job.stat()
        except FileNotFoundError:
            return False
        return (st.st_ino, st.st_mtime_ns, st.st_size) == self.written

    def _write(self) -> None:
        if not self._still_ours():
            self.stopping = True
            return
        self.rv += 1
        self.job["metadata"]["resourceVersion"] = str(self.rv)
        _write_json(self.paths.job, self.job)
        st = self.paths.job.stat()
        self.written = (st.st_ino, st.st_mtime_ns, st.st_size)
        self.dirty = False

    def _say(self, message: str) -> None:
        """A line in the supervisor's log (never a Secret value)."""
        print(f"{_iso(time.time())} {message}", file=sys.stderr, flush=True)

    # --- main loop ---

    def run(self) -> int:
        if not self._take_lock():
            self._say("another supervisor holds this Job; exiting")
            return 0
        if self.paths.tombstone.exists():
            return 0
        job = _read_json(self.paths.job)
        if job is None:
            return 0
        self.job = job
        self.supervisor_pid = os.getpid()
        self.rv = int(job["metadata"].get("resourceVersion") or 1)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        # A pod that exits wakes the loop at once (SIGCHLD through the wakeup pipe) instead of
        # at the next poll: in coarse mode that is per-item latency.
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, self._on_signal_child)
        if self._terminal():
            self._after_finish()
            return 0
        self.local["supervisor"] = {
            "pid": os.getpid(),
            "pidStart": _proc_start(os.getpid()),
            "startedAt": _iso(time.time()),
        }
        self._start_watchdog()
        self._resume(time.time())
        self._write()
        self._say(f"supervising Job {self.paths.name} (uid {self.uid})")
        while True:
            if self.stopping or self.paths.tombstone.exists():
                self._say("deleted: stopping the pods")
                self._shutdown()
                return 0
            now = time.time()
            self._check_watchdog()
            self._reap(now)
            self._escalate(now)
            self._reconcile(now)
            self._refresh_status(now)
            if self.dirty:
                self._write()
            if self._terminal():
                break
            self._nap(POLL_S)
        self._after_finish()
        return 0

    def _resume(self, now: float) -> None:
        """Take over from a supervisor that died: its pods were stopped by its watchdog and
        count as failed, as pods lost with their node do."""
        lost = self._running()
        if not lost:
            return
        _stop_processes(_job_targets(self.job, exclude={os.getpid(), self.watchdog_pid or 0}),
                        grace_s=0.0)  # fmt: skip
        for pod in lost:
            pod.update(
                phase="Failed",
                exitCode=None,
                reason="Lost",
                message="the pod's supervisor stopped; the pod was killed",
                finishedAt=_iso(now),
                finishedEpoch=now,
            )
            self._note_failure(now)
        self.dirty = True

    def _shutdown(self) -> None:
        """Deleted: stop every pod (SIGTERM, SIGKILL after the grace period) and exit."""
        now = time.time()
        for pod in self._running():
            self._terminate(pod, now, reason=None)
        deadline = time.monotonic() + self.grace_s
        while self._running() and time.monotonic() < deadline:
            self._reap(time.time())
            self._nap(POLL_S)
        for pod in self._running():
            _signal_group(int(pod["pgid"]), signal.SIGKILL)
        for name, popen in list(self.popens.items()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=KILL_WAIT_S)
            if popen.returncode is not None:
                pod = self._pod(name)
                if pod["phase"] == "Running":
                    self._finish(pod, popen.returncode, time.time())
        self._refresh_status(time.time())
        if not self.paths.tombstone.exists():
            self._write()

    def _after_finish(self) -> None:
        """Honour ttlSecondsAfterFinished: the finished Job removes itself after that time."""
        ttl = self.spec.get("ttlSecondsAfterFinished")
        if ttl is None:
            return
        finished = float(self.local.get("finishedEpoch") or time.time())
        while time.time() < finished + float(ttl):
            if self.stopping or self.paths.tombstone.exists():
                return
            time.sleep(min(0.5, max(0.0, finished + float(ttl) - time.time())))
        self.paths.tombstone.touch(mode=0o600, exist_ok=True)
        try:
            # The run's Secrets the Job uses go with it, as Secrets owned by a Job do.
            label = run_id_of(self.job)
            for name, secret in self._secrets().items():
                if run_id_of(secret) == label:
                    with contextlib.suppress(FileNotFoundError):
                        self.paths.secret(name).unlink()
            _remove_job_files(self.paths)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.paths.tombstone.unlink()

    # --- pods ---

    def _pod(self, name: str) -> dict[str, Any]:
        return next(p for p in self.pods if p["name"] == name)

    def _reap(self, now: float) -> None:
        for pod in self._running():
            popen = self.popens.get(pod["name"])
            if popen is None:
                continue
            rc = popen.poll()
            if rc is not None:
                self._finish(pod, rc, now)

    def _finish(self, pod: dict[str, Any], rc: int, now: float) -> None:
        self.popens.pop(pod["name"], None)
        # The container ends with its main process: whatever it left behind goes, in its group
        # or not (the worker runs the user's command in a process group of its own).
        _signal_group(int(pod["pgid"]), signal.SIGKILL)
        _stop_processes(_Targets(pod_uids=frozenset({str(pod["uid"])})), grace_s=0.0)
        exit_code = rc if rc >= 0 else 128 - rc
        killed = pod.get("terminatingSince") is not None
        succeeded = exit_code == 0 and not killed
        pod.update(
            phase="Succeeded" if succeeded else "Failed",
            exitCode=exit_code,
            reason="Completed" if exit_code == 0 else "Error",
            finishedAt=_iso(now),
            finishedEpoch=now,
        )
        self._say(f"pod {pod['name']} ended with exit code {exit_code}")
        if succeeded:
            self.local["failuresSinceSuccess"] = 0
        else:
            self._note_failure(now)
            tail = _tail(self.paths.logs / f"{pod['name']}.log", LOG_TAIL_LINES)
            sensitive = self._sensitive()
            pod["logTail"] = _scrub(tail, sensitive).splitlines()
        self.dirty = True

    def _note_failure(self, now: float) -> None:
        self.local["failuresSinceSuccess"] = int(self.local.get("failuresSinceSuccess") or 0) + 1
        self.local["lastFailureEpoch"] = now

    def _terminate(self, pod: dict[str, Any], now: float, *, reason: str | None) -> None:
        if pod.get("terminatingSince") is not None:
            return
        pod["terminatingSince"] = now
        if reason:
            pod["message"] = reason
        _signal_group(int(pod["pgid"]), signal.SIGTERM)
        self.dirty = True

    def _escalate(self, now: float) -> None:
        for pod in self._running():
            since = pod.get("terminatingSince")
            if since is not None and not pod.get("killed") and now - since >= self.grace_s:
                _signal_group(int(pod["pgid"]), signal.SIGKILL)
                pod["killed"] = True

    def _secrets(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for entry in self._container().get("env") or []:
            ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
            if ref and ref["name"] not in out:
                secret = _read_json(self.paths.secret(str(ref["name"])))
                if secret is not None:
                    out[str(ref["name"])] = secret
        return out

    def _sensitive(self) -> list[str]:
        return _sensitive_strings(self._secrets().values())

    def _container(self) -> dict[str, Any]:
        container: dict[str, Any] = self.spec["template"]["spec"]["containers"][0]
        return container

    def _pod_env(self, name: str, pod_uid: str) -> tuple[dict[str, str], dict[str, str]]:
        """The pod's environment, as the kubelet would build it, and the variables the
        container defines (for ``$(VAR)`` references). Raises ValueError with a message for a
        missing Secret key."""
        env = {k: v for k, v in os.environ.items() if k in _INHERITED_ENV or k.startswith("LC_")}
        env["HOSTNAME"] = name
        defined: dict[str, str] = {}
        secrets = self._secrets()
        meta = self.spec["template"].get("metadata") or {}
        fields = {
            "metadata.name": name,
            "metadata.namespace": str(self.job["metadata"]["namespace"]),
            "metadata.uid": pod_uid,
            "spec.nodeName": "localhost",
            "spec.serviceAccountName": str(
                self.spec["template"]["spec"].get("serviceAccountName") or "default"
            ),
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        for entry in self._container().get("env") or []:
            key = str(entry["name"])
            source = entry.get("valueFrom")
            if source is None:
                env[key] = _expand(str(entry.get("value", "")), defined)
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = secrets.get(str(ref["name"]))
                value = _secret_value(secret, str(ref["key"])) if secret else None
                if value is None:
                    if ref.get("optional"):
                        continue
                    raise ValueError(
                        f"couldn't find key {ref['key']} in Secret "
                        f"{self.job['metadata']['namespace']}/{ref['name']}"
                    )
                env[key] = value
            else:
                path = str(source["fieldRef"]["fieldPath"])
                match = _FIELD_LABEL.match(path)
                if match:
                    env[key] = str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
                else:
                    env[key] = fields[path]
            defined[key] = env[key]
        env[JOB_UID_ENV] = self.uid
        env[RUN_ENV] = os.environ.get(RUN_ENV, "")
        env[POD_ENV] = pod_uid
        return env, defined

    def _argv(self, env: dict[str, str], defined: Mapping[str, str]) -> list[str]:
        container = self._container()
        argv = [
            _expand(a, defined) for a in (*container["command"], *(container.get("args") or []))
        ]
        if argv[:2] == ["queuejob", "worker"]:
            # Run the worker module with this interpreter: no console script needed, and none of
            # the CLI's imports.
            argv = [sys.executable, "-m", "flows.worker", *argv[2:]]
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
            )
            env.setdefault("PYTHONUNBUFFERED", "1")
        return argv

    def _preexec(self) -> None:
        """In the pod's process before exec: die with the supervisor (Linux)."""
        if self.prctl is not None:
            self.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self.supervisor_pid:
            os._exit(137)  # the supervisor died before prctl took effect

    def _new_pod_name(self) -> str:
        taken = {p["name"] for p in self.pods}
        while True:
            suffix = "".join(random.choices(_POD_SUFFIX_ALPHABET, k=5))
            name = f"{self.job['metadata']['name']}-{suffix}"
            if name not in taken:
                return name

    def _start_pod(self, now: float) -> None:
        name = self._new_pod_name()
        pod_uid = str(uuid.uuid4())
        pod: dict[str, Any] = {
            "name": name,
            "uid": pod_uid,
            "phase": "Running",
            "startedAt": _iso(now),
            "startEpoch": now,
        }
        self.pods.append(pod)
        self.dirty = True
        log_path = self.paths.logs / f"{name}.log"
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            try:
                env, defined = self._pod_env(name, pod_uid)
            except ValueError as exc:
                self._fail_to_start(pod, fd, "CreateContainerConfigError", str(exc), now)
                return
            argv = self._argv(env, defined)
            container = self._container()
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=fd,
                    stderr=fd,
                    env=env,
                    cwd=container.get("workingDir") or None,
                    start_new_session=True,
                    preexec_fn=self._preexec,
                )
            except OSError as exc:
                what = exc.filename or argv[0]
                self._fail_to_start(pod, fd, "StartError", f"{what}: {exc.strerror}", now)
                return
        finally:
            os.close(fd)
        self.popens[name] = popen
        pod.update(pid=popen.pid, pgid=popen.pid, procStart=_proc_start(popen.pid))
        self._say(f"pod {name} started (pid {popen.pid})")

    def _fail_to_start(
        self, pod: dict[str, Any], fd: int, reason: str, message: str, now: float
    ) -> None:
        os.write(fd, f"queuejob local backend: {reason}: {message}\n".encode())
        self._say(f"pod {pod['name']} could not start: {reason}: {message}")
        pod.update(
            phase="Failed",
            exitCode=128,
            reason=reason,
            message=message,
            finishedAt=_iso(now),
            finishedEpoch=now,
            logTail=[f"queuejob local backend: {reason}: {message}"],
        )
        self._note_failure(now)

    # --- the Job controller's decisions ---

    def _reconcile(self, now: float) -> None:
        spec = self.spec
        if not self.status.get("startTime"):
            self.status["startTime"] = _iso(now)
            self.local["startEpoch"] = now
            self.dirty = True
        running = self._running()
        active = [p for p in running if p.get("terminatingSince") is None]
        succeeded = sum(1 for p in self.pods if p["phase"] == "Succeeded")
        failed = sum(1 for p in self.pods if p["phase"] == "Failed")
        completions = spec.get("completions")
        if self._decided() is None:
            deadline = spec.get("activeDeadlineSeconds")
            start = float(self.local.get("startEpoch") or now)
            if deadline is not None and now - start >= float(deadline):
                self._add_condition("FailureTarget", DEADLINE_REASON, DEADLINE_MESSAGE, now)
            elif failed > int(spec["backoffLimit"]):
                self._add_condition("FailureTarget", BACKOFF_REASON, BACKOFF_MESSAGE, now)
            elif (completions is not None and succeeded >= int(completions)) or (
                completions is None and succeeded > 0 and not running
            ):
                self._add_condition("SuccessCriteriaMet", SUCCESS_REASON, SUCCESS_MESSAGE, now)
            decided = self._decided()
            if decided is not None:
                for pod in active:
                    self._terminate(pod, now, reason=str(decided["reason"]))
                return
            self._start_wanted(now, active, succeeded, completions)
            return
        if not running and not self._terminal():
            decided = self._decided()
            assert decided is not None
            if decided["type"] == "SuccessCriteriaMet":
                self._add_condition("Complete", SUCCESS_REASON, SUCCESS_MESSAGE, now)
                self.status["completionTime"] = _iso(now)
            else:
                self._add_condition("Failed", str(decided["reason"]), str(decided["message"]), now)
            self.local["finishedEpoch"] = now

    def _start_wanted(
        self, now: float, active: list[dict[str, Any]], succeeded: int, completions: int | None
    ) -> None:
        parallelism = int(self.spec["parallelism"])
        if completions is None:
            # Work-queue mode: after one success no new pod starts; the rest finish on their own.
            want = parallelism if succeeded == 0 else 0
        else:
            want = min(parallelism, int(completions) - succeeded)
        missing = want - len(active)
        if missing <= 0 or self.stopping or self.paths.tombstone.exists():
            return
        failures = int(self.local.get("failuresSinceSuccess") or 0)
        if failures > 0:
            settings = self.local["settings"]
            delay = min(
                float(settings["backoffBaseSeconds"]) * 2 ** (failures - 1),
                float(settings["backoffMaxSeconds"]),
            )
            if now < float(self.local.get("lastFailureEpoch") or 0) + delay:
                return
        for _ in range(missing):
            self._start_pod(now)

    def _refresh_status(self, now: float) -> None:
        running = self._running()
        active = sum(1 for p in running if p.get("terminatingSince") is None)
        terminating = len(running) - active
        succeeded = sum(1 for p in self.pods if p["phase"] == "Succeeded")
        failed = sum(1 for p in self.pods if p["phase"] == "Failed")
        status: dict[str, Any] = {}
        if self._conditions():
            status["conditions"] = self._conditions()
        if self.status.get("startTime"):
            status["startTime"] = self.status["startTime"]
        if self.status.get("completionTime"):
            status["completionTime"] = self.status["completionTime"]
        # Kubernetes omits the zero counters but always writes terminating and ready.
        for key, value in (("active", active), ("succeeded", succeeded), ("failed", failed)):
            if value:
                status[key] = value
        status["terminating"] = terminating
        status["uncountedTerminatedPods"] = {}
        status["ready"] = active
        if status != self.job.get("status"):
            self.job["status"] = status
            self.dirty = True


def _watchdog(read_fd: int, paths: _Paths, job_uid: str, grace_s: float) -> None:
    """Block until the supervisor's end of the pipe closes (it exited or was killed), then stop
    whatever is left of the Job's processes."""
    while True:
        try:
            chunk = os.read(read_fd, 64)
        except InterruptedError:
            continue
        if not chunk:
            break
    job = _read_json(paths.job) or {}
    if (job.get("metadata") or {}).get("uid") != job_uid:
        job = {"metadata": {"uid": job_uid}}  # deleted, perhaps re-created: not ours to read
    targets = _job_targets(job, exclude={os.getpid()})
    if not targets.job_uids:
        targets = _Targets(
            job_uids=frozenset({job_uid}), groups=targets.groups, exclude=targets.exclude
        )
    # The supervisor's own pid is in the targets; it is dead (or a zombie) by now.
    left = _stop_processes(targets, grace_s=grace_s)
    if left:
        print(f"watchdog: pids {left} did not exit", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.adapters.local_jobs supervise <job state file>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "supervise":
        print("usage: python -m flows.adapters.local_jobs supervise <job state file>",
              file=sys.stderr)  # fmt: skip
        return 2
    job_file = Path(args[1])
    # Detach: the launcher exits at once, the supervisor lives on in a session of its own and is
    # adopted by init, so the caller never has to reap it.
    if os.fork() != 0:
        os._exit(0)
    os.setsid()
    try:
        return _Supervisor(job_file).run()
    except Exception as exc:  # pragma: no cover - logged for the operator, then re-raised
        print(f"supervisor failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
