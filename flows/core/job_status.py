"""A Job's phase, decided from its status the way Kubernetes means it.

Since Kubernetes 1.31 the terminal conditions (``Complete``, ``Failed``) are written only after
every pod has terminated, and are preceded by interim ones: ``SuccessCriteriaMet`` and
``FailureTarget``. Both interim conditions already decide the outcome, so a waiter can return on
them. Older clusters write only the terminal ones; both orders are handled.

A Job that fails by its pod failure policy (``FailJob``) has reason ``PodFailurePolicy`` and a
message naming the pod. Pods that Kubernetes disrupted (condition ``DisruptionTarget``: evicted,
preempted, lost with their node) are not in the Job's status at all when the policy ignored them;
the backends observe them on the pods and report them with the state (`PodDisruption`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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


@dataclass(frozen=True, slots=True)
class JobState:
    """A Job's phase, counters and, once decided, the condition that decided it; and the pods
    Kubernetes disrupted, as far as the backend saw them (see `PodDisruption`)."""

    phase: JobPhase
    counts: JobCounts
    condition: str | None = None  # SuccessCriteriaMet, Complete, FailureTarget or Failed
    reason: str | None = None  # CompletionsReached, BackoffLimitExceeded, DeadlineExceeded, ...
    message: str | None = None
    terminal: bool = False  # True once Complete/Failed are written (every pod has ended)
    disruptions: tuple[PodDisruption, ...] = ()

    def describe(self) -> str:
        """One line for logs: phase, reason and counts."""
        c = self.counts
        head = self.phase.value if not self.reason else f"{self.phase.value} ({self.reason})"
        line = (
            f"{head}: active={c.active} ready={c.ready} succeeded={c.succeeded} "
            f"failed={c.failed} terminating={c.terminating}"
        )
        if self.disruptions:
            line += f" disrupted={len(self.disruptions)}"
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
