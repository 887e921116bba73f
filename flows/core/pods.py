"""What the wait learns from the Job's pods, beyond the Job's own status.

The Job's status counts pods, but a pod that its pod failure policy ignored leaves no trace
there, and an evicted pod is deleted soon after it stopped. `PodTracker` takes every version of
every pod the backend sees (a watch's events, a list) and keeps what the run's report needs: the
pods Kubernetes disrupted (condition ``DisruptionTarget``) and whether each counted toward
``backoffLimit``. Pure: the backend feeds it, `JobState.disruptions` carries its findings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from queuejob.flows.core.job_status import PodDisruption
from queuejob.flows.core.pod_failure import IGNORE, disruption_of, match_pod


@dataclass
class _Seen:
    reason: str | None
    message: str | None
    counted: bool
    succeeded: bool


class PodTracker:
    """Pods of one Job, as observed; ``policy`` is the Job's ``podFailurePolicy`` (None: none,
    every disruption counts)."""

    def __init__(self, policy: Mapping[str, Any] | None = None) -> None:
        self.policy = policy
        self._disrupted: dict[str, _Seen] = {}

    def observe(self, pod: Mapping[str, Any]) -> bool:
        """Take one version of a pod (a watch event's object, a listed item); True when what
        the tracker reports changed."""
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

    @property
    def disruptions(self) -> tuple[PodDisruption, ...]:
        """The disrupted pods that did not succeed, in the order first seen."""
        return tuple(
            PodDisruption(pod=name, reason=s.reason, message=s.message, counted=s.counted)
            for name, s in self._disrupted.items()
            if not s.succeeded
        )
