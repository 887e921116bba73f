"""The Job's pod failure policy: which pod failures fail the Job at once, which do not count, and
which API servers know the fields.

Kubernetes (1.26+) applies a Job's ``podFailurePolicy`` to each pod that ends in phase Failed; the
first rule that matches decides. ``FailJob``: the Job fails now (reason ``PodFailurePolicy``) and
its other pods are stopped. ``Ignore``: the failure does not count toward ``backoffLimit`` (the
back-off delay before the next pod still grows). ``Count``, or no rule matching: it counts, as it
does without a policy. queuejob's Job carries two rules ahead of any a template adds:

1. ``FailJob`` when the worker container exits 2: the worker's usage and configuration exit (a
   ``--call`` that cannot be imported, refused credentials, a missing queue). Retrying cannot fix
   it, so the run fails within seconds instead of after ``backoffLimit`` back-offs.
2. ``Ignore`` when the pod has the condition ``DisruptionTarget``, which Kubernetes adds to a pod
   it stops for reasons that are not the pod's fault: the Eviction API (a node drain), a
   preemption, a taint, a node that went away. A run on spot nodes does not fail from
   disruptions alone. The item the pod held goes back to the queue (the broker redelivers it).

With a policy, Kubernetes counts a deleted pod only once it has stopped (phase Failed), and
``podReplacementPolicy: Failed`` (stated explicitly in the Job) starts no replacement while the
old pod is still terminating with messages unacknowledged.

Pure: the rules as the manifest writes them, the check of a template's extra rules, the matcher
the local backend applies (Kubernetes' order and wording), the explanation of a Job that failed
by the policy, and `ServerFeatures`, which fields an API server of a given version keeps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

USAGE_EXIT_CODE = 2  # the worker's usage/configuration exit (queuejob.flows.worker.options)
DISRUPTION_TARGET = "DisruptionTarget"
POLICY_REASON = "PodFailurePolicy"  # the Job condition's reason when a FailJob rule matched
FAIL_JOB, IGNORE, COUNT = "FailJob", "Ignore", "Count"
ACTIONS = (FAIL_JOB, IGNORE, COUNT)
MAX_RULES = 20  # Kubernetes' limit on podFailurePolicy.rules
BUILTIN_RULES = 2
# The first versions whose API server keeps the field by default (beta, on by default).
POD_FAILURE_POLICY_SINCE = (1, 26)
POD_REPLACEMENT_POLICY_SINCE = (1, 29)

_CONDITION_TYPE = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)


def builtin_rules(container: str) -> list[dict[str, Any]]:
    """queuejob's two rules: FailJob on the worker's exit 2, Ignore on a disruption."""
    return [
        {
            "action": FAIL_JOB,
            "onExitCodes": {
                "containerName": container,
                "operator": "In",
                "values": [USAGE_EXIT_CODE],
            },
        },
        {"action": IGNORE, "onPodConditions": [{"type": DISRUPTION_TARGET, "status": "True"}]},
    ]


def pod_failure_policy(container: str, extra: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The Job's ``podFailurePolicy``: queuejob's rules, then ``extra`` (already checked)."""
    return {"rules": [*builtin_rules(container), *(_copy(r) for r in extra)]}


def _copy(rule: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"action": rule["action"]}
    if "onExitCodes" in rule:
        req = rule["onExitCodes"]
        codes: dict[str, Any] = {}
        if req.get("containerName") is not None:
            codes["containerName"] = req["containerName"]
        codes["operator"] = req["operator"]
        codes["values"] = list(req["values"])
        out["onExitCodes"] = codes
    else:
        out["onPodConditions"] = [
            {"type": p["type"], "status": p.get("status", "True")} for p in rule["onPodConditions"]
        ]
    return out


# --- a template's extra rules ------------------------------------------------------------------


def check_rules(
    rules: Iterable[Any], *, container: str, room: int = MAX_RULES - BUILTIN_RULES
) -> tuple[dict[str, Any], ...]:
    """A template's extra rules (at most ``room``: Kubernetes allows 20 per Job and queuejob's
    own take 2), checked as the API server would, and normalised (a condition pattern's
    ``status`` defaults to ``"True"``). Raises ValueError naming the rule and the problem: the
    run must not fail on a 422 after its queue was filled."""
    out: list[dict[str, Any]] = []
    rules = list(rules)
    if len(rules) > room:
        raise ValueError(
            f"{len(rules)} pod failure rules given: Kubernetes allows {MAX_RULES} per Job"
            + (f" and queuejob's own take {MAX_RULES - room}" if room < MAX_RULES else "")
            + f"; give at most {room}"
        )
    for i, rule in enumerate(rules):
        where = f"pod failure rule {i}"
        if not isinstance(rule, Mapping):
            raise ValueError(
                f"{where} must be an object with 'action' and one of 'onExitCodes' "
                "or 'onPodConditions'"
            )
        unknown = sorted(set(rule) - {"action", "onExitCodes", "onPodConditions"})
        if unknown:
            raise ValueError(
                f"{where}: unknown field(s) {unknown}; a rule has 'action' and one "
                "of 'onExitCodes' or 'onPodConditions'"
            )
        action = rule.get("action")
        if action == "FailIndex":
            raise ValueError(
                f"{where}: action FailIndex needs backoffLimitPerIndex (Indexed "
                "Jobs); queuejob's Job is NonIndexed: use FailJob, Ignore or Count"
            )
        if action not in ACTIONS:
            raise ValueError(f"{where}: action {action!r} is not one of {', '.join(ACTIONS)}")
        if ("onExitCodes" in rule) == ("onPodConditions" in rule):
            raise ValueError(f"{where}: give exactly one of 'onExitCodes' and 'onPodConditions'")
        if "onExitCodes" in rule:
            _check_exit_codes(rule["onExitCodes"], where, container)
        else:
            _check_conditions(rule["onPodConditions"], where)
        out.append(_copy(rule))
    return tuple(out)


