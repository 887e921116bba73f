"""Rerun: an earlier run's failed, dead-lettered and leftover items as a new run.

The items come from the earlier run's ledger (an `ItemSource` of kind ``ledger``): each row
holds the item's id and body, so the new run needs neither the original file (which may have
changed, or be absent from a fresh pod) nor a range to recompute. The settings come from the
earlier run's report (``params``: the flow parameters it ran with); options given for the rerun
replace them field by field.

Pure: the caller reads the report and the ledger.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from queuejob.flows.core.errors import InvalidInput

# What users type, and what ledger rows say.
FATE_NAMES = ("succeeded", "failed", "dead_lettered", "left")
FATE_STATUS = {
    "succeeded": "succeeded",
    "failed": "failed",
    "dead_lettered": "dead_lettered",
    "left": "left_in_queue",
    "left_in_queue": "left_in_queue",
}
DEFAULT_FATES = ("failed", "dead_lettered", "left")

# The flow parameters a report's ``params`` may carry, and which of them are objects whose
# fields an override replaces one by one.
FLOW_PARAMS = (
    "items",
    "queue",
    "job",
    "mode",
    "backend",
    "broker_block",
    "kubernetes_credentials_block",
    "caveat_policy",
    "timeout_seconds",
    "broker_wait_seconds",
    "cleanup",
    "ledger_storage",
)
NESTED_PARAMS = ("queue", "job", "cleanup")


def parse_fates(values: Iterable[str] | str | None) -> tuple[str, ...]:
    """Fate names from ``--fate`` values (each may be comma-separated), in canonical order,
    without repeats; None or nothing gives the default (failed, dead_lettered, left).
    ``left_in_queue`` is accepted for ``left``. An unknown name raises `InvalidInput`."""
    if values is None:
        return DEFAULT_FATES
    if isinstance(values, str):
        values = [values]
    asked: set[str] = set()
    for value in values:
        for part in value.split(","):
            name = part.strip()
            if not name:
                continue
            if name not in FATE_STATUS:
                raise InvalidInput(
                    f"unknown fate {name!r}: use one or more of {', '.join(FATE_NAMES)} "
                    "(comma-separated, or --fate repeated)"
                )
            asked.add("left" if name == "left_in_queue" else name)
    if not asked:
        return DEFAULT_FATES
    return tuple(f for f in FATE_NAMES if f in asked)


def fate_statuses(fates: Iterable[str]) -> frozenset[str]:
    """The ledger row statuses of those fate names (``left`` -> ``left_in_queue``)."""
    return frozenset(FATE_STATUS[f] for f in fates)


def rerun_params(
    params: Mapping[str, Any] | None,
    *,
    run_id: str,
    fates: Iterable[str],
    ledger_storage: str | None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The new run's flow parameters (plain JSON values): the earlier run's ``params``, the
    items replaced by that run's ledger, then ``overrides`` applied.

    An override of ``queue``, ``job`` or ``cleanup`` is a mapping of fields replacing the
    earlier ones one by one; any other override replaces the value. Messages already in the
    work queue are purged (``queue.stale_messages = purge``) when the fates include both
    ``failed`` and ``left``, unless an override says otherwise: what the earlier run left there
    (items never taken, or failed and put back) is rerun from the ledger and would otherwise be
    processed twice. With fewer fates nothing is purged, as those messages are not rerun.

    Raises `InvalidInput` when ``params`` is missing (a report written before reruns existed)
    or an override names no flow parameter.
    """
    if params is None:
        raise InvalidInput(
            f"the report of run {run_id} does not record its parameters (it was written by an "
            "older queuejob): run the items again with `queuejob run` instead"
        )
    out: dict[str, Any] = {k: _copy(v) for k, v in params.items() if k in FLOW_PARAMS}
    earlier_items = params.get("items")
    items: dict[str, Any] = {
        "kind": "ledger",
        "run_id": run_id,
        "fates": list(fates),
        "ledger_storage": ledger_storage,
    }
    if isinstance(earlier_items, Mapping) and "max_item_bytes" in earlier_items:
        items["max_item_bytes"] = earlier_items["max_item_bytes"]
    out["items"] = items
    out["ledger_storage"] = ledger_storage
    if {"failed", "left"} <= set(fates):
        # Everything the earlier run can have left in its work queue (items never taken, items
        # failed and put back) is in this rerun's items: purge it rather than run it twice.
        # With fewer fates those messages are not rerun, so they must not be purged: the
        # earlier run's stale-message policy stands.
        queue = dict(out.get("queue") or {})
        queue["stale_messages"] = "purge"
        out["queue"] = queue
    for key, value in (overrides or {}).items():
        if key not in FLOW_PARAMS or key == "items":
            raise InvalidInput(
                f"cannot override {key!r} in a rerun: the items come from the earlier run's "
                f"ledger; the settings that can be given are {', '.join(FLOW_PARAMS[1:])}"
            )
        if key in NESTED_PARAMS and isinstance(value, Mapping):
            merged = dict(out.get(key) or {})
            merged.update(value)
            out[key] = merged
        else:
            out[key] = _copy(value)
    job = out.get("job")
    if isinstance(job, dict) and overrides and isinstance(overrides.get("job"), Mapping):
        given = overrides["job"]
        # A command and a callable exclude each other: the one given for the rerun wins.
        if given.get("command") is not None and "call" not in given:
            job["call"] = None
        if given.get("call") is not None and "command" not in given:
            job["command"] = None
    return out


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value
