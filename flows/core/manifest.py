"""The per-run Secret and batch/v1 Job, as plain dicts (camelCase, ready for the API server).

The Job runs ``queuejob worker`` in every pod: it takes messages from the work queue and runs the
user's command (or Python callable) on each. The broker URL reaches the pods only through a
``secretKeyRef`` to the run's Secret, never as a literal in the Job. Both objects carry the labels
that tie them to the flow run, so cleanup hooks in another process can find them by label.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from queuejob.flows.core.errors import InvalidInput
from queuejob.flows.core.pod_failure import ServerFeatures, check_rules, pod_failure_policy
from queuejob.flows.core.results import DEFAULT_MAX_RESULT_BYTES, MAX_RESULT_BYTES_CEILING

APP_LABEL = "app.kubernetes.io/name"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
RUN_ID_LABEL = "queuejob.io/run-id"
ITEMS_ANNOTATION = "queuejob.io/confirmed-items"
QUEUE_ANNOTATION = "queuejob.io/queue"
APP_NAME = "queuejob"
SECRET_KEY = "BROKER_URL"
CONTAINER_NAME = "worker"
# The broker's CA bundle in a pod, when the Job template names a Secret or ConfigMap holding it:
# mounted read-only here, and named to the worker by CA_FILE_ENV.
CA_VOLUME = "broker-ca"
CA_MOUNT_DIR = "/etc/queuejob/broker-ca"
CA_FILE_ENV = "QUEUEJOB_BROKER_CA_FILE"

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_FRAGMENT = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# registry[:port]/path[:tag][@digest]; lower-case path components as the distribution spec says.
_IMAGE_REF = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$",
    re.ASCII,  # a tag is ASCII: without this, \w would accept any Unicode letter
)
RUN_SUFFIX_LEN = 12
MAX_NAME = 63


def is_dns1123_label(value: str) -> bool:
    """True when value is a valid DNS-1123 label (namespaces, Job names)."""
    # fullmatch, not match: '$' alone would accept a trailing newline.
    return len(value) <= MAX_NAME and bool(_DNS1123_LABEL.fullmatch(value))


def check_dns1123_label(value: str, what: str) -> str:
    """Return value, or raise `InvalidInput` saying what a DNS-1123 label must look like."""
    if not is_dns1123_label(value):
        raise InvalidInput(
            f"{what} {value!r} is not a valid DNS-1123 label: use at most 63 lower-case letters, "
            "digits and '-', starting and ending with a letter or digit"
        )
    return value


def is_dns1123_subdomain(value: str) -> bool:
    """True when value may name a Secret or ConfigMap (a DNS-1123 subdomain)."""
    return len(value) <= 253 and all(_DNS1123_LABEL.fullmatch(p) for p in value.split("."))


def check_image(value: str) -> str:
    """Return value, or raise `InvalidInput` when it is not an image reference."""
    if not value or not _IMAGE_REF.fullmatch(value) or len(value) > 512:
        raise InvalidInput(
            f"image {value!r} is not a valid image reference: expected "
            "[registry/]repository[:tag][@sha256:digest] with a lower-case repository"
        )
    return value


def run_suffix(run_id: str) -> str:
    """A short, DNS-safe token derived from a run id (a flow-run UUID or any string)."""
    token = re.sub(r"[^a-z0-9]", "", run_id.lower())
    if not token:
        raise InvalidInput(f"run id {run_id!r} has no letters or digits to name objects with")
    return token[:RUN_SUFFIX_LEN]


def job_name(prefix: str, run_id: str) -> str:
    """The Job's name: ``<prefix>-<12 characters of the run id>``, at most 63 characters."""
    name = f"{prefix}-{run_suffix(run_id)}"
    if len(name) > MAX_NAME:
        room = MAX_NAME - RUN_SUFFIX_LEN - 1
        raise InvalidInput(
            f"name prefix {prefix!r} is too long: the Job name {name!r} would have {len(name)} "
            f"characters, over Kubernetes' 63; use a prefix of at most {room} characters"
        )
    return check_dns1123_label(name, "Job name")


