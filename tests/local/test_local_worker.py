"""The local backend running the real worker (``queuejob worker``) against the real broker.

The Jobs are the ones the manifest builder makes for Kubernetes; the local backend runs them as
they are. Outcome records from the results queue and the process table are the evidence.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from queuejob.flows.adapters.broker import (
    BrokerConfig,
    QueueSettings,
    ResultsConsumer,
    declare_queues,
    delete_queues,
    fill_queue,
    queue_depths,
)
from queuejob.flows.core.backend import JobHandle
from queuejob.flows.core.items import Item
from queuejob.flows.core.job_status import JobPhase
from queuejob.flows.core.ledger import FAILED, NO_WORK, SUCCEEDED, OutcomeRecord
from queuejob.flows.core.manifest import JobSpec, build_job, build_secret, secret_name

from .conftest import Harness, until

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
# The items of the Kubernetes docs' "Coarse Parallel Processing Using a Work Queue".
DOCS_ITEMS = ["apple", "banana", "cherry", "date", "fig", "grape", "lemon", "melon"]


@pytest.fixture
def queues(broker_url: str, queue_name: str) -> Iterator[tuple[BrokerConfig, QueueSettings]]:
    """The run's work, results and dead-letter queues, deleted again afterwards."""
    cfg = BrokerConfig(url=broker_url, connect_timeout_s=10.0)
    qs = QueueSettings(name=queue_name)
    declare_queues(cfg, qs)
    try:
        yield cfg, qs
    finally:
        delete_queues(cfg, qs, only_if_empty=False)


def start_job(
    harness: Harness,
    broker_url: str,
    queues: tuple[BrokerConfig, QueueSettings],
    items: list[str],
    *,
    command: tuple[str, ...],
    completions: int | None,
    parallelism: int = 2,
    backoff_limit: int = 6,
    deadline_s: int | None = None,
    mode: str = "coarse",
) -> JobHandle:
    """Fill the queue with ``items`` and create the manifest builder's Job for them."""
    cfg, qs = queues
    run_id = str(uuid.uuid4())
    filled = fill_queue(
        cfg,
        qs,
        [Item(id=f"item-{i}", index=i, body=body.encode()) for i, body in enumerate(items)],
        run_id=run_id,
    )
    assert filled.confirmed == len(items)
    spec = JobSpec(
        image="local/queuejob:dev",
        command=command,
        mode=mode,  # type: ignore[arg-type]
        parallelism=parallelism,
        backoff_limit=backoff_limit,
        active_deadline_seconds=deadline_s,
        idle_timeout_seconds=1.5,
    )
    job = build_job(
        spec, run_id=run_id, queue=qs.name, completions=completions, confirmed_items=len(items)
    )
    name = job["metadata"]["name"]
    secret = build_secret(
        namespace=spec.namespace, name=secret_name(name), run_id=run_id, broker_url=broker_url
    )
    harness.runs.append((spec.namespace, run_id))
    return harness.backend.create_or_adopt(secret=secret, job=job, run_id=run_id)


def outcome_records(
    queues: tuple[BrokerConfig, QueueSettings], run_id: str, *, at_least: int
) -> list[OutcomeRecord]:
    """This run's outcome records, waiting (with a deadline) until ``at_least`` arrived."""
    cfg, qs = queues
    got: list[OutcomeRecord] = []
    deadline = time.monotonic() + 20
    with ResultsConsumer(cfg, qs, run_id=run_id) as consumer:
        while len(got) < at_least and time.monotonic() < deadline:
            got += consumer.drain(max_wait_s=0.5)
        got += consumer.drain(max_wait_s=0.2)  # anything beyond what we asked for
    return got


def command_processes(harness: Harness, handle: JobHandle) -> list[psutil.Process]:
    """The run's user-command processes (``sleep 600``)."""
    out = []
    for proc in harness.processes(handle):
        try:
            if proc.cmdline() == ["sleep", "600"]:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def test_docs_eight_items_with_parallelism_two_each_processed_once(
    harness: Harness, broker_url: str, queues: tuple[BrokerConfig, QueueSettings]
) -> None:
    handle = start_job(
        harness, broker_url, queues, DOCS_ITEMS, command=("sh", "-c", "cat; echo"), completions=8
    )
    seen_active: list[int] = []

    state = harness.backend.wait(
        handle, timeout_s=90, on_update=lambda s: seen_active.append(s.counts.active)
    )

    assert state.phase is JobPhase.SUCCEEDED, harness.backend.failure_details(handle)
    job = harness.terminal(handle)
    assert job["status"]["succeeded"] == 8 and "failed" not in job["status"]
    assert max(seen_active) <= 2
    records = outcome_records(queues, handle.run_id, at_least=8)
    assert Counter(r.status for r in records) == {SUCCEEDED: 8}
    assert sorted(r.item_id or "" for r in records) == sorted(f"item-{i}" for i in range(8))
    # Each pod ran `cat` on one item: its body is in exactly one pod's log.
    logs = harness.backend.pod_logs(handle)
    assert len(logs) == 8
    lines = Counter(line for text in logs.values() for line in text.splitlines())
    assert {item: lines[item] for item in DOCS_ITEMS} == dict.fromkeys(DOCS_ITEMS, 1)
    assert queue_depths(*queues)["work"].ready == 0


