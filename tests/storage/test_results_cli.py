"""`queuejob results RUN_ID` and `queuejob.read_results`: the items with their results, in item
order, filtered by fate, as JSON Lines or CSV, followed across reruns, streamed in flat memory."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

import queuejob
from queuejob.flows.cli import main
from queuejob.flows.core.errors import InvalidInput, LedgerNotFound
from queuejob.flows.results import record_rerun
from queuejob.flows.storage import open_storage
from tests.storage.peak_rss import cli_peak_rss_kb

RUN = "0f0e0d0c-0000-4000-8000-00000000000a"
RAW = b"\xff\xfe binary \x00"
STORED_RAW = {"$base64": base64.b64encode(RAW).decode()}


def _row(i: int, status: str, result: Any, *, body: str | None = None) -> dict[str, Any]:
    return {
        "item_id": f"id-{i}",
        "index": i,
        "status": status,
        "attempts": 1,
        "pod": "pod-0",
        "exit_code": 0 if status == "succeeded" else 1,
        "duration_s": 0.01,
        "error_tail": "" if status == "succeeded" else "boom",
        "body": body if body is not None else f"item {i}",
        "result": result,
    }


def _store(run_id: str, rows: Any, *, rerun_of: str | None = None) -> None:
    storage = open_storage(None)
    storage.write_rows(run_id, rows)
    storage.write_report(
        run_id,
        {"run_id": run_id, "summary": {}, "rerun_of": rerun_of, "ledger_path": "x"},
    )


ROWS = [
    _row(0, "succeeded", 5),
    _row(1, "succeeded", "line one\nline two, with a comma\n"),
    _row(2, "failed", None),
    _row(3, "succeeded", {"rows": [1, 2], "name": "ü"}),
    _row(4, "succeeded", STORED_RAW),
    _row(5, "left_in_queue", None),
]


@pytest.fixture(autouse=True)
def ledger_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("QUEUEJOB_LEDGER_DIR", str(tmp_path / "ledgers"))
    return tmp_path / "ledgers"


def test_jsonl_gives_the_five_fields_in_item_order(capsys: pytest.CaptureFixture[str]) -> None:
    _store(RUN, ROWS)
    assert main(["results", RUN, "--format", "jsonl"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [list(r) for r in out] == [["item_id", "index", "body", "status", "result"]] * 6
    assert [r["result"] for r in out] == [r["result"] for r in ROWS]  # base64 stays marked
    assert [r["index"] for r in out] == list(range(6))


def test_fates_filter_the_rows(capsys: pytest.CaptureFixture[str]) -> None:
    _store(RUN, ROWS)
    assert main(["results", RUN, "--fate", "failed", "--fate", "left"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["item_id"], r["status"]) for r in out] == [
        ("id-2", "failed"),
        ("id-5", "left_in_queue"),
    ]


def test_csv_has_a_header_text_as_it_is_and_other_results_as_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _store(RUN, ROWS)
    assert main(["results", RUN, "--format", "csv"]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert table[0] == ["item_id", "index", "body", "status", "result"]
    assert [r[4] for r in table[1:]] == [
        "5",
        "line one\nline two, with a comma\n",
        "",
        '{"rows":[1,2],"name":"ü"}',
        json.dumps(STORED_RAW, separators=(",", ":")),
        "",
    ]
    assert table[2][:4] == ["id-1", "1", "item 1", "succeeded"]


def test_an_unknown_run_is_an_error_naming_it(
    capsys: pytest.CaptureFixture[str], ledger_dir: Path
) -> None:
    assert main(["results", "no-such-run"]) == 2
    err = capsys.readouterr().err
    assert "no ledger for run no-such-run at" in err and str(ledger_dir) in err
    with pytest.raises(LedgerNotFound):
        queuejob.read_results("no-such-run")  # at the call, not at the first row
    _store(RUN, ROWS)
    with pytest.raises(InvalidInput, match="unknown fate 'lost'"):
        queuejob.read_results(RUN, fates=["lost"])


def test_python_gets_bytes_back_and_can_filter() -> None:
    _store(RUN, ROWS)
    rows = list(queuejob.read_results(RUN, fates=["succeeded"]))
    assert [r["result"] for r in rows] == [5, ROWS[1]["result"], ROWS[3]["result"], RAW]
    assert [r["item_id"] for r in queuejob.read_results(RUN, fates="failed,left")] == [
        "id-2",
        "id-5",
    ]
    kept = list(queuejob.read_results(RUN, decode_bytes=False))
    assert kept[4]["result"] == STORED_RAW


def test_follow_reruns_gives_each_item_the_latest_run_that_reached_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    first, second, third = RUN, RUN[:-1] + "b", RUN[:-1] + "c"
    _store(first, ROWS)
    # The rerun of the failed and left items (numbered anew): 2 succeeds, 5 fails.
    _store(second, [_row(0, "succeeded", "two", body="item 2") | {"item_id": "id-2"},
                    _row(1, "failed", None, body="item 5") | {"item_id": "id-5"}],
           rerun_of=first)  # fmt: skip
    record_rerun(earlier_run_id=first, earlier_storage=None, rerun_id=second, ledger_storage=None)
    # A rerun of the rerun's failed item: 5 succeeds.
    _store(third, [_row(0, "succeeded", "five", body="item 5") | {"item_id": "id-5"}],
           rerun_of=second)  # fmt: skip
    record_rerun(earlier_run_id=second, earlier_storage=None, rerun_id=third, ledger_storage=None)

    assert main(["results", first, "--follow-reruns", "--format", "jsonl"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["item_id"], r["index"], r["status"], r["result"], r["run_id"]) for r in out] == [
        ("id-0", 0, "succeeded", 5, first),
        ("id-1", 1, "succeeded", ROWS[1]["result"], first),
        ("id-2", 2, "succeeded", "two", second),
        ("id-3", 3, "succeeded", ROWS[3]["result"], first),
        ("id-4", 4, "succeeded", STORED_RAW, first),
        ("id-5", 5, "succeeded", "five", third),
    ]
    # Without following, the run's own rows; a rerun's run_id column only when following.
    assert [r["status"] for r in queuejob.read_results(first, fates=["succeeded"])] == [
        "succeeded"
    ] * 4
    followed = list(queuejob.read_results(first, follow_reruns=True, fates=["succeeded"]))
    assert len(followed) == 6 and followed[5]["run_id"] == third


def test_a_large_run_and_its_rerun_print_in_flat_memory(ledger_dir: Path) -> None:
    n = 200_000
    pad = "r" * 100  # 100-byte results
    small, large, rerun = "run-small", "run-large", "run-large-rerun"
    _store(small, (_row(i, "succeeded", pad) for i in range(10)))
    _store(large, (_row(i, "failed" if i % 2 else "succeeded", None if i % 2 else pad)
                   for i in range(n)))  # fmt: skip
    _store(rerun, ({**_row(k, "succeeded", f"{pad}{k}"), "item_id": f"id-{2 * k + 1}"}
                   for k in range(n // 2)), rerun_of=large)  # fmt: skip
    record_rerun(earlier_run_id=large, earlier_storage=None, rerun_id=rerun, ledger_storage=None)
    assert (ledger_dir / large / "ledger.jsonl").stat().st_size > 40_000_000
    base = cli_peak_rss_kb(["results", small, "--follow-reruns"], ledger_dir)
    grown_kb = cli_peak_rss_kb(["results", large, "--follow-reruns"], ledger_dir) - base
    assert grown_kb < 10_000, f"peak RSS grew {grown_kb} KB printing {n:,} merged results"
    merged = queuejob.read_results(large, follow_reruns=True)
    last = None
    for count, row in enumerate(merged, start=1):  # noqa: B007 - the last row is checked
        last = row
    assert count == n and last is not None
    assert (last["status"], last["run_id"], last["result"]) == (
        "succeeded",
        rerun,
        f"{pad}{n // 2 - 1}",
    )
