"""The contract both Job backends (Kubernetes and local processes) fulfil.

The flow talks to a `JobBackend` only, so its wait and caveat logic cannot tell the backends apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from queuejob.flows.core.job_status import JobState
from queuejob.flows.core.manifest import RUN_ID_LABEL
from queuejob.flows.core.pods import StartLimits

Propagation = Literal["Background", "Foreground"]


@dataclass(frozen=True, slots=True)
class JobHandle:
    """A created (or adopted) Job."""

    name: str
    namespace: str
    uid: str
    run_id: str
    adopted: bool = False  # True when the Job already existed for this run
    annotations: Mapping[str, str] | None = None

    @classmethod
    def from_job(cls, job: Mapping[str, Any], run_id: str, *, adopted: bool) -> JobHandle:
        """The handle of a Job object (a dict as the API server or the local backend has it)."""
        meta = job.get("metadata") or {}
        annotations = meta.get("annotations") or None
        return cls(
            name=str(meta.get("name")),
            namespace=str(meta.get("namespace")),
            uid=str(meta.get("uid") or ""),
            run_id=run_id,
            adopted=adopted,
            annotations=dict(annotations) if annotations else None,
        )


def run_id_of(obj: Mapping[str, Any]) -> str | None:
    """The run id an object is labelled with, or None for an object no run owns."""
    value = ((obj.get("metadata") or {}).get("labels") or {}).get(RUN_ID_LABEL)
    return str(value) if value is not None else None


@dataclass(frozen=True, slots=True)
class PodFailure:
    """Why one pod failed: its exit code, the container's reason and the end of its log."""

    pod: str
    exit_code: int | None
    reason: str | None
    log_tail: str


# Called with the Job's state whenever it changes, and at least every `tick` seconds while
# waiting (so a caller can poll the broker between events). It may raise to abort the wait.
ProgressCallback = Callable[[JobState], None]


class JobBackend(Protocol):
    """Create or adopt, wait with progress, failure details, delete."""

    def create_or_adopt(
        self, *, secret: dict[str, Any], job: dict[str, Any], run_id: str
    ) -> JobHandle:
        """Create the Secret and the Job; adopt the Job when it exists for the same run."""
        ...

    def find_job(self, *, namespace: str, name: str, run_id: str) -> JobHandle | None:
        """The run's Job if it exists (for a retried run that skips the fill)."""
        ...

    def wait(
        self,
        handle: JobHandle,
        *,
        timeout_s: float,
        on_update: ProgressCallback | None = None,
        tick_s: float = 1.0,
        start: StartLimits | None = None,
    ) -> JobState:
        """Block until the Job is decided (success or failure) or raise `JobTimeout`; return
        early, the Job undecided, when its pods cannot start within the ``start`` limits
        (`JobState.start_failure`) or only pods that never started keep it open
        (`JobState.held_open`). A backend whose pods always start ignores ``start``."""
        ...

    def failure_details(self, handle: JobHandle, *, tail_lines: int = 20) -> list[PodFailure]:
        """One entry per failed pod."""
        ...

    def delete_run(
        self, *, namespace: str, run_id: str, propagation: Propagation = "Background"
    ) -> int:
        """Delete every Job (and its pods and Secret) labelled with the run id; return how many
        Jobs were deleted. Missing objects are not an error."""
        ...
