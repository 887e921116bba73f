"""Shared pieces of the fake API server: resource table, timestamps, key order, Status bodies.

The fake answers the way a v1.32 kube-apiserver does in the recorded traces: compact JSON with the
Go structs' key order, second-precision ``Z`` timestamps, and ``Status`` bodies whose
``details.kind`` is the resource plural for NotFound/AlreadyExists/Conflict/Forbidden but the
Kind for Invalid.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

Obj = dict[str, Any]

JOB_TRACKING_FINALIZER = "batch.kubernetes.io/job-tracking"
FOREGROUND_FINALIZER = "foregroundDeletion"
ORPHAN_FINALIZER = "orphan"
ORPHAN_WARNING = (
    '299 - "child pods are preserved by default when jobs are deleted; set '
    "propagationPolicy=Background to remove them or set propagationPolicy=Orphan to suppress "
    'this warning"'
)
NODE_NAME = "fake-node"
# The node's labels, as a kubelet registers them: what a pod's nodeSelector is matched against.
NODE_LABELS = {
    "kubernetes.io/hostname": NODE_NAME,
    "kubernetes.io/os": "linux",
    "kubernetes.io/arch": "amd64",
}
# The scheduler's message for a pod whose nodeSelector matches no node (1.32, one node).
UNSCHEDULABLE_MESSAGE = (
    "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. "
    "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
)


@dataclass(frozen=True, slots=True)
class Resource:
    """One REST resource the fake serves."""

    plural: str
    kind: str
    group: str  # "" for the core group
    version: str
    namespaced: bool
    has_generation: bool = False
    returns_deleted_object: bool = False  # pods answer DELETE with the object, others with Status

    @property
    def api_version(self) -> str:
        """``v1`` or ``batch/v1``."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """``jobs.batch`` or ``pods``: how messages name the resource."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def kind_qualified(self) -> str:
        """``Job.batch`` or ``Secret``: how Invalid messages name the kind."""
        return f"{self.kind}.{self.group}" if self.group else self.kind


RESOURCES: dict[str, Resource] = {
    "namespaces": Resource("namespaces", "Namespace", "", "v1", namespaced=False),
    "secrets": Resource("secrets", "Secret", "", "v1", namespaced=True),
    "pods": Resource("pods", "Pod", "", "v1", namespaced=True, returns_deleted_object=True),
    "jobs": Resource("jobs", "Job", "batch", "v1", namespaced=True, has_generation=True),
    "events": Resource("events", "Event", "", "v1", namespaced=True),
}


# --- time, names, ids -----------------------------------------------------------------------


def utcnow() -> datetime:
    """The current time (UTC)."""
    return datetime.now(UTC)


def fmt_time(when: datetime) -> str:
    """RFC 3339 with second precision and ``Z``, as the API server writes metav1.Time."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_str(offset_s: float = 0.0) -> str:
    """The current time, optionally shifted, formatted as metav1.Time."""
    return fmt_time(utcnow() + timedelta(seconds=offset_s))


def parse_time(value: str | None) -> datetime | None:
    """Parse a metav1.Time string (None stays None)."""
    if not value:
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def new_uid() -> str:
    """A random UID shaped like the API server's."""
    return str(uuid.uuid4())


# Kubernetes' generated-name alphabet: no vowels (no words) and no look-alike characters.
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_MAX_GENERATED_BASE = 58  # 63 - 5: names.SimpleNameGenerator truncates the base to this


def generate_name(base: str, rng: random.Random | None = None) -> str:
    """``base`` plus a 5-character random suffix, as ``metadata.generateName`` does."""
    pick = rng or random
    suffix = "".join(pick.choice(_NAME_ALPHABET) for _ in range(5))
    return base[:_MAX_GENERATED_BASE] + suffix


# --- key order ----------------------------------------------------------------------------------
# The Go structs' field order, so bodies read like the real server's (clients do not care, but
# the traces and a human comparing them do).

