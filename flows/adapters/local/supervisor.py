"""The supervisor: the Job controller of one local Job, a process of its own."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from queuejob.flows.adapters.local.common import (
    BACKOFF_MESSAGE,
    BACKOFF_REASON,
    DEADLINE_MESSAGE,
    DEADLINE_REASON,
    KILL_WAIT_S,
    LOG_TAIL_LINES,
    LOST_MESSAGE,
    LOST_REASON,
    POD_SUFFIX_ALPHABET,
    POLICY_REASON,
    POLL_S,
    PR_SET_PDEATHSIG,
    SUCCESS_MESSAGE,
    SUCCESS_REASON,
    iso,
    read_json,
    scrub,
    sensitive_strings,
    tail_of_file,
    write_json,
)
from queuejob.flows.adapters.local.pods import container_of, pod_argv, pod_env, read_secrets
from queuejob.flows.adapters.local.processes import (
    Targets,
    job_targets,
    libc_prctl,
    proc_start,
    signal_group,
    stop_processes,
    watchdog,
)
from queuejob.flows.adapters.local.state import Paths, remove_job_files
from queuejob.flows.core.backend import run_id_of
from queuejob.flows.core.pod_failure import DISRUPTION_TARGET, FAIL_JOB, IGNORE, match

# --- the supervisor (the Job controller of one Job) -----------------------------------------------


class Supervisor:
    """Runs one Job's pods with Job semantics and keeps its state file up to date."""

    def __init__(self, job_file: Path) -> None:
        self.paths = Paths.for_job_file(job_file)
        self.job: dict[str, Any] = {}
        self.popens: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False
        self.watchdog_pid: int | None = None
        self.watchdog_w: int | None = None
        self.lock_fd: int | None = None
        self.prctl = libc_prctl()
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
                watchdog(read_fd, self.paths.job, self.uid, self.grace_s)
            finally:
                os._exit(0)
        os.close(read_fd)
        if self.watchdog_w is not None:
            os.close(self.watchdog_w)
        self.watchdog_w = write_fd
        self.watchdog_pid = pid
        sup = self.local.setdefault("supervisor", {}) or {}
        sup["watchdogPid"] = pid
        sup["watchdogPidStart"] = proc_start(pid)
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
        stamp = iso(now)
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
        write_json(self.paths.job, self.job)
        st = self.paths.job.stat()
        self.written = (st.st_ino, st.st_mtime_ns, st.st_size)
        self.dirty = False

    def _say(self, message: str) -> None:
        """A line in the supervisor's log (never a Secret value)."""
        print(f"{iso(time.time())} {message}", file=sys.stderr, flush=True)

    # --- main loop ---

    def run(self) -> int:
        if not self._take_lock():
            self._say("another supervisor holds this Job; exiting")
            return 0
        if self.paths.tombstone.exists():
            return 0
        job = read_json(self.paths.job)
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
            "pidStart": proc_start(os.getpid()),
            "startedAt": iso(time.time()),
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
        stop_processes(job_targets(self.job, exclude={os.getpid(), self.watchdog_pid or 0}),
                        grace_s=0.0)  # fmt: skip
        for pod in lost:
            pod.update(
                phase="Failed",
                exitCode=None,
                reason="Lost",
                message="the pod's supervisor stopped; the pod was killed",
                finishedAt=iso(now),
                finishedEpoch=now,
            )
            # Stopped by the backend, not by its own doing: a disruption, which a Job's pod
            # failure policy may ignore (as Kubernetes marks the pods of a node that is gone).
            pod["conditions"] = [
                {
                    "type": DISRUPTION_TARGET,
                    "status": "True",
                    "lastTransitionTime": iso(now),
                    "reason": LOST_REASON,
                    "message": LOST_MESSAGE,
                }
            ]
            self._judge(pod, now)
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
            signal_group(int(pod["pgid"]), signal.SIGKILL)
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
            remove_job_files(self.paths)
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
        signal_group(int(pod["pgid"]), signal.SIGKILL)
        stop_processes(Targets(pod_uids=frozenset({str(pod["uid"])})), grace_s=0.0)
        exit_code = rc if rc >= 0 else 128 - rc
        killed = pod.get("terminatingSince") is not None
        succeeded = exit_code == 0 and not killed
        pod.update(
            phase="Succeeded" if succeeded else "Failed",
            exitCode=exit_code,
            reason="Completed" if exit_code == 0 else "Error",
            finishedAt=iso(now),
            finishedEpoch=now,
        )
        self._say(f"pod {pod['name']} ended with exit code {exit_code}")
        if succeeded:
            self.local["failuresSinceSuccess"] = 0
        else:
            self._judge(pod, now)
            tail = tail_of_file(self.paths.logs / f"{pod['name']}.log", LOG_TAIL_LINES)
            sensitive = self._sensitive()
            pod["logTail"] = scrub(tail, sensitive).splitlines()
        self.dirty = True

    def _judge(self, pod: dict[str, Any], now: float) -> None:
        """A failed pod, as the Job's podFailurePolicy sees it: FailJob decides the Job (at the
        next reconcile), Ignore keeps it out of ``failed``; either way the back-off grows (as
        Kubernetes 1.28+ does for ignored failures too)."""
        self._note_failure(now)
        policy = self.spec.get("podFailurePolicy")
        if policy is None:
            return
        code = pod.get("exitCode")
        found = match(
            policy,
            namespace=str(self.job["metadata"]["namespace"]),
            pod=str(pod["name"]),
            exit_codes={str(self._container().get("name")): code},
            conditions=pod.get("conditions") or (),
        )
        if found is None:
            return
        pod["policyAction"] = found.action
        if found.action == IGNORE:
            pod["ignored"] = True
        elif found.action == FAIL_JOB and self.local.get("failJob") is None:
            self.local["failJob"] = found.message
        self._say(f"pod {pod['name']}: {found.message}")

    def _counted_failures(self) -> int:
        """Failed pods that count toward backoffLimit (not ignored by the policy)."""
        return sum(1 for p in self.pods if p["phase"] == "Failed" and not p.get("ignored"))

    def _note_failure(self, now: float) -> None:
        self.local["failuresSinceSuccess"] = int(self.local.get("failuresSinceSuccess") or 0) + 1
        self.local["lastFailureEpoch"] = now

    def _terminate(self, pod: dict[str, Any], now: float, *, reason: str | None) -> None:
        if pod.get("terminatingSince") is not None:
            return
        pod["terminatingSince"] = now
        if reason:
            pod["message"] = reason
        signal_group(int(pod["pgid"]), signal.SIGTERM)
        self.dirty = True

    def _escalate(self, now: float) -> None:
        for pod in self._running():
            since = pod.get("terminatingSince")
            if since is not None and not pod.get("killed") and now - since >= self.grace_s:
                signal_group(int(pod["pgid"]), signal.SIGKILL)
                pod["killed"] = True

    def _secrets(self) -> dict[str, dict[str, Any]]:
        return read_secrets(self.paths, self._container())

    def _sensitive(self) -> list[str]:
        return sensitive_strings(self._secrets().values())

    def _container(self) -> dict[str, Any]:
        return container_of(self.job)

    def _pod_env(self, name: str, pod_uid: str) -> tuple[dict[str, str], dict[str, str]]:
        return pod_env(self.job, self._secrets(), name=name, pod_uid=pod_uid, job_uid=self.uid)

    def _preexec(self) -> None:
        """In the pod's process before exec: die with the supervisor (Linux)."""
        if self.prctl is not None:
            self.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self.supervisor_pid:
            os._exit(137)  # the supervisor died before prctl took effect

    def _new_pod_name(self) -> str:
        taken = {p["name"] for p in self.pods}
        while True:
            suffix = "".join(random.choices(POD_SUFFIX_ALPHABET, k=5))
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
            "startedAt": iso(now),
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
            argv = pod_argv(self._container(), env, defined)
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
        pod.update(pid=popen.pid, pgid=popen.pid, procStart=proc_start(popen.pid))
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
            finishedAt=iso(now),
            finishedEpoch=now,
            logTail=[f"queuejob local backend: {reason}: {message}"],
        )
        self._judge(pod, now)

    # --- the Job controller's decisions ---

    def _reconcile(self, now: float) -> None:
        spec = self.spec
        if not self.status.get("startTime"):
            self.status["startTime"] = iso(now)
            self.local["startEpoch"] = now
            self.dirty = True
        running = self._running()
        active = [p for p in running if p.get("terminatingSince") is None]
        succeeded = sum(1 for p in self.pods if p["phase"] == "Succeeded")
        failed = self._counted_failures()
        completions = spec.get("completions")
        if self._decided() is None:
            deadline = spec.get("activeDeadlineSeconds")
            start = float(self.local.get("startEpoch") or now)
            if self.local.get("failJob"):
                self._add_condition("FailureTarget", POLICY_REASON, self.local["failJob"], now)
            elif deadline is not None and now - start >= float(deadline):
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
                self.status["completionTime"] = iso(now)
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
        if self.spec.get("podReplacementPolicy") == "Failed":
            # No replacement while a pod still terminates (it may hold unacked messages).
            missing -= sum(1 for p in self._running() if p.get("terminatingSince") is not None)
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
        failed = self._counted_failures()
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
