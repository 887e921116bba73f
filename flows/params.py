"""The flow's parameters: what the Prefect UI shows as the run form.

Every field has a description and bounds, so a bad value is rejected before the run starts
(and, with `enforce_parameter_schema`, by the server when a run is created from the UI).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from queuejob.flows.core.errors import InvalidInput
from queuejob.flows.core.items import ItemSource
from queuejob.flows.core.manifest import JobSpec
from queuejob.flows.core.outcome import TOLERANCE_PATTERN
from queuejob.flows.core.results import MAX_RESULT_BYTES_CEILING
from queuejob.flows.core.validation import readable_errors

QUEUE_NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"

# The flow's `max_failed_items`: a number of items, or a percentage of them as text ("5%"). The
# form shows both (a number, or text matching the pattern); the server rejects anything else.
MaxFailedItems = Annotated[
    Annotated[int, Field(ge=0, title="items")]
    | Annotated[str, Field(pattern=TOLERANCE_PATTERN, title="percentage of the items")],
    Field(
        description="Items that may fail, be dead-lettered or be left in the queue before the "
        "run fails: a number (default 0: any such item fails the run) or a percentage of the "
        "items, e.g. '5%'. Caveat findings are caveat_policy's, not this.",
    ),
]
# The image of a local-backend run that names none: the pods are local processes, no image is
# pulled, but the Job manifest still needs one.
LOCAL_IMAGE = "localhost/queuejob:local"


class QueueParams(BaseModel):
    """The work queue in RabbitMQ."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(
        default="job1",
        pattern=QUEUE_NAME_PATTERN,
        description="Work queue name (letters, digits, '_', '.', ':', '-'; at most 200 "
        "characters). '<name>.dead', '<name>.results' and '<name>.fill' are created beside it.",
    )
    type: Literal["quorum", "classic"] = Field(
        default="quorum",
        description="quorum bounds poison messages with a delivery limit; classic is the "
        "docs' default queue type.",
    )
    delivery_limit: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Redeliveries allowed (x-delivery-limit) before an item is dead-lettered "
        "into '<name>.dead': an item is tried at most this many times plus one.",
    )
    stale_messages: Literal["fail", "purge"] = Field(
        default="fail",
        description="What to do when the queue already holds messages this run did not put "
        "there: fail the run, or purge them first.",
    )

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: object) -> object:
        # Before the pattern check, so a bad name gets a message saying what to change rather
        # than the bare pattern (which stays on the field for the UI form).
        if not isinstance(value, str):
            return value
        if not value:
            raise ValueError("queue name is empty; give a name such as 'job1'")
        if len(value) > 200:
            raise ValueError(
                f"queue name {value[:20]!r}... is {len(value)} characters "
                f"({len(value.encode())} bytes); use at most 200 (RabbitMQ allows 255 bytes "
                "and queuejob appends '.fill.lock' and '.results')"
            )
        bad = sorted({c for c in value if not (c.isascii() and (c.isalnum() or c in "_.:-"))})
        if bad:
            shown = ", ".join(repr(c) for c in bad)
            raise ValueError(
                f"queue name {value!r} contains {shown}; use only letters, digits, '_', '.', "
                "':' and '-'"
            )
        return value