def secret_name(job: str) -> str:
    """The run's Secret, named after its Job."""
    return f"{job}-broker"


def run_labels(run_id: str) -> dict[str, str]:
    """The labels every object of the run carries."""
    value = run_id if _LABEL_VALUE.fullmatch(run_id) and len(run_id) <= 63 else run_suffix(run_id)
    return {APP_LABEL: APP_NAME, MANAGED_BY_LABEL: APP_NAME, RUN_ID_LABEL: value}


def run_selector(run_id: str) -> str:
    """A label selector that matches exactly the run's objects."""
    return ",".join(f"{k}={v}" for k, v in run_labels(run_id).items())


class JobSpec(BaseModel):
    """What the worker Job looks like, apart from the per-run names, labels and completions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = Field(description="Container image with queuejob installed.")
    command: tuple[str, ...] = Field(
        default=(),
        description="The command run for each item, with the item's body on stdin "
        "(as amqp-consume does). Empty when 'call' is used.",
    )
    call: str | None = Field(
        default=None,
        description="A Python callable 'module:function' called with the item's body (bytes), "
        "instead of a command.",
    )
    max_result_bytes: int = Field(
        default=DEFAULT_MAX_RESULT_BYTES,
        ge=0,
        le=MAX_RESULT_BYTES_CEILING,
        description="The largest result an item may return, in bytes (a call's return value "
        "as JSON, or what a command writes to $QUEUEJOB_RESULT_FILE); a larger one fails the "
        "item. Store large outputs elsewhere and return a reference.",
    )
    namespace: str = Field(default="default", description="Namespace for the Job and Secret.")
    name_prefix: str = Field(
        default="queuejob",
        max_length=MAX_NAME - RUN_SUFFIX_LEN - 1,
        description="Job names are '<prefix>-<run id>'; a DNS-1123 label of at most 50 chars.",
    )
    mode: Literal["coarse", "fine"] = Field(
        default="coarse",
        description="coarse: each pod takes one item (the docs' pattern); fine: each pod loops "
        "until the queue stays empty for the idle timeout.",
    )
    parallelism: int = Field(default=2, ge=1, le=10_000, description="Pods running at once.")
    backoff_limit: int = Field(
        default=6, ge=0, le=10_000, description="Failed pods tolerated before the Job fails."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Wall-clock limit for the whole Job, in seconds."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the finished Job after this many seconds."
    )
    idle_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="A worker that finds the queue empty this long exits 0 ('no work').",
    )
    service_account: str | None = Field(default=None, description="Pods' service account.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Pull policy; Kubernetes' default when empty."
    )
    resources: dict[str, dict[str, str]] | None = Field(
        default=None, description="Container resources: {'requests': {...}, 'limits': {...}}."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for pods.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: tuple[dict[str, Any], ...] = Field(default=(), description="Pod tolerations.")
    image_pull_secrets: tuple[str, ...] = Field(
        default=(), description="Names of Secrets used to pull the image."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels.")
    broker_ca_secret: str | None = Field(
        default=None,
        description="A Secret holding the CA bundle that signed the broker's TLS certificate: "
        "mounted into the pods, which verify the broker with it.",
    )
    broker_ca_configmap: str | None = Field(
        default=None,
        description="The same from a ConfigMap (give one of the two).",
    )
    broker_ca_key: str = Field(
        default="ca.crt",
        description="The key of the CA bundle in that Secret or ConfigMap.",
    )
    item_timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        description="A command still running after this many seconds is stopped and its item "
        "recorded failed (retried up to the delivery limit). Empty: no limit.",
    )
    start_grace_seconds: float = Field(
        default=60.0,
        ge=0,
        le=86_400,
        description="Kubernetes: a start error (an image that cannot be pulled, a missing "
        "Secret key) that lasts this long with no pod of the Job started fails the run "
        "(InvalidImageName and ErrImageNeverPull fail it at once).",
    )
    start_timeout_seconds: float = Field(
        default=600.0,
        ge=0,
        description="Kubernetes: no pod of the Job started this long (unschedulable, a quota, "
        "a slow pull) fails the run. 0: wait for the run's timeout.",
    )
    pod_failure_rules: tuple[dict[str, Any], ...] = Field(
        default=(),
        description="podFailurePolicy rules added after queuejob's own two (FailJob on the "
        "worker's exit 2, Ignore on DisruptionTarget), as Kubernetes writes them.",
    )

    @field_validator("pod_failure_rules")
    @classmethod
    def _rules(cls, value: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
        return check_rules(value, container=CONTAINER_NAME)

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        try:
            return check_image(value)
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None

    @field_validator("namespace", "name_prefix")
    @classmethod
    def _dns(cls, value: str) -> str:
        if len(value) > MAX_NAME or not _DNS1123_FRAGMENT.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a valid DNS-1123 label: at most 63 lower-case letters, digits "
                "and '-', starting and ending with a letter or digit"
            )
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = {
            SECRET_KEY,
            "QUEUE",
            "QUEUEJOB_RUN_ID",
            "POD_NAME",
            "QUEUEJOB_DELIVERY_LIMIT",
            CA_FILE_ENV,
        } & set(value)
        if reserved:
            raise ValueError(f"env may not set {sorted(reserved)}: queuejob sets them itself")
        return value

    @model_validator(mode="after")
    def _one_ca_source(self) -> JobSpec:
        if self.broker_ca_secret and self.broker_ca_configmap:
            raise ValueError("give one of 'broker_ca_secret' and 'broker_ca_configmap', not both")
        for name in (self.broker_ca_secret, self.broker_ca_configmap):
            if name is not None and not is_dns1123_subdomain(name):
                raise ValueError(f"{name!r} is not a valid Secret or ConfigMap name")
        if not re.fullmatch(r"[-._a-zA-Z0-9]+", self.broker_ca_key):
            raise ValueError(f"broker_ca_key {self.broker_ca_key!r} is not a valid key name")
        return self

    @model_validator(mode="after")
    def _command_or_call(self) -> JobSpec:
        if bool(self.command) == bool(self.call):
            raise ValueError("give exactly one of 'command' (a program run per item) and 'call'")
        if self.call is not None and not re.fullmatch(r"[\w.]+:[\w.]+", self.call):
            raise ValueError(f"call {self.call!r} must look like 'package.module:function'")
        return self


def check_counts(*, parallelism: int, completions: int | None) -> None:
    """Raise `InvalidInput` for counts Kubernetes would reject or that cannot do any work."""
    if parallelism < 1:
        raise InvalidInput(f"parallelism must be at least 1 (got {parallelism})")
    if completions is not None and completions < 1:
        raise InvalidInput(
            f"completions must be at least 1 (got {completions}); use completions=auto to size "
            "it from the items"
        )


def worker_command(spec: JobSpec) -> list[str]:
    """The container command: ``queuejob worker`` with the mode and the user's command."""
    cmd = [
        "queuejob",
        "worker",
        "--mode",
        spec.mode,
        "--idle-timeout",
        f"{spec.idle_timeout_seconds:g}",
    ]
    if spec.max_result_bytes != DEFAULT_MAX_RESULT_BYTES:
        cmd += ["--max-result-bytes", str(spec.max_result_bytes)]
    if spec.item_timeout_seconds is not None:
        cmd += ["--item-timeout", f"{spec.item_timeout_seconds:g}"]
    if spec.call:
        return [*cmd, "--call", spec.call]
    return [*cmd, "--", *spec.command]


