"""The run's outcome: decided by its items, with the Job's condition beside it.

A run whose items did not all succeed (failed, dead-lettered or left in the queue) ends Failed,
unless their number is within ``max_failed_items``: a count (``3``) or a share of the items
(``"5%"``), default 0. A Job that failed fails the run whatever its items, and so do a Job
whose pods could not start (the run deleted it, keeping its items in the queue) and caveat
findings under ``caveat_policy='fail'`` (the caveats of the pattern, not the items' fates).

`decide` turns the ledger's counts, the Job's condition and the tolerance into an `Outcome`:
the state (Completed or Failed), a headline (``Failed: 1 of 6 items dead-lettered``) and the
message the flow run's state carries (by fate, the tolerance, and the command that reruns what
did not succeed).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

from queuejob.flows.core.errors import InvalidInput
from queuejob.flows.core.ledger import LedgerSummary

# What `max_failed_items` accepts as text: a whole number of items, or a percentage of them.
TOLERANCE_PATTERN = r"^\s*\d+(\.\d+)?\s*%\s*$|^\s*\d+\s*$"
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_COUNT = re.compile(r"^\s*(\d+)\s*$")

# The fates that are not success, in the order messages name them, with their words.
FATES: tuple[tuple[str, str], ...] = (
    ("failed", "failed"),
    ("dead_lettered", "dead-lettered"),
    ("left", "left in the queue"),
)


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How many items may not succeed before the run fails: a count, or a percentage of the
    items (rounded down: 10% of 6 items tolerates none)."""

    count: int | None = None
    percent: Fraction | None = None

    @classmethod
    def parse(cls, value: int | str | None) -> Tolerance:
        """``3``, ``"3"``, ``"5%"`` or ``"2.5%"``; `InvalidInput` for anything else."""
        if value is None:
            return cls(count=0)
        if isinstance(value, bool):
            raise InvalidInput(_bad(value))
        if isinstance(value, int):
            if value < 0:
                raise InvalidInput(_bad(value))
            return cls(count=value)
        if isinstance(value, str):
            count = _COUNT.match(value)
            if count:
                return cls(count=int(count.group(1)))
            percent = _PERCENT.match(value)
            if percent:
                share = Fraction(percent.group(1))
                if share > 100:
                    raise InvalidInput(_bad(value))
                return cls(percent=share)
        raise InvalidInput(_bad(value))

    def allowed(self, total: int) -> int:
        """Items of ``total`` that may not succeed."""
        if self.percent is not None:
            return int(self.percent * total / 100)
        return self.count or 0

    def text(self) -> str:
        """As a user writes it: ``3`` or ``5%``."""
        if self.percent is not None:
            share = self.percent
            return f"{share.numerator if share.denominator == 1 else float(share):g}%"
        return str(self.count or 0)


def _bad(value: object) -> str:
    return (
        f"max_failed_items {value!r} is not a number of items or a percentage: give a whole "
        "number of items (0 or more, e.g. 3) or a percentage of the items from 0% to 100% "
        "(e.g. 5%)"
    )


def job_condition(phase: str | None, reason: str | None) -> str:
    """The Job's condition in a few words: ``Job Succeeded (CompletionsReached)``."""
    text = f"Job {phase or 'unknown'}"
    return f"{text} ({reason})" if reason else text


def _items(n: int) -> str:
    return f"{n} item" if n == 1 else f"{n} items"


def not_succeeded(summary: LedgerSummary) -> dict[str, int]:
    """The items that did not succeed, by fate (fates with none left out)."""
    counts = {
        "failed": summary.failed,
        "dead_lettered": summary.dead_lettered,
        "left": summary.left,
    }
    return {fate: counts[fate] for fate, _ in FATES if counts[fate]}


def describe_items(summary: LedgerSummary) -> str:
    """``1 of 6 items dead-lettered``, ``3 of 8 items did not succeed (1 failed, 2 left in the
    queue)`` or ``8 of 8 items succeeded``."""
    total = summary.expected
    by_fate = not_succeeded(summary)
    missing = sum(by_fate.values())
    if not missing:
        return f"{summary.succeeded} of {_items(total)} succeeded"
    words = dict(FATES)
    if len(by_fate) == 1:
        ((fate, n),) = by_fate.items()
        return f"{n} of {_items(total)} {words[fate]}"
    parts = ", ".join(f"{n} {words[fate]}" for fate, n in by_fate.items())
    return f"{missing} of {_items(total)} did not succeed ({parts})"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the run ends, and why: what the flow run's state, the report's headline, the
    CLI's exit status and the run's end event say."""

    state: Literal["Completed", "Failed"]
    headline: str  # "Failed: 1 of 6 items dead-lettered"
    job: str  # "Job Succeeded (CompletionsReached)"
    message: str  # the flow run state's message
    not_succeeded: dict[str, int] = field(default_factory=dict)
    tolerated: int = 0
    allowed: int = 0
    max_failed_items: str = "0"
    # Why Failed: "pods", "items", "job", "caveats" (empty when Completed).
    reasons: tuple[str, ...] = ()
    rerun: str | None = None  # the command that reruns the items that did not succeed

    @property
    def failed(self) -> bool:
        """True when the run ends Failed."""
        return self.state == "Failed"

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for the report, the return value and the run's end event."""
        return {
            "state": self.state,
            "headline": self.headline,
            "job": self.job,
            "message": self.message,
            "not_succeeded": dict(self.not_succeeded),
            "tolerated": self.tolerated,
            "allowed": self.allowed,
            "max_failed_items": self.max_failed_items,
            "reasons": list(self.reasons),
            "rerun": self.rerun,
        }


