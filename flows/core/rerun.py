"""Rerun: an earlier run's failed, dead-lettered and leftover items as a new run.

The items come from the earlier run's ledger (an `ItemSource` of kind ``ledger``): each row
holds the item's id and body, so the new run needs neither the original file (which may have
changed, or be absent from a fresh pod) nor a range to recompute. The settings come from the
earlier run's report (``params``: the flow parameters it ran with); options given for the rerun
replace them field by field.

Pure: the caller reads the report and the ledger.
"""

from __future__ import annotations

import zlib
from array import array
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from queuejob.flows.core.caveats import Code, Finding, Severity
from queuejob.flows.core.errors import InvalidInput, StaleMessages

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
    earlier ones one by one; any other override replaces the value. ``job.completions`` is
    ``auto`` (sized to the rerun's own items) unless an override gives it: the earlier run's
    fixed number was for its items, not these. The stale-message policy stays the earlier
    run's: it applies only to messages that are not the earlier run's own leftovers of the
    items rerun, which the rerun takes out of the queue before its fill (`RerunLeftovers`).

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
    if isinstance(out.get("job"), Mapping):
        # A fixed count fitted the earlier run's items: 3 left items rerun with its 5 would
        # leave 2 pods without work. An override below may still fix it.
        out["job"] = {**out["job"], "completions": "auto"}
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


# --- the earlier run's leftovers in the work queue ----------------------------------------------

# Why a message in the work queue is not one the rerun takes out (keys of the scan's counts).
OTHER_RUN = "other-run"  # another run's message (or one without a run id)
NOT_IN_LEDGER = "not-in-ledger"  # the earlier run's id, but no such item in its ledger
MORE_THAN_RERUN = "more-than-rerun"  # more messages than the rerun has items: not all read

_STATUS_CODES = {"succeeded": 1, "failed": 2, "dead_lettered": 3, "left_in_queue": 4}
_STATUS_NAMES = {v: k for k, v in _STATUS_CODES.items()}
_STATUS_FATE = {"left_in_queue": "left"}


class RerunLeftovers:
    """Which messages in the work queue are the earlier run's own, for items the rerun queues
    again from that run's ledger: those the rerun takes out of the queue before its fill, so
    that no item runs twice. Everything else there is stale to the rerun.

    A message names its run and its index in that run's fill in headers, and its item in
    ``message_id``; the earlier run's ledger row of that index gives the item's id and fate.
    Built from the ledger's rows, streamed: per index one byte (the fate) and a 32-bit checksum
    of the item id, so a rerun of millions of items holds a few MB, not the ids themselves.
    """

    def __init__(self, run_id: str, statuses: Iterable[str]) -> None:
        self.run_id = run_id
        self._wanted = frozenset(_STATUS_CODES[s] for s in statuses)
        self._status = bytearray()
        self._crc = array("I")
        self.items = 0  # rows of the rerun's fates: the items the rerun queues again

    @classmethod
    def from_rows(
        cls, run_id: str, statuses: Iterable[str], rows: Iterable[Mapping[str, Any]]
    ) -> RerunLeftovers:
        """The lookup over every row of the earlier run's ledger (all fates)."""
        out = cls(run_id, statuses)
        for row in rows:
            out.add(row)
        return out

    def add(self, row: Mapping[str, Any]) -> None:
        """Take one ledger row (``index``, ``item_id``, ``status``); others are ignored."""
        index, item_id = row.get("index"), row.get("item_id")
        code = _STATUS_CODES.get(str(row.get("status")))
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            return
        if not isinstance(item_id, str) or code is None:
            return
        if index >= len(self._status):
            grow = index + 1 - len(self._status)
            self._status.extend(bytes(grow))
            self._crc.extend([0] * grow)
        if code in self._wanted and self._status[index] not in self._wanted:
            self.items += 1
        self._status[index] = code
        self._crc[index] = _checksum(item_id)

    def classify(self, run_id: str | None, item_id: str | None, index: int | None) -> str | None:
        """None when the message is the earlier run's, for an item the rerun queues again (take
        it out); otherwise why not: `OTHER_RUN`, `NOT_IN_LEDGER`, or the item's fate in the
        earlier run (``succeeded``, ``failed``, ``dead_lettered``, ``left``) when the rerun does
        not take that fate."""
        if run_id != self.run_id:
            return OTHER_RUN
        if (
            item_id is None
            or index is None
            or not 0 <= index < len(self._status)
            or self._status[index] == 0
            or self._crc[index] != _checksum(item_id)
        ):
            return NOT_IN_LEDGER
        code = self._status[index]
        if code in self._wanted:
            return None
        status = _STATUS_NAMES[code]
        return _STATUS_FATE.get(status, status)


def _checksum(item_id: str) -> int:
    return zlib.crc32(item_id.encode("utf-8", "surrogatepass"))


def check_rerun_leftovers(
    *,
    queue: str,
    earlier_run: str,
    taken: int,
    others: Mapping[str, int],
    exhaustive: bool,
    policy: Literal["fail", "purge"],
) -> Finding | None:
    """The stale-message rule for a rerun: ``others`` are the messages in the work queue that
    are not the earlier run's leftovers of the rerun's items (those, ``taken``, were taken out:
    the rerun queues their items again). None when there are none; with policy ``fail`` raises
    `StaleMessages` naming them and what to do; with ``purge`` the finding that they were
    purged (the caller purged them). ``exhaustive`` is False when the count is a lower bound
    (the scan stopped at the first such message, or did not read the queue)."""
    count = sum(others.values())
    if count == 0:
        return None
    what = _describe(others, earlier_run, count, exhaustive)
    fates = sorted(f for f in others if f in FATE_STATUS)
    numbers: dict[str, int | float | str] = {"stale": count, "taken": taken, **others}
    if policy == "fail":
        options = []
        if fates:
            options.append(f"rerun those fates too (--fate {','.join(fates)})")
        options.append("purge them (stale_messages='purge', --stale purge)")
        options.append("use another queue name")
        raise StaleMessages(
            f"queue {queue!r} holds {what}: pods would process them as this rerun's items. "
            + (
                f"Taken out first: {taken} of run {earlier_run}'s own, rerun here. "
                if taken
                else ""
            )
            + "Either "
            + ", or ".join(options)
        )
    return Finding(
        Code.STALE_PURGED,
        Severity.WARNING,
        f"queue {queue!r} held {what}; they were purged"
        + (
            f" ({taken} of run {earlier_run}'s own were taken out and queued again)"
            if taken
            else ""
        ),
        "the purged items of run "
        + earlier_run
        + " are still in its ledger (queuejob ledger); find out which run left the others",
        numbers,
        stage="before",
    )


def _describe(others: Mapping[str, int], earlier_run: str, count: int, exhaustive: bool) -> str:
    if MORE_THAN_RERUN in others:
        return (
            f"at least {count} message(s) more than the items this rerun queues again from run "
            f"{earlier_run}'s ledger (another run's, or items of fates not rerun)"
        )
    parts = []
    for key, n in sorted(others.items()):
        if key == OTHER_RUN:
            parts.append(f"{n} of other runs")
        elif key == NOT_IN_LEDGER:
            parts.append(f"{n} marked as run {earlier_run}'s but not in its ledger")
        else:
            parts.append(f"{n} of run {earlier_run}'s {key} items, not rerun")
    lead = "" if exhaustive else "at least "
    return f"{lead}{count} message(s) that are not this rerun's: " + "; ".join(parts)