def _check_exit_codes(req: Any, where: str, container: str) -> None:
    if not isinstance(req, Mapping):
        raise ValueError(f"{where}: onExitCodes must be an object (operator, values)")
    unknown = sorted(set(req) - {"containerName", "operator", "values"})
    if unknown:
        raise ValueError(f"{where}: onExitCodes has unknown field(s) {unknown}")
    name = req.get("containerName")
    if name is not None and name != container:
        raise ValueError(
            f"{where}: onExitCodes.containerName {name!r} is not a container of the "
            f"pod; its only container is {container!r}"
        )
    operator = req.get("operator")
    if operator not in ("In", "NotIn"):
        raise ValueError(f"{where}: onExitCodes.operator must be In or NotIn (got {operator!r})")
    values = req.get("values")
    if (
        not isinstance(values, list | tuple)
        or not values
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    ):
        raise ValueError(f"{where}: onExitCodes.values must be a non-empty list of exit codes")
    if len(values) > 255:
        raise ValueError(f"{where}: onExitCodes.values has {len(values)} codes; at most 255")
    if list(values) != sorted(set(values)):
        raise ValueError(
            f"{where}: onExitCodes.values must be in increasing order without "
            f"duplicates (got {list(values)})"
        )
    if operator == "In" and 0 in values:
        raise ValueError(
            f"{where}: exit code 0 cannot be used with operator In (a container "
            "that exits 0 succeeded)"
        )


def _check_conditions(patterns: Any, where: str) -> None:
    if not isinstance(patterns, list | tuple) or not patterns:
        raise ValueError(
            f"{where}: onPodConditions must be a non-empty list of "
            "{'type': ..., 'status': 'True'} patterns"
        )
    if len(patterns) > 20:
        raise ValueError(f"{where}: onPodConditions has {len(patterns)} patterns; at most 20")
    for j, pattern in enumerate(patterns):
        if not isinstance(pattern, Mapping) or set(pattern) - {"type", "status"}:
            raise ValueError(
                f"{where}: onPodConditions[{j}] must have 'type' and optionally 'status'"
            )
        kind = pattern.get("type")
        if not isinstance(kind, str) or not _CONDITION_TYPE.fullmatch(kind):
            raise ValueError(
                f"{where}: onPodConditions[{j}].type {kind!r} is not a condition "
                "type such as 'DisruptionTarget'"
            )
        if pattern.get("status", "True") not in ("True", "False", "Unknown"):
            raise ValueError(
                f"{where}: onPodConditions[{j}].status must be True, False or "
                f"Unknown (got {pattern.get('status')!r})"
            )


# --- matching a failed pod -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyMatch:
    """The rule that decided a failed pod: its action, its index and Kubernetes' message."""

    action: str
    index: int
    message: str


def match(
    policy: Mapping[str, Any] | None,
    *,
    namespace: str,
    pod: str,
    exit_codes: Mapping[str, int | None],
    conditions: Iterable[Mapping[str, Any]],
) -> PolicyMatch | None:
    """The first rule of ``policy`` that a failed pod matches, or None (the failure counts).

    ``exit_codes``: each terminated container's exit code by name (a container still running or
    never started is None); ``conditions``: the pod's conditions. As in Kubernetes, a container
    that exited 0 matches no exit-code rule.
    """
    conds = [(str(c.get("type")), str(c.get("status"))) for c in conditions]
    for index, rule in enumerate((policy or {}).get("rules") or []):
        action = str(rule.get("action"))
        req = rule.get("onExitCodes")
        if req is not None:
            values = set(req.get("values") or ())
            wanted = req.get("containerName")
            for name, code in exit_codes.items():
                if code is None or code == 0 or (wanted is not None and wanted != name):
                    continue
                if (code in values) == (req.get("operator") == "In"):
                    return PolicyMatch(
                        action,
                        index,
                        f"Container {name} for pod {namespace}/{pod} failed with exit code "
                        f"{code} matching {action} rule at index {index}",
                    )
            continue
        for pattern in rule.get("onPodConditions") or ():
            wanted_status = str(pattern.get("status", "True"))
            if (str(pattern.get("type")), wanted_status) in conds:
                return PolicyMatch(
                    action,
                    index,
                    f"Pod {namespace}/{pod} has condition {pattern.get('type')} matching "
                    f"{action} rule at index {index}",
                )
    return None


