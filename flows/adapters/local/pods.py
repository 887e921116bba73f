"""A local pod's container: its Secrets, its environment and its command line, as a kubelet
would build them from the Job's pod template."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from queuejob.flows.adapters.local.common import (
    FIELD_LABEL,
    INHERITED_ENV,
    JOB_UID_ENV,
    POD_ENV,
    RUN_ENV,
    expand,
    read_json,
    secret_value,
)
from queuejob.flows.adapters.local.state import Paths


def container_of(job: Mapping[str, Any]) -> dict[str, Any]:
    """The Job's (single) container."""
    container: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]
    return container


def read_secrets(paths: Paths, container: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The Secrets the container's env refers to, by name (missing ones left out)."""
    out: dict[str, dict[str, Any]] = {}
    for entry in container.get("env") or []:
        ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
        if ref and ref["name"] not in out:
            secret = read_json(paths.secret(str(ref["name"])))
            if secret is not None:
                out[str(ref["name"])] = secret
    return out


def pod_env(
    job: Mapping[str, Any],
    secrets: Mapping[str, Mapping[str, Any]],
    *,
    name: str,
    pod_uid: str,
    job_uid: str,
) -> tuple[dict[str, str], dict[str, str]]:
    """The pod's environment, as the kubelet would build it, and the variables the
    container defines (for ``$(VAR)`` references). Raises ValueError with a message for a
    missing Secret key."""
    env = {k: v for k, v in os.environ.items() if k in INHERITED_ENV or k.startswith("LC_")}
    env["HOSTNAME"] = name
    defined: dict[str, str] = {}
    meta = job["spec"]["template"].get("metadata") or {}
    fields = {
        "metadata.name": name,
        "metadata.namespace": str(job["metadata"]["namespace"]),
        "metadata.uid": pod_uid,
        "spec.nodeName": "localhost",
        "spec.serviceAccountName": str(
            job["spec"]["template"]["spec"].get("serviceAccountName") or "default"
        ),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    for entry in container_of(job).get("env") or []:
        key = str(entry["name"])
        source = entry.get("valueFrom")
        if source is None:
            env[key] = expand(str(entry.get("value", "")), defined)
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            secret = secrets.get(str(ref["name"]))
            value = secret_value(secret, str(ref["key"])) if secret else None
            if value is None:
                if ref.get("optional"):
                    continue
                raise ValueError(
                    f"couldn't find key {ref['key']} in Secret "
                    f"{job['metadata']['namespace']}/{ref['name']}"
                )
            env[key] = value
        else:
            path = str(source["fieldRef"]["fieldPath"])
            match = FIELD_LABEL.match(path)
            if match:
                env[key] = str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
            else:
                env[key] = fields[path]
        defined[key] = env[key]
    env[JOB_UID_ENV] = job_uid
    env[RUN_ENV] = os.environ.get(RUN_ENV, "")
    env[POD_ENV] = pod_uid
    return env, defined


def pod_argv(
    container: Mapping[str, Any], env: dict[str, str], defined: Mapping[str, str]
) -> list[str]:
    """The pod's command line with ``$(VAR)`` expanded; ``queuejob worker`` runs as
    ``python -m queuejob.flows.worker`` with this interpreter, which has queuejob installed: no
    path is added, so the pod imports a user's own modules (``--call``) as the flow's process
    would, and a user's ``flows`` package never meets one of ours."""
    argv = [expand(a, defined) for a in (*container["command"], *(container.get("args") or []))]
    if argv[:2] == ["queuejob", "worker"]:
        # Run the worker module with this interpreter: no console script needed, and none of
        # the CLI's imports.
        argv = [sys.executable, "-m", "queuejob.flows.worker", *argv[2:]]
        env.setdefault("PYTHONUNBUFFERED", "1")
    return argv
