"""The controller manager's part: the Job controller, the garbage collector and the TTL controller.

The Job controller follows the 1.32 controller's observable behaviour (see the traces' s02-s11):

- pods are created up to ``min(parallelism, completions - succeeded)`` with ``generateName``
  ``<job>-``, the template's labels, a controller ownerReference and the job-tracking finalizer;
- a finished pod is first listed by UID in ``status.uncountedTerminatedPods``, its finalizer is
  removed, and a second status write moves it into ``succeeded``/``failed``;
- failed pods are replaced after a back-off of ``base * 2**(n-1)`` (capped), n counting failures
  since the last success;
- the decision comes first as an interim condition (``SuccessCriteriaMet`` / ``FailureTarget``),
  the terminal one (``Complete`` + completionTime / ``Failed``) once no pod is left running;
  ``legacy_conditions`` writes only the terminal ones, as clusters before 1.31 did (in the
  write that moves the last pods into the counts, without waiting for pods to terminate);
- ``suspend`` deletes the running pods (uncounted) and flips the ``Suspended`` condition;
- ``podFailurePolicy`` (the traces' p01-p04): each failed pod meets the rules in order, the first
  match decides; ``FailJob`` writes ``FailureTarget``/``Failed`` with reason ``PodFailurePolicy``
  and the message naming the container, pod and exit code (or condition) and rule index;
  ``Ignore`` removes the pod's tracking finalizer without counting it (the back-off delay still
  grows); ``Count`` or no match counts it. With a policy, or ``podReplacementPolicy: Failed``, a
  deleted pod counts only once it is Failed, and no replacement starts while it terminates;
- ``active``, ``succeeded`` and ``failed`` are omitted when 0; ``terminating``,
  ``uncountedTerminatedPods`` and ``ready`` are always written;
- each pod it creates gets a ``SuccessfulCreate`` event on the Job (``Created pod: <name>``);
  a pod the API refuses (a ResourceQuota, ``FakeKubeServer.limit_pods``) a ``FailedCreate``
  Warning (``Error creating: <the refusal>``), repeated ones counted on the same event as a
  recorder aggregates them, and the Job is synced again after a back-off (base doubling up to
  the max, as the controller's rate-limited queue does).

The garbage collector deletes dependents whose owner is gone (Background), deletes them and then
the owner for ``foregroundDeletion``, and strips ownerReferences for ``orphan``.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.fakekube.admission import (
    check_pod_quota,
    pod_from_template,
    prepare_event_create,
    prepare_pod_create,
)
from tests.fakekube.objects import (
    FOREGROUND_FINALIZER,
    JOB_TRACKING_FINALIZER,
    ORDER_JOB_STATUS,
    ORPHAN_FINALIZER,
    ApiError,
    Obj,
    now_str,
    ordered,
)
from tests.fakekube.store import Event, Store

MANAGER = "kube-controller-manager"

SUCCESS_REASON = "CompletionsReached"
SUCCESS_MESSAGE = "Reached expected number of succeeded pods"
BACKOFF_REASON = "BackoffLimitExceeded"
BACKOFF_MESSAGE = "Job has reached the specified backoff limit"
DEADLINE_REASON = "DeadlineExceeded"
DEADLINE_MESSAGE = "Job was active longer than specified deadline"
POLICY_REASON = "PodFailurePolicy"
_MESSAGES = {BACKOFF_REASON: BACKOFF_MESSAGE, DEADLINE_REASON: DEADLINE_MESSAGE}
_TERMINAL = ("Succeeded", "Failed")


@dataclass
class _JobMemory:
    """What the controller remembers about a Job between syncs (as the real one's caches)."""

    started_mono: float | None = None  # monotonic time of status.startTime
    failures_since_success: int = 0
    last_failure_mono: float = 0.0
    finished_mono: float | None = None
    fail_job: str | None = None  # the message of the first pod that matched a FailJob rule
    create_failures: int = 0  # pod creations refused in a row (their back-off)
    create_retry_mono: float = 0.0


def _has_finalizer(pod: Obj) -> bool:
    return JOB_TRACKING_FINALIZER in (pod["metadata"].get("finalizers") or [])


def _phase(pod: Obj) -> str | None:
    phase = (pod.get("status") or {}).get("phase")
    return phase if isinstance(phase, str) else None


def _is_active(pod: Obj) -> bool:
    return _phase(pod) not in _TERMINAL and not pod["metadata"].get("deletionTimestamp")


def _is_terminating(pod: Obj) -> bool:
    return _phase(pod) not in _TERMINAL and bool(pod["metadata"].get("deletionTimestamp"))


def _is_ready(pod: Obj) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _finished_as(pod: Obj, *, only_failed: bool = False) -> str | None:
    """ "succeeded"/"failed" for a pod the Job should count, None while it still runs. A pod
    being deleted counts as failed at once, unless ``only_failed`` (the Job has a pod failure
    policy or podReplacementPolicy Failed): then only once its phase is Failed."""
    phase = _phase(pod)
    if phase == "Succeeded":
        return "succeeded"
    if phase == "Failed" or (pod["metadata"].get("deletionTimestamp") and not only_failed):
        return "failed"
    return None


def _only_replace_failed(spec: Obj) -> bool:
    return spec.get("podFailurePolicy") is not None or spec.get("podReplacementPolicy") == "Failed"


def _policy_match(policy: Obj | None, pod: Obj) -> tuple[str, str] | None:
    """(action, message) of the first podFailurePolicy rule a failed pod matches."""
    meta, status = pod["metadata"], pod.get("status") or {}
    where = f"{meta['namespace']}/{meta['name']}"
    for index, rule in enumerate((policy or {}).get("rules") or []):
        action = rule.get("action")
        codes = rule.get("onExitCodes")
        if codes is not None:
            for cs in status.get("containerStatuses") or []:
                code = ((cs.get("state") or {}).get("terminated") or {}).get("exitCode")
                if code in (None, 0):
                    continue
                if codes.get("containerName") not in (None, cs.get("name")):
                    continue
                if (code in codes.get("values") or []) == (codes.get("operator") == "In"):
                    return action, (
                        f"Container {cs.get('name')} for pod {where} failed with exit code "
                        f"{code} matching {action} rule at index {index}"
                    )
            continue
        for pattern in rule.get("onPodConditions") or []:
            for cond in status.get("conditions") or []:
                if cond.get("type") == pattern.get("type") and cond.get("status") == pattern.get(
                    "status", "True"
                ):
                    return action, (
                        f"Pod {where} has condition {cond.get('type')} matching {action} rule "
                        f"at index {index}"
                    )
    return None


def _condition(type_: str, reason: str, message: str, status: str = "True") -> Obj:
    now = now_str()
    return {
        "type": type_,
        "status": status,
        "lastProbeTime": now,
        "lastTransitionTime": now,
        "reason": reason,
        "message": message,
    }


def _has(conditions: list[Obj], type_: str) -> Obj | None:
    return next(
        (c for c in conditions if c.get("type") == type_ and c.get("status") == "True"), None
    )


class Controllers:
    """Job controller + garbage collector + TTL-after-finished, on one background thread."""

    def __init__(
        self,
        store: Store,
        *,
        backoff_base_s: float,
        backoff_max_s: float,
        legacy_conditions: bool,
        gc_delay_s: float = 0.1,
    ) -> None:
        self.store = store
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.legacy_conditions = legacy_conditions
        self.gc_delay_s = gc_delay_s
        self._memory: dict[str, _JobMemory] = {}
        self._timers: dict[str, float] = {}  # job uid -> monotonic time it wants a sync
        self._gc_seen: dict[str, float] = {}  # owner uid -> when the collector first saw it
        # namespace -> (quota name, pods allowed): ResourceQuota admission for pods.
        self.pod_quotas: dict[str, tuple[str, int]] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        store.add_listener(self._on_event)

    def _on_event(self, resource: str, _event: Event) -> None:
        if resource != "events":  # its own event writes must not wake it again
            self._wake.set()

    def wake(self) -> None:
        """Sync again now (a quota changed)."""
        self._wake.set()

    def start(self) -> None:
        """Run the control loop in a background thread."""
        self._thread = threading.Thread(target=self._loop, name="fakekube-controllers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the control loop."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            timeout = 1.0
            if self._timers:
                timeout = max(0.005, min(1.0, min(self._timers.values()) - time.monotonic()))
            self._wake.wait(timeout=timeout)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.sync_once()
            except Exception:  # pragma: no cover - keep the loop alive, report loudly
                import traceback

                traceback.print_exc()

    def sync_once(self) -> None:
        """One pass over every Job, then the garbage collector and the TTL controller."""
        now = time.monotonic()
        self._timers = {u: t for u, t in self._timers.items() if t > now}
        for job in self.store.items("jobs"):
            if self._stopping.is_set():
                return
            try:
                self._sync_job(job)
            except ApiError:
                self._wake.set()  # a conflicting write: look again
        self._orphaned_tracking_finalizers()
        self._collect_garbage()

    # --- helpers ---------------------------------------------------------------------------------

    def _later(self, uid: str, at: float) -> None:
        current = self._timers.get(uid)
        if current is None or at < current:
            self._timers[uid] = at

    def _pods_of(self, job: Obj) -> list[Obj]:
        uid = job["metadata"]["uid"]
        return [
            p
            for p in self.store.items("pods", job["metadata"]["namespace"])
            if any(
                r.get("uid") == uid and r.get("controller")
                for r in p["metadata"].get("ownerReferences") or []
            )
        ]

    def _remove_tracking(self, pod: Obj) -> None:
        self._drop_finalizer("pods", pod, JOB_TRACKING_FINALIZER)

    def _delete_pod(self, pod: Obj) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiError):
            self.store.delete("pods", meta["namespace"], meta["name"], expect_uid=meta["uid"])

    def _write_status(self, job: Obj, status: Obj) -> Obj:
        meta = job["metadata"]
        clean = ordered(status, ORDER_JOB_STATUS)

        def put(draft: Obj) -> None:
            draft["status"] = clean

        return self.store.update(
            "jobs",
            meta["namespace"],
            meta["name"],
            put,
            expect_uid=meta["uid"],
            manager=MANAGER,
            subresource="status",
        )

    # --- the Job controller ----------------------------------------------------------------------

    def _sync_job(self, job: Obj) -> None:
        meta = job["metadata"]
        uid = meta["uid"]
        mem = self._memory.setdefault(uid, _JobMemory())
        spec = job.get("spec") or {}
        status: Obj = copy.deepcopy(job.get("status") or {})
        conditions: list[Obj] = status.get("conditions") or []
        pods = self._pods_of(job)

        if meta.get("deletionTimestamp"):
            # Foreground or orphan deletion in progress: stop tracking the pods.
            for pod in pods:
                if _has_finalizer(pod):
                    self._remove_tracking(pod)
            return
        if _has(conditions, "Complete") or _has(conditions, "Failed"):
            for pod in pods:
                if _is_active(pod):
                    self._delete_pod(pod)
                elif _has_finalizer(pod):
                    self._remove_tracking(pod)
            self._ttl(job, mem)
            return

        now = time.monotonic()
        suspended = bool(spec.get("suspend"))
        parallelism = int(spec.get("parallelism") or 0)
        completions = spec.get("completions")
        backoff_limit = int(spec.get("backoffLimit", 6))
        deadline = spec.get("activeDeadlineSeconds")
        uncounted: dict[str, list[str]] = {
            k: list(v) for k, v in (status.get("uncountedTerminatedPods") or {}).items() if v
        }

        # 1. Suspension: remove the running pods without counting them; flip the condition.
        suspended_cond = next((c for c in conditions if c.get("type") == "Suspended"), None)
        if suspended:
            for pod in pods:
                if _is_active(pod):
                    if _has_finalizer(pod):
                        self._remove_tracking(pod)
                    self._delete_pod(pod)
            if suspended_cond is None or suspended_cond.get("status") != "True":
                conditions = [c for c in conditions if c.get("type") != "Suspended"]
                conditions.append(_condition("Suspended", "JobSuspended", "Job suspended"))
            mem.started_mono = None
            pods = self._pods_of(job)
        elif suspended_cond is not None and suspended_cond.get("status") == "True":
            conditions = [
                _condition("Suspended", "JobResumed", "Job resumed", "False")
                if c.get("type") == "Suspended"
                else c
                for c in conditions
            ]
            status["startTime"] = now_str()
            mem.started_mono = now

        if not suspended and not status.get("startTime"):
            status["startTime"] = now_str()
            mem.started_mono = now
        elif not suspended and mem.started_mono is None:
            mem.started_mono = now  # a Job from before a restart of the fake: count from now

        # 2. Pods that finished (or are being deleted) while tracked by the finalizer. A failed
        # pod meets the pod failure policy first: Ignore lets it go uncounted.
        policy = spec.get("podFailurePolicy")
        only_failed = _only_replace_failed(spec)
        listed = {u for v in uncounted.values() for u in v}
        ignored: set[str] = set()
        for pod in pods:
            kind = _finished_as(pod, only_failed=only_failed)
            pod_uid = pod["metadata"]["uid"]
            if kind is None or not _has_finalizer(pod) or pod_uid in listed:
                continue
            if kind == "failed":
                mem.failures_since_success += 1
                mem.last_failure_mono = now
                matched = _policy_match(policy, pod) if policy else None
                if matched is not None and matched[0] == "Ignore":
                    ignored.add(pod_uid)
                    continue
                if matched is not None and matched[0] == "FailJob" and mem.fail_job is None:
                    mem.fail_job = matched[1]
            else:
                mem.failures_since_success = 0
            uncounted.setdefault(kind, []).append(pod_uid)
            listed.add(pod_uid)

        succeeded = int(status.get("succeeded") or 0) + len(uncounted.get("succeeded", []))
        failed = int(status.get("failed") or 0) + len(uncounted.get("failed", []))
        active = [p for p in pods if _is_active(p)]

        # 3. The decision: interim conditions first (1.31+), terminal ones when all pods ended.
        decided = _has(conditions, "FailureTarget") or _has(conditions, "SuccessCriteriaMet")
        failure = None
        failure_message = ""
        success = False
        if decided is not None:
            failure = decided["reason"] if decided["type"] == "FailureTarget" else None
            failure_message = str(decided.get("message") or "")
            success = failure is None
        elif not suspended:
            if mem.fail_job is not None:
                failure, failure_message = POLICY_REASON, mem.fail_job
            elif failed > backoff_limit:
                failure = BACKOFF_REASON
            elif (
                deadline is not None
                and mem.started_mono is not None
                and now - mem.started_mono >= float(deadline)
            ):
                failure = DEADLINE_REASON
            elif completions is not None:
                success = succeeded >= int(completions)
            else:
                # Completions unset: done once a pod succeeded and no pod is left running.
                success = succeeded > 0 and not active
            if deadline is not None and mem.started_mono is not None and failure is None:
                self._later(uid, mem.started_mono + float(deadline))

        if failure is not None and decided is None:
            failure_message = failure_message or _MESSAGES[failure]
            for pod in active:
                # Deleted while tracked: these count as failed, like the real controller.
                self._delete_pod(pod)
            if not self.legacy_conditions:
                conditions.append(_condition("FailureTarget", failure, failure_message))
            pods = self._pods_of(job)
            for pod in pods:
                pod_uid = pod["metadata"]["uid"]
                ended_as = _finished_as(pod, only_failed=only_failed)
                if ended_as == "failed" and _has_finalizer(pod) and pod_uid not in listed:
                    uncounted.setdefault("failed", []).append(pod_uid)
                    listed.add(pod_uid)
            active = [p for p in pods if _is_active(p)]
        elif success and decided is None:
            for pod in active:
                if _has_finalizer(pod):
                    self._remove_tracking(pod)
                self._delete_pod(pod)
            if not self.legacy_conditions:
                conditions.append(_condition("SuccessCriteriaMet", SUCCESS_REASON, SUCCESS_MESSAGE))
            pods = self._pods_of(job)
            active = [p for p in pods if _is_active(p)]

        # 4. Pods to start (or to remove after a parallelism decrease).
        if failure is None and not success and not suspended:
            if completions is None:
                # After a first success no pod is added, and none is taken away either.
                want = len(active) if succeeded > 0 else parallelism
            else:
                want = max(0, min(parallelism, int(completions) - succeeded))
            missing = want - len(active)
            to_create = missing
            if only_failed:
                # Replacements wait until terminating pods are fully gone.
                to_create -= sum(1 for p in pods if _is_terminating(p))
            if to_create > 0:
                ready_at = max(self._backoff_ready_at(mem), mem.create_retry_mono)
                if ready_at > now:
                    self._later(uid, ready_at)
                else:
                    for _ in range(to_create):
                        created = self._create_pod(job, mem)
                        if created is None:
                            self._later(uid, mem.create_retry_mono)
                            break
                        active.append(created)
            elif missing < 0:
                for pod in sorted(
                    active, key=lambda p: p["metadata"]["creationTimestamp"], reverse=True
                )[:-missing]:
                    if _has_finalizer(pod):
                        self._remove_tracking(pod)
                    self._delete_pod(pod)
                active = [p for p in self._pods_of(job) if _is_active(p)]

        pods_now = self._pods_of(job)
        active_now = [p for p in pods_now if _is_active(p)]
        terminating = sum(1 for p in pods_now if _is_terminating(p))

        # 5. Write 1: the new active/ready/terminating, newly finished pods as uncounted UIDs.
        status["conditions"] = conditions
        if not conditions:
            status.pop("conditions")
        self._counts(
            status,
            active=len(active_now),
            terminating=terminating,
            ready=sum(1 for p in active_now if _is_ready(p)),
        )
        status["uncountedTerminatedPods"] = {
            k: uncounted[k] for k in ("succeeded", "failed") if uncounted.get(k)
        }
        job = self._write_status(job, status)

        # 6. Stop tracking the counted pods, then write 2: UIDs move into the counts.
        for pod in pods_now:
            if pod["metadata"]["uid"] in listed | ignored and _has_finalizer(pod):
                self._remove_tracking(pod)
        status = copy.deepcopy(job.get("status") or {})
        moved = bool(uncounted)
        if moved:
            status["succeeded"] = int(status.get("succeeded") or 0) + len(
                uncounted.get("succeeded", [])
            )
            status["failed"] = int(status.get("failed") or 0) + len(uncounted.get("failed", []))
            status["uncountedTerminatedPods"] = {}
            self._counts(status)
        # 1.31+: the terminal condition waits for every pod to end. Before 1.31 it came in the
        # write that flushed the uncounted pods, with pods possibly still terminating.
        finished = (failure is not None or success) and (
            self.legacy_conditions or (not active_now and terminating == 0)
        )
        if finished:
            # With a flush the terminal condition rides on that write (as Complete does in the
            # traces); otherwise it gets a write of its own after the counters' one.
            conditions = status.get("conditions") or []
            if success and not _has(conditions, "Complete"):
                conditions.append(_condition("Complete", SUCCESS_REASON, SUCCESS_MESSAGE))
                status["completionTime"] = now_str()
            elif failure is not None and not _has(conditions, "Failed"):
                conditions.append(
                    _condition("Failed", failure, failure_message or _MESSAGES[failure])
                )
            status["conditions"] = conditions
            mem.finished_mono = now
        if moved or finished:
            job = self._write_status(job, status)
        if finished:
            self._ttl(job, mem)

    @staticmethod
    def _counts(status: Obj, **values: int) -> None:
        """Set counters; active/succeeded/failed are omitted when 0, the others always kept."""
        for key, value in values.items():
            status[key] = value
        for key in ("active", "succeeded", "failed"):
            if not status.get(key):
                status.pop(key, None)
        status.setdefault("terminating", 0)
        status.setdefault("uncountedTerminatedPods", {})
        status.setdefault("ready", 0)

    def _backoff_ready_at(self, mem: _JobMemory) -> float:
        n = mem.failures_since_success
        if n <= 0:
            return 0.0
        delay = min(self.backoff_base_s * float(2 ** (n - 1)), self.backoff_max_s)
        return mem.last_failure_mono + delay

    def _create_pod(self, job: Obj, mem: _JobMemory) -> Obj | None:
        pod = pod_from_template(job)
        namespace = job["metadata"]["namespace"]
        try:
            quota = self.pod_quotas.get(namespace)
            if quota is not None:
                check_pod_quota(self.store.items("pods", namespace), pod, quota)
            created = self.store.create("pods", pod, prepare=prepare_pod_create, manager=MANAGER)
        except ApiError as exc:
            mem.create_failures += 1
            delay = min(
                self.backoff_base_s * float(2 ** (mem.create_failures - 1)), self.backoff_max_s
            )
            mem.create_retry_mono = time.monotonic() + delay
            message = (
                str(exc.body.get("message") or exc) if isinstance(exc.body, dict) else str(exc)
            )
            self._record(job, "Warning", "FailedCreate", f"Error creating: {message}")
            return None
        mem.create_failures = 0
        mem.create_retry_mono = 0.0
        self._record(
            job, "Normal", "SuccessfulCreate", f"Created pod: {created['metadata']['name']}"
        )
        return created

    def _record(self, job: Obj, type_: str, reason: str, message: str) -> None:
        """An event on the Job, as the controller's recorder writes it: a repeat of the same
        event raises its count and lastTimestamp."""
        meta = job["metadata"]
        namespace = meta["namespace"]
        for old in self.store.items("events", namespace):
            inv = old.get("involvedObject") or {}
            if (inv.get("uid"), old.get("reason"), old.get("message"), old.get("type")) == (
                meta["uid"],
                reason,
                message,
                type_,
            ):

                def bump(draft: Obj) -> None:
                    draft["count"] = int(draft.get("count") or 1) + 1
                    draft["lastTimestamp"] = now_str()

                with contextlib.suppress(ApiError):
                    self.store.update(
                        "events", namespace, old["metadata"]["name"], bump, manager=MANAGER
                    )
                return
        now = now_str()
        event: Obj = {
            "kind": "Event",
            "apiVersion": "v1",
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": namespace},
            "involvedObject": {
                "kind": "Job",
                "namespace": namespace,
                "name": meta["name"],
                "uid": meta["uid"],
                "apiVersion": "batch/v1",
                "resourceVersion": meta.get("resourceVersion", ""),
            },
            "reason": reason,
            "message": message,
            "source": {"component": "job-controller"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "type": type_,
            "eventTime": None,
            "reportingComponent": "job-controller",
            "reportingInstance": "",
        }
        with contextlib.suppress(ApiError):
            self.store.create("events", event, prepare=prepare_event_create, manager=MANAGER)

    def _ttl(self, job: Obj, mem: _JobMemory) -> None:
        ttl = (job.get("spec") or {}).get("ttlSecondsAfterFinished")
        if ttl is None:
            return
        if mem.finished_mono is None:
            mem.finished_mono = time.monotonic()
        due = mem.finished_mono + float(ttl)
        meta = job["metadata"]
        if time.monotonic() >= due:
            with contextlib.suppress(ApiError):
                self.store.delete(
                    "jobs",
                    meta["namespace"],
                    meta["name"],
                    propagation="Background",
                    expect_uid=meta["uid"],
                )
            self._memory.pop(meta["uid"], None)
        else:
            self._later(meta["uid"], due)

    def _orphaned_tracking_finalizers(self) -> None:
        """Pods still tracked by a Job that is gone (or going) lose the tracking finalizer."""
        for pod in self.store.items("pods"):
            if not _has_finalizer(pod):
                continue
            owner = next(
                (
                    r
                    for r in pod["metadata"].get("ownerReferences") or []
                    if r.get("controller") and r.get("kind") == "Job"
                ),
                None,
            )
            job = self.store.by_uid(owner["uid"]) if owner else None
            if job is not None and not job["metadata"].get("deletionTimestamp"):
                continue
            # Wait for the garbage collector's delete (or the pod's end) before letting go, as
            # the traces show: deletionTimestamp first, then the finalizer goes.
            if job is None or pod["metadata"].get("deletionTimestamp") or _phase(pod) in _TERMINAL:
                self._remove_tracking(pod)

    # --- the garbage collector -------------------------------------------------------------------

    def _gc_due(self, owner_uid: str, now: float, touched: set[str]) -> bool:
        """The collector acts on an owner ``gc_delay_s`` after it first saw it (as the real one,
        fed by informers, lags a little): a GET right after a DELETE still finds the Job."""
        touched.add(owner_uid)
        seen = self._gc_seen.setdefault(owner_uid, now)
        if now >= seen + self.gc_delay_s:
            return True
        self._later(f"gc:{owner_uid}", seen + self.gc_delay_s)
        return False

    def _collect_garbage(self) -> None:
        now = time.monotonic()
        touched: set[str] = set()
        try:
            self._collect(now, touched)
        finally:
            self._gc_seen = {k: v for k, v in self._gc_seen.items() if k in touched}

    def _collect(self, now: float, touched: set[str]) -> None:
        objects = list(self.store.all_objects())
        alive = {o["metadata"]["uid"]: o for _r, o in objects}
        dependents: dict[str, list[tuple[str, Obj, Obj]]] = {}
        for resource, obj in objects:
            for ref in obj["metadata"].get("ownerReferences") or []:
                dependents.setdefault(ref.get("uid", ""), []).append((resource, obj, ref))

        for owner_uid, deps in dependents.items():
            owner = alive.get(owner_uid)
            finalizers = (owner or {}).get("metadata", {}).get("finalizers") or []
            deleting = owner is not None and owner["metadata"].get("deletionTimestamp")
            if (owner is None or deleting) and not self._gc_due(owner_uid, now, touched):
                continue
            for resource, obj, _ref in deps:
                if owner is None:
                    self._owner_gone(resource, obj, owner_uid, alive)
                elif deleting and ORPHAN_FINALIZER in finalizers:
                    self._drop_owner_ref(resource, obj, owner_uid)
                elif deleting and FOREGROUND_FINALIZER in finalizers:
                    self._delete_dependent(resource, obj)

        for _resource, owner in objects:
            meta = owner["metadata"]
            finalizers = meta.get("finalizers") or []
            if not meta.get("deletionTimestamp"):
                continue
            if not {ORPHAN_FINALIZER, FOREGROUND_FINALIZER} & set(finalizers):
                continue
            if not self._gc_due(meta["uid"], now, touched):
                continue
            remaining = [
                (r, o, ref)
                for r, o, ref in dependents.get(meta["uid"], [])
                if self.store.by_uid(o["metadata"]["uid"]) is not None
            ]
            if ORPHAN_FINALIZER in finalizers and not any(
                self._still_owned(o, meta["uid"]) for _r, o, _ref in remaining
            ):
                self._drop_finalizer(_resource, owner, ORPHAN_FINALIZER)
            elif FOREGROUND_FINALIZER in finalizers and not any(
                ref.get("blockOwnerDeletion") for _r, _o, ref in remaining
            ):
                self._drop_finalizer(_resource, owner, FOREGROUND_FINALIZER)

    def _still_owned(self, obj: Obj, owner_uid: str) -> bool:
        current = self.store.by_uid(obj["metadata"]["uid"])
        return current is not None and any(
            r.get("uid") == owner_uid for r in current["metadata"].get("ownerReferences") or []
        )

    def _owner_gone(self, resource: str, obj: Obj, owner_uid: str, alive: dict[str, Obj]) -> None:
        refs = obj["metadata"].get("ownerReferences") or []
        if any(r.get("uid") in alive for r in refs if r.get("uid") != owner_uid):
            self._drop_owner_ref(resource, obj, owner_uid)
        else:
            self._delete_dependent(resource, obj)

    def _delete_dependent(self, resource: str, obj: Obj) -> None:
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return
        with contextlib.suppress(ApiError):
            self.store.delete(
                resource,
                meta.get("namespace", ""),
                meta["name"],
                propagation="Background",
                expect_uid=meta["uid"],
            )

    def _drop_owner_ref(self, resource: str, obj: Obj, owner_uid: str) -> None:
        meta = obj["metadata"]

        def drop(draft: Obj) -> None:
            refs = [
                r
                for r in draft["metadata"].get("ownerReferences") or []
                if r.get("uid") != owner_uid
            ]
            if refs:
                draft["metadata"]["ownerReferences"] = refs
            else:
                draft["metadata"].pop("ownerReferences", None)

        with contextlib.suppress(ApiError):
            self.store.update(
                resource,
                meta.get("namespace", ""),
                meta["name"],
                drop,
                expect_uid=meta["uid"],
                manager=MANAGER,
            )

    def _drop_finalizer(self, resource: str, obj: Obj, finalizer: str) -> None:
        meta = obj["metadata"]

        def drop(draft: Obj) -> None:
            draft["metadata"]["finalizers"] = [
                f for f in draft["metadata"].get("finalizers") or [] if f != finalizer
            ]

        with contextlib.suppress(ApiError):
            self.store.update(
                resource,
                meta.get("namespace", ""),
                meta["name"],
                drop,
                expect_uid=meta["uid"],
                manager=MANAGER,
            )


Callback = Callable[[], Any]