def match_pod(policy: Mapping[str, Any] | None, pod: Mapping[str, Any]) -> PolicyMatch | None:
    """`match` for a pod object as the API server returns it."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    codes: dict[str, int | None] = {}
    for cs in [
        *(status.get("containerStatuses") or ()),
        *(status.get("initContainerStatuses") or ()),
    ]:
        term = (cs.get("state") or {}).get("terminated") or {}
        code = term.get("exitCode")
        codes[str(cs.get("name"))] = int(code) if code is not None else None
    return match(
        policy,
        namespace=str(meta.get("namespace")),
        pod=str(meta.get("name")),
        exit_codes=codes,
        conditions=status.get("conditions") or (),
    )


def disruption_of(conditions: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """A pod's ``DisruptionTarget`` condition when it is True, else None."""
    return next(
        (c for c in conditions if c.get("type") == DISRUPTION_TARGET and c.get("status") == "True"),
        None,
    )


# --- a Job that failed by the policy -----------------------------------------------------------

_NAMED_POD = re.compile(r"(?:for pod|^Pod) [^/\s]+/(?P<pod>[^\s]+)")


def named_pod(message: str | None) -> str | None:
    """The pod a PodFailurePolicy message names, or None."""
    found = _NAMED_POD.search(message or "")
    return found.group("pod") if found else None


def explain_policy_failure(
    message: str | None, pod_failures: Sequence[Mapping[str, Any]], *, lines: int = 3
) -> str:
    """Why a Job failed with reason PodFailurePolicy, in one line: Kubernetes' message, what
    the worker's exit 2 means, and the end of the named pod's log."""
    out = message or "a pod failure matched a FailJob rule"
    if f"with exit code {USAGE_EXIT_CODE} matching" in out:
        out += (
            f"; exit code {USAGE_EXIT_CODE} is the worker's usage or configuration error (a "
            "--call that cannot be imported, refused broker credentials, a missing queue), "
            "which retrying cannot fix"
        )
    pod = named_pod(message)
    failure = next((f for f in pod_failures if f.get("pod") == pod), None)
    if failure is not None:
        tail = [ln.strip() for ln in str(failure.get("log_tail") or "").splitlines() if ln.strip()]
        if tail:
            out += f"; the end of pod {pod}'s log: " + " / ".join(tail[-lines:])
    return out


# --- what the API server keeps ---------------------------------------------------------------

_VERSION = re.compile(r"v?(?P<major>\d+)\.(?P<minor>\d+)")


@dataclass(frozen=True, slots=True)
class ServerFeatures:
    """Which of the Job's failure fields an API server keeps (an older one drops them without a
    word, so the manifest leaves them out and the run says so). The default is a current
    server's (1.29+); ``version`` is /version's ``gitVersion`` when it was read."""

    version: str | None = None
    pod_failure_policy: bool = True
    pod_replacement_policy: bool = True

    @classmethod
    def from_version(cls, info: Mapping[str, Any]) -> ServerFeatures:
        """From the API server's ``/version`` answer (``major``, ``minor`` such as ``"27+"``,
        ``gitVersion``). An answer that cannot be read gives a current server's features: an
        older server drops the fields it does not know, and the create's answer shows that."""
        git = str(info.get("gitVersion") or "") or None
        found = _VERSION.match(f"{info.get('major', '')}.{info.get('minor', '')}".replace("+", ""))
        found = found or _VERSION.match(git or "")
        if found is None:
            return cls(version=git)
        have = (int(found["major"]), int(found["minor"]))
        return cls(
            version=git or f"v{have[0]}.{have[1]}",
            pod_failure_policy=have >= POD_FAILURE_POLICY_SINCE,
            pod_replacement_policy=have >= POD_REPLACEMENT_POLICY_SINCE,
        )

    def omitted(self) -> list[str]:
        """The fields the Job leaves out on this server."""
        out = []
        if not self.pod_failure_policy:
            out.append("podFailurePolicy")
        if not self.pod_replacement_policy:
            out.append("podReplacementPolicy")
        return out

    def omission_note(self) -> str | None:
        """One line for the run's log when the Job leaves fields out, else None."""
        omitted = self.omitted()
        if not omitted:
            return None
        since = {
            "podFailurePolicy": ".".join(map(str, POD_FAILURE_POLICY_SINCE)),
            "podReplacementPolicy": ".".join(map(str, POD_REPLACEMENT_POLICY_SINCE)),
        }
        fields = " and ".join(f"{f} (Kubernetes {since[f]}+)" for f in omitted)
        effect = (
            "every failed pod counts toward backoffLimit: a worker's configuration error (exit "
            "2) is retried until the limit, and evicted or preempted pods count as failures"
            if not self.pod_failure_policy
            else "a replacement pod may start while the pod it replaces is still terminating"
        )
        return (
            f"the Kubernetes API server is {self.version or 'of an unknown version'}: the Job "
            f"leaves out {fields}, which it does not know; {effect}"
        )
