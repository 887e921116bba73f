"""`queuejob rerun` end to end: real Prefect, real RabbitMQ, the local backend.

A run with a poison item and a failing item (both fail while a flag file is missing), the
cause fixed (the flag file written), the run's leftovers rerun from its ledger: the rerun's
ledger holds exactly those two items, succeeded. Then a rerun of the rerun.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pika
import pytest

from queuejob.flows.cli import main
from queuejob.flows.core.errors import JobFailed, LedgerNotFound
from queuejob.flows.rerun import rerun_failures, rerun_kwargs
from queuejob.flows.work_queue import run_work_queue
from tests.flows.conftest import local_kwargs

pytestmark = [pytest.mark.broker, pytest.mark.prefect]


def _command(flag: Path) -> list[str]:
    # "poison" and "flaky" fail while the flag file is missing; every other item succeeds.
    return [
        "sh",
        "-c",
        f'item=$(cat); case "$item" in poison|flaky) [ -e "{flag}" ] || '
        f'{{ echo "cannot process $item: no {flag}" >&2; exit 4; }};; esac; echo "processed $item"',
    ]


def _rows(ledger_dir: Path, run_id: str) -> dict[str, dict[str, Any]]:
    lines = (ledger_dir / run_id / "ledger.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return {r["body"]: r for r in rows}


def _report(ledger_dir: Path, run_id: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((ledger_dir / run_id / "report.json").read_text())
    return report


def _queue_exists(url: str, name: str) -> bool:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404
        return False
    finally:
        if conn.is_open:
            conn.close()


def test_rerun_of_the_poison_and_failing_items_after_the_fix_succeeds_with_just_those(
    flow_env: dict[str, str],
    queue_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ledger_dir = Path(flow_env["QUEUEJOB_LEDGER_DIR"])
    flag = tmp_path / "fixed"
    items = ["apple", "banana", "poison", "flaky"]
    # One pod at a time, in queue order: the broker hands a returned message out again first,
    # so "poison" fails twice and is dead-lettered (delivery limit 1), then "flaky" fails once
    # more than the Job's back-off limit of 2 allows: the Job fails with "flaky" failed.
    kwargs = local_kwargs(
        queue_name, items=items, command=_command(flag), parallelism=1, backoff_limit=2
    )
    kwargs["queue"] = kwargs["queue"].model_copy(update={"delivery_limit": 1})  # type: ignore[attr-defined]
    with pytest.raises(JobFailed):
        run_work_queue(**kwargs)
    [first] = [p.name for p in ledger_dir.iterdir()]
    rows = _rows(ledger_dir, first)
    assert {body: r["status"] for body, r in rows.items()} == {
        "apple": "succeeded",
        "banana": "succeeded",
        "poison": "dead_lettered",
        "flaky": "failed",
    }
    assert f"cannot process poison: no {flag}" in rows["poison"]["error_tail"]
    report = _report(ledger_dir, first)
    advice = {f["code"]: f["advice"] for f in report["findings"]}
    assert f"queuejob rerun {first} --fate dead_lettered" in advice["dead-letters"]
    assert f"queuejob rerun {first} --fate failed" in advice["items-failed"]

    flag.write_text("fixed\n")  # the cause, fixed
    # The deployment's flow: the earlier settings (queue, delivery limit, command, mode, ...),
    # a few overrides; the earlier run's leftover "flaky" (failed and put back) is taken out of
    # the work queue first, as the rerun queues it again from the ledger.
    rerun = rerun_failures(run_id=first, parallelism=2)
    second = rerun["run_id"]
    assert rerun["rerun_of"] == first
    assert rerun["queue"] == queue_name and rerun["job_phase"] == "Succeeded"
    rows2 = _rows(ledger_dir, second)
    assert {body: r["status"] for body, r in rows2.items()} == {
        "poison": "succeeded",
        "flaky": "succeeded",
    }
    # The original ids travel with the bodies.
    assert {r["item_id"] for r in rows2.values()} == {
        rows["poison"]["item_id"],
        rows["flaky"]["item_id"],
    }
    assert all(r["attempts"] == 1 for r in rows2.values())
    assert rerun["summary"]["processed_more_than_once"] == 0
    params = _report(ledger_dir, second)["params"]
    assert params["items"]["kind"] == "ledger" and params["items"]["run_id"] == first
    assert params["job"]["parallelism"] == 2 and params["job"]["backoff_limit"] == 2

    # A rerun of the rerun (its ledger holds the bodies too), from the command line.
    sigterm = signal.getsignal(signal.SIGTERM)  # `queuejob rerun` installs its own
    try:
        assert main(["rerun", second, "--fate", "succeeded", "--parallelism", "1"]) == 0
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    out = capsys.readouterr().out
    assert f"queuejob rerun: the succeeded items of run {second}" in out
    [third] = {p.name for p in ledger_dir.iterdir()} - {first, second}
    third_report = _report(ledger_dir, third)
    assert third_report["rerun_of"] == second
    assert third_report["params"]["job"]["parallelism"] == 1
    rows3 = _rows(ledger_dir, third)
    assert {body: r["status"] for body, r in rows3.items()} == {
        "poison": "succeeded",
        "flaky": "succeeded",
    }


def test_rerun_of_the_items_left_in_the_queue_runs_just_those_sized_to_them(
    flow_env: dict[str, str],
    queue_name: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """completions 5 of 8 items leaves 3 in the queue, which --delete-queues keeps; `queuejob
    rerun RUN --fate left` takes those three messages out, queues the items again from the
    ledger and sizes its Job to them. (The first run tolerates its three left items, so its
    report is its result.)"""
    ledger_dir = Path(flow_env["QUEUEJOB_LEDGER_DIR"])
    first = run_work_queue(
        **local_kwargs(queue_name, completions=5, delete_queues=True), max_failed_items=3
    )
    assert first["summary"]["left"] == 3 and first["kept_queues"] == {queue_name: 3}
    left_ids = {
        r["item_id"] for r in _rows(ledger_dir, first["run_id"]).values()
        if r["status"] == "left_in_queue"
    }  # fmt: skip

    sigterm = signal.getsignal(signal.SIGTERM)  # `queuejob rerun` installs its own
    try:
        assert main(["rerun", first["run_id"], "--fate", "left"]) == 0
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    capsys.readouterr()
    [second] = {p.name for p in ledger_dir.iterdir()} - {first["run_id"]}
    report = _report(ledger_dir, second)
    assert report["rerun_of"] == first["run_id"]
    assert report["completions"] == 3 and report["confirmed"] == 3
    s = report["summary"]
    assert (s["expected"], s["succeeded"], s["left"], s["processed_more_than_once"]) == (3, 3, 0, 0)
    assert {r["item_id"] for r in _rows(ledger_dir, second).values()} == left_ids
    # No stale messages, no mismatch between completions and items.
    assert not report["findings"], report["findings"]
    # The earlier run's three messages were taken, not processed by the rerun's pods.
    assert all(r["attempts"] == 1 for r in _rows(ledger_dir, second).values())


def test_rerun_of_an_unknown_run_or_a_missing_ledger_stops_before_anything_is_declared(
    flow_env: dict[str, str], queue_name: str
) -> None:
    ledger_dir = Path(flow_env["QUEUEJOB_LEDGER_DIR"])
    with pytest.raises(LedgerNotFound, match="no ledger for run no-such-run at"):
        rerun_failures(run_id="no-such-run")
    # A report whose ledger file is gone: the flow stops while reading the items.
    run_dir = ledger_dir / "gone-run"
    run_dir.mkdir(parents=True)
    params = {
        "items": {"kind": "list", "values": ["a"]},
        "queue": {"name": queue_name},
        "job": {"command": ["cat"]},
        "backend": "local",
        "mode": "coarse",
    }
    (run_dir / "report.json").write_text(json.dumps({"run_id": "gone-run", "params": params}))
    with pytest.raises(LedgerNotFound, match="no ledger for run gone-run"):
        run_work_queue(**rerun_kwargs("gone-run"))
    assert not _queue_exists(flow_env["QUEUEJOB_BROKER_URL"], queue_name)
    state_dir = Path(flow_env["QUEUEJOB_STATE_DIR"])
    assert not state_dir.exists() or not list(state_dir.rglob("*.json")), "no Job was created"
