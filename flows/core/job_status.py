"""A Job's phase, decided from its status the way Kubernetes means it.

Since Kubernetes 1.31 the terminal conditions (``Complete``, ``Failed``) are written only after
every pod has terminated, and are preceded by interim ones: ``SuccessCriteriaMet`` and
``FailureTarget``. Both interim conditions already decide the outcome, so a waiter can return on
them. Older clusters write only the terminal ones; both orders are handled.

A Job that fails by its pod failure policy (``FailJob``) has reason ``PodFailurePolicy`` and a
message naming the pod. Pods that Kubernetes disrupted (condition ``DisruptionTarget``: evicted,
preempted, lost with their node) are not in the Job's status at all when the policy ignored them;
the backends observe them on the pods and report them with the state (`PodDisruption`).

A pod that never starts (an image that cannot be pulled, a missing Secret key, no node that fits,
a quota that refuses the pod) does not fail either: Kubernetes keeps it ``Pending``, so neither
``backoffLimit`` nor a pod failure policy ever applies. The Kubernetes backend watches for that
(`queuejob.flows.core.pods`) and says on the state what holds the pods (`StartProblem`), and
when the wait gave up on them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal


class JobPhase(enum.StrEnum):
    """Where a Job stands."""

    PENDING = "Pending"  # created, no pod seen yet
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def decided(self) -> bool:
        """True once the outcome can no longer change."""
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED)


@dataclass(frozen=True, slots=True)
class JobCounts:
    """The Job's pod counters (Kubernetes omits the zero ones)."""

    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    terminating: int = 0

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> JobCounts:
        """Read the counters from a Job's ``status``.

        Pods that have ended but are still listed in ``uncountedTerminatedPods`` (their
        job-tracking finalizer not yet removed) count too: on 1.31+ the controller writes the
        interim ``SuccessCriteriaMet``/``FailureTarget`` before it moves them into
        ``succeeded``/``failed``, and a summary taken there must not contradict the items.
        """
        uncounted = status.get("uncountedTerminatedPods") or {}
        return cls(
            active=int(status.get("active") or 0),
            ready=int(status.get("ready") or 0),
            succeeded=int(status.get("succeeded") or 0) + len(uncounted.get("succeeded") or ()),
            failed=int(status.get("failed") or 0) + len(uncounted.get("failed") or ()),
            terminating=int(status.get("terminating") or 0),
        )


@dataclass(frozen=True, slots=True)
class PodDisruption:
    """A pod of the Job that Kubernetes stopped for a reason that was not its own (its
    ``DisruptionTarget`` condition), and whether the failure counted toward ``backoffLimit``
    (False when the Job's pod failure policy ignored it)."""

    pod: str
    reason: str | None  # EvictionByEvictionAPI, PreemptionByScheduler, DeletionByPodGC, ...
    message: str | None
    counted: bool

    def as_dict(self) -> dict[str, object]:
        """Plain dict for reports."""
        return {
            "pod": self.pod,
            "reason": self.reason,
            "message": self.message,
            "counted": self.counted,
        }


StartKind = Literal["container", "scheduling", "create", "sandbox", "waiting", "none"]


@dataclass(frozen=True, slots=True)
class StartProblem:
    """What keeps pods of the Job from starting, as the wait saw it.

    ``kind`` says where it was seen: a container's waiting reason (``container``: ErrImagePull,
    ImagePullBackOff, InvalidImageName, CreateContainerConfigError, ...), the scheduler's
    ``PodScheduled=False`` (``scheduling``: Unschedulable), the Job controller's
    ``FailedCreate`` event (``create``: a quota, a missing service account, an admission
    refusal), the kubelet's ``FailedCreatePodSandBox`` event (``sandbox``), a pod still waiting
    with no error (``waiting``: ContainerCreating, a slow pull) or no pod at all (``none``).
    ``seconds`` is how long it had lasted and ``rule`` the setting that decided, when the wait
    gave up on it (or noted it as stuck).
    """

    reason: str
    message: str | None = None
    kind: StartKind = "container"
    pods: tuple[str, ...] = ()
    image: str | None = None
    seconds: float = 0.0
    rule: str | None = None

    def line(self) -> str:
        """One line: ``2 pods pending: ImagePullBackOff: Back-off pulling image "x"`` or ``Job
        cannot create pods: FailedCreate: pods "x-7kq2m" is forbidden: exceeded quota: ...``."""
        text = f"{self.reason}: {self.message}" if self.message else self.reason
        if self.kind == "create":
            return f"Job cannot create pods: {text}"
        if self.kind == "none":
            return f"Job has no pods: {text}"
        n = len(self.pods)
        return f"{n} pod{'' if n == 1 else 's'} pending: {text}"

    def why(self) -> str:
        """Why the wait gave up on it (or noted it): ``for 61 s, past start_grace_seconds=60``,
        ``no pod started within start_timeout_seconds=600``, ``InvalidImageName does not
        resolve by waiting``."""
        rule = self.rule or ""
        if rule == "at once":
            return f"{self.reason} does not resolve by waiting"
        if rule.startswith("start_grace_seconds"):
            return f"for {self.seconds:.0f} s, past {rule}"
        if rule.startswith("start_timeout_seconds"):
            return f"no pod started within {rule}"
        return f"for {self.seconds:.0f} s"

    def as_dict(self) -> dict[str, object]:
        """Plain dict for reports."""
        return {
            "reason": self.reason,
            "message": self.message,
            "kind": self.kind,
            "pods": list(self.pods),
            "image": self.image,
            "seconds": round(self.seconds, 1),
            "rule": self.rule,
        }


