"""Label and field selectors, parsed and matched the way the API server does for lists and watches.

Label selectors: ``k``, ``!k``, ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``,
comma-separated (AND). Field selectors: ``f=v``, ``f==v``, ``f!=v`` over the fields each resource
supports (``metadata.name`` and ``metadata.namespace`` everywhere, plus a few per resource).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tests.fakekube.objects import bad_request

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Req:
    key: str
    op: str  # exists, !exists, =, !=, in, notin
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        # != and notin also match objects without the label, as in Kubernetes.
        return not present or value not in self.values


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts: list[str] = []
    depth = 0
    current = ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


_SET_RE = re.compile(r"^\s*([^\s!=()]+)\s+(in|notin)\s+\(([^()]*)\)\s*$")
_EQ_RE = re.compile(r"^\s*([^\s!=()]+)\s*(==|!=|=)\s*([^\s!=(),]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(!?)\s*([^\s!=(),]+)\s*$")


def parse_label_selector(text: str | None) -> Callable[[Mapping[str, str]], bool]:
    """A predicate over a label map; raises a 400 ApiError for a malformed selector."""
    if not text or not text.strip():
        return lambda _labels: True
    reqs: list[_Req] = []
    for raw in _split_top(text):
        if not raw.strip():
            raise bad_request(
                f"unable to parse requirement: found '', expected: identifier in {text!r}"
            )
        if m := _SET_RE.match(raw):
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append(_Req(m.group(1), m.group(2), values))
        elif m := _EQ_RE.match(raw):
            op = "!=" if m.group(2) == "!=" else "="
            reqs.append(_Req(m.group(1), op, (m.group(3),)))
        elif m := _EXISTS_RE.match(raw):
            reqs.append(_Req(m.group(2), "!exists" if m.group(1) else "exists"))
        else:
            raise bad_request(
                f"unable to parse requirement: <nil>: Invalid value: {raw.strip()!r}: "
                "found unexpected token in label selector"
            )
    return lambda labels: all(r.matches(labels) for r in reqs)


def _pod_phase(obj: Obj) -> Any:
    return (obj.get("status") or {}).get("phase")


def _node_name(obj: Obj) -> Any:
    return (obj.get("spec") or {}).get("nodeName")


def _secret_type(obj: Obj) -> Any:
    return obj.get("type")


def _job_successful(obj: Obj) -> Any:
    return str((obj.get("status") or {}).get("succeeded") or 0)


def _namespace_phase(obj: Obj) -> Any:
    return (obj.get("status") or {}).get("phase")


_FIELDS: dict[str, dict[str, Callable[[Obj], Any]]] = {
    "pods": {
        "status.phase": _pod_phase,
        "spec.nodeName": _node_name,
        "spec.restartPolicy": lambda o: (o.get("spec") or {}).get("restartPolicy"),
        "spec.schedulerName": lambda o: (o.get("spec") or {}).get("schedulerName"),
        "spec.serviceAccountName": lambda o: (o.get("spec") or {}).get("serviceAccountName"),
        "status.podIP": lambda o: (o.get("status") or {}).get("podIP"),
    },
    "secrets": {"type": _secret_type},
    "jobs": {"status.successful": _job_successful},
    "namespaces": {"status.phase": _namespace_phase},
    # The fields core/v1 Events are selectable by (pkg/registry/core/event/strategy.go).
    "events": {
        **{
            f"involvedObject.{key}": (lambda k: lambda o: (o.get("involvedObject") or {}).get(k))(
                key
            )
            for key in (
                "kind",
                "namespace",
                "name",
                "uid",
                "apiVersion",
                "resourceVersion",
                "fieldPath",
            )
        },
        "reason": lambda o: o.get("reason"),
        "reportingComponent": lambda o: o.get("reportingComponent"),
        "source": lambda o: (o.get("source") or {}).get("component"),
        "type": lambda o: o.get("type"),
    },
}


def parse_field_selector(resource: str, text: str | None) -> Callable[[Obj], bool]:
    """A predicate over an object; 400 for a malformed selector or an unsupported field."""
    if not text or not text.strip():
        return lambda _obj: True
    getters = {
        "metadata.name": lambda o: (o.get("metadata") or {}).get("name"),
        "metadata.namespace": lambda o: (o.get("metadata") or {}).get("namespace"),
        **_FIELDS.get(resource, {}),
    }
    checks: list[tuple[Callable[[Obj], Any], bool, str]] = []
    for raw in text.split(","):
        m = re.match(r"^\s*([^\s!=]+)\s*(==|!=|=)\s*(.*?)\s*$", raw)
        if not m:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{raw}'")
        field, op, value = m.groups()
        if field not in getters:
            raise bad_request(f"field label not supported: {field}")
        checks.append((getters[field], op != "!=", value))

    def match(obj: Obj) -> bool:
        for getter, equal, value in checks:
            actual = getter(obj)
            actual_s = "" if actual is None else str(actual)
            if (actual_s == value) != equal:
                return False
        return True

    return match
