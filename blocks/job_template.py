"""What a run's worker Job looks like, kept as a Prefect block.

The block holds every field of `queuejob.flows.core.manifest.JobSpec` (per-run values such as
the run id, the queue and completions are not part of either) with the same bounds, in the shapes
the UI's forms handle (lists rather than tuples). `WorkQueueJobTemplate.to_job_spec` applies a run's
overrides and returns the validated `JobSpec` the manifest builder takes.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import Field, ValidationError, model_validator

from queuejob.blocks._validation import readable_errors
from queuejob.flows.core.errors import InvalidInput
from queuejob.flows.core.manifest import MAX_NAME, RUN_SUFFIX_LEN, JobSpec
from queuejob.flows.core.results import DEFAULT_MAX_RESULT_BYTES, MAX_RESULT_BYTES_CEILING

# The JSON-schema pattern lets the UI reject a bad namespace before the block is saved.
_DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Keys Prefect itself puts into a block's data (see `Block.ser_model`).
_BLOCK_KEYS = frozenset(
    {"block_type_slug", "_block_document_id", "_block_document_name", "_is_anonymous"}
)


class WorkQueueJobTemplate(Block):
    """The worker Job's shape: image, command, namespace, pod settings and Job limits.

    Give either `command` (run once per item with the item's body on stdin) or `call` (a Python
    function called with the body); a run may override either, and the other is then dropped.
    """

    _block_type_name = "Work Queue Job Template"
    _block_type_slug = "work-queue-job-template"
    _description = (
        "The Kubernetes Job queuejob creates for a run: the worker image and the command run "
        "per work item, the namespace, pod settings (service account, resources, env, node "
        "selector, tolerations, pull secrets) and the Job's parallelism and limits."
    )

    image: str = Field(
        description="Container image with queuejob installed (its 'queuejob' command runs in "
        "every pod), e.g. 'registry.example.com/team/queuejob:1.2.0'.",
    )
    command: list[str] = Field(
        default_factory=list,
        description="The program run for each work item, with the item's body on stdin (as "
        "amqp-consume does), e.g. ['python', '/app/process.py']. Leave empty when 'call' is used.",
    )
    call: str | None = Field(
        default=None,
        description="Instead of a command: a Python function 'package.module:function' in the "
        "image, called with the item's body (bytes).",
    )
    max_result_bytes: int = Field(
        default=DEFAULT_MAX_RESULT_BYTES,
        ge=0,
        le=MAX_RESULT_BYTES_CEILING,
        description="The largest result an item may return, in bytes: the function's return "
        "value as JSON, or what the command writes to $QUEUEJOB_RESULT_FILE. A larger result "
        "fails the item (nothing is truncated): store large outputs elsewhere (a bucket) and "
        "return a reference to them.",
    )
    namespace: str = Field(
        default="default",
        pattern=_DNS1123,
        max_length=MAX_NAME,
        description="Namespace the Job and its Secret are created in; the flow's service "
        "account needs the queuejob Role there.",
    )
    name_prefix: str = Field(
        default="queuejob",
        pattern=_DNS1123,
        max_length=MAX_NAME - RUN_SUFFIX_LEN - 1,
        description="Job names are '<prefix>-<run id>': lower-case letters, digits and '-', "
        "at most 50 characters.",
    )
    mode: Literal["coarse", "fine"] = Field(
        default="coarse",
        description="coarse: each pod processes one item and exits (completions = items); "
        "fine: each pod keeps taking items until the queue stays empty for the idle timeout.",
    )
    parallelism: int = Field(
        default=2, ge=1, le=10_000, description="How many worker pods run at once."
    )
    backoff_limit: int = Field(
        default=6,
        ge=0,
        le=10_000,
        description="Failed pods tolerated before Kubernetes marks the Job failed.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Wall-clock limit for the whole Job in seconds; running pods are killed "
        "when it passes. Empty: no limit.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description="Kubernetes deletes the finished Job (and its pods) this many seconds "
        "after it ends. Empty: keep it (queuejob's cleanup policy decides).",
    )
    idle_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="A worker that finds the queue empty for this long exits 0 with "
        "'no work', so no pod waits forever.",
    )
    service_account: str | None = Field(
        default=None,
        description="Service account the worker pods run as. Empty: the namespace's default.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None,
        description="When the kubelet pulls the image. Empty: Kubernetes' default "
        "(Always for ':latest', else IfNotPresent).",
    )
    resources: dict[str, dict[str, str]] | None = Field(
        default=None,
        description="Container resources, e.g. {'requests': {'cpu': '250m', 'memory': "
        "'256Mi'}, 'limits': {'memory': '512Mi'}}.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables for the worker container. BROKER_URL, QUEUE, "
        "QUEUEJOB_RUN_ID and POD_NAME are set by queuejob.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Pod nodeSelector: node labels the worker pods must land on.",
    )
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Pod tolerations as Kubernetes writes them, e.g. [{'key': 'batch', "
        "'operator': 'Exists', 'effect': 'NoSchedule'}].",
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list,
        description="Names of docker-registry Secrets in the namespace used to pull the image.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels for the Job and its pods (queuejob adds its own).",
    )
    broker_ca_secret: str | None = Field(
        default=None,
        description="For a TLS broker signed by a private CA: a Secret in the namespace holding "
        "the CA bundle (key 'broker_ca_key'). It is mounted into the worker pods, which verify "
        "the broker with it.",
    )
    broker_ca_configmap: str | None = Field(
        default=None,
        description="The same from a ConfigMap instead of a Secret (give one of the two).",
    )
    broker_ca_key: str = Field(
        default="ca.crt",
        description="The key of the CA bundle (PEM) in that Secret or ConfigMap.",
    )
    item_timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        description="A command still running after this many seconds is stopped (SIGTERM, "
        "then SIGKILL) and its item recorded failed, then retried up to the queue's delivery "
        "limit. A --call function cannot be stopped: its pod exits and is replaced. Empty: no "
        "limit.",
    )
    start_grace_seconds: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        description="A start error of the worker pods (an image that cannot be pulled, a "
        "missing Secret or key, a container the runtime refuses) that lasts this long with no "
        "pod of the Job started fails the run: the Job, its pods and its Secret are deleted and "
        "every item stays in the queue for a rerun. InvalidImageName and ErrImageNeverPull fail "
        "it at once.",
    )
    start_timeout_seconds: float = Field(
        default=600.0,
        ge=0,
        description="When no pod of the Job has started after this long (no node fits, a "
        "quota refuses the pods, a slow pull), the run fails the same way. 0: wait for the "
        "run's timeout. Give a cluster autoscaler time to add a node.",
    )
    pod_failure_rules: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra podFailurePolicy rules, as Kubernetes writes them, after queuejob's "
        "own two (FailJob when the worker exits 2, its configuration error; Ignore when the pod "
        "has the DisruptionTarget condition). E.g. [{'action': 'FailJob', 'onPodConditions': "
        "[{'type': 'ConfigIssue'}]}]. The first rule that matches a failed pod decides.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_fields(cls, data: Any) -> Any:
        # Block allows extra fields; a misspelt one ("paralelism") would otherwise vanish.
        if isinstance(data, dict):
            unknown = sorted(
                k
                for k in data
                if isinstance(k, str) and k not in cls.model_fields and k not in _BLOCK_KEYS
            )
            if unknown:
                raise ValueError(
                    f"unknown field(s) {unknown} for the Work Queue Job Template; known: "
                    f"{sorted(cls.model_fields)}"
                )
        return data

    def to_job_spec(self, **overrides: Any) -> JobSpec:
        """The validated `JobSpec` for one run: the block's values with ``overrides`` applied.

        Overrides whose value is None are ignored, so a flow can pass its optional parameters
        straight through. Overriding ``command`` drops the block's ``call`` and vice versa.
        Raises `InvalidInput`, naming the fields, for unknown names or values JobSpec rejects.
        """
        unknown = sorted(set(overrides) - set(JobSpec.model_fields))
        if unknown:
            raise InvalidInput(
                f"cannot override {unknown} on {self._label()}: they are not Job settings; "
                f"known: {sorted(JobSpec.model_fields)}"
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        values: dict[str, Any] = {name: getattr(self, name) for name in JobSpec.model_fields}
        if "command" in given and "call" not in given:
            values["call"] = None
        if "call" in given and "command" not in given:
            values["command"] = ()
        values.update(given)
        try:
            return JobSpec.model_validate(values)
        except ValidationError as exc:
            raise InvalidInput(
                f"{self._label()} does not make a valid Job: "
                f"{readable_errors(exc, show_input=True)}; fix the block or the run's overrides"
            ) from exc

    def _label(self) -> str:
        name = self._block_document_name
        return f"job template {name!r}" if name else "the job template"
