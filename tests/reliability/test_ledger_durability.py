"""The ledger survives the flow's process, and holds the broker's unacknowledged records down.

- The flow process is SIGKILLed while it waits for the Job (records already checkpointed and
  acknowledged, others not), its local store directory is wiped (as a new pod would find it),
  and the same flow run is retried in another process with another, empty, local directory: the
  ledger in the storage is complete, with every item's result, and no item or record counts
  twice.
- While a fine-mode run goes, the results queue's unacknowledged count is read from the broker
  itself (``rabbitmqctl``): it never exceeds the bound (``QUEUEJOB_MAX_UNACKED_RECORDS``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from queuejob.flows.adapters.local import LocalBackend
from queuejob.flows.core.items import ItemSource
from queuejob.flows.params import CleanupParams, JobParams, QueueParams
from queuejob.flows.work_queue import run_work_queue
from tests.reliability.conftest import RelEnv
from tests.reliability.private_broker import PrivateBroker
from tests.reliability.support import Witness, record, wait_for
from tests.reliability.test_flow_kill import ephemeral_api_url, job_files

pytestmark = [pytest.mark.reliability, pytest.mark.broker, pytest.mark.prefect]


def complete_segments(ledger_dir: Path) -> list[Path]:
    """Checkpoint segments with their trailer (written whole) under any run's directory."""
    out = []
    for path in sorted(ledger_dir.glob("*/segments/records-*.jsonl")):
        lines = path.read_bytes().splitlines()
        if lines and lines[-1].startswith(b'{"end"'):
            out.append(path)
    return out


def test_flow_killed_mid_wait_retried_in_a_fresh_pod_keeps_every_record_once(
    rel_env: RelEnv, queue: str, witness: Witness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx = rel_env.effects
    n = 300
    items = [str(i) for i in range(n)]
    work_a, work_b = tmp_path / "pod-a-disk", tmp_path / "pod-b-disk"
    env = {
        **os.environ,
        "PREFECT_API_URL": ephemeral_api_url(),
        "QUEUEJOB_LEDGER_WORK_DIR": str(work_a),
        "QUEUEJOB_MAX_UNACKED_RECORDS": "20",  # batches of 10: many checkpoints
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "queuejob.flows.cli", "run", "--range", "0", str(n),
         "--mode", "fine", "--backend", "local", "--queue", queue, "--parallelism", "2",
         "--idle-timeout", "3", "--keep-job", "--", *fx.work(sleep_s=0.05, result=True)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(
            lambda: len(complete_segments(rel_env.ledger_dir)) >= 3 or proc.poll() is not None,
            timeout=180,
            what="process A to checkpoint three batches of records",
            every=0.02,
        )
        assert proc.poll() is None, "process A ended before it was killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        out, _ = proc.communicate(timeout=60)
    witness.add("process A output", out)
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = sum(fx.done().values())
    assert done_at_kill < n, "the Job had finished: the kill was not mid-wait"
    jobs = job_files(rel_env.state_dir)
    assert len(jobs) == 1
    run_id = jobs[0]["metadata"]["labels"]["queuejob.io/run-id"]
    witness.add_run(run_id)
    # A new pod has none of the old one's disk.
    assert list(work_a.glob("*.sqlite")), "process A kept its store in its work directory"
    shutil.rmtree(work_a)
    saved_before = len(complete_segments(rel_env.ledger_dir))

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import AwaitingRetry, Crashed

    monkeypatch.setenv("QUEUEJOB_LEDGER_WORK_DIR", str(work_b))
    monkeypatch.setenv("QUEUEJOB_MAX_UNACKED_RECORDS", "20")
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(uuid.UUID(run_id))
        client.set_flow_run_state(flow_run.id, Crashed(message="process killed"), force=True)
        client.set_flow_run_state(flow_run.id, AwaitingRetry(), force=True)
        flow_run = client.read_flow_run(flow_run.id)
    try:
        report = run_flow(run_work_queue, flow_run=flow_run, parameters=flow_run.parameters)
    finally:
        LocalBackend(state_dir=rel_env.state_dir).delete_run(namespace="default", run_id=run_id)
    witness.add("report", report)
    assert isinstance(report, dict) and report["run_id"] == run_id
    assert witness.logged("outcome records from"), "the retry rebuilt its store from storage"

    s = report["summary"]
    assert (s["expected"], s["succeeded"], s["left"]) == (n, n, 0)
    assert s["processed_more_than_once"] == 0
    lost, twice = fx.lost_and_twice(items)
    assert (lost, twice) == ([], []), "the work itself: each item once"
    rows = [json.loads(x) for x in (rel_env.ledger_dir / run_id / "ledger.jsonl").open()]
    assert [r["body"] for r in rows] == items, "one row per item, in item order"
    assert {r["status"] for r in rows} == {"succeeded"}
    assert {r["attempts"] for r in rows} == {1}, "no record counted twice"
    assert [r["result"] for r in rows] == [f"result-{i}" for i in items], "every result kept"
    assert report["results"]["items"] == n
    # Every checkpointed record is there once across all segments, the first pod's included.
    lines = [
        line
        for seg in complete_segments(rel_env.ledger_dir)
        for line in seg.read_bytes().splitlines()[:-1]
    ]
    item_records = [json.loads(x) for x in lines if json.loads(x).get("item_id") is not None]
    assert len(lines) == len(set(lines))
    assert sorted(int(r["item_id"]) for r in item_records) == list(range(n))
    assert len(complete_segments(rel_env.ledger_dir)) > saved_before
    assert not list(work_b.glob("*.sqlite")), "the local store is removed at the end"
    stored = json.loads((rel_env.ledger_dir / run_id / "report.json").read_text())
    assert stored["summary"] == s and stored["params"]["mode"] == "fine"
    record(
        "flow SIGKILLed mid-wait, its local store wiped, run retried elsewhere",
        faults="1 SIGKILL of the flow, 1 wiped disk",
        items=n,
        lost=len(lost),
        twice_expected="0 (records rebuilt from the checkpoints)",
        twice_observed=len(twice),
    )


def test_unacknowledged_records_stay_within_the_bound(
    rel_env: RelEnv,
    queue: str,
    witness: Witness,
    broker: PrivateBroker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bound = 40
    n = 3000
    monkeypatch.setenv("QUEUEJOB_MAX_UNACKED_RECORDS", str(bound))
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                value = broker.unacked(f"{queue}.results")
            except (subprocess.SubprocessError, OSError):
                continue
            if value is not None:
                samples.append(value)

    sampler = threading.Thread(target=sample, name="unacked-sampler", daemon=True)
    sampler.start()
    try:
        report = run_work_queue(
            items=ItemSource.int_range(0, n),
            queue=QueueParams(name=queue),
            job=JobParams(call="builtins:len", parallelism=2, idle_timeout_seconds=2.0),
            mode="fine",
            backend="local",
            timeout_seconds=300.0,
            cleanup=CleanupParams(delete_job=True, delete_queues=False),
        )
    finally:
        stop.set()
        sampler.join(timeout=90)
    witness.add("report", report)
    assert report["summary"]["succeeded"] == n
    assert len(samples) >= 3, f"too few readings of the broker ({samples})"
    assert max(samples) <= bound, f"unacknowledged records above {bound}: {samples}"
    assert 0 < report["max_unacked_records"] <= bound
