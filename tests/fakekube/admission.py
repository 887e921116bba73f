"""Defaulting, admission and validation: what the API server does to a body before storing it.

Only the rules a work-queue Job, its pods and its Secret can hit are here, with the exact messages
and cause order the recorded 1.32 server gives (see the traces' s06 and s11 files).
"""

from __future__ import annotations

import base64
import copy
import re
from typing import Any

from tests.fakekube.objects import (
    JOB_TRACKING_FINALIZER,
    ORDER_CONTAINER,
    ORDER_JOB_SPEC,
    ORDER_POD_SPEC,
    ORDER_POD_STATUS,
    RESOURCES,
    ApiError,
    Cause,
    Obj,
    bad_request,
    forbidden_field,
    generate_name,
    invalid,
    invalid_raw,
    invalid_value,
    not_supported,
    ordered,
    required,
    status_body,
)

CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
LEGACY_CONTROLLER_UID_LABEL = "controller-uid"
LEGACY_JOB_NAME_LABEL = "job-name"

_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")

SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
DNS_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
QUALIFIED_NAME_MSG = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
    "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used "
    "for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)


# --- common metadata ---------------------------------------------------------------------------


def validate_object_meta(meta: Obj, *, check_name: bool = True) -> list[Cause]:
    """metadata.name (a DNS-1123 subdomain), labels and annotations."""
    causes: list[Cause] = []
    name = meta.get("name")
    if check_name:
        if not name:
            causes.append(required("metadata.name", "name or generateName is required"))
        elif len(name) > 253:
            causes.append(
                invalid_value("metadata.name", name, "must be no more than 253 characters")
            )
        elif not _DNS1123_SUBDOMAIN.match(name):
            causes.append(invalid_value("metadata.name", name, SUBDOMAIN_MSG))
    causes += validate_labels(meta.get("labels") or {}, "metadata.labels")
    return causes


def validate_labels(labels: Any, field: str) -> list[Cause]:
    """Label keys (qualified names) and values (at most 63 characters, the label charset)."""
    causes: list[Cause] = []
    if not isinstance(labels, dict):
        return [invalid_value(field, str(labels), "must be a map of strings")]
    for key in sorted(labels):
        value = labels[key]
        name_part = key.split("/", 1)[-1]
        if len(name_part) > 63:
            causes.append(invalid_value(field, key, "name part must be no more than 63 characters"))
        elif not _QUALIFIED_NAME.match(name_part):
            causes.append(invalid_value(field, key, QUALIFIED_NAME_MSG))
        if not isinstance(value, str):
            causes.append(invalid_value(field, str(value), LABEL_VALUE_MSG))
        elif len(value) > 63:
            causes.append(invalid_value(field, value, "must be no more than 63 characters"))
        elif not _LABEL_VALUE.match(value):
            causes.append(invalid_value(field, value, LABEL_VALUE_MSG))
    return causes


def _nonnegative(spec: Obj, key: str, field: str) -> list[Cause]:
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, int) or isinstance(value, bool):
        return [invalid_value(field, str(value), "must be an integer")]
    if value < 0:
        return [invalid_value(field, value, "must be greater than or equal to 0")]
    return []


# --- pod template and pod spec ----------------------------------------------------------------


def _image_pull_policy(image: str) -> str:
    """Always for ``:latest`` or untagged images, else IfNotPresent (SetDefaults_Container)."""
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def default_container(container: Obj) -> Obj:
    """SetDefaults for one container; returns it in the Go key order."""
    out = dict(container)
    out.setdefault("resources", {})
    out.setdefault("terminationMessagePath", "/dev/termination-log")
    out.setdefault("terminationMessagePolicy", "File")
    if "imagePullPolicy" not in out and isinstance(out.get("image"), str):
        out["imagePullPolicy"] = _image_pull_policy(out["image"])
    env = []
    for var in out.get("env") or []:
        var = copy.deepcopy(var)
        field_ref = (var.get("valueFrom") or {}).get("fieldRef")
        if isinstance(field_ref, dict):
            var["valueFrom"]["fieldRef"] = {
                "apiVersion": field_ref.get("apiVersion", "v1"),
                **field_ref,
            }
        env.append(var)
    if "env" in out:
        out["env"] = env
    ports = []
    for port in out.get("ports") or []:
        ports.append({**port, "protocol": port.get("protocol", "TCP")})
    if "ports" in out:
        out["ports"] = ports
    return ordered(out, ORDER_CONTAINER)


