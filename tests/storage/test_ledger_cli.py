"""`queuejob ledger RUN_ID`: the summary and the rows, filtered, streamed in bounded memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from queuejob.flows.cli import main
from queuejob.flows.storage import open_storage
from tests.storage.peak_rss import cli_peak_rss_kb

RUN = "0f0e0d0c-0000-4000-8000-000000000001"
FATES = ["succeeded", "failed", "dead_lettered", "left_in_queue"]


def _rows(n: int) -> list[dict[str, object]]:
    return [
        {
            "item_id": str(i),
            "index": i,
            "status": FATES[i % 4] if i < 8 else "succeeded",
            "attempts": 1,
            "pod": f"pod-{i % 2}",
            "exit_code": 0,
            "duration_s": 0.01,
            "error_tail": "",
            "body": f"item body {i}",
        }
        for i in range(n)
    ]


def _store(run_id: str, rows: object) -> None:
    storage = open_storage(None)
    storage.write_rows(run_id, rows)  # type: ignore[arg-type]
    summary = {"expected": 10, "succeeded": 4, "failed": 2, "dead_lettered": 2, "left": 2}
    storage.write_report(
        run_id,
        {
            "run_id": run_id,
            "backend": "local",
            "mode": "fine",
            "namespace": "default",
            "job": "queuejob-x",
            "job_phase": "succeeded",
            "summary": summary,
            "findings": [],
            "wall_time_s": 1.0,
            "ledger": storage.location(run_id),
            "ledger_path": storage.path(run_id, "ledger.jsonl"),
        },
    )


@pytest.fixture(autouse=True)
def ledger_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("QUEUEJOB_LEDGER_DIR", str(tmp_path / "ledgers"))
    return tmp_path / "ledgers"


def test_table_shows_the_summary_and_the_rows_of_a_fate(capsys: pytest.CaptureFixture[str]) -> None:
    _store(RUN, _rows(10))
    assert main(["ledger", RUN, "--fate", "left", "--fate", "failed"]) == 0
    out = capsys.readouterr().out
    assert "succeeded:      4" in out and "left in queue:  2" in out
    lines = [ln for ln in out.splitlines() if ln.startswith(("1 ", "3 ", "5 ", "7 "))]
    assert [ln.split()[2] for ln in lines] == ["failed", "left_in_queue"] * 2
    assert "(4 rows, failed, left_in_queue)" in out


def test_jsonl_rows_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    _store(RUN, _rows(10))
    assert main(["ledger", RUN, "--format", "jsonl", "--fate", "dead_lettered"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["item_id"] for r in rows] == ["2", "6"]
    assert rows[0]["body"] == "item body 2"
    assert "10 items" in captured.err


def test_an_unknown_run_is_named(capsys: pytest.CaptureFixture[str], ledger_dir: Path) -> None:
    assert main(["ledger", "no-such-run"]) == 2
    err = capsys.readouterr().err
    assert "no ledger for run no-such-run at" in err and str(ledger_dir) in err


def test_a_large_ledger_prints_in_bounded_memory(ledger_dir: Path) -> None:
    small, large = "run-small", "run-large"
    _store(small, _rows(10))
    _store(large, _rows(300_000))  # about 50 MB of rows: held in memory, it would show
    assert (ledger_dir / large / "ledger.jsonl").stat().st_size > 40_000_000
    large_kb, small_kb = (
        cli_peak_rss_kb(["ledger", run_id, "--format", "jsonl"], ledger_dir)
        for run_id in (large, small)
    )
    grown_kb = large_kb - small_kb
    assert grown_kb < 10_000, f"peak RSS grew {grown_kb} KB printing 300,000 rows"


def test_run_takes_the_ledger_storage_block() -> None:
    import argparse

    from queuejob.flows.cli.args import flow_kwargs as _flow_kwargs

    ns = argparse.Namespace(
        items=["a"], file=None, jsonl=None, range=None, mode="fine", backend="local",
        parallelism=None, completions="auto", backoff_limit=None, deadline=None,
        idle_timeout=None, image=None, namespace=None, template_block=None, call=None,
        queue="q", queue_type="quorum", delivery_limit=3, stale="fail", broker_block=None,
        kube_credentials_block=None, policy="warn", timeout=60.0, keep_job=False,
        delete_queues=False, ledger_storage="team-ledgers",
    )  # fmt: skip
    assert _flow_kwargs(ns, ["cat"])["ledger_storage"] == "team-ledgers"