ORDER_TOP = ["kind", "apiVersion", "metadata", "spec", "immutable", "data", "type", "status"]
ORDER_META = [
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
]
ORDER_JOB_SPEC = [
    "parallelism",
    "completions",
    "activeDeadlineSeconds",
    "podFailurePolicy",
    "successPolicy",
    "backoffLimit",
    "backoffLimitPerIndex",
    "maxFailedIndexes",
    "selector",
    "manualSelector",
    "template",
    "ttlSecondsAfterFinished",
    "completionMode",
    "suspend",
    "podReplacementPolicy",
    "managedBy",
]
ORDER_JOB_STATUS = [
    "conditions",
    "startTime",
    "completionTime",
    "active",
    "succeeded",
    "failed",
    "terminating",
    "completedIndexes",
    "failedIndexes",
    "uncountedTerminatedPods",
    "ready",
]
ORDER_POD_SPEC = [
    "volumes",
    "initContainers",
    "containers",
    "ephemeralContainers",
    "restartPolicy",
    "terminationGracePeriodSeconds",
    "activeDeadlineSeconds",
    "dnsPolicy",
    "nodeSelector",
    "serviceAccountName",
    "serviceAccount",
    "automountServiceAccountToken",
    "nodeName",
    "hostNetwork",
    "hostPID",
    "hostIPC",
    "shareProcessNamespace",
    "securityContext",
    "imagePullSecrets",
    "hostname",
    "subdomain",
    "affinity",
    "schedulerName",
    "tolerations",
    "hostAliases",
    "priorityClassName",
    "priority",
    "dnsConfig",
    "readinessGates",
    "runtimeClassName",
    "enableServiceLinks",
    "preemptionPolicy",
    "overhead",
    "topologySpreadConstraints",
    "setHostnameAsFQDN",
    "os",
    "hostUsers",
    "schedulingGates",
    "resourceClaims",
    "resources",
]
ORDER_CONTAINER = [
    "name",
    "image",
    "command",
    "args",
    "workingDir",
    "ports",
    "envFrom",
    "env",
    "resources",
    "resizePolicy",
    "restartPolicy",
    "volumeMounts",
    "volumeDevices",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "imagePullPolicy",
    "securityContext",
    "stdin",
    "stdinOnce",
    "tty",
]
ORDER_POD_STATUS = [
    "phase",
    "conditions",
    "message",
    "reason",
    "nominatedNodeName",
    "hostIP",
    "hostIPs",
    "podIP",
    "podIPs",
    "startTime",
    "initContainerStatuses",
    "containerStatuses",
    "qosClass",
]


def ordered(data: Mapping[str, Any], order: Iterable[str]) -> Obj:
    """A copy of ``data`` with the known keys first, in ``order``, then the others as they were."""
    keys = list(order)
    out: Obj = {k: data[k] for k in keys if k in data}
    out.update({k: v for k, v in data.items() if k not in out})
    return out


# --- Status bodies and the error that carries them ---------------------------------------------