def default_pod_spec(spec: Obj) -> Obj:
    """SetDefaults_PodSpec: restart policy, grace period, DNS, security context, scheduler."""
    out = dict(spec)
    out["containers"] = [default_container(c) for c in out.get("containers") or []]
    if "initContainers" in out:
        out["initContainers"] = [default_container(c) for c in out["initContainers"] or []]
    out.setdefault("restartPolicy", "Always")
    out.setdefault("terminationGracePeriodSeconds", 30)
    out.setdefault("dnsPolicy", "ClusterFirst")
    out.setdefault("securityContext", {})
    out.setdefault("schedulerName", "default-scheduler")
    return ordered(out, ORDER_POD_SPEC)


def validate_pod_spec(spec: Obj, field: str) -> list[Cause]:
    """Containers (name, image, env names) and the restart policy."""
    causes: list[Cause] = []
    containers = spec.get("containers")
    if not containers:
        causes.append(required(f"{field}.containers"))
    seen: set[str] = set()
    for i, container in enumerate(containers or []):
        where = f"{field}.containers[{i}]"
        name = container.get("name")
        if not name:
            causes.append(required(f"{where}.name"))
        elif not _DNS1123_LABEL.match(name) or len(name) > 63:
            causes.append(invalid_value(f"{where}.name", name, DNS_LABEL_MSG))
        elif name in seen:
            causes.append(
                Cause(
                    "FieldValueDuplicate",
                    f"{where}.name",
                    f"Duplicate value: {name!r}".replace("'", '"'),
                )
            )
        if name:
            seen.add(name)
        if not container.get("image"):
            causes.append(required(f"{where}.image"))
        for j, var in enumerate(container.get("env") or []):
            var_name = var.get("name")
            if not var_name:
                causes.append(required(f"{where}.env[{j}].name"))
            elif not _ENV_NAME.match(var_name):
                causes.append(
                    invalid_value(
                        f"{where}.env[{j}].name",
                        var_name,
                        "a valid environment variable name must consist of alphabetic characters, "
                        "digits, '_', '-', or '.', and must not start with a digit (e.g. "
                        "'my.env-name',  or 'MY_ENV.NAME',  or 'MyEnvName1', regex used for "
                        "validation is '[-._a-zA-Z][-._a-zA-Z0-9]*')",
                    )
                )
            if "value" in var and "valueFrom" in var:
                causes.append(
                    invalid_value(
                        f"{where}.env[{j}].valueFrom",
                        "",
                        "may not be specified when `value` is not empty",
                    )
                )
    policy = spec.get("restartPolicy")
    if policy not in ("Always", "OnFailure", "Never"):
        causes.append(
            not_supported(f"{field}.restartPolicy", policy, ["Always", "OnFailure", "Never"])
        )
    return causes


# --- Job ---------------------------------------------------------------------------------------