def decide(
    *,
    summary: LedgerSummary,
    job_phase: str | None,
    job_reason: str | None,
    job_message: str | None = None,
    tolerance: Tolerance,
    run_id: str,
    caveat_failures: Sequence[str] = (),
    start_failure: str | None = None,
) -> Outcome:
    """The run's outcome from its items, its Job and the caveat findings the policy fails on
    (``caveat_failures``: their lines; empty under the ``warn`` policy). ``job_message``: why
    the Job failed, added to a failed run's message. ``start_failure``: what kept every pod
    from starting, when the wait gave up on them (the run deleted the Job)."""
    by_fate = not_succeeded(summary)
    missing = sum(by_fate.values())
    allowed = tolerance.allowed(summary.expected)
    job = job_condition(job_phase, job_reason)
    items = describe_items(summary)
    rerun = f"queuejob rerun {run_id}" if missing else None
    if start_failure is not None:
        return _cannot_start(
            start_failure, items=items, by_fate=by_fate, allowed=allowed, tolerance=tolerance,
            run_id=run_id, caveat_failures=caveat_failures, missing=missing,
        )  # fmt: skip
    reasons: list[str] = []
    if job_phase == "Failed":
        reasons.append("job")
    if missing > allowed:
        reasons.append("items")
    if caveat_failures:
        reasons.append("caveats")
    limit = f"max_failed_items={tolerance.text()}"
    if not reasons:
        tolerated = missing
        if tolerated:
            headline = f"Completed: {items} ({_items(tolerated)} tolerated: {limit})"
        else:
            headline = f"Completed: {items}"
        message = f"{headline}; {job}"
        if rerun:
            message += f"; `{rerun}` runs {'it' if missing == 1 else 'them'} again"
        return Outcome(
            state="Completed",
            headline=headline,
            job=job,
            message=message,
            not_succeeded=by_fate,
            tolerated=tolerated,
            allowed=allowed,
            max_failed_items=tolerance.text(),
            rerun=rerun,
        )
    extra: list[str] = []
    if missing and "items" not in reasons:
        extra.append(f"within {limit}")
    if "job" in reasons and not missing:
        extra.append("but the Job failed")
    if "caveats" in reasons:
        n = len(caveat_failures)
        extra.append(f"{n} caveat finding{'s' if n != 1 else ''} with caveat_policy=fail")
    headline = f"Failed: {items}" + (f" ({'; '.join(extra)})" if extra else "")
    message = f"{headline}; {job}"
    if "job" in reasons and job_message:
        message += f": {job_message}"
    if "items" in reasons and allowed:
        message += f"; more than {limit} allows"
    if rerun:
        message += f"; `{rerun}` runs {'it' if missing == 1 else 'them'} again"
    if caveat_failures:
        message += "; " + "; ".join(caveat_failures)
    return Outcome(
        state="Failed",
        headline=headline,
        job=job,
        message=message,
        not_succeeded=by_fate,
        tolerated=0,
        allowed=allowed,
        max_failed_items=tolerance.text(),
        reasons=tuple(reasons),
        rerun=rerun,
    )


def _cannot_start(
    start_failure: str,
    *,
    items: str,
    by_fate: dict[str, int],
    allowed: int,
    tolerance: Tolerance,
    run_id: str,
    caveat_failures: Sequence[str],
    missing: int,
) -> Outcome:
    """A run whose pods could not start: Failed whatever the tolerance (nothing was done)."""
    rerun = None
    if missing:
        only_left = set(by_fate) == {"left"}
        rerun = f"queuejob rerun {run_id}" + (" --fate left" if only_left else "")
    headline = f"Failed: no pod could start; {items}"
    message = (
        f"{headline}: {start_failure}; the Job, its pods and its Secret were deleted, and "
        "the items stay in the queue"
    )
    if rerun:
        message += f"; `{rerun}` runs {'it' if missing == 1 else 'them'} once that is fixed"
    reasons = ["pods"]
    if missing > allowed:
        reasons.append("items")
    if caveat_failures:
        reasons.append("caveats")
        message += "; " + "; ".join(caveat_failures)
    return Outcome(
        state="Failed",
        headline=headline,
        job="Job deleted",
        message=message,
        not_succeeded=by_fate,
        tolerated=0,
        allowed=allowed,
        max_failed_items=tolerance.text(),
        reasons=tuple(reasons),
        rerun=rerun,
    )
