"""Kubernetes API errors translated into ``queuejob.flows.core.errors`` types, with retry hints."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from queuejob.flows.adapters.kube.common import FORBIDDEN, RBAC_HINT
from queuejob.flows.core.errors import (
    ConfigError,
    KubeError,
    KubeForbidden,
    KubeInvalid,
    KubeNotFound,
    KubeUnavailable,
    QueueJobError,
)

# --- error translation -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KubeOp:
    """One API operation, for messages: ``create jobs 'x' in namespace 'ns'``."""

    verb: str
    resource: str
    namespace: str | None = None
    name: str | None = None

    def __str__(self) -> str:
        what = f"{self.verb} {self.resource}"
        if self.name:
            what += f" '{self.name}'"
        if self.namespace:
            what += f" in namespace '{self.namespace}'"
        return what


def status_body(raw: str | bytes | None) -> dict[str, Any]:
    """The Status object in an error response body, or {} when it is not one."""
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def error_from_status(code: int, status: Mapping[str, Any] | None, *, op: KubeOp) -> QueueJobError:
    """Translate an API error (HTTP code and ``Status`` body) into a queuejob error.

    Used for error responses and for ``ERROR`` events inside a watch stream alike.
    """
    body = status or {}
    message = str(body.get("message") or "").strip()
    reason = str(body.get("reason") or "")
    details = body.get("details") or {}
    ns = op.namespace or "default"
    if code == 401:
        return ConfigError(
            f"the API server rejected the credentials (401 Unauthorized) for {op}; the token in "
            "the Kubernetes credentials block or kubeconfig is invalid or expired: refresh it"
        )
    if code == 403:
        verb, resource, who = op.verb, op.resource, ""
        match = FORBIDDEN.search(message)
        if match:
            verb, resource = match["verb"], match["resource"]
            group = match["group"]
            who = f' (user "{match["user"]}"'
            who += f', API group "{group}")' if group else ")"
        return KubeForbidden(
            f"the service account cannot {verb} {resource} in namespace '{ns}'{who}; grant it "
            f"with a Role like {RBAC_HINT}"
        )
    if code == 404:
        if details.get("kind") == "namespaces":
            missing = details.get("name") or ns
            return KubeNotFound(
                f"namespace '{missing}' does not exist; create it (kubectl create namespace "
                f"{missing}) or choose an existing namespace in the job template"
            )
        kind = details.get("kind") or op.resource
        name = details.get("name") or op.name or "?"
        return KubeNotFound(
            f"{kind} '{name}' not found in namespace '{ns}' (during {op}); it was deleted or "
            "never created"
        )
    if code == 422:
        causes = [
            f"{c.get('field')}: {c.get('message')}" if c.get("field") else str(c.get("message"))
            for c in details.get("causes") or []
            if isinstance(c, Mapping)
        ]
        kind = details.get("kind") or op.resource
        name = details.get("name") or op.name or "?"
        why = "; ".join(causes) if causes else message or reason or "no causes given"
        return KubeInvalid(
            f"the API server rejected {kind} '{name}' in namespace '{ns}' as invalid: {why}; "
            "fix the job template and run again"
        )
    if code == 429:
        return KubeUnavailable(
            f"the API server is throttling requests (429 TooManyRequests) for {op}; retry later"
        )
    if code >= 500:
        return KubeUnavailable(
            f"the API server answered {code} {reason or 'error'} for {op}: "
            f"{message or 'no message'}; retry later"
        )
    if code == 0:
        # The client reports TLS failures as status 0: the CA or server address is wrong.
        return KubeError(
            f"{op} failed before reaching the API server ({message or reason}); check the "
            "cluster's server address and CA in the Kubernetes configuration"
        )
    return KubeError(
        f"the API server refused {op} with {code} {reason or 'error'}: {message or 'no message'}"
    )


def error_from_api_exception(exc: ApiException, *, op: KubeOp) -> QueueJobError:
    """Translate a client `ApiException` (its status and JSON ``Status`` body)."""
    body = status_body(exc.body)
    if not body and exc.reason:
        body = {"message": str(exc.reason)}
    return error_from_status(int(exc.status or 0), body, op=op)


def field_path(loc: tuple[int | str, ...]) -> str:
    """A validation error's location inside the body (without the argument's position)."""
    if loc and (isinstance(loc[0], int) or loc[0] == "body"):
        loc = loc[1:]
    return ".".join(str(part) for part in loc) or "body"


def unreachable(exc: BaseException, op: KubeOp) -> KubeUnavailable:
    return KubeUnavailable(
        f"could not reach the API server for {op} ({type(exc).__name__}: {exc}); check that "
        "the cluster is up and reachable, then retry"
    )


def retry_after_s(exc: BaseException) -> float | None:
    """The Retry-After header of the response behind a translated error, if any."""
    cause = exc.__cause__
    headers = getattr(cause, "headers", None) if isinstance(cause, ApiException) else None
    if not headers:
        return None
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