def default_job(job: Obj) -> None:
    """SetDefaults_Job plus the job strategy's PrepareForCreate (selector and labels).

    Runs once the name and uid are known, as the labels carry both.
    """
    meta = job["metadata"]
    spec = job.setdefault("spec", {})
    if spec.get("completions") is None and spec.get("parallelism") is None:
        spec["completions"] = 1
        spec["parallelism"] = 1
    if spec.get("parallelism") is None:
        spec["parallelism"] = 1
    if spec.get("backoffLimit") is None and spec.get("backoffLimitPerIndex") is None:
        spec["backoffLimit"] = 6
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    if spec.get("podReplacementPolicy") is None:
        spec["podReplacementPolicy"] = (
            "Failed" if spec.get("podFailurePolicy") else "TerminatingOrFailed"
        )
    manual = bool(spec.get("manualSelector"))
    spec["manualSelector"] = manual
    template = spec.setdefault("template", {})
    tmeta = dict(template.get("metadata") or {})
    tmeta["creationTimestamp"] = None
    if not manual:
        uid, name = meta["uid"], meta.get("name", "")
        labels = dict(tmeta.get("labels") or {})
        labels[CONTROLLER_UID_LABEL] = uid
        labels[JOB_NAME_LABEL] = name
        labels[LEGACY_CONTROLLER_UID_LABEL] = uid
        labels[LEGACY_JOB_NAME_LABEL] = name
        tmeta["labels"] = dict(sorted(labels.items()))
        spec["selector"] = {"matchLabels": {CONTROLLER_UID_LABEL: uid}}
    template["metadata"] = ordered(tmeta, ["name", "namespace", "creationTimestamp", "labels"])
    template["spec"] = default_pod_spec(template.get("spec") or {})
    spec["template"] = ordered(template, ["metadata", "spec"])
    job["spec"] = ordered(spec, ORDER_JOB_SPEC)
    job["status"] = {}


def validate_job(job: Obj) -> list[Cause]:
    """ValidateJob for create, in the server's order (metadata, counts, template, restart)."""
    meta = job.get("metadata") or {}
    spec = job.get("spec") or {}
    causes = validate_object_meta(meta)
    causes += _nonnegative(spec, "parallelism", "spec.parallelism")
    causes += _nonnegative(spec, "completions", "spec.completions")
    causes += _nonnegative(spec, "activeDeadlineSeconds", "spec.activeDeadlineSeconds")
    causes += _nonnegative(spec, "backoffLimit", "spec.backoffLimit")
    causes += _nonnegative(spec, "ttlSecondsAfterFinished", "spec.ttlSecondsAfterFinished")
    mode = spec.get("completionMode")
    if mode not in ("NonIndexed", "Indexed"):
        causes.append(not_supported("spec.completionMode", mode, ["NonIndexed", "Indexed"]))
    elif mode == "Indexed" and spec.get("completions") is None:
        causes.append(required("spec.completions", "when completion mode is Indexed"))
    template = spec.get("template") or {}
    tmeta = template.get("metadata") or {}
    selector = ((spec.get("selector") or {}).get("matchLabels")) or {}
    causes += validate_labels(tmeta.get("labels") or {}, "spec.template.labels")
    labels = tmeta.get("labels") or {}
    if selector and any(labels.get(k) != v for k, v in selector.items()):
        causes.append(
            invalid_value(
                "spec.template.metadata.labels",
                str(labels),
                "`selector` does not match template `labels`",
            )
        )
    pod_spec = template.get("spec") or {}
    causes += validate_pod_spec(pod_spec, "spec.template.spec")
    policy = pod_spec.get("restartPolicy")
    if spec.get("podFailurePolicy") is not None and policy != "Never":
        # Not in the traces: the rule and wording of the 1.32 source (ValidateJobSpec).
        causes.append(
            invalid_value(
                "spec.template.spec.restartPolicy",
                policy,
                'only "Never" is supported when podFailurePolicy is specified',
            )
        )
    policy = pod_spec.get("restartPolicy")
    if policy not in ("OnFailure", "Never"):
        # The pod-spec check accepts Always; the Job check does not, and says "Required".
        causes = [c for c in causes if c.field != "spec.template.spec.restartPolicy"]
        causes.append(
            required("spec.template.spec.restartPolicy", 'valid values: "OnFailure", "Never"')
        )
    return causes


