"""The ledger storage on real filesystems: a local directory and fsspec's memory filesystem."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import fsspec
import pytest

from queuejob.flows.adapters.ledger_storage import LedgerStorage
from queuejob.flows.core.errors import InvalidInput, LedgerNotFound, LedgerStorageError
from queuejob.flows.storage import open_storage


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> LedgerStorage:
    if request.param == "local":
        return LedgerStorage(fsspec.filesystem("file"), str(tmp_path), local=True, source="test")
    base = f"memory://queuejob-test-{uuid.uuid4().hex[:8]}/ledgers"
    return LedgerStorage(fsspec.filesystem("memory"), base, local=False, source="test")


def test_segments_round_trip_in_order(storage: LedgerStorage) -> None:
    storage.write_segment("run-1", 2, [b'{"n":3}'])
    storage.write_segment("run-1", 1, [b'{"n":1}', b'{"n":2}'])
    assert storage.segment_numbers("run-1") == [1, 2]
    assert list(storage.iter_segments("run-1")) == [
        (1, [b'{"n":1}', b'{"n":2}']),
        (2, [b'{"n":3}']),
    ]
    assert storage.segment_numbers("run-2") == []


def test_a_segment_cut_short_is_skipped(storage: LedgerStorage) -> None:
    storage.write_segment("run-1", 1, [b'{"n":1}'])
    cut = storage.path("run-1", "segments/records-00000002.jsonl")
    with storage.fs.open(cut, "wb") as fh:  # a crash mid-write: no trailer
        fh.write(b'{"n":2}\n{"n":')
    wrong = storage.path("run-1", "segments/records-00000003.jsonl")
    with storage.fs.open(wrong, "wb") as fh:  # a trailer that does not match the lines
        fh.write(b'{"n":3}\n{"end": 2}\n')
    assert storage.segment_numbers("run-1") == [1, 2, 3]
    assert [seq for seq, _ in storage.iter_segments("run-1")] == [1]


def test_rows_stream_filtered_by_fate(storage: LedgerStorage) -> None:
    rows = [
        {"item_id": "a", "index": 0, "status": "succeeded", "body": "a"},
        {"item_id": "b", "index": 1, "status": "left_in_queue", "body": "b"},
        {"item_id": "c", "index": 2, "status": "failed", "body": "ü"},
    ]
    storage.write_rows("run-1", rows)
    storage.write_report("run-1", {"run_id": "run-1", "summary": {"expected": 3}})
    assert list(storage.iter_rows("run-1")) == rows
    assert [r["item_id"] for r in storage.iter_rows("run-1", ["left"])] == ["b"]
    assert [r["item_id"] for r in storage.iter_rows("run-1", {"succeeded", "failed"})] == ["a", "c"]
    assert storage.read_report("run-1")["summary"] == {"expected": 3}
    with pytest.raises(InvalidInput, match="unknown fate 'lost'"):
        list(storage.iter_rows("run-1", ["lost"]))


def test_a_run_without_a_ledger_is_named(storage: LedgerStorage) -> None:
    with pytest.raises(LedgerNotFound, match=r"no ledger for run nope at .*nope"):
        storage.read_report("nope")
    with pytest.raises(LedgerNotFound):
        list(storage.iter_rows("nope"))
    assert issubclass(LedgerNotFound, InvalidInput)


def test_default_storage_is_the_ledger_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUEUEJOB_LEDGER_DIR", str(tmp_path / "ledgers"))
    storage = open_storage(None)
    assert storage.location("r") == str((tmp_path / "ledgers" / "r").resolve())
    storage.write_report("r", {"ok": True})
    assert json.loads((tmp_path / "ledgers" / "r" / "report.json").read_text()) == {"ok": True}
    assert not [p for p in (tmp_path / "ledgers" / "r").iterdir() if p.name.startswith(".")]


def test_a_location_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    # A path below a regular file cannot be a directory, whoever runs the test (root too).
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    storage = LedgerStorage(
        fsspec.filesystem("file"), str(blocker / "ledgers"), local=True, source="test"
    )
    with pytest.raises(LedgerStorageError, match=r"cannot write the ledger to .*not-a-directory"):
        storage.check_writable("r1")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to read-only directories")
def test_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "ro"
    base.mkdir()
    base.chmod(0o555)
    try:
        storage = LedgerStorage(fsspec.filesystem("file"), str(base), local=True, source="test")
        with pytest.raises(LedgerStorageError, match=r"cannot write the ledger to .*ro/r1"):
            storage.check_writable("r1")
    finally:
        base.chmod(0o755)


def test_a_bad_run_id_is_refused(storage: LedgerStorage) -> None:
    with pytest.raises(InvalidInput, match="invalid run id"):
        storage.location("../etc")
