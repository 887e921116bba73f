"""The run's outcome: the items decide it, within max_failed_items; the Job's condition beside."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from queuejob.flows.core.errors import (
    CaveatViolation,
    InvalidInput,
    ItemsFailed,
    JobFailed,
    PermanentError,
    RunFailed,
)
from queuejob.flows.core.ledger import LedgerSummary
from queuejob.flows.core.outcome import Outcome, Tolerance, decide, describe_items, job_condition

RUN = "3f2a9c1e-run"


def summary(expected: int, **fates: int) -> LedgerSummary:
    values = {"failed": 0, "dead_lettered": 0, "left": 0}
    values.update(fates)
    succeeded = expected - sum(values.values())
    return LedgerSummary(
        expected=expected,
        succeeded=succeeded,
        processed_more_than_once=0,
        attempts=expected,
        no_work_pods=0,
        foreign_records=0,
        **values,
    )


def outcome(
    s: LedgerSummary,
    tolerance: int | str = 0,
    *,
    phase: str = "Succeeded",
    reason: str | None = "CompletionsReached",
    caveats: tuple[str, ...] = (),
) -> Outcome:
    return decide(
        summary=s,
        job_phase=phase,
        job_reason=reason,
        tolerance=Tolerance.parse(tolerance),
        run_id=RUN,
        caveat_failures=caveats,
    )


# --- max_failed_items -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "total", "allowed", "text"),
    [
        pytest.param(0, 6, 0, "0", id="default"),
        pytest.param(None, 6, 0, "0", id="none"),
        pytest.param(1, 6, 1, "1", id="one"),
        pytest.param("3", 6, 3, "3", id="count-as-text"),
        pytest.param("10%", 6, 0, "10%", id="percent-rounds-down"),
        pytest.param("50%", 6, 3, "50%", id="half"),
        pytest.param(" 2.5 % ", 200, 5, "2.5%", id="fraction"),
        pytest.param("100%", 7, 7, "100%", id="all"),
    ],
)
def test_tolerance(value: Any, total: int, allowed: int, text: str) -> None:
    tolerance = Tolerance.parse(value)
    assert tolerance.allowed(total) == allowed
    assert tolerance.text() == text


@pytest.mark.parametrize("value", [-1, "-1", "lots", "5 %%", "101%", "1.5", True, 2.0])
def test_a_bad_tolerance_says_what_to_give(value: Any) -> None:
    with pytest.raises(InvalidInput, match=r"give a whole number of items .* or a percentage"):
        Tolerance.parse(value)


# --- the outcome --------------------------------------------------------------------------------


def test_every_item_succeeded_is_completed() -> None:
    result = outcome(summary(8))
    assert (result.state, result.headline) == ("Completed", "Completed: 8 of 8 items succeeded")
    assert result.job == "Job Succeeded (CompletionsReached)"
    assert result.message == "Completed: 8 of 8 items succeeded; Job Succeeded (CompletionsReached)"
    assert result.rerun is None and not result.failed and result.reasons == ()


def test_one_dead_lettered_item_of_six_fails_the_run_and_says_how_to_rerun_it() -> None:
    result = outcome(summary(6, dead_lettered=1))
    assert result.state == "Failed" and result.failed
    assert result.headline == "Failed: 1 of 6 items dead-lettered"
    assert result.job == "Job Succeeded (CompletionsReached)"
    assert result.message == (
        "Failed: 1 of 6 items dead-lettered; Job Succeeded (CompletionsReached); "
        f"`queuejob rerun {RUN}` runs it again"
    )
    assert result.not_succeeded == {"dead_lettered": 1}
    assert result.reasons == ("items",)
    assert result.rerun == f"queuejob rerun {RUN}"


def test_within_max_failed_items_the_run_completes_and_says_what_was_tolerated() -> None:
    result = outcome(summary(6, dead_lettered=1), 1)
    assert result.state == "Completed"
    assert result.headline == (
        "Completed: 1 of 6 items dead-lettered (1 item tolerated: max_failed_items=1)"
    )
    assert result.tolerated == 1 and result.allowed == 1
    assert f"`queuejob rerun {RUN}` runs it again" in result.message


def test_beyond_a_percentage_the_message_names_the_limit() -> None:
    result = outcome(summary(8, left=3), "25%")
    assert result.headline == "Failed: 3 of 8 items left in the queue"
    assert result.allowed == 2
    assert "more than max_failed_items=25% allows" in result.message


def test_items_of_several_fates_are_counted_by_fate() -> None:
    result = outcome(summary(10, failed=1, dead_lettered=2, left=3))
    assert result.headline == (
        "Failed: 6 of 10 items did not succeed (1 failed, 2 dead-lettered, 3 left in the queue)"
    )
    assert result.not_succeeded == {"failed": 1, "dead_lettered": 2, "left": 3}
    assert result.message.endswith("runs them again")


def test_a_failed_job_fails_the_run_even_within_the_tolerance() -> None:
    result = outcome(
        summary(4, failed=1), 1, phase="Failed", reason="BackoffLimitExceeded"
    )  # fmt: skip
    assert result.state == "Failed" and result.reasons == ("job",)
    assert result.headline == "Failed: 1 of 4 items failed (within max_failed_items=1)"
    assert result.job == "Job Failed (BackoffLimitExceeded)"
    every = outcome(summary(4), phase="Failed", reason="DeadlineExceeded")
    assert every.headline == "Failed: 4 of 4 items succeeded (but the Job failed)"


def test_caveat_findings_under_the_fail_policy_fail_the_run_with_their_lines() -> None:
    line = "[warning] processed-more-than-once: 1 item(s) were processed twice (make it idempotent)"
    result = outcome(summary(8), caveats=(line,))
    assert result.state == "Failed" and result.reasons == ("caveats",)
    assert result.headline == (
        "Failed: 8 of 8 items succeeded (1 caveat finding with caveat_policy=fail)"
    )
    assert result.message.endswith(line)


def test_outcome_as_dict() -> None:
    assert outcome(summary(6, dead_lettered=1)).as_dict() == {
        "state": "Failed",
        "headline": "Failed: 1 of 6 items dead-lettered",
        "job": "Job Succeeded (CompletionsReached)",
        "message": "Failed: 1 of 6 items dead-lettered; Job Succeeded (CompletionsReached); "
        f"`queuejob rerun {RUN}` runs it again",
        "not_succeeded": {"dead_lettered": 1},
        "tolerated": 0,
        "allowed": 0,
        "max_failed_items": "0",
        "reasons": ["items"],
        "rerun": f"queuejob rerun {RUN}",
    }


def test_small_words() -> None:
    assert describe_items(summary(1)) == "1 of 1 item succeeded"
    assert job_condition("Succeeded", None) == "Job Succeeded"
    assert job_condition(None, None) == "Job unknown"


# --- the Failed run's result ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", [RunFailed, ItemsFailed, JobFailed, CaveatViolation])
def test_a_failed_runs_error_reads_as_its_report(cls: type[RunFailed]) -> None:
    report = {"run_id": RUN, "summary": {"expected": 6, "dead_lettered": 1}}
    error = cls("Failed: 1 of 6 items dead-lettered", report)
    assert isinstance(error, PermanentError)
    assert str(error) == "Failed: 1 of 6 items dead-lettered"
    assert error["summary"]["dead_lettered"] == 1
    assert dict(error) == report and len(error) == 2
    assert {error: 1}[error] == 1  # hashable, as exceptions must be
    again = pickle.loads(pickle.dumps(error))  # a persisted result
    assert type(again) is cls and dict(again) == report and str(again) == str(error)
    empty = cls("stopped before the Job")
    assert bool(empty) and dict(empty) == {}  # an error is never falsy