def prepare_job_create(job: Obj) -> None:
    """Default and validate a new Job (the store's ``prepare`` hook)."""
    job.setdefault("spec", {})
    default_job(job)
    causes = validate_job(job)
    if causes:
        raise invalid(RESOURCES["jobs"], job["metadata"].get("name", ""), causes)


_TEMPLATE_MUTABLE_WHEN_SUSPENDED = ("nodeSelector", "tolerations", "affinity", "schedulingGates")


def prepare_job_update(old: Obj, new: Obj) -> Obj:
    """The job strategy's PrepareForUpdate + ValidateUpdate: keep status, check immutability."""
    res = RESOURCES["jobs"]
    out = copy.deepcopy(new)
    out["status"] = copy.deepcopy(old.get("status") or {})
    spec = out.setdefault("spec", {})
    old_spec = old.get("spec") or {}
    # Defaults apply to the new body too (a PUT may omit them).
    for key in (
        "completionMode",
        "suspend",
        "podReplacementPolicy",
        "manualSelector",
        "selector",
        "backoffLimit",
    ):
        if key not in spec and key in old_spec:
            spec[key] = copy.deepcopy(old_spec[key])
    if "template" in spec:
        template = spec["template"]
        tmeta = dict(template.get("metadata") or {})
        tmeta["creationTimestamp"] = None
        template["metadata"] = ordered(tmeta, ["name", "namespace", "creationTimestamp", "labels"])
        template["spec"] = default_pod_spec(template.get("spec") or {})
        spec["template"] = ordered(template, ["metadata", "spec"])
    out["spec"] = ordered(spec, ORDER_JOB_SPEC)
    name = old["metadata"]["name"]

    causes = validate_object_meta(out.get("metadata") or {})
    causes += _nonnegative(spec, "parallelism", "spec.parallelism")
    causes += _nonnegative(spec, "activeDeadlineSeconds", "spec.activeDeadlineSeconds")
    causes += _nonnegative(spec, "backoffLimit", "spec.backoffLimit")
    if spec.get("completions") != old_spec.get("completions"):
        causes.append(
            invalid_value("spec.completions", spec.get("completions"), "field is immutable")
        )
    for key in (
        "selector",
        "completionMode",
        "podFailurePolicy",
        "backoffLimitPerIndex",
        "manualSelector",
    ):
        if spec.get(key) != old_spec.get(key):
            causes.append(invalid_value(f"spec.{key}", str(spec.get(key)), "field is immutable"))
    if spec.get("template") != old_spec.get("template"):
        suspended_never_started = bool(old_spec.get("suspend")) and not (
            (old.get("status") or {}).get("startTime")
        )
        if not (
            suspended_never_started
            and _only_scheduling_changes(old_spec.get("template") or {}, spec.get("template") or {})
        ):
            causes.append(
                invalid_raw(
                    "spec.template",
                    go_dump_template(spec.get("template") or {}),
                    "field is immutable",
                )
            )
        causes += validate_pod_spec(
            (spec.get("template") or {}).get("spec") or {}, "spec.template.spec"
        )
    if causes:
        raise invalid(res, name, causes)
    return out


def _only_scheduling_changes(old: Obj, new: Obj) -> bool:
    a, b = copy.deepcopy(old), copy.deepcopy(new)
    for t in (a, b):
        t.setdefault("metadata", {}).pop("labels", None)
        t["metadata"].pop("annotations", None)
        for key in _TEMPLATE_MUTABLE_WHEN_SUSPENDED:
            t.setdefault("spec", {}).pop(key, None)
    return a == b


def _go_str(value: Any) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _go_map(values: Any) -> str:
    if not values:
        return "map[string]string(nil)"
    inner = ", ".join(f"{_go_str(k)}:{_go_str(v)}" for k, v in sorted(values.items()))
    return "map[string]string{" + inner + "}"