@dataclass(frozen=True, slots=True)
class JobState:
    """A Job's phase, counters and, once decided, the condition that decided it; and what the
    backend saw of its pods: those Kubernetes disrupted (`PodDisruption`), what holds pods that
    have not started (``pending``), pods stuck while others ran (``stuck``).

    ``start_failure`` is set when the wait gave up because no pod of the Job could start (the
    Job itself is not decided: the run deletes it). ``held_open`` is set when the Job's work is
    done (completions unset and a pod succeeded) but pods that never started keep it from
    completing: the wait ends there too.
    """

    phase: JobPhase
    counts: JobCounts
    condition: str | None = None  # SuccessCriteriaMet, Complete, FailureTarget or Failed
    reason: str | None = None  # CompletionsReached, BackoffLimitExceeded, DeadlineExceeded, ...
    message: str | None = None
    terminal: bool = False  # True once Complete/Failed are written (every pod has ended)
    disruptions: tuple[PodDisruption, ...] = ()
    pending: StartProblem | None = None
    start_failure: StartProblem | None = None
    stuck: tuple[StartProblem, ...] = ()
    held_open: bool = False

    @property
    def settled(self) -> bool:
        """True when the wait is over: the Job is decided, its pods cannot start, or only pods
        that never started keep it open."""
        return self.phase.decided or self.start_failure is not None or self.held_open

    def describe(self, *, pods: bool = True) -> str:
        """One line for logs: phase, reason and counts, and what holds pods from starting
        (unless ``pods`` is False)."""
        c = self.counts
        head = self.phase.value if not self.reason else f"{self.phase.value} ({self.reason})"
        line = (
            f"{head}: active={c.active} ready={c.ready} succeeded={c.succeeded} "
            f"failed={c.failed} terminating={c.terminating}"
        )
        if self.disruptions:
            line += f" disrupted={len(self.disruptions)}"
        if pods and self.pending is not None:
            line += f"; {self.pending.line()}"
        return line


_SUCCESS = ("SuccessCriteriaMet", "Complete")
_FAILURE = ("FailureTarget", "Failed")


def job_state(job: Mapping[str, Any]) -> JobState:
    """The phase of a Job object (a dict as the API server returns it)."""
    status = job.get("status") or {}
    counts = JobCounts.from_status(status)
    conditions = [c for c in status.get("conditions") or [] if c.get("status") == "True"]
    by_type = {c.get("type"): c for c in conditions}
    for kinds, phase in ((_FAILURE, JobPhase.FAILED), (_SUCCESS, JobPhase.SUCCEEDED)):
        present = [k for k in kinds if k in by_type]
        if present:
            # Prefer the terminal condition when both are there: it is the final word.
            decisive = by_type[present[-1]]
            return JobState(
                phase=phase,
                counts=counts,
                condition=str(decisive.get("type")),
                reason=decisive.get("reason"),
                message=decisive.get("message"),
                terminal=kinds[1] in by_type,
            )
    if "Suspended" in by_type:
        cond = by_type["Suspended"]
        return JobState(
            phase=JobPhase.SUSPENDED,
            counts=counts,
            condition="Suspended",
            reason=cond.get("reason"),
            message=cond.get("message"),
        )
    started = bool(status.get("startTime")) or counts.active or counts.succeeded or counts.failed
    return JobState(phase=JobPhase.RUNNING if started else JobPhase.PENDING, counts=counts)
