"""The local backend's API: create or adopt, wait, failures, logs and deletion (`LocalBackend`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from queuejob.flows.adapters.local.common import (
    INHERITED_ENV,
    JOB_UID_ENV,
    KILL_WAIT_S,
    LOG_TAIL_LINES,
    POLL_S,
    RUN_ENV,
    SUPERVISOR_START_TIMEOUT_S,
    default_state_dir,
    iso,
    mkdir_private,
    read_json,
    run_marker,
    scrub,
    secret_value,
    sensitive_strings,
    tail_of_file,
    write_json,
)
from queuejob.flows.adapters.local.processes import Targets, job_targets, stop_processes
from queuejob.flows.adapters.local.spec import prepare_job, prepare_secret
from queuejob.flows.adapters.local.state import Paths, lock_is_free, remove_job_files
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
    KubeNotFound,
    RetryableError,
)
from queuejob.flows.core.job_status import JobState, PodDisruption, job_state
from queuejob.flows.core.manifest import RUN_ID_LABEL, check_dns1123_label, run_labels
from queuejob.flows.core.pod_failure import disruption_of
from queuejob.flows.core.pods import StartLimits

# --- the backend ----------------------------------------------------------------------------------


def local_state(job: Mapping[str, Any]) -> JobState:
    """`job_state` of a local Job, with the pods it disrupted (its supervisor went away)."""
    disruptions = []
    for pod in (job.get("local") or {}).get("pods") or []:
        cond = disruption_of(pod.get("conditions") or ())
        if cond is not None and pod.get("phase") == "Failed":
            disruptions.append(
                PodDisruption(
                    pod=str(pod["name"]),
                    reason=cond.get("reason"),
                    message=cond.get("message"),
                    counted=not pod.get("ignored"),
                )
            )
    return dataclasses.replace(job_state(job), disruptions=tuple(disruptions))


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

    def _paths(self, namespace: str, name: str) -> Paths:
        check_dns1123_label(namespace, "namespace")
        check_dns1123_label(name, "Job name")
        return Paths(ns_dir=self.state_dir / namespace, name=name)

    def read_job(self, *, namespace: str, name: str) -> dict[str, Any] | None:
        """The Job object as last written by its supervisor (metadata, spec, status and the
        ``local`` pod bookkeeping), or None when there is no such Job."""
        return read_json(self._paths(namespace, name).job)

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
        prepared = prepare_job(job, run_id)
        meta = prepared["metadata"]
        namespace, name = str(meta["namespace"]), str(meta["name"])
        label = run_labels(run_id)[RUN_ID_LABEL]
        sec = prepare_secret(secret, namespace, run_id)
        paths = self._paths(namespace, name)
        mkdir_private(paths.ns_dir)
        mkdir_private(paths.secrets)
        self._await_deletion(paths)

        # The Secret first, as on Kubernetes: one of this run is reused, another run's refused.
        sec_name = str(sec["metadata"]["name"])
        sec_path = paths.secret(sec_name)
        old_secret = read_json(sec_path)
        if old_secret is not None and run_id_of(old_secret) != label:
            raise self._conflict("Secret", namespace, sec_name, run_id_of(old_secret))
        created_secret = old_secret is None
        del old_secret
        if created_secret:
            self._check_secret_refs(paths, prepared, {sec_name: sec})
            write_json(sec_path, sec)
        try:
            return self._create_job(paths, prepared, run_id)
        except Exception as exc:
            if created_secret and not getattr(exc, "retryable", False):
                # Do not leave the broker URL behind for a Job that will never exist.
                with contextlib.suppress(FileNotFoundError):
                    sec_path.unlink()
            raise

    def _create_job(self, paths: Paths, prepared: dict[str, Any], run_id: str) -> JobHandle:
        existing = read_json(paths.job)
        if existing is not None:
            return self._adopt(paths, existing, run_id)
        self._check_secret_refs(paths, prepared, {})
        meta = prepared["metadata"]
        namespace, name = str(meta["namespace"]), str(meta["name"])
        now = time.time()
        uid = str(uuid.uuid4())
        meta.update(uid=uid, creationTimestamp=iso(now), generation=1, resourceVersion="1")
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
            write_json(paths.job, prepared, exclusive=True)
        except FileExistsError:
            # Another process created it between our read and write: same rules as an adopt.
            current = read_json(paths.job)
            if current is None:
                raise RetryableError(
                    f"Job '{name}' in namespace '{namespace}' appeared and vanished while being "
                    "created on the local backend; retry"
                ) from None
            return self._adopt(paths, current, run_id)
        self._start_supervisor(paths, previous_pid=None)
        return JobHandle.from_job(prepared, run_id, adopted=False)

    def _adopt(self, paths: Paths, job: dict[str, Any], run_id: str) -> JobHandle:
        other = run_id_of(job)
        meta = job.get("metadata") or {}
        if other != run_labels(run_id)[RUN_ID_LABEL]:
            raise self._conflict("Job", str(meta.get("namespace")), paths.name, other)
        self._ensure_supervisor(paths, job)
        return JobHandle.from_job(job, run_id, adopted=True)

    def _await_deletion(self, paths: Paths) -> None:
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
        paths: Paths, job: Mapping[str, Any], pending: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """Every required secretKeyRef must resolve (Kubernetes would leave the pods pending)."""
        container = job["spec"]["template"]["spec"]["containers"][0]
        for entry in container.get("env") or []:
            ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
            if not ref or ref.get("optional"):
                continue
            secret = pending.get(str(ref["name"])) or read_json(paths.secret(str(ref["name"])))
            if secret is None or secret_value(secret, str(ref["key"])) is None:
                raise InvalidInput(
                    f"Job '{paths.name}': env {entry['name']} refers to key {ref['key']!r} of "
                    f"Secret '{ref['name']}', which does not exist; pass that Secret to "
                    "create_or_adopt"
                )

    def _ensure_supervisor(self, paths: Paths, job: Mapping[str, Any]) -> None:
        """Start a supervisor for an unfinished Job that has none (a restarted controller)."""
        if paths.tombstone.exists() or job_state(job).terminal:
            return
        if lock_is_free(paths.lock):
            previous = ((job.get("local") or {}).get("supervisor") or {}).get("pid")
            self._start_supervisor(paths, previous_pid=previous)

    def _start_supervisor(self, paths: Paths, *, previous_pid: int | None) -> None:
        """Launch the Job's supervisor, detached, and wait until it has taken the Job over."""
        mkdir_private(paths.logs)
        job = read_json(paths.job) or {}
        meta = job.get("metadata") or {}
        env = {k: v for k, v in os.environ.items() if k in INHERITED_ENV or k.startswith("LC_")}
        env[JOB_UID_ENV] = str(meta.get("uid") or "")
        env[RUN_ENV] = run_marker(paths.ns_dir.name, str(run_id_of(job) or ""))
        fd = os.open(paths.supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            launcher = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "queuejob.flows.adapters.local",
                    "supervise",
                    str(paths.job),
                ],
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
            current = read_json(paths.job)
            if current is None or paths.tombstone.exists():
                return  # deleted meanwhile: wait() will say so
            sup = (current.get("local") or {}).get("supervisor") or {}
            if (sup.get("pid") and sup.get("pid") != previous_pid) or job_state(current).terminal:
                return
            if previous_pid is not None and not lock_is_free(paths.lock):
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
        job = read_json(self._paths(handle.namespace, handle.name).job)
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
        start: StartLimits | None = None,
    ) -> JobState:
        """Block until the Job is decided, calling ``on_update`` on every change and every tick.

        Returns as soon as a decisive condition is written (the interim ``SuccessCriteriaMet`` /
        ``FailureTarget`` count). Raises `JobTimeout` after ``timeout_s`` seconds, `KubeNotFound`
        when the Job is deleted meanwhile, and whatever ``on_update`` raises. A supervisor found
        dead before the Job finished is replaced. ``start`` is accepted and not used: a local
        pod is a process, which starts (a pod that cannot, such as one naming a missing
        Secret, fails at once and counts toward backoffLimit).
        """
        paths = self._paths(handle.namespace, handle.name)
        del start
        began = time.monotonic()
        deadline = began + timeout_s
        last_sig: tuple[int, int, int] | None = None
        state: JobState | None = None
        last_notice = 0.0
        last_check = began
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
                new = local_state(job)
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

    def _sensitive(self, paths: Paths, job: Mapping[str, Any]) -> list[str]:
        containers = (((job.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
            "containers"
        ) or []
        names = {
            str(ref["name"])
            for c in containers
            for e in c.get("env") or []
            if (ref := (e.get("valueFrom") or {}).get("secretKeyRef")) and ref.get("name")
        }
        secrets = [s for n in sorted(names) if (s := read_json(paths.secret(n))) is not None]
        return sensitive_strings(secrets)

    def failure_details(self, handle: JobHandle, *, tail_lines: int = 20) -> list[PodFailure]:
        """One entry per failed pod that counted (not one the Job's pod failure policy
        ignored), in start order: exit code, reason and the last log lines (Secret values
        scrubbed)."""
        paths = self._paths(handle.namespace, handle.name)
        job = self._read_handle(handle)
        if job is None:
            return []
        sensitive = self._sensitive(paths, job)
        out: list[PodFailure] = []
        for pod in (job.get("local") or {}).get("pods") or []:
            if pod.get("phase") != "Failed" or pod.get("ignored"):
                continue
            log_path = paths.logs / f"{pod['name']}.log"
            text = tail_of_file(log_path, tail_lines) if log_path.exists() else ""
            if not text and tail_lines > 0:
                text = "\n".join((pod.get("logTail") or [])[-tail_lines:])
            out.append(
                PodFailure(
                    pod=str(pod["name"]),
                    exit_code=pod.get("exitCode"),
                    reason=pod.get("reason"),
                    log_tail=scrub(text, sensitive),
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
            str(pod["name"]): scrub(
                tail_of_file(paths.logs / f"{pod['name']}.log", LOG_TAIL_LINES), sensitive
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
        found: list[tuple[Paths, dict[str, Any]]] = []
        if ns_dir.is_dir():
            for path in sorted(ns_dir.glob("*.json")):
                job = read_json(path)
                if job is not None and run_id_of(job) == label:
                    found.append((Paths.for_job_file(path), job))
        for paths, _ in found:
            paths.tombstone.touch(mode=0o600, exist_ok=True)  # no supervisor may (re)start now
        uids: set[str] = set()
        groups: list[tuple[int, str | None]] = []
        pids: list[tuple[int, str | None]] = []
        for _, job in found:
            t = job_targets(job)
            uids |= t.job_uids
            groups += t.groups
            pids += t.pids
        targets = Targets(
            job_uids=frozenset(uids),
            run=run_marker(namespace, label),
            groups=tuple(groups),
            pids=tuple(pids),
        )
        left = stop_processes(targets, grace_s=self.grace_s)
        if left:
            raise RetryableError(
                f"{len(left)} process(es) of run '{label}' in namespace '{namespace}' did not "
                f"exit after SIGKILL (pids {left[:10]}); retry the delete"
            )
        for paths, _ in found:
            remove_job_files(paths)
        secrets_dir = ns_dir / "secrets"
        if secrets_dir.is_dir():
            for path in secrets_dir.glob("*.json"):
                secret = read_json(path)
                if secret is not None and run_id_of(secret) == label:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
        for paths, _ in found:
            with contextlib.suppress(FileNotFoundError):
                paths.tombstone.unlink()
        return len(found)
