"""What the local backend accepts of a Job and a Secret: validation and the prepared objects."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from queuejob.flows.adapters.local.common import (
    FIELD_LABEL,
    SECRET_NAME,
    SUPPORTED_FIELDS,
    UNSUPPORTED_JOB_FIELDS,
)
from queuejob.flows.core.errors import (
    InvalidInput,
)
from queuejob.flows.core.manifest import check_dns1123_label, run_labels
from queuejob.flows.core.pod_failure import MAX_RULES, check_rules

# --- validation ---------------------------------------------------------------------------------


def _unsupported(what: str) -> InvalidInput:
    return InvalidInput(
        f"{what} is not supported by the local backend; remove it or run on Kubernetes"
    )


def _check_env(container: Mapping[str, Any], job_name: str) -> None:
    if container.get("envFrom"):
        raise _unsupported(f"Job '{job_name}': envFrom")
    for entry in container.get("env") or []:
        name = entry.get("name")
        if not name:
            raise InvalidInput(f"Job '{job_name}': every env entry needs a name")
        if "value" in entry and "valueFrom" in entry:
            raise InvalidInput(f"Job '{job_name}': env {name} has both value and valueFrom")
        source = entry.get("valueFrom")
        if source is None:
            continue
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"] or {}
            if not ref.get("name") or not ref.get("key"):
                raise InvalidInput(
                    f"Job '{job_name}': env {name}: secretKeyRef needs a name and a key"
                )
        elif "fieldRef" in source:
            path = str((source["fieldRef"] or {}).get("fieldPath") or "")
            if path not in SUPPORTED_FIELDS and not FIELD_LABEL.match(path):
                raise _unsupported(f"Job '{job_name}': env {name}: fieldRef {path!r}")
        else:
            kinds = ", ".join(sorted(source)) or "an empty valueFrom"
            raise _unsupported(f"Job '{job_name}': env {name}: {kinds}")


def _count(spec: Mapping[str, Any], key: str, job_name: str) -> int | None:
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(
            f"Job '{job_name}': spec.{key} must be a whole number >= 0 (got {value!r})"
        )
    return value


def prepare_job(job: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """A validated, defaulted deep copy of a Job dict (as the API server would store it)."""
    if job.get("kind", "Job") != "Job" or job.get("apiVersion", "batch/v1") != "batch/v1":
        raise InvalidInput("the local backend runs batch/v1 Jobs only")
    out: dict[str, Any] = json.loads(json.dumps(job))
    meta = out.setdefault("metadata", {})
    name = meta.get("name")
    if not name:
        raise _unsupported("a Job without metadata.name (generateName)")
    check_dns1123_label(str(name), "Job name")
    namespace = meta.setdefault("namespace", "default")
    check_dns1123_label(str(namespace), "namespace")
    labels = meta.setdefault("labels", {})
    for key, value in run_labels(run_id).items():
        if labels.setdefault(key, value) != value:
            raise InvalidInput(
                f"Job '{name}' carries {key}={labels[key]!r} but is created for run {run_id!r}; "
                "build it with this run's id"
            )
    spec = out.setdefault("spec", {})
    for key in UNSUPPORTED_JOB_FIELDS:
        if spec.get(key) is not None:
            raise _unsupported(f"Job '{name}': spec.{key}")
    if spec.get("completionMode", "NonIndexed") != "NonIndexed":
        raise _unsupported(f"Job '{name}': completionMode {spec['completionMode']!r}")
    if spec.get("suspend"):
        raise _unsupported(f"Job '{name}': spec.suspend")
    completions = _count(spec, "completions", name)
    parallelism = _count(spec, "parallelism", name)
    backoff = _count(spec, "backoffLimit", name)
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and (not isinstance(deadline, int) or deadline < 1):
        raise InvalidInput(f"Job '{name}': activeDeadlineSeconds must be >= 1 (got {deadline!r})")
    if completions is None and parallelism is None:
        spec["completions"] = 1
    spec["parallelism"] = 1 if parallelism is None else parallelism
    spec["backoffLimit"] = 6 if backoff is None else backoff
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    policy = spec.get("podFailurePolicy")
    replacement = spec.setdefault(
        "podReplacementPolicy", "Failed" if policy is not None else "TerminatingOrFailed"
    )
    if replacement not in ("Failed", "TerminatingOrFailed"):
        raise InvalidInput(
            f"Job '{name}': podReplacementPolicy must be Failed or TerminatingOrFailed (got "
            f"{replacement!r})"
        )

    template = spec.get("template") or {}
    pod_spec = template.get("spec") or {}
    for key in ("initContainers", "ephemeralContainers"):
        if pod_spec.get(key):
            raise _unsupported(f"Job '{name}': {key}")
    restart = pod_spec.get("restartPolicy")
    if restart != "Never":
        if restart == "OnFailure":
            raise _unsupported(f"Job '{name}': restartPolicy OnFailure")
        raise InvalidInput(
            f"Job '{name}': spec.template.spec.restartPolicy must be 'Never' (got {restart!r})"
        )
    containers = pod_spec.get("containers") or []
    if len(containers) != 1:
        raise _unsupported(f"Job '{name}': {len(containers)} containers (it runs exactly one)")
    container = containers[0]
    command = container.get("command")
    if not command or not all(isinstance(c, str) for c in command):
        raise InvalidInput(
            f"Job '{name}': the container needs an explicit command (a list of strings); the "
            "local backend has no image entrypoint to fall back on"
        )
    if not all(isinstance(a, str) for a in container.get("args") or []):
        raise InvalidInput(f"Job '{name}': container args must be strings")
    _check_env(container, name)
    if policy is not None:
        if replacement != "Failed":
            raise InvalidInput(
                f"Job '{name}': podReplacementPolicy must be Failed with a podFailurePolicy"
            )
        rules = (policy or {}).get("rules") if isinstance(policy, dict) else None
        if not isinstance(rules, list):
            raise InvalidInput(f"Job '{name}': podFailurePolicy needs a list of rules")
        try:
            check_rules(rules, container=str(container.get("name") or ""), room=MAX_RULES)
        except ValueError as exc:
            raise InvalidInput(f"Job '{name}': podFailurePolicy: {exc}") from None
    return out


def prepare_secret(secret: Mapping[str, Any], namespace: str, run_id: str) -> dict[str, Any]:
    if secret.get("kind", "Secret") != "Secret":
        raise InvalidInput("the secret argument must be a v1 Secret")
    out: dict[str, Any] = json.loads(json.dumps(secret))
    meta = out.setdefault("metadata", {})
    name = str(meta.get("name") or "")
    if not name or len(name) > 253 or not SECRET_NAME.match(name):
        raise InvalidInput(
            f"Secret name {name!r} is not a valid DNS-1123 subdomain (lower-case letters, "
            "digits, '-' and '.')"
        )
    if meta.setdefault("namespace", namespace) != namespace:
        raise InvalidInput(
            f"Secret '{name}' and its Job must be in the same namespace (got "
            f"{meta['namespace']!r} and {namespace!r})"
        )
    labels = meta.setdefault("labels", {})
    for key, value in run_labels(run_id).items():
        labels.setdefault(key, value)
    return out
