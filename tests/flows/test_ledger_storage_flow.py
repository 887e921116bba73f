"""The flow's ledger storage: a RemoteFileSystem block (fsspec URL), and storage problems found
before anything happens."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from queuejob.flows.cli import main
from queuejob.flows.core.errors import InvalidInput, LedgerStorageError
from queuejob.flows.work_queue import run_work_queue
from tests.flows.conftest import DOCS_ITEMS, local_kwargs
from tests.reliability.support import queue_exists

pytestmark = [pytest.mark.broker, pytest.mark.prefect]


def test_a_remote_filesystem_block_keeps_the_ledger(
    flow_env: dict[str, str], queue_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # fsspec's memory filesystem lives in this process, as the flow run does: the same code
    # path as s3://, gs:// or az:// (Prefect's RemoteFileSystem, fsspec), without a cloud.
    import fsspec
    from prefect.filesystems import RemoteFileSystem

    block = f"qj-ledgers-{uuid.uuid4().hex[:8]}"
    base = f"memory://{block}/queuejob-ledgers"
    RemoteFileSystem(basepath=base).save(block)
    report = run_work_queue(**local_kwargs(queue_name), ledger_storage=block)
    run_id = report["run_id"]
    fs = fsspec.filesystem("memory")
    assert report["ledger"] == f"{base}/{run_id}"
    assert report["ledger_path"] == f"{base}/{run_id}/ledger.jsonl"
    assert report["summary"]["succeeded"] == 8
    assert fs.glob(f"{base}/{run_id}/segments/records-*.jsonl"), "checkpoints were kept"
    assert not (Path(flow_env["QUEUEJOB_LEDGER_DIR"]) / run_id).exists(), "nothing by default"
    rows = [json.loads(x) for x in fs.cat(f"{base}/{run_id}/ledger.jsonl").splitlines()]
    assert [r["body"] for r in rows] == DOCS_ITEMS
    stored = json.loads(fs.cat(f"{base}/{run_id}/report.json"))
    assert stored["params"]["ledger_storage"] == block
    assert stored["ledger"] == report["ledger"]

    capsys.readouterr()
    assert main(["ledger", run_id, "--ledger-storage", block, "--format", "jsonl"]) == 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert printed == rows
    assert main(["ledger", run_id]) == 2, "not in the default storage"
    assert "no ledger for run" in capsys.readouterr().err


def test_storage_that_cannot_be_written_fails_before_the_job(
    flow_env: dict[str, str], queue_name: str, tmp_path: Path
) -> None:
    from prefect.filesystems import LocalFileSystem

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    block = f"qj-ro-{uuid.uuid4().hex[:8]}"
    LocalFileSystem(basepath=str(blocker / "ledgers")).save(block)
    with pytest.raises(LedgerStorageError, match=r"cannot write the ledger to .*a-file/ledgers"):
        run_work_queue(**local_kwargs(queue_name), ledger_storage=block)
    assert not queue_exists(flow_env["QUEUEJOB_BROKER_URL"], queue_name), "nothing was queued"
    state_dir = Path(flow_env["QUEUEJOB_STATE_DIR"])
    assert not (state_dir.exists() and list(state_dir.rglob("*.json"))), "no Job"


def test_a_missing_storage_block_is_named(flow_env: dict[str, str], queue_name: str) -> None:
    with pytest.raises(InvalidInput, match="no ledger storage block named 'no-such-block'"):
        run_work_queue(**local_kwargs(queue_name), ledger_storage="no-such-block")
    assert not queue_exists(flow_env["QUEUEJOB_BROKER_URL"], queue_name)
