"""Item results, pure: what a return value or a result file becomes, the limit, the lossless
form of bytes that are not UTF-8, and the merge of a run's rows with its reruns'."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from queuejob.flows.core.ledger import FAILED, SUCCEEDED, Ledger, OutcomeRecord
from queuejob.flows.core.manifest import JobSpec, worker_command
from queuejob.flows.core.results import (
    BASE64_KEY,
    DEFAULT_MAX_RESULT_BYTES,
    ResultError,
    as_text,
    decode,
    follow_reruns,
    from_bytes,
    from_call,
    short,
)
from queuejob.flows.worker.options import Usage, parse_args

LIMIT = DEFAULT_MAX_RESULT_BYTES


@pytest.mark.parametrize(
    "value",
    [5, 2.5, True, "text ü", [1, "a", None], {"rows": 3, "ok": True}, {"nested": {"a": [1]}}],
)
def test_a_json_value_is_its_own_result(value: Any) -> None:
    assert from_call(value, LIMIT) == value


def test_none_is_no_result() -> None:
    assert from_call(None, LIMIT) is None
    assert from_bytes(b"", LIMIT) is None


def test_bytes_are_text_when_utf8_and_marked_base64_otherwise() -> None:
    assert from_call("é".encode(), LIMIT) == "é"
    assert from_bytes(b"line\n", LIMIT) == "line\n"  # exactly as written
    raw = bytes(range(256))
    stored = from_bytes(raw, LIMIT)
    assert stored == {BASE64_KEY: base64.b64encode(raw).decode()}
    assert json.loads(json.dumps(stored)) == stored  # plain JSON
    assert decode(stored) == raw  # and back, byte for byte
    assert decode({"$base64": "not base64!"}) == {"$base64": "not base64!"}
    assert decode({"$base64": "AA==", "other": 1}) == {"$base64": "AA==", "other": 1}


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (object(), "object, which is not JSON-serialisable"),
        ({1, 2}, "set, which is not JSON-serialisable"),
        (float("nan"), "float, which is not JSON-serialisable"),
        ({"when": 1j}, "dict, which is not JSON-serialisable"),
        ("\udc80", "not valid Unicode"),
    ],
)
def test_a_value_that_is_not_json_fails_with_what_to_return(value: Any, why: str) -> None:
    with pytest.raises(ResultError, match=why) as err:
        from_call(value, LIMIT)
    assert "return None, a JSON value" in str(err.value) or "bytes" in str(err.value)


def test_a_result_over_the_limit_fails_naming_the_limit_and_what_to_do() -> None:
    assert from_call("x" * 98, 100) == "x" * 98  # 100 bytes as JSON: at the limit
    with pytest.raises(ResultError) as err:
        from_call("x" * 99, 100)
    message = str(err.value)
    assert "101 bytes, over the limit of 100 bytes" in message
    assert "--max-result-bytes" in message and "max_result_bytes" in message
    assert "store large outputs elsewhere" in message and "reference" in message
    # Measured as UTF-8 bytes, not characters; a file by its bytes.
    with pytest.raises(ResultError, match="102 bytes"):
        from_call("é" * 50, 101)
    assert from_bytes(b"z" * 100, 100) == "z" * 100
    with pytest.raises(ResultError, match="101 bytes, over the limit of 100"):
        from_bytes(b"z" * 101, 100)
    with pytest.raises(ResultError, match="over the limit of 0"):
        from_call(0, 0)


def test_text_views_of_a_result() -> None:
    assert as_text(None) == ""
    assert as_text("plain") == "plain"
    assert as_text({"a": 1}) == '{"a":1}'
    assert as_text(5) == "5"
    assert short("line one\nline two") == "line one | line two"
    cut = short("x" * 200, 20)
    assert cut == "x" * 17 + "..." and len(cut) == 20


def test_the_ledger_keeps_the_result_of_the_success() -> None:
    ledger = Ledger("r")
    ledger.add(OutcomeRecord(run_id="r", status=FAILED, item_id="a", index=0, ts=1.0))
    ledger.add(OutcomeRecord(run_id="r", status=SUCCEEDED, item_id="a", index=0, ts=2.0, result=7))
    # A later failure of the same item (processed twice) does not hide the success's result.
    ledger.add(OutcomeRecord(run_id="r", status=FAILED, item_id="a", index=0, ts=3.0))
    [row] = ledger.rows()
    assert (row["status"], row["result"]) == ("succeeded", 7)


def test_the_worker_and_the_job_carry_the_limit() -> None:
    opts = parse_args(["--call", "m:f"])
    assert opts.max_result_bytes == DEFAULT_MAX_RESULT_BYTES
    assert parse_args(["--max-result-bytes", "0", "--", "cat"]).max_result_bytes == 0
    with pytest.raises(Usage, match="--max-result-bytes must be between 0 and"):
        parse_args(["--max-result-bytes", "-1", "--", "cat"])
    spec = JobSpec(image="busybox", command=("cat",))
    assert "--max-result-bytes" not in worker_command(spec)  # the default: as before
    spec = JobSpec(image="busybox", call="m:f", max_result_bytes=1000)
    assert worker_command(spec)[-4:] == ["--max-result-bytes", "1000", "--call", "m:f"]


# --- a run and its reruns -----------------------------------------------------------------------


def _run(when: float, run_id: str, rows: list[tuple[str, str, Any]]) -> Iterator[Any]:
    """A run's ledger, tagged: (item id, status, result) per row, indexes from 0."""
    for i, (item, status, result) in enumerate(rows):
        yield when, run_id, {"item_id": item, "index": i, "body": f"b{item}", "status": status,
                             "result": result}  # fmt: skip