def _go_strings(values: Any) -> str:
    if not values:
        return "[]string(nil)"
    return "[]string{" + ", ".join(_go_str(v) for v in values) + "}"


def go_dump_template(template: Obj) -> str:
    """A shortened ``%#v`` of core.PodTemplateSpec, as the immutable-template error embeds it."""
    meta = template.get("metadata") or {}
    spec = template.get("spec") or {}
    containers = []
    for c in spec.get("containers") or []:
        containers.append(
            "core.Container{"
            f"Name:{_go_str(c.get('name', ''))}, Image:{_go_str(c.get('image', ''))}, "
            f"Command:{_go_strings(c.get('command'))}, Args:{_go_strings(c.get('args'))}, "
            f"TerminationMessagePath:{_go_str(c.get('terminationMessagePath', ''))}, "
            f"TerminationMessagePolicy:{_go_str(c.get('terminationMessagePolicy', ''))}, "
            f"ImagePullPolicy:{_go_str(c.get('imagePullPolicy', ''))}"
            "}"
        )
    return (
        'core.PodTemplateSpec{ObjectMeta:v1.ObjectMeta{Name:"", GenerateName:"", '
        f'Namespace:"", Labels:{_go_map(meta.get("labels"))}, '
        f"Annotations:{_go_map(meta.get('annotations'))}}}, "
        "Spec:core.PodSpec{Containers:[]core.Container{" + ", ".join(containers) + "}, "
        f"RestartPolicy:{_go_str(spec.get('restartPolicy', ''))}, "
        f"DNSPolicy:{_go_str(spec.get('dnsPolicy', ''))}, "
        f"SchedulerName:{_go_str(spec.get('schedulerName', ''))}}}}}"
    )


# --- Pod ---------------------------------------------------------------------------------------

_VOLUME_SUFFIX_BASE = "kube-api-access-"