class ApiError(Exception):
    """An API answer other than success: the HTTP code and the ``Status`` body to send."""

    def __init__(self, code: int, body: Obj, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{code} {body.get('reason')}: {body.get('message')}")
        self.code = code
        self.body = body
        self.headers = dict(headers or {})


def status_body(code: int, reason: str, message: str | None, details: Obj | None = None) -> Obj:
    """A failure ``Status`` in the server's key order (message before reason, code last)."""
    body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    if message is not None:
        body["message"] = message
    body["reason"] = reason
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def _details(res: Resource, name: str | None = None, **extra: Any) -> Obj:
    details: Obj = {}
    if name:
        details["name"] = name
    if res.group:
        details["group"] = res.group
    details["kind"] = res.plural
    details.update(extra)
    return details


def not_found(res: Resource, name: str) -> ApiError:
    """404: ``jobs.batch "x" not found``."""
    return ApiError(
        404,
        status_body(404, "NotFound", f'{res.qualified} "{name}" not found', _details(res, name)),
    )


def already_exists(res: Resource, name: str) -> ApiError:
    """409: ``jobs.batch "x" already exists``."""
    return ApiError(
        409,
        status_body(
            409, "AlreadyExists", f'{res.qualified} "{name}" already exists', _details(res, name)
        ),
    )


def conflict(res: Resource, name: str, why: str | None = None) -> ApiError:
    """409 Conflict: a stale resourceVersion (or a failed precondition)."""
    text = why or (
        "the object has been modified; please apply your changes to the latest version and "
        "try again"
    )
    return ApiError(
        409,
        status_body(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {res.qualified} "{name}": {text}',
            _details(res, name),
        ),
    )


def forbidden(
    res_name: str,
    group: str,
    user: str,
    verb: str,
    namespace: str | None,
    name: str | None,
    kind_plural: str,
) -> ApiError:
    """403 as RBAC words it: the resource (with subresource), group, verb and namespace."""
    qualified = f"{kind_plural}.{group}" if group else kind_plural
    subject = f'{qualified} "{name}"' if name else qualified
    where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
    message = (
        f'{subject} is forbidden: User "{user}" cannot {verb} resource "{res_name}" in API group '
        f'"{group}"{where}'
    )
    details: Obj = {}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    details["kind"] = kind_plural
    return ApiError(
        403,
        status_body(403, "Forbidden", message, details),
        headers={"X-Content-Type-Options": "nosniff"},
    )


def bad_request(message: str) -> ApiError:
    """400 BadRequest (no details, as the server sends it)."""
    return ApiError(400, status_body(400, "BadRequest", message))


def unauthorized() -> ApiError:
    """401 for an unknown bearer token."""
    return ApiError(401, status_body(401, "Unauthorized", "Unauthorized"))


def unsupported_media_type() -> ApiError:
    """415 for a PATCH with a content type that is not a patch type."""
    return ApiError(
        415, status_body(415, "UnsupportedMediaType", "415: Unsupported Media Type", {})
    )


def method_not_allowed() -> ApiError:
    """405 for a verb the resource does not support."""
    return ApiError(
        405,
        status_body(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            {},
        ),
    )


def route_not_found() -> ApiError:
    """404 for a path the server does not serve."""
    return ApiError(
        404,
        status_body(404, "NotFound", "the server could not find the requested resource", {}),
    )


def expired(message: str) -> Obj:
    """The 410 Expired Status a watch sends as an ERROR event for a too-old resourceVersion."""
    return status_body(410, "Expired", message)


def success_status(res: Resource, name: str, uid: str) -> Obj:
    """200 Status Success for a DELETE that removed the object at once."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": _details(res, name, uid=uid),
    }


# --- Invalid (422) ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cause:
    """One validation failure: ``field.Error`` in the API server."""

    reason: str  # FieldValueInvalid, FieldValueRequired, ...
    field: str
    message: str  # the part after "<field>: "


def go_quote(value: Any) -> str:
    """A value as Go's validation errors print it: strings quoted, numbers bare."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def invalid_value(field: str, value: Any, detail: str) -> Cause:
    """``field.Invalid``."""
    return Cause("FieldValueInvalid", field, f"Invalid value: {go_quote(value)}: {detail}")


def invalid_raw(field: str, rendered: str, detail: str) -> Cause:
    """``field.Invalid`` with a value rendered by the caller (Go struct dumps)."""
    return Cause("FieldValueInvalid", field, f"Invalid value: {rendered}: {detail}")


def required(field: str, detail: str = "") -> Cause:
    """``field.Required``."""
    return Cause("FieldValueRequired", field, "Required value" + (f": {detail}" if detail else ""))


def not_supported(field: str, value: Any, supported: Iterable[str]) -> Cause:
    """``field.NotSupported``."""
    values = ", ".join(go_quote(v) for v in supported)
    return Cause(
        "FieldValueNotSupported",
        field,
        f"Unsupported value: {go_quote(value)}: supported values: {values}",
    )


def forbidden_field(field: str, detail: str) -> Cause:
    """``field.Forbidden``."""
    return Cause("FieldValueForbidden", field, f"Forbidden: {detail}")


def invalid(res: Resource, name: str, causes: list[Cause]) -> ApiError:
    """422 Invalid: ``Job.batch "x" is invalid: <field>: <msg>`` or ``[a, b]`` for several."""
    # ErrorList.ToAggregate drops repeated messages from the summary; causes keep them all.
    parts = list(dict.fromkeys(f"{c.field}: {c.message}" for c in causes))
    summary = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    details: Obj = {"name": name}
    if res.group:
        details["group"] = res.group
    details["kind"] = res.kind
    details["causes"] = [
        {"reason": c.reason, "message": c.message, "field": c.field} for c in causes
    ]
    return ApiError(
        422,
        status_body(
            422, "Invalid", f'{res.kind_qualified} "{name}" is invalid: {summary}', details
        ),
    )


def dumps(obj: Any) -> bytes:
    """Compact JSON, as the server writes it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
