"""A run's outcome tells the truth: `queuejob run` end to end (real Prefect, real RabbitMQ, the
local backend), its exit status, its one line and summary, and the flow run's state in the
Prefect API.

Six items, one of them poison (delivery limit 1, completions auto): the run ends Failed with one
finding and exits 1, and so does `queuejob rerun` of it while the item is still poison; the same
with ``--max-failed-items 1`` ends Completed and exits 0; three of eight items left in the queue
by ``--completions 5`` exit 1; configuration the flow refuses before anything is queued exits 2.
"""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from queuejob.flows.cli import main

pytestmark = [pytest.mark.broker, pytest.mark.prefect]

SIX = ["apple", "banana", "cherry", "poison", "date", "fig"]
POISON = 'item=$(cat); [ "$item" = poison ] && { echo "cannot take $item" >&2; exit 3; }; echo ok'


@pytest.fixture
def cli(flow_env: dict[str, str]) -> Iterator[Any]:
    """`queuejob ...` in this process (its Prefect API is the tests' ephemeral one); restores
    the SIGTERM handler `run` installs."""
    saved = signal.getsignal(signal.SIGTERM)

    def run(*argv: str) -> int:
        return main(list(argv))

    try:
        yield run
    finally:
        signal.signal(signal.SIGTERM, saved)


def _only_report(flow_env: dict[str, str]) -> dict[str, Any]:
    (run_dir,) = Path(flow_env["QUEUEJOB_LEDGER_DIR"]).iterdir()
    report: dict[str, Any] = json.loads((run_dir / "report.json").read_text())
    return report


def _api_state(run_id: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(run_id)).state


def _six(queue: str, *extra: str) -> list[str]:
    return [
        "run", *SIX, "--backend", "local", "--queue", queue, "--delivery-limit", "1",
        "--idle-timeout", "1", *extra, "--", "sh", "-c", POISON,
    ]  # fmt: skip


def test_one_poison_item_of_six_fails_the_run_with_one_finding_and_exit_1(
    cli: Any, flow_env: dict[str, str], queue_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(*_six(queue_name)) == 1
    out, err = capsys.readouterr()
    report = _only_report(flow_env)
    run_id = report["run_id"]
    headline = "Failed: 1 of 6 items dead-lettered; Job Succeeded (CompletionsReached)"
    assert f"  outcome:        {headline}" in out
    assert f"  rerun:          queuejob rerun {run_id}" in out
    # The last line on stderr is the Failed state's message: by fate, and the rerun command.
    message = f"{headline}; `queuejob rerun {run_id}` runs it again"
    assert err.rstrip().splitlines()[-1] == f"queuejob: {message}"
    # One cause, one finding: the pod that took the dead-lettered item's completion slot and
    # found no work is named inside it.
    (finding,) = report["findings"]
    assert finding["code"] == "dead-letters"
    assert finding["numbers"] == {"dead_lettered": 1, "no_work_pods": 1}
    assert report["outcome"]["state"] == "Failed"
    assert report["outcome"]["not_succeeded"] == {"dead_lettered": 1}
    # What the UI shows: the flow run Failed, with the message.
    state = _api_state(run_id)
    assert (state.type.value, state.message) == ("FAILED", message)
    # `queuejob rerun` exits by the same table: the poison item fails again, exit 1.
    assert cli("rerun", run_id) == 1
    out = capsys.readouterr().out
    assert "  outcome:        Failed: 1 of 1 item dead-lettered; Job Succeeded" in out


def test_the_same_run_within_max_failed_items_completes_and_says_what_it_tolerated(
    cli: Any, flow_env: dict[str, str], queue_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(*_six(queue_name, "--max-failed-items", "1")) == 0
    out = capsys.readouterr().out
    report = _only_report(flow_env)
    headline = "Completed: 1 of 6 items dead-lettered (1 item tolerated: max_failed_items=1)"
    assert f"  outcome:        {headline}; Job Succeeded (CompletionsReached)" in out
    assert report["outcome"]["tolerated"] == 1
    assert [f["code"] for f in report["findings"]] == ["dead-letters"]
    state = _api_state(report["run_id"])
    assert state.type.value == "COMPLETED"
    assert state.message.startswith(headline)


def test_three_of_eight_items_left_by_too_few_completions_exit_1(
    cli: Any, flow_env: dict[str, str], queue_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", *"abcdefgh", "--backend", "local", "--queue", queue_name,
            "--completions", "5", "--idle-timeout", "1", "--", "sh", "-c", "cat"]  # fmt: skip
    assert cli(*argv) == 1
    out = capsys.readouterr().out
    report = _only_report(flow_env)
    assert "Failed: 3 of 8 items left in the queue; Job Succeeded (CompletionsReached)" in out
    (finding,) = report["findings"]
    assert finding["code"] == "items-left-in-queue"
    assert f"`queuejob rerun {report['run_id']} --fate left`" in finding["advice"]
    assert _api_state(report["run_id"]).type.value == "FAILED"


def test_configuration_the_flow_refuses_before_anything_is_queued_exits_2(
    cli: Any, queue_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "a", "--backend", "local", "--queue", queue_name,
            "--broker-block", "no-such-broker-block", "--", "cat"]  # fmt: skip
    assert cli(*argv) == 2
    err = capsys.readouterr().err
    assert "no-such-broker-block" in err.rstrip().splitlines()[-1]