def test_work_queue_mode_drains_the_queue(
    harness: Harness, broker_url: str, queues: tuple[BrokerConfig, QueueSettings]
) -> None:
    items = [f"item body {i}" for i in range(6)]
    handle = start_job(
        harness,
        broker_url,
        queues,
        items,
        command=("sh", "-c", "cat >/dev/null"),
        completions=None,
        mode="fine",
    )
    state = harness.backend.wait(handle, timeout_s=90)
    assert state.phase is JobPhase.SUCCEEDED, harness.backend.failure_details(handle)
    job = harness.terminal(handle)
    assert len(job["local"]["pods"]) == 2 and job["status"]["succeeded"] == 2
    records = outcome_records(queues, handle.run_id, at_least=6)
    done = sorted(r.item_id or "" for r in records if r.status == SUCCEEDED)
    assert done == sorted(f"item-{i}" for i in range(6))


def test_failing_item_reaches_the_backoff_limit(
    harness: Harness, broker_url: str, queues: tuple[BrokerConfig, QueueSettings]
) -> None:
    handle = start_job(
        harness,
        broker_url,
        queues,
        ["poison"],
        command=("sh", "-c", "cat >/dev/null; echo cannot process this item >&2; exit 3"),
        completions=1,
        parallelism=1,
        backoff_limit=1,
    )

    state = harness.backend.wait(handle, timeout_s=90)

    assert state.phase is JobPhase.FAILED and state.reason == "BackoffLimitExceeded"
    job = harness.terminal(handle)
    assert job["status"]["failed"] == 2 and "succeeded" not in job["status"]
    failures = harness.backend.failure_details(handle)
    assert len(failures) == 2
    for failure in failures:
        assert failure.exit_code == 1 and failure.reason == "Error"  # the worker's item-failed
        assert "cannot process this item" in failure.log_tail
    records = outcome_records(queues, handle.run_id, at_least=2)
    assert [(r.status, r.item_id, r.attempt) for r in records] == [
        (FAILED, "item-0", 1),
        (FAILED, "item-0", 2),
    ]


def test_deadline_kills_workers_and_their_commands(
    harness: Harness, broker_url: str, queues: tuple[BrokerConfig, QueueSettings]
) -> None:
    handle = start_job(
        harness,
        broker_url,
        queues,
        ["slow-1", "slow-2"],
        command=("sh", "-c", "cat >/dev/null; exec sleep 600"),
        completions=2,
        deadline_s=3,
    )
    until(lambda: len(command_processes(harness, handle)) == 2, what="2 running commands")

    state = harness.backend.wait(handle, timeout_s=30)

    assert state.phase is JobPhase.FAILED and state.reason == "DeadlineExceeded"
    job = harness.terminal(handle)
    assert job["status"]["failed"] == 2
    until(lambda: not harness.processes(handle), timeout=15, what="every process of the run")
    # The interrupted items were never acked: the broker has them again for a retry.
    until(lambda: queue_depths(*queues)["work"].ready == 2, what="the items back in the queue")


def test_more_completions_than_items_ends_by_idle_exit(
    harness: Harness, broker_url: str, queues: tuple[BrokerConfig, QueueSettings]
) -> None:
    started = time.monotonic()
    handle = start_job(
        harness, broker_url, queues, ["one", "two"], command=("sh", "-c", "cat"), completions=4
    )

    state = harness.backend.wait(handle, timeout_s=60)

    assert state.phase is JobPhase.SUCCEEDED
    assert time.monotonic() - started < 45
    job = harness.terminal(handle)
    assert job["status"]["succeeded"] == 4
    records = outcome_records(queues, handle.run_id, at_least=4)
    statuses = Counter(r.status for r in records)
    assert statuses[SUCCEEDED] == 2 and statuses[NO_WORK] == 2


_DELETE = """
import sys
from pathlib import Path
from queuejob.flows.adapters.local import LocalBackend
backend = LocalBackend(state_dir=Path(sys.argv[1]), grace_s=1.0)
print(backend.delete_run(namespace=sys.argv[2], run_id=sys.argv[3]))
"""


def test_delete_from_another_process_stops_workers_and_commands(
    harness: Harness, broker_url: str, queues: tuple[BrokerConfig, QueueSettings]
) -> None:
    handle = start_job(
        harness,
        broker_url,
        queues,
        ["a", "b", "c", "d"],
        command=("sh", "-c", "cat >/dev/null; exec sleep 600"),
        completions=4,
    )
    until(lambda: len(command_processes(harness, handle)) == 2, what="2 running commands")
    before = harness.processes(handle)
    assert len(before) >= 2 * 2 + 2  # 2 workers + 2 commands + supervisor + watchdog

    out = subprocess.run(
        [sys.executable, "-c", _DELETE, str(harness.state_dir), handle.namespace, handle.run_id],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout

    assert out.strip() == "1"
    assert harness.processes(handle) == []
    assert not any(p.is_running() and p.status() != "zombie" for p in before)
    until(lambda: queue_depths(*queues)["work"].ready == 4, what="the items back in the queue")
