"""Item results through whole runs (real Prefect, real RabbitMQ, the local backend): a
``--call`` function's return values and a command's result file, read back with ``queuejob
results`` and ``queuejob.read_results``, named in the report, shown in the table artifact."""

from __future__ import annotations

import json
import re
import signal
import uuid
from pathlib import Path

import pytest

import queuejob
from queuejob.flows.cli import main
from queuejob.flows.work_queue import run_work_queue
from tests.flows.conftest import local_kwargs

pytestmark = [pytest.mark.broker, pytest.mark.prefect]


def test_run_with_a_call_then_its_results(
    flow_env: dict[str, str], queue_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sigterm = signal.getsignal(signal.SIGTERM)  # `queuejob run` installs its own
    try:
        rc = main(["run", "--call", "builtins:len", "apple", "banana", "--backend", "local",
                   "--queue", queue_name, "--idle-timeout", "1.5"])  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    out = capsys.readouterr().out
    assert rc == 0, out
    match = re.search(r"queuejob run ([0-9a-f-]{36})", out)
    assert match, out
    run_id = match.group(1)
    assert f"results:        2 item(s): queuejob results {run_id}" in out

    assert main(["results", run_id, "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["body"], r["index"], r["status"], r["result"]) for r in rows] == [
        ("apple", 0, "succeeded", 5),
        ("banana", 1, "succeeded", 6),
    ]

    report = json.loads(
        (Path(flow_env["QUEUEJOB_LEDGER_DIR"]) / run_id / "report.json").read_text()
    )
    assert report["results"] == {
        "items": 2,
        "ledger_path": report["ledger_path"],
        "column": "result",
        "read_with": f"queuejob results {run_id}",
    }
    # The table artifact shows the result column; the report says where the results are.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(run_id)])
            )
        )
    by_type = {a.type: a for a in artifacts}
    table = by_type["table"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [(r["body"], r["result"]) for r in table] == [("apple", "5"), ("banana", "6")]
    assert f"queuejob results {run_id}" in str(by_type["markdown"].data)


def test_a_command_writes_its_result_file_and_gets_its_text_back(
    flow_env: dict[str, str], queue_name: str
) -> None:
    command = ["sh", "-c", 'item=$(cat); printf "%s has %s letters" "$item" "${#item}" '
               '> "$QUEUEJOB_RESULT_FILE"; echo "log line for $item"']  # fmt: skip
    report = run_work_queue(
        **local_kwargs(queue_name, items=["fig", "lemon", "apple"], command=command, mode="fine")
    )
    assert report["summary"]["succeeded"] == 3 and report["results"]["items"] == 3
    rows = list(queuejob.read_results(report["run_id"]))
    assert [r["result"] for r in rows] == [
        "fig has 3 letters",
        "lemon has 5 letters",
        "apple has 5 letters",
    ]


def test_follow_reruns_gives_the_latest_result_along_a_chain_of_reruns(
    flow_env: dict[str, str], queue_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from queuejob.flows.rerun import rerun_kwargs

    ledger_dir = Path(flow_env["QUEUEJOB_LEDGER_DIR"])
    # Each run's result names the run that produced it.
    command = ["sh", "-c", 'item=$(cat); printf "%s@%s" "$item" "$QUEUEJOB_RUN_ID" '
               '> "$QUEUEJOB_RESULT_FILE"']  # fmt: skip
    first = run_work_queue(**local_kwargs(queue_name, items=["apple", "banana"], command=command))
    a = first["run_id"]
    b = run_work_queue(**rerun_kwargs(a, fates=["succeeded"]))["run_id"]
    c = run_work_queue(**rerun_kwargs(b, fates=["succeeded"]))["run_id"]
    # Each rerun, once ended, left a link in its earlier run's directory.
    assert [p.name for p in (ledger_dir / a / "reruns").iterdir()] == [f"{b}.json"]
    assert [p.name for p in (ledger_dir / b / "reruns").iterdir()] == [f"{c}.json"]

    assert main(["results", a, "--follow-reruns", "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["index"], r["body"], r["result"], r["run_id"]) for r in rows] == [
        (0, "apple", f"apple@{c}", c),
        (1, "banana", f"banana@{c}", c),
    ]
    # Without following, the run's own results; from the middle, the chain onwards.
    assert [r["result"] for r in queuejob.read_results(a)] == [f"apple@{a}", f"banana@{a}"]
    assert [r["run_id"] for r in queuejob.read_results(b, follow_reruns=True)] == [c, c]