def admit_pod(pod: Obj) -> None:
    """Defaults plus the admission plugins' additions (ServiceAccount, tolerations, priority)."""
    spec = dict(pod.get("spec") or {})
    spec = default_pod_spec(spec)
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    spec["serviceAccountName"] = account
    spec["serviceAccount"] = account
    if spec.get("automountServiceAccountToken", True) is not False:
        volume = generate_name(_VOLUME_SUFFIX_BASE)
        spec["volumes"] = [
            *(spec.get("volumes") or []),
            {
                "name": volume,
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "path": "namespace",
                                        "fieldRef": {
                                            "apiVersion": "v1",
                                            "fieldPath": "metadata.namespace",
                                        },
                                    }
                                ]
                            }
                        },
                    ],
                    "defaultMode": 420,
                },
            },
        ]
        mount = {
            "name": volume,
            "readOnly": True,
            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
        }
        spec["containers"] = [
            ordered({**c, "volumeMounts": [*(c.get("volumeMounts") or []), mount]}, ORDER_CONTAINER)
            for c in spec["containers"]
        ]
    tolerations = list(spec.get("tolerations") or [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(t.get("key") == key for t in tolerations):
            tolerations.append(
                {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            )
    spec["tolerations"] = tolerations
    spec.setdefault("priority", 0)
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    pod["spec"] = ordered(spec, ORDER_POD_SPEC)
    status = dict(pod.get("status") or {})
    status["phase"] = "Pending"
    status["qosClass"] = qos_class(spec)
    pod["status"] = ordered(status, ORDER_POD_STATUS)


def qos_class(spec: Obj) -> str:
    """BestEffort without requests/limits, Guaranteed when limits equal requests, else Burstable."""
    containers = spec.get("containers") or []
    resources = [c.get("resources") or {} for c in containers]
    if all(not r.get("requests") and not r.get("limits") for r in resources):
        return "BestEffort"
    for r in resources:
        limits = r.get("limits") or {}
        requests = r.get("requests") or limits
        if set(limits) != {"cpu", "memory"} or any(requests.get(k) != limits[k] for k in limits):
            return "Burstable"
    return "Guaranteed"


def prepare_pod_create(pod: Obj) -> None:
    """Admit and validate a new Pod."""
    admit_pod(pod)
    causes = validate_object_meta(pod["metadata"])
    causes += validate_pod_spec(pod["spec"], "spec")
    if causes:
        raise invalid(RESOURCES["pods"], pod["metadata"].get("name", ""), causes)


def pod_from_template(job: Obj) -> Obj:
    """The pod the Job controller creates: template, generateName, owner, tracking finalizer."""
    meta = job["metadata"]
    template = copy.deepcopy(job["spec"]["template"])
    tmeta = template.get("metadata") or {}
    pod_meta: Obj = {
        "generateName": f"{meta['name']}-",
        "namespace": meta["namespace"],
        "labels": dict(tmeta.get("labels") or {}),
    }
    if tmeta.get("annotations"):
        pod_meta["annotations"] = dict(tmeta["annotations"])
    pod_meta["ownerReferences"] = [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    pod_meta["finalizers"] = [JOB_TRACKING_FINALIZER]
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": pod_meta,
        "spec": template.get("spec") or {},
    }


def prepare_pod_update(old: Obj, new: Obj) -> Obj:
    """Pod updates may change metadata (labels, annotations, owners, finalizers) only."""
    out = copy.deepcopy(old)
    new_meta = new.get("metadata") or {}
    for key in ("labels", "annotations", "ownerReferences", "finalizers"):
        if key in new_meta:
            out["metadata"][key] = copy.deepcopy(new_meta[key])
        else:
            out["metadata"].pop(key, None)
    if (new.get("spec") or old.get("spec")) != old.get("spec"):
        raise invalid(
            RESOURCES["pods"],
            old["metadata"]["name"],
            [
                forbidden_field(
                    "spec",
                    "pod updates may not change fields other than `spec.containers[*].image`,"
                    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,"
                    "`spec.tolerations` "
                    "(only additions to existing tolerations),`spec.terminationGracePeriodSeconds` "
                    "(allow it to be set to 1 if it was previously negative)",
                )
            ],
        )
    causes = validate_labels(out["metadata"].get("labels") or {}, "metadata.labels")
    if causes:
        raise invalid(RESOURCES["pods"], old["metadata"]["name"], causes)
    return out


# --- Secret, Namespace --------------------------------------------------------------------------


def _fold_string_data(secret: Obj) -> None:
    data = dict(secret.get("data") or {})
    for key, value in (secret.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    if data or "data" in secret:
        secret["data"] = data
    secret.setdefault("type", "Opaque")


def _validate_secret(secret: Obj) -> list[Cause]:
    causes: list[Cause] = []
    for key, value in (secret.get("data") or {}).items():
        if not re.match(r"^[-._a-zA-Z0-9]+$", key):
            causes.append(
                invalid_value(
                    f"data[{key}]",
                    key,
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' "
                    "(e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for "
                    "validation is "
                    "'[-._a-zA-Z0-9]+')",
                )
            )
        try:
            base64.b64decode(value, validate=True)
        except (ValueError, TypeError):
            raise bad_request(
                'Secret in version "v1" cannot be handled as a Secret: illegal base64 data'
            ) from None
    return causes


def prepare_secret_create(secret: Obj) -> None:
    """stringData folded into base64 ``data``; type defaults to Opaque."""
    _fold_string_data(secret)
    causes = validate_object_meta(secret["metadata"]) + _validate_secret(secret)
    if causes:
        raise invalid(RESOURCES["secrets"], secret["metadata"].get("name", ""), causes)


def prepare_secret_update(old: Obj, new: Obj) -> Obj:
    """Same folding on update; the type is immutable."""
    out = copy.deepcopy(new)
    _fold_string_data(out)
    causes = validate_object_meta(out.get("metadata") or {})
    if out.get("type") != old.get("type"):
        causes.append(invalid_value("type", out.get("type"), "field is immutable"))
    causes += _validate_secret(out)
    if causes:
        raise invalid(RESOURCES["secrets"], old["metadata"]["name"], causes)
    return out


def prepare_namespace_create(ns: Obj) -> None:
    """A Namespace gets its name label, the kubernetes finalizer and phase Active."""
    meta = ns["metadata"]
    name = meta.get("name", "")
    causes: list[Cause] = []
    if not name or not _DNS1123_LABEL.match(name) or len(name) > 63:
        causes.append(invalid_value("metadata.name", name, DNS_LABEL_MSG))
    if causes:
        raise invalid(RESOURCES["namespaces"], name, causes)
    meta["labels"] = {**(meta.get("labels") or {}), "kubernetes.io/metadata.name": name}
    ns["spec"] = {"finalizers": ["kubernetes"]}
    ns["status"] = {"phase": "Active"}


def check_kind(body: Obj, resource: str) -> None:
    """A body's kind/apiVersion, when given, must match the URL's resource."""
    res = RESOURCES[resource]
    kind = body.get("kind")
    api_version = body.get("apiVersion")
    if (kind and kind != res.kind) or (api_version and api_version != res.api_version):
        raise bad_request(
            f"the API version in the data ({api_version}) does not match the expected API "
            f"version ({res.api_version})"
            if api_version != res.api_version
            else f"the kind in the data ({kind}) does not match the expected kind ({res.kind})"
        )


def raise_if(causes: list[Cause], resource: str, name: str) -> None:
    """Raise the 422 for ``causes`` when there are any."""
    if causes:
        raise invalid(RESOURCES[resource], name, causes)


__all__ = [
    "ApiError",
    "admit_pod",
    "default_job",
    "pod_from_template",
    "prepare_job_create",
    "prepare_job_update",
    "prepare_namespace_create",
    "prepare_pod_create",
    "prepare_pod_update",
    "prepare_secret_create",
    "prepare_secret_update",
    "validate_job",
]


# --- events and quotas -----------------------------------------------------------------------


def prepare_event_create(event: Obj) -> None:
    """An Event needs the object it is about, in its own namespace (as core/v1 validation)."""
    causes = validate_object_meta(event["metadata"])
    inv = event.get("involvedObject") or {}
    if inv.get("namespace") and inv.get("namespace") != event["metadata"].get("namespace"):
        causes.append(
            invalid_value(
                "involvedObject.namespace",
                inv.get("namespace"),
                "does not match event.namespace",
            )
        )
    if causes:
        raise invalid(RESOURCES["events"], event["metadata"].get("name", ""), causes)


def prepare_event_update(old: Obj, new: Obj) -> Obj:
    """Events are updated whole (a recorder's count and lastTimestamp)."""
    out = copy.deepcopy(new)
    prepare_event_create(out)
    return out


def check_pod_quota(pods_now: list[Obj], pod: Obj, quota: tuple[str, int]) -> None:
    """ResourceQuota admission for ``pods``: a pod beyond ``quota`` (name, hard limit on
    non-terminal pods in the namespace) is refused, 403 as the real plugin words it. The
    apiserver generates a ``generateName`` pod's name before validating admission, so the
    message names a generated name that no pod ever gets (each refusal a new one, as on a real
    1.20 control plane)."""
    name, hard = quota
    used = sum(
        1 for p in pods_now if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    )
    if used + 1 <= hard:
        return
    meta = pod.get("metadata") or {}
    base = meta.get("generateName")
    shown = meta.get("name") or (generate_name(base) if base else "Unknown")
    message = (
        f'pods "{shown}" is forbidden: exceeded quota: {name}, requested: pods=1, used: '
        f"pods={used}, limited: pods={hard}"
    )
    raise ApiError(403, status_body(403, "Forbidden", message, {"name": shown, "kind": "pods"}))
