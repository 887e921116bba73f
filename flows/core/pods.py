"""What the wait learns from the Job's pods and events, beyond the Job's own status.

The Job's status counts pods, but two things never show there. A pod that its pod failure
policy ignored leaves no trace, and an evicted pod is deleted soon after it stopped: the tracker
keeps the pods Kubernetes disrupted (condition ``DisruptionTarget``) and whether each counted
toward ``backoffLimit`` (`PodTracker.disruptions`).

And a pod that never starts never fails: an image that cannot be pulled, a missing Secret key,
no node that fits or a quota that refuses the pod keep it ``Pending`` (or keep the Job
controller from creating it, with a ``FailedCreate`` event on the Job), so neither
``backoffLimit`` nor a pod failure policy applies, and the Job waits for ever. `PodTracker.apply`
turns what the tracker saw, with the time, into what the Job's state says: what holds the pods
now (`JobState.pending`), when the wait gives up on them (`JobState.start_failure`) and the pods
stuck while others ran (`JobState.stuck`). The rules, with `StartLimits`:

- ``InvalidImageName`` and ``ErrImageNeverPull`` cannot resolve: the wait gives up at once.
- Other start errors (``ErrImagePull``, ``ImagePullBackOff``, ``ImageInspectError``,
  ``CreateContainerConfigError``, ``CreateContainerError``, ``RunContainerError``) give up once a
  pod has been in one for ``grace_s`` with no pod of the Job started: a registry's rate limit or
  a Secret created a moment late resolve within it.
- Anything else that keeps every pod from starting (``Unschedulable`` while an autoscaler adds a
  node, a slow pull, ``FailedCreatePodSandBox``, ``FailedCreate`` from a quota that may free up,
  no pod at all) gives up when no pod has started within ``timeout_s`` of the wait's start (0:
  never). Time while the Job is suspended does not count.
- Once a pod of the Job has started none of this fails the run: a pod that meets these rules is
  noted as stuck (a warning in the report); and when the work of a Job without completions
  (fine mode) is done, pods that never started no longer hold the wait (`JobState.held_open`).

Times are the caller's clock (monotonic seconds), never the server's timestamps, so clock skew
plays no part; a wait that re-attaches to a Job (a retried flow run) starts its clocks again.
Pure: the backend feeds it pods and events and asks it for the state.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from queuejob.flows.core.errors import InvalidInput
from queuejob.flows.core.job_status import (
    JobPhase,
    JobState,
    PodDisruption,
    StartKind,
    StartProblem,
)
from queuejob.flows.core.pod_failure import IGNORE, disruption_of, match_pod

DEFAULT_START_GRACE_S = 60.0
DEFAULT_START_TIMEOUT_S = 600.0

# Waiting reasons no retry can fix: the wait gives up at once.
FATAL_REASONS = frozenset({"InvalidImageName", "ErrImageNeverPull"})
# Waiting reasons that are errors, though a retry may fix them: the wait gives up after grace_s.
START_ERRORS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "ImageInspectError",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
IMAGE_REASONS = frozenset(
    {
        "InvalidImageName",
        "ErrImageNeverPull",
        "ErrImagePull",
        "ImagePullBackOff",
        "ImageInspectError",
    }
)
# A kubelet alternates these two while it backs off pulling an image: one cause.
PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff"})
FAILED_CREATE = "FailedCreate"
SUCCESSFUL_CREATE = "SuccessfulCreate"
SANDBOX_FAILED = "FailedCreatePodSandBox"
NO_PODS = "NoPods"
# The Job controller's FailedCreate message starts with this; the rest is the API's refusal.
_CREATE_PREFIX = "Error creating: "
# A terminated container with one of these reasons never ran (the runtime could not start it).
_NEVER_RAN = frozenset({"StartError", "ContainerCannotRun"})
# Most severe first: what the progress line names, and the cause a failure reports.
_RANK: dict[str, int] = {
    "fatal": 0,
    "error": 1,
    "create": 2,
    "scheduling": 3,
    "sandbox": 4,
    "waiting": 5,
    "none": 6,
}
_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?")


@dataclass(frozen=True, slots=True)
class StartLimits:
    """How long the wait lets pods take to start: ``grace_s`` for a start error (an image pull,
    a container's configuration), ``timeout_s`` for anything else that keeps every pod from
    starting (0: no limit, the run's own timeout decides)."""

    grace_s: float = DEFAULT_START_GRACE_S
    timeout_s: float = DEFAULT_START_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.grace_s < 0 or self.timeout_s < 0:
            raise InvalidInput(
                f"start grace and start timeout must be 0 or more seconds (got "
                f"{self.grace_s:g} and {self.timeout_s:g})"
            )


@dataclass(frozen=True, slots=True)
class _Seen:
    reason: str | None
    message: str | None
    counted: bool
    succeeded: bool


@dataclass
class _Pod:
    """One pod of the Job, as far as starting goes."""

    name: str
    first_seen: float
    image: str | None = None
    started: bool = False
    gone: bool = False  # deleted, or ended without ever starting
    reason: str | None = None  # what holds it now (None: nothing known yet)
    message: str | None = None
    group: str = "waiting"  # fatal, error, scheduling, sandbox, waiting
    error_since: float | None = None
    pull_error: str | None = None  # the latest ErrImagePull message (why the pulls fail)
    noted: StartProblem | None = None  # stuck while other pods ran

    def key(self) -> tuple[str, str | None, str | None]:
        """What pods are grouped by: one cause, however a kubelet's back-off words it."""
        if self.group == "error" and self.reason in PULL_REASONS:
            return (self.group, "pull", self.image)
        return (self.group, self.reason, self.message)


@dataclass
class _Create:
    """The Job controller's latest FailedCreate."""

    message: str
    since: float
    at: tuple[str, float]


class PodTracker:
    """Pods and events of one Job, as observed.

    ``policy`` is the Job's ``podFailurePolicy`` (None: none, every disruption counts);
    ``limits`` the start rules; ``now`` the wait's start on the caller's clock; ``job_name``
    and ``job_uid`` tell the Job's own events and its pods' apart from others in the namespace;
    ``open_ended`` is True for a Job without completions (fine mode), which a pod that never
    started can hold open after its work is done.
    """

    def __init__(
        self,
        policy: Mapping[str, Any] | None = None,
        *,
        limits: StartLimits | None = None,
        now: float = 0.0,
        job_name: str | None = None,
        job_uid: str | None = None,
        open_ended: bool = False,
    ) -> None:
        self.policy = policy
        self.limits = limits or StartLimits()
        self.job_name = job_name
        self.job_uid = job_uid
        self.open_ended = open_ended
        # False once reading the Job's events (or its pods) failed: a failure then says so.
        self.events_readable = True
        self.pods_readable = True
        self._disrupted: dict[str, _Seen] = {}
        self._pods: dict[str, _Pod] = {}
        self._clock = now  # when the time without a started pod began
        self._started = False
        self._create: _Create | None = None
        self._created_at: tuple[str, float] | None = None  # the latest SuccessfulCreate
        self._sandbox: dict[str, str] = {}  # pod name -> FailedCreatePodSandBox message
        self._noted_create: StartProblem | None = None

    @classmethod
    def for_job(
        cls, job: Mapping[str, Any], *, limits: StartLimits | None = None, now: float = 0.0
    ) -> PodTracker:
        """A tracker for a Job object (a dict as the API server returns it)."""
        meta = job.get("metadata") or {}
        spec = job.get("spec") or {}
        return cls(
            spec.get("podFailurePolicy"),
            limits=limits,
            now=now,
            job_name=meta.get("name"),
            job_uid=meta.get("uid"),
            open_ended=spec.get("completions") is None,
        )

    # --- observations --------------------------------------------------------------------------

    def observe(self, pod: Mapping[str, Any], *, now: float = 0.0, deleted: bool = False) -> bool:
        """Take one version of a pod (a watch event's object, a listed item; ``deleted`` for a
        DELETED event); True when what the tracker reports may have changed."""
        changed = self._observe_disruption(pod)
        return self._observe_start(pod, now, deleted) or changed

    def _observe_disruption(self, pod: Mapping[str, Any]) -> bool:
        status = pod.get("status") or {}
        cond = disruption_of(status.get("conditions") or ())
        if cond is None:
            return False
        name = str((pod.get("metadata") or {}).get("name"))
        matched = match_pod(self.policy, pod)
        seen = _Seen(
            reason=cond.get("reason"),
            message=cond.get("message"),
            counted=matched is None or matched.action != IGNORE,
            # A disrupted pod whose container still exited 0 in its grace period succeeded.
            succeeded=status.get("phase") == "Succeeded",
        )
        if self._disrupted.get(name) == seen:
            return False
        self._disrupted[name] = seen
        return True

    def _observe_start(self, pod: Mapping[str, Any], now: float, deleted: bool) -> bool:
        meta = pod.get("metadata") or {}
        key = str(meta.get("uid") or meta.get("name"))
        name = str(meta.get("name"))
        rec = self._pods.get(key)
        if rec is None:
            rec = self._pods[key] = _Pod(name=name, first_seen=now)
        before = dataclasses.replace(rec)
        status = pod.get("status") or {}
        rec.image = _image(pod)
        if _has_started(status):
            rec.started = True
            self._started = True
        rec.gone = (
            deleted
            or bool(meta.get("deletionTimestamp"))
            or status.get("phase") in ("Succeeded", "Failed")
        )
        group, reason, message = _holding(status)
        sandbox = self._sandbox.get(name)
        if group == "waiting" and sandbox is not None:
            group, reason, message = "sandbox", SANDBOX_FAILED, sandbox
        rec.group, rec.reason, rec.message = group, reason, message
        if reason == "ErrImagePull" and message:
            rec.pull_error = message
        if group in ("fatal", "error"):
            if rec.error_since is None:
                rec.error_since = now
        else:
            rec.error_since = None
        return rec != before

    def observe_event(self, event: Mapping[str, Any], *, now: float = 0.0) -> bool:
        """Take one core/v1 Event: the Job's ``FailedCreate`` / ``SuccessfulCreate``, or a pod's
        ``FailedCreatePodSandBox``. True when what the tracker reports may have changed."""
        inv = event.get("involvedObject") or {}
        reason = event.get("reason")
        if inv.get("kind") == "Job" and self._is_job(inv):
            at = _event_time(event)
            if reason == FAILED_CREATE and event.get("type", "Warning") == "Warning":
                message = str(event.get("message") or "").removeprefix(_CREATE_PREFIX)
                if self._create is not None and at < self._create.at:
                    return False
                since = self._create.since if self._create is not None else now
                if self._created_at is not None and self._created_at > at:
                    return False
                changed = self._create is None or self._create.message != message
                self._create = _Create(message=message, since=since, at=at)
                return changed
            if reason == SUCCESSFUL_CREATE:
                if self._created_at is None or at > self._created_at:
                    self._created_at = at
                if self._create is not None and self._created_at > self._create.at:
                    self._create = None
                    return True
            return False
        if inv.get("kind") == "Pod" and reason == SANDBOX_FAILED:
            name = str(inv.get("name") or "")
            if not self._owns_pod(inv):
                return False
            message = str(event.get("message") or "")
            if not message or self._sandbox.get(name) == message:
                return False
            self._sandbox[name] = message
            for rec in self._pods.values():
                if rec.name == name and rec.group == "waiting" and not rec.started:
                    rec.group, rec.reason, rec.message = "sandbox", SANDBOX_FAILED, message
            return True
        return False

    def retain(self, keys: Iterable[str]) -> None:
        """After a re-list: pods not in it (by uid) are gone."""
        keep = set(keys)
        for key, rec in self._pods.items():
            if key not in keep:
                rec.gone = True

    def _is_job(self, inv: Mapping[str, Any]) -> bool:
        if self.job_uid and inv.get("uid"):
            return str(inv.get("uid")) == self.job_uid
        return self.job_name is not None and inv.get("name") == self.job_name

    def _owns_pod(self, inv: Mapping[str, Any]) -> bool:
        uid, name = str(inv.get("uid") or ""), str(inv.get("name") or "")
        if uid and uid in self._pods:
            return True
        return self.job_name is not None and name.startswith(f"{self.job_name}-")

    # --- what the state says ------------------------------------------------------------------

    @property
    def disruptions(self) -> tuple[PodDisruption, ...]:
        """The disrupted pods that did not succeed, in the order first seen."""
        return tuple(
            PodDisruption(pod=name, reason=s.reason, message=s.message, counted=s.counted)
            for name, s in self._disrupted.items()
            if not s.succeeded
        )

    @property
    def started(self) -> bool:
        """True once a pod of the Job has started (a container ran)."""
        return self._started

    def apply(self, state: JobState, now: float) -> JobState:
        """``state`` (from the Job's status) with what the pods and events say at ``now``:
        disruptions, what holds the pods, a start failure, stuck pods, a Job held open."""
        if state.phase is JobPhase.SUSPENDED:
            self._clock = now  # a suspended Job has no pods on purpose
        if state.counts.succeeded or state.counts.ready:
            self._started = True
        waiting = [p for p in self._pods.values() if not p.started and not p.gone]
        problems = self._problems(waiting, now)
        shown = [p for p in problems if self._shown(p, now)]
        failure: StartProblem | None = None
        if state.phase.decided:
            shown = []
        elif not self._started:
            failure = self._failure(problems, now)
        else:
            self._note_stuck(waiting, now)
        stuck = self._stuck()
        running = [p for p in self._pods.values() if p.started and not p.gone]
        held_open = (
            self.open_ended
            and not state.phase.decided
            and state.counts.succeeded > 0
            and not running
            and bool(waiting)
            and all(p.noted is not None for p in waiting)
            and len(waiting) >= state.counts.active
        )
        pending = shown[0][0] if shown else None
        return dataclasses.replace(
            state,
            disruptions=self.disruptions,
            pending=pending,
            start_failure=failure,
            stuck=stuck,
            held_open=held_open,
        )

    def _create_failing(self) -> bool:
        return self._create is not None and (
            self._created_at is None or self._create.at >= self._created_at
        )

    def _problems(self, waiting: list[_Pod], now: float) -> list[tuple[StartProblem, float, str]]:
        """What holds the pods, most severe first: (problem, since, group)."""
        groups: dict[tuple[str, str | None, str | None], list[_Pod]] = {}
        for rec in sorted(waiting, key=lambda p: p.first_seen):
            groups.setdefault(rec.key(), []).append(rec)
        out: list[tuple[StartProblem, float, str]] = []
        for recs in groups.values():
            group = recs[0].group
            if group in ("fatal", "error"):
                since = min(now if r.error_since is None else r.error_since for r in recs)
            else:
                since = min(r.first_seen for r in recs)
            out.append((_problem(recs), since, group))
        if self._create_failing():
            assert self._create is not None
            problem = StartProblem(
                reason=FAILED_CREATE, message=self._create.message, kind="create"
            )
            out.append((problem, self._create.since, "create"))
        if not out and not any(not p.gone for p in self._pods.values()):
            message = "the Job controller has created no pod for it"
            if not self.pods_readable:
                message = "no pod of the Job has started (its pods could not be watched)"
            elif not self.events_readable:
                message += " (its events, which say why, could not be read)"
            out.append(
                (StartProblem(reason=NO_PODS, message=message, kind="none"), self._clock, "none")
            )
        out.sort(key=lambda t: (_RANK[t[2]], t[1]))
        return out

    def _shown(self, problem: tuple[StartProblem, float, str], now: float) -> bool:
        """Errors are named as soon as they are seen; a pod merely on its way (pulling,
        ContainerCreating) or a Job with no pod yet only once it has lasted the grace."""
        _, since, group = problem
        if group in ("waiting", "none"):
            return now - since >= max(self.limits.grace_s, 1.0)
        return True

    def _failure(
        self, problems: list[tuple[StartProblem, float, str]], now: float
    ) -> StartProblem | None:
        limits = self.limits
        for problem, since, group in problems:
            if group == "fatal":
                return dataclasses.replace(problem, seconds=now - since, rule="at once")
        for problem, since, group in problems:
            if group == "error" and now - since >= limits.grace_s:
                return dataclasses.replace(
                    problem, seconds=now - since, rule=f"start_grace_seconds={limits.grace_s:g}"
                )
        if limits.timeout_s and now - self._clock >= limits.timeout_s:
            problem = problems[0][0] if problems else StartProblem(reason=NO_PODS, kind="none")
            return dataclasses.replace(
                problem,
                seconds=now - self._clock,
                rule=f"start_timeout_seconds={limits.timeout_s:g}",
            )
        return None

    def _note_stuck(self, waiting: list[_Pod], now: float) -> None:
        """Pods of a Job whose other pods started, that meet the start rules: noted once."""
        limits = self.limits
        for rec in waiting:
            if rec.noted is not None:
                continue
            rule: str | None = None
            seconds = now - rec.first_seen
            if rec.group == "fatal":
                rule = "at once"
            elif rec.group == "error":
                seconds = 0.0 if rec.error_since is None else now - rec.error_since
                if seconds >= limits.grace_s:
                    rule = f"start_grace_seconds={limits.grace_s:g}"
            elif limits.timeout_s and seconds >= limits.timeout_s:
                rule = f"start_timeout_seconds={limits.timeout_s:g}"
            if rule is None:
                continue
            rec.noted = dataclasses.replace(_problem([rec]), seconds=seconds, rule=rule)
        if self._noted_create is None and self._create_failing() and limits.timeout_s:
            assert self._create is not None
            seconds = now - self._create.since
            if seconds >= limits.timeout_s:
                self._noted_create = StartProblem(
                    reason=FAILED_CREATE,
                    message=self._create.message,
                    kind="create",
                    seconds=seconds,
                    rule=f"start_timeout_seconds={limits.timeout_s:g}",
                )

    def _stuck(self) -> tuple[StartProblem, ...]:
        """The noted pods that never started, one problem per cause."""
        merged: dict[tuple[str, str | None, str | None], StartProblem] = {}
        for rec in sorted(self._pods.values(), key=lambda p: p.first_seen):
            noted = rec.noted
            if noted is None or rec.started:
                continue
            key = (
                noted.kind,
                "pull" if noted.reason in PULL_REASONS else noted.reason,
                noted.image,
            )
            if noted.reason not in PULL_REASONS:
                key = (noted.kind, noted.reason, noted.message)
            old = merged.get(key)
            merged[key] = (
                noted
                if old is None
                else dataclasses.replace(
                    old, pods=old.pods + noted.pods, seconds=max(old.seconds, noted.seconds)
                )
            )
        out = list(merged.values())
        if self._noted_create is not None:
            out.append(self._noted_create)
        return tuple(out)


# --- reading a pod -----------------------------------------------------------------------------


def _problem(recs: list[_Pod]) -> StartProblem:
    """One cause, for pods grouped by `_Pod.key`. A pull that backs off is named by its
    back-off with the last pull error after it (as kubelets since 1.30 word it), since the
    back-off alone does not say why (not found, unauthorized, ...)."""
    first = recs[0]
    group = first.group
    kind: StartKind = "container" if group in ("fatal", "error") else group  # type: ignore[assignment]
    reason, message = first.reason, first.message
    if group == "error" and reason in PULL_REASONS:
        backing_off = [r for r in recs if r.reason == "ImagePullBackOff"]
        if backing_off:
            reason, message = "ImagePullBackOff", backing_off[0].message
            error = next((r.pull_error for r in recs if r.pull_error), None)
            if error and message and "ErrImagePull" not in message:
                message = f"{message}: ErrImagePull: {error}"
    return StartProblem(
        reason=reason or "Pending",
        message=message,
        kind=kind,
        pods=tuple(r.name for r in recs),
        image=first.image,
    )


def _image(pod: Mapping[str, Any]) -> str | None:
    containers = (pod.get("spec") or {}).get("containers") or []
    return str(containers[0].get("image")) if containers and containers[0].get("image") else None


def _has_started(status: Mapping[str, Any]) -> bool:
    """A container of the pod ran (or runs): what ``started`` means for the start rules."""
    if status.get("phase") in ("Running", "Succeeded"):
        return True
    for cs in [
        *(status.get("initContainerStatuses") or ()),
        *(status.get("containerStatuses") or ()),
    ]:
        state = cs.get("state") or {}
        if state.get("running") or cs.get("started"):
            return True
        term = state.get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if term and term.get("reason") not in _NEVER_RAN:
            return True
    return False


def _holding(status: Mapping[str, Any]) -> tuple[str, str | None, str | None]:
    """What holds a pod that has not started: (group, reason, message), the most severe of
    its containers' waiting reasons and the scheduler's condition."""
    waits = [
        (cs.get("state") or {}).get("waiting") or {}
        for cs in [
            *(status.get("initContainerStatuses") or ()),
            *(status.get("containerStatuses") or ()),
        ]
    ]
    for group, reasons in (("fatal", FATAL_REASONS), ("error", START_ERRORS)):
        for w in waits:
            if w.get("reason") in reasons:
                return group, str(w["reason"]), w.get("message") or None
    for cond in status.get("conditions") or ():
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return "scheduling", str(cond.get("reason") or "Unschedulable"), cond.get("message")
    for w in waits:
        if w.get("reason"):
            return "waiting", str(w["reason"]), w.get("message") or None
    return "waiting", None, None


def _event_time(event: Mapping[str, Any]) -> tuple[str, float]:
    """When an event last happened, comparable across the timestamp formats of core/v1 and
    events.k8s.io/v1 events (seconds, or microseconds)."""
    series = event.get("series") or {}
    raw = (
        series.get("lastObservedTime")
        or event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or (event.get("metadata") or {}).get("creationTimestamp")
        or ""
    )
    m = _TIME.match(str(raw))
    if not m:
        return ("", 0.0)
    return (m.group(1), float("0" + m.group(2)) if m.group(2) else 0.0)