def _merged(rows: Iterator[Any], reruns: list[Iterator[Any]]) -> list[tuple[str, Any, str, Any]]:
    return [
        (row["item_id"], row["index"], row["status"], (rid, row["result"], row["body"]))
        for _t, rid, row in follow_reruns(rows, reruns)
    ]


def test_a_rerun_replaces_the_rows_it_reached_keeping_the_original_position() -> None:
    first = _run(0.0, "A", [("a", "succeeded", 1), ("b", "failed", None), ("c", "failed", None),
                            ("d", "left_in_queue", None)])  # fmt: skip
    # The rerun of b, c, d: numbered anew, b succeeded, c failed again, d never reached.
    rerun = _run(10.0, "B", [("b", "succeeded", 2), ("c", "failed", None),
                             ("d", "left_in_queue", None)])  # fmt: skip
    assert _merged(first, [rerun]) == [
        ("a", 0, "succeeded", ("A", 1, "ba")),
        ("b", 1, "succeeded", ("B", 2, "bb")),
        ("c", 2, "failed", ("B", None, "bc")),
        ("d", 3, "left_in_queue", ("A", None, "bd")),
    ]


def test_a_chain_and_two_reruns_of_one_run_give_the_latest_that_reached_each_item() -> None:
    a = _run(0.0, "A", [("x", "failed", None), ("y", "failed", None), ("z", "succeeded", "z1")])
    b1 = _run(10.0, "B1", [("x", "failed", None), ("y", "succeeded", "y-b1")])
    c = _run(30.0, "C", [("x", "succeeded", "x-c")])  # a rerun of B1, the latest of all
    b2 = _run(20.0, "B2", [("x", "succeeded", "x-b2"), ("y", "succeeded", "y-b2"),
                           ("z", "left_in_queue", None)])  # fmt: skip
    b1_merged = follow_reruns(b1, [c])
    assert _merged(a, [b1_merged, b2]) == [
        ("x", 0, "succeeded", ("C", "x-c", "bx")),
        ("y", 1, "succeeded", ("B2", "y-b2", "by")),
        ("z", 2, "succeeded", ("A", "z1", "bz")),
    ]


def test_rows_of_a_rerun_that_match_nothing_come_last() -> None:
    a = _run(0.0, "A", [("x", "failed", None)])
    stray = _run(5.0, "B", [("q", "succeeded", 1)])
    assert [r[0] for r in _merged(a, [stray])] == ["x", "q"]


def test_run_options_take_the_limit_to_the_pods(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from queuejob.flows.cli import main

    assert main(["render", "--max-result-bytes", "1000", "--", "cat"]) == 0
    job = list(yaml.safe_load_all(capsys.readouterr().out))[1]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--max-result-bytes") + 1] == "1000"
    with pytest.raises(SystemExit):
        main(["render", "--max-result-bytes", "-5", "--", "cat"])
    assert "--max-result-bytes: must be 0 or more (got -5)" in capsys.readouterr().err
    assert main(["render", "--max-result-bytes", "99999999", "--", "cat"]) == 2
    err = capsys.readouterr().err
    assert "--max-result-bytes" in err and "8388608" in err


def test_a_result_file_is_read_only_within_the_limit_and_never_blocks(tmp_path: Path) -> None:
    import os

    from queuejob.flows.worker.runner import read_result_file

    path = tmp_path / "result-1"
    assert read_result_file(str(path), 10) is None  # never created: no result
    path.write_bytes(b"")
    assert read_result_file(str(path), 10) is None
    path.write_bytes(b"0123456789")
    assert read_result_file(str(path), 10) == "0123456789"
    path.write_bytes(b"x" * 5_000_000)
    with pytest.raises(ResultError, match="the result file is 5,000,000 bytes, over the limit"):
        read_result_file(str(path), 10)
    path.unlink()
    os.mkfifo(path)  # a FIFO in its place, with no writer: refused, not waited on
    with pytest.raises(ResultError, match="no longer a regular file"):
        read_result_file(str(path), 10)