def build_secret(*, namespace: str, name: str, run_id: str, broker_url: str) -> dict[str, Any]:
    """The run's Secret holding the broker URL (read by pods through ``secretKeyRef``)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": run_labels(run_id)},
        "type": "Opaque",
        "stringData": {SECRET_KEY: broker_url},
    }


def redact_secret(secret: dict[str, Any]) -> dict[str, Any]:
    """A copy of a Secret with every value replaced, for display."""
    out = {k: v for k, v in secret.items() if k not in ("stringData", "data")}
    for key in ("stringData", "data"):
        if key in secret:
            out[key] = {k: "<redacted>" for k in secret[key]}
    return out


def build_job(
    spec: JobSpec,
    *,
    run_id: str,
    queue: str,
    completions: int | None,
    confirmed_items: int | None = None,
    delivery_limit: int | None = None,
    features: ServerFeatures = ServerFeatures(),  # noqa: B008 - frozen
) -> dict[str, Any]:
    """The batch/v1 Job for one run.

    ``completions`` is None in fine mode (pods loop until the queue is drained; the Job is done
    when one pod succeeded and all ended); in coarse mode it is the number of items to process.
    ``features`` says which fields the API server keeps (default: a current server's): the
    ``podFailurePolicy`` and ``podReplacementPolicy: Failed`` are left out where it has neither
    (see `queuejob.flows.core.pod_failure`).
    """
    check_counts(parallelism=spec.parallelism, completions=completions)
    name = job_name(spec.name_prefix, run_id)
    labels = {**spec.labels, **run_labels(run_id)}
    env: list[dict[str, Any]] = [
        {
            "name": SECRET_KEY,
            "valueFrom": {"secretKeyRef": {"name": secret_name(name), "key": SECRET_KEY}},
        },
        {"name": "QUEUE", "value": queue},
        {"name": "QUEUEJOB_RUN_ID", "value": run_id},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    if delivery_limit is not None:
        # Classic queues have no broker-side limit: the worker counts redeliveries itself.
        env.append({"name": "QUEUEJOB_DELIVERY_LIMIT", "value": str(delivery_limit)})
    env += [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "command": worker_command(spec),
        "env": env,
    }
    ca_source = _ca_volume_source(spec)
    if ca_source is not None:
        # The broker's CA, for a TLS broker signed by a private CA: a read-only volume.
        env.append({"name": CA_FILE_ENV, "value": f"{CA_MOUNT_DIR}/{spec.broker_ca_key}"})
        container["volumeMounts"] = [
            {"name": CA_VOLUME, "mountPath": CA_MOUNT_DIR, "readOnly": True}
        ]
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    if spec.resources:
        container["resources"] = {k: dict(v) for k, v in spec.resources.items()}
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    if ca_source is not None:
        pod_spec["volumes"] = [{"name": CA_VOLUME, **ca_source}]

    job_spec: dict[str, Any] = {"parallelism": spec.parallelism}
    if completions is not None:
        job_spec["completions"] = completions
        # More pods at once than completions would only start pods with nothing to do.
        job_spec["parallelism"] = min(spec.parallelism, completions)
    if features.pod_failure_policy:
        job_spec["podFailurePolicy"] = pod_failure_policy(CONTAINER_NAME, spec.pod_failure_rules)
    job_spec["backoffLimit"] = spec.backoff_limit
    if features.pod_replacement_policy:
        # No replacement while the pod it replaces still terminates, holding unacked messages.
        job_spec["podReplacementPolicy"] = "Failed"
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    job_spec["template"] = {"metadata": {"labels": dict(labels)}, "spec": pod_spec}

    annotations = {QUEUE_ANNOTATION: queue}
    if confirmed_items is not None:
        annotations[ITEMS_ANNOTATION] = str(confirmed_items)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": spec.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": job_spec,
    }


def _ca_volume_source(spec: JobSpec) -> dict[str, Any] | None:
    """The volume source of the broker's CA bundle (only its key, as ``<key>``), or None."""
    items = [{"key": spec.broker_ca_key, "path": spec.broker_ca_key}]
    if spec.broker_ca_secret:
        return {"secret": {"secretName": spec.broker_ca_secret, "items": items}}
    if spec.broker_ca_configmap:
        return {"configMap": {"name": spec.broker_ca_configmap, "items": items}}
    return None