class JobParams(BaseModel):
    """The worker Job: a template block, and per-run overrides of it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    template_block: str | None = Field(
        default=None,
        description="Name of a WorkQueueJobTemplate block to start from (optional).",
    )
    image: str | None = Field(
        default=None, description="Container image with queuejob installed (overrides the block)."
    )
    command: list[str] | None = Field(
        default=None,
        description="Command run per item, the item's body on its stdin, e.g. "
        "['sh', '-c', 'cat']. Overrides the block.",
    )
    call: str | None = Field(
        default=None,
        description="Instead of a command: a Python callable 'module:function' given the item.",
    )
    max_result_bytes: int | None = Field(
        default=None,
        ge=0,
        le=MAX_RESULT_BYTES_CEILING,
        description="The largest result an item may return, in bytes (default 65536, or the "
        "template's); a larger one fails the item.",
    )
    namespace: str | None = Field(default=None, description="Kubernetes namespace.")
    parallelism: int | None = Field(
        default=None, ge=1, le=10_000, description="Pods running at once (default 2)."
    )
    completions: int | Literal["auto"] = Field(
        default="auto",
        description="'auto' sizes the Job from the confirmed item count (coarse mode). A number "
        "is used as given and checked against the items.",
    )
    backoff_limit: int | None = Field(
        default=None, ge=0, le=10_000, description="Failed pods tolerated (default 6)."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Wall-clock limit for the Job, in seconds."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Kubernetes deletes the finished Job after this long."
    )
    idle_timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="A worker finding the queue empty this long exits 'no work' (default 10).",
    )
    name_prefix: str | None = Field(
        default=None, description="Job names are '<prefix>-<run id>' (default 'queuejob')."
    )
    item_timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        description="An item still running after this many seconds fails and is retried up to "
        "the delivery limit (a command is stopped; a --call ends its pod). Default: no limit.",
    )
    start_grace_seconds: float | None = Field(
        default=None,
        ge=0,
        le=86_400,
        description="Kubernetes: a start error (image pull, missing Secret key, container "
        "config) lasting this long with no pod started fails the run, keeping every item in the "
        "queue (default 60, or the template's). InvalidImageName fails it at once.",
    )
    start_timeout_seconds: float | None = Field(
        default=None,
        ge=0,
        description="Kubernetes: no pod started this long (unschedulable, a quota, a slow "
        "pull) fails the run, keeping every item in the queue (default 600, or the template's; "
        "0: wait for timeout_seconds).",
    )

    @field_validator("completions")
    @classmethod
    def _completions(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(
                f"completions must be at least 1 or 'auto' (got {value}); 'auto' sizes the Job "
                "from the items"
            )
        return value

    def overrides(self) -> dict[str, object]:
        """The JobSpec fields this run sets (None means: keep the template's value)."""
        fields: dict[str, object] = {
            "image": self.image,
            "command": tuple(self.command) if self.command is not None else None,
            "call": self.call,
            "max_result_bytes": self.max_result_bytes,
            "namespace": self.namespace,
            "parallelism": self.parallelism,
            "backoff_limit": self.backoff_limit,
            "active_deadline_seconds": self.active_deadline_seconds,
            "ttl_seconds_after_finished": self.ttl_seconds_after_finished,
            "idle_timeout_seconds": self.idle_timeout_seconds,
            "name_prefix": self.name_prefix,
            "item_timeout_seconds": self.item_timeout_seconds,
            "start_grace_seconds": self.start_grace_seconds,
            "start_timeout_seconds": self.start_timeout_seconds,
        }
        out: dict[str, object] = {k: v for k, v in fields.items() if v is not None}
        if self.call is not None and self.command is None:
            out["command"] = ()
        if self.command is not None and self.call is None:
            out["call"] = None
        return out


class CleanupParams(BaseModel):
    """What to remove when the run succeeds (a cancelled or crashed run always removes its
    Job, pods and Secret)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    delete_job: bool = Field(
        default=True, description="Delete the Job, its pods and its Secret after success."
    )
    delete_queues: bool = Field(
        default=False,
        description="Delete the run's queues after success; a work or dead-letter queue that "
        "still holds items is kept and reported.",
    )


def default_items() -> ItemSource:
    """The Kubernetes docs' eight items."""
    return ItemSource.inline(
        ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]
    )


def job_spec_from(base: dict[str, object], job: JobParams, mode: str) -> JobSpec:
    """Merge a template's fields, the run's overrides and the mode into a validated JobSpec."""
    merged = {**base, **job.overrides(), "mode": mode}
    return JobSpec.model_validate(merged)


def job_spec_for_run(
    job: JobParams, mode: str, backend: str, *, names: Mapping[str, str] | None = None
) -> JobSpec:
    """The JobSpec of a run that names no template block: the run's own settings.

    Raises `InvalidInput` with one plain line when there is no command or call, no image for the
    kubernetes backend, or a value JobSpec refuses. ``names`` renames fields in that line (the
    CLI shows its options, ``--namespace`` for ``job.namespace``).
    """
    if not job.command and not job.call:
        raise InvalidInput(
            "job.command is missing: give the command run per item (job.command), a Python "
            "callable (job.call, 'module:function') or job.template_block naming a "
            "WorkQueueJobTemplate block"
        )
    base: dict[str, object] = {}
    if job.image is None:
        if backend != "local":
            raise InvalidInput(
                "no image: set job.image, or job.template_block naming a WorkQueueJobTemplate"
            )
        base["image"] = LOCAL_IMAGE
    try:
        return job_spec_from(base, job, mode)
    except ValidationError as exc:
        problems = readable_errors(exc, show_input=True, prefix="job", names=names)
        raise InvalidInput(f"invalid job settings: {problems}") from exc
