"""The flow's own process killed with SIGKILL after create_job, and the run retried.

What is done, and why this way: process A runs ``queuejob run`` (the CLI, a real flow run
against this test's Prefect API) and is SIGKILLed as soon as its Job exists; its pods go on, as
a Kubernetes Job's would. The retry then does what Prefect does when a crashed flow run is
retried: the same flow run (same id, same parameters, read back from the API) is put back to
AwaitingRetry and run again, here in this process (a new process, as a worker would start). The
retry must adopt the Job, publish nothing (the fill's marker says it is done), create no second
Job, and account for every item exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from queuejob.flows.adapters.local import LocalBackend
from queuejob.flows.core.manifest import RUN_ID_LABEL
from queuejob.flows.work_queue import run_work_queue
from tests.broker.support import ready_count
from tests.reliability.conftest import RelEnv
from tests.reliability.support import (
    DOCS_ITEMS,
    Witness,
    ledger_rows,
    record,
    wait_for,
)

pytestmark = [pytest.mark.reliability, pytest.mark.broker, pytest.mark.prefect]


def job_files(state_dir: Path) -> list[dict[str, Any]]:
    """The Jobs the local backend holds."""
    if not state_dir.exists():
        return []
    out = []
    for path in state_dir.rglob("*.json"):
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now
        if obj.get("kind") == "Job":
            out.append(obj)
    return out


def ephemeral_api_url() -> str:
    """The URL of this process's Prefect API (the temporary server, started if needed)."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def test_flow_killed_after_create_job_then_retried_adopts_the_job(
    rel_env: RelEnv, queue: str, witness: Witness
) -> None:
    fx = rel_env.effects
    env = {**os.environ, "PREFECT_API_URL": ephemeral_api_url()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "queuejob.flows.cli", "run", *DOCS_ITEMS, "--backend", "local",
         "--queue", queue, "--parallelism", "2", "--idle-timeout", "3", "--keep-job",
         "--", *fx.work(sleep_s=1.0)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(
            lambda: job_files(rel_env.state_dir) or proc.poll() is not None,
            timeout=180,
            what="process A to create its Job",
            every=0.02,
        )
        jobs = job_files(rel_env.state_dir)
        assert len(jobs) == 1, f"process A ended ({proc.returncode}) before creating its Job"
        proc.send_signal(signal.SIGKILL)
        job = jobs[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        out, _ = proc.communicate(timeout=60)
    witness.add("process A output", out)
    assert proc.returncode == -signal.SIGKILL
    run_id = job["metadata"]["labels"][RUN_ID_LABEL]
    witness.add_run(run_id)
    first_uid = job["metadata"]["uid"]

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import AwaitingRetry, Crashed

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(uuid.UUID(run_id))
        assert flow_run.state is not None and flow_run.state.is_running(), "A died mid-run"
        # What a worker and a retry would record: the crash, then the run scheduled again.
        client.set_flow_run_state(flow_run.id, Crashed(message="process killed"), force=True)
        client.set_flow_run_state(flow_run.id, AwaitingRetry(), force=True)
        flow_run = client.read_flow_run(flow_run.id)
    report = run_flow(run_work_queue, flow_run=flow_run, parameters=flow_run.parameters)
    witness.add("report", report)

    try:
        assert isinstance(report, dict) and report["run_id"] == run_id
        assert witness.logged("re-attaching to Job"), "the retry adopted the Job"
        jobs = job_files(rel_env.state_dir)
        assert [j["metadata"]["uid"] for j in jobs] == [first_uid], "no second Job"
        lost, twice = fx.lost_and_twice(DOCS_ITEMS)
        assert (lost, twice) == ([], []), "no duplicate messages, nothing lost"
        assert ready_count(rel_env.url, queue) == 0
        s = report["summary"]
        assert (s["succeeded"], s["left"], s["processed_more_than_once"]) == (8, 0, 0)
        assert {r["attempts"] for r in ledger_rows(report, DOCS_ITEMS).values()} == {1}
    finally:
        LocalBackend(state_dir=rel_env.state_dir).delete_run(namespace="default", run_id=run_id)
    record(
        "flow process SIGKILLed after create_job, run retried",
        faults="1 SIGKILL of the flow",
        items=8,
        lost=len(lost),
        twice_expected="0 (Job adopted, no refill)",
        twice_observed=len(twice),
    )
