"""The whole flow on real Prefect, real RabbitMQ and the local backend."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pika
import pytest

from queuejob.flows.adapters import broker as broker_io
from queuejob.flows.core.errors import CaveatViolation, ItemsFailed
from queuejob.flows.work_queue import cleanup_hook, run_work_queue
from tests.flows.conftest import DOCS_ITEMS, local_kwargs, pids_with_env_marker
from tests.foreground import sigint_delivered

pytestmark = [pytest.mark.broker, pytest.mark.prefect]


def codes(report: dict[str, object]) -> set[str]:
    return {f["code"] for f in report["findings"]}  # type: ignore[index,union-attr]


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def work_depth(broker_url: str, queue: str, which: str = "work") -> int:
    cfg = broker_io.BrokerConfig(url=broker_url)
    return broker_io.queue_depths(cfg, broker_io.QueueSettings(name=queue))[which].ready


def ready_or_none(broker_url: str, queue: str) -> int | None:
    """Ready messages in one queue, None when it does not exist."""
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker:
        return None
    finally:
        conn.close()


def test_docs_eight_items_all_succeed_once(flow_env: dict[str, str], queue_name: str) -> None:
    report = run_work_queue(**local_kwargs(queue_name))
    s = report["summary"]
    assert (s["expected"], s["succeeded"], s["failed"], s["dead_lettered"], s["left"]) == (
        8,
        8,
        0,
        0,
        0,
    )
    assert s["processed_more_than_once"] == 0
    assert report["job_phase"] == "Succeeded"
    assert report["completions"] == 8
    # No finding, not even the live "drained while pods wait" one: the pod that took the last
    # item is still exiting when the queue drains, and that is not a pod waiting for work.
    assert not [f for f in report["findings"] if f["severity"] != "info"]
    rows = [json.loads(line) for line in Path(report["ledger_path"]).read_text().splitlines()]
    assert [r["status"] for r in rows] == ["succeeded"] * 8
    assert work_depth(flow_env["QUEUEJOB_BROKER_URL"], queue_name) == 0
    # delete_job=True after success: nothing left in the local backend's state
    state_dir = Path(flow_env["QUEUEJOB_STATE_DIR"])
    assert not list(state_dir.rglob("*.json")) if state_dir.exists() else True


def test_completions_fewer_than_items_leaves_items_and_fails_the_run(
    flow_env: dict[str, str], queue_name: str
) -> None:
    # Cleanup asks for the queues to go: the work queue still holds the 3 items, so it stays.
    state = run_work_queue(
        **local_kwargs(queue_name, completions=5, delete_queues=True), return_state=True
    )
    assert state.is_failed()
    assert state.message.startswith("Failed: 3 of 8 items left in the queue; Job Succeeded")
    report = state.result(raise_on_failure=False)
    assert isinstance(report, ItemsFailed)  # the report, as the Failed run's result
    # One cause, one finding: the completions, the items left and the queue kept for them.
    (finding,) = report["findings"]
    assert finding["code"] == "items-left-in-queue"
    assert finding["numbers"] == {
        "items": 3, "ready": 3, "unacked": 0, "completions": 5, "queue_kept": 3
    }  # fmt: skip
    assert f"queuejob rerun {report['run_id']} --fate left" in finding["advice"]
    assert report["summary"]["succeeded"] == 5
    assert report["summary"]["left"] == 3
    assert report["kept_queues"] == {queue_name: 3}
    url = flow_env["QUEUEJOB_BROKER_URL"]
    assert ready_or_none(url, queue_name) == 3
    # The empty dead-letter queue and the bookkeeping queues went.
    assert [ready_or_none(url, f"{queue_name}.{s}") for s in ("dead", "results")] == [None, None]


def test_completions_fewer_than_items_fails_before_the_job(
    flow_env: dict[str, str], queue_name: str
) -> None:
    with pytest.raises(CaveatViolation, match=r"completions=5: 3 item\(s\) will be left"):
        run_work_queue(**local_kwargs(queue_name, completions=5, policy="fail"))
    state_dir = Path(flow_env["QUEUEJOB_STATE_DIR"])
    assert not state_dir.exists() or not list(state_dir.rglob("*.json")), "no Job was created"


def test_completions_more_than_items_ends_with_idle_pods(
    flow_env: dict[str, str], queue_name: str
) -> None:
    started = time.monotonic()
    report = run_work_queue(**local_kwargs(queue_name, completions=10, idle_timeout=4.0))
    assert time.monotonic() - started < 90, "the run must end by idle exit, not the timeout"
    # The pods that waited while the queue was drained, then found no work, are the extra
    # completions: one finding says so.
    (finding,) = report["findings"]
    assert finding["code"] == "completions-more-than-items"
    assert finding["numbers"]["pods_without_work"] == finding["numbers"]["no_work_pods"] == 2
    assert report["outcome"]["state"] == "Completed"  # every item succeeded
    assert report["summary"]["succeeded"] == 8
    assert report["summary"]["no_work_pods"] == 2
    assert report["job_phase"] == "Succeeded"


def test_poison_item_is_dead_lettered_while_the_rest_succeed_and_the_run_fails(
    flow_env: dict[str, str], queue_name: str
) -> None:
    command = ["sh", "-c", 'item=$(cat); if [ "$item" = fig ]; then echo "bad fig" >&2; exit 4; fi']
    with pytest.raises(ItemsFailed, match=r"^Failed: 1 of 8 items dead-lettered; Job Succ") as info:
        run_work_queue(**local_kwargs(queue_name, command=command, delete_queues=True))
    report = info.value  # the error reads as the report
    s = report["summary"]
    assert (s["succeeded"], s["dead_lettered"], s["left"]) == (7, 1, 0)
    assert codes(report) == {"dead-letters"}  # the kept dead-letter queue is said inside it
    assert "queue-kept" not in codes(report)
    # Cleanup deleted the drained work queue but kept the dead letter's queue.
    assert report["kept_queues"] == {f"{queue_name}.dead": 1}
    url = flow_env["QUEUEJOB_BROKER_URL"]
    assert (ready_or_none(url, queue_name), ready_or_none(url, f"{queue_name}.dead")) == (None, 1)
    rows = {
        r["item_id"]: r
        for r in map(json.loads, Path(report["ledger_path"]).read_text().splitlines())
    }
    fig = next(r for r in rows.values() if r["status"] == "dead_lettered")
    # x-delivery-limit=3 allows 3 redeliveries: 4 attempts, then the dead-letter queue.
    assert fig["attempts"] == 4
    assert "bad fig" in fig["error_tail"]


def test_a_failed_job_puts_each_failed_pods_exit_code_and_log_tail_in_the_run_logs(
    flow_env: dict[str, str], queue_name: str
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    command = ["sh", "-c", 'echo "cannot handle $(cat)" >&2; exit 4']
    kwargs = local_kwargs(queue_name, items=["apple"], command=command, backoff_limit=0)
    state = run_work_queue(**kwargs, return_state=True)
    assert state.is_failed()
    run_id = state.state_details.flow_run_id

    def pod_lines() -> list[str]:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
            )
        return [log.message for log in logs if " failed: exit code " in log.message]

    # The run's logs reach the API in batches, every few seconds.
    (line,) = wait_for(pod_lines, 30, "the failed pod's line in the run's logs")
    assert "failed: exit code 1 (Error); the end of its log:" in line
    assert "cannot handle apple" in line
    assert "failed with exit code 4" in line  # the worker's own line, from the pod log


def test_demo_ends_with_what_each_pod_printed(flow_env: dict[str, str], queue_name: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "queuejob.flows.cli", "demo", "--queue", queue_name],
        env={**os.environ, **flow_env}, stdin=subprocess.DEVNULL, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = re.findall(r"^  (queuejob-\S+)  processed (\w+)$", proc.stdout, flags=re.MULTILINE)
    assert sorted(item for _, item in shown) == sorted(DOCS_ITEMS), proc.stdout
    assert len({pod for pod, _ in shown}) == len(DOCS_ITEMS)  # coarse mode: a pod per item
    assert "Traceback" not in proc.stdout + proc.stderr
    # The Job was kept only to read its pods' logs.
    state_dir = Path(flow_env["QUEUEJOB_STATE_DIR"])
    jobs = [p for p in state_dir.rglob("*.json") if json.loads(p.read_text()).get("kind") == "Job"]
    assert not jobs


def test_crash_after_the_wait_then_retry_keeps_every_record(
    flow_env: dict[str, str], queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt read all eight outcome records, then died before saving its ledger.
    Each batch was checkpointed in the ledger storage before it was acknowledged, so the
    retry rebuilds the ledger from the checkpoints and it is whole; the results queue is
    empty."""
    monkeypatch.setenv("QUEUEJOB_FAULT", "crash-after-wait")
    retrying = run_work_queue.with_options(retries=1, retry_delay_seconds=0)
    report = retrying(**local_kwargs(queue_name))
    s = report["summary"]
    assert (s["succeeded"], s["attempts"], s["left"], s["processed_more_than_once"]) == (
        8,
        8,
        0,
        0,
    )
    assert "ledger-short" not in codes(report)
    rows = Path(report["ledger_path"]).read_text().splitlines()
    ledger_rows = [json.loads(r) for r in rows]
    assert len({r["item_id"] for r in ledger_rows}) == len(DOCS_ITEMS) == len(ledger_rows)
    assert {r["status"] for r in ledger_rows} == {"succeeded"}
    assert work_depth(flow_env["QUEUEJOB_BROKER_URL"], queue_name, "results") == 0


def test_crash_after_create_job_then_retry_adopts_the_job(
    flow_env: dict[str, str], queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUEUEJOB_FAULT", "crash-after-create-job")
    retrying = run_work_queue.with_options(retries=1, retry_delay_seconds=0)
    report = retrying(**local_kwargs(queue_name, keep_job=True))
    s = report["summary"]
    assert (s["succeeded"], s["attempts"], s["processed_more_than_once"]) == (8, 8, 0)
    jobs = list(Path(flow_env["QUEUEJOB_STATE_DIR"]).rglob("*.json"))
    job_files = [p for p in jobs if json.loads(p.read_text()).get("kind") == "Job"]
    assert len(job_files) == 1, f"exactly one Job, got {job_files}"
    assert work_depth(flow_env["QUEUEJOB_BROKER_URL"], queue_name) == 0
    from queuejob.flows.adapters.local import LocalBackend

    LocalBackend(state_dir=Path(flow_env["QUEUEJOB_STATE_DIR"])).delete_run(
        namespace="default", run_id=report["run_id"]
    )


def _read_to_end(stream: Any, timeout_s: float) -> tuple[str, bool]:
    """Read a pipe until every process holding it has closed it, or until the deadline.

    Returns the text and whether the end was reached: a process the run left behind (a pod, a
    temporary Prefect server) keeps the pipe open.
    """
    if stream is None:
        return "", True
    fd = stream.fileno()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks).decode(errors="replace"), True
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace"), False


@pytest.mark.parametrize(
    ("sig", "status"),
    [
        pytest.param(signal.SIGTERM, 128 + signal.SIGTERM, id="sigterm-143"),
        pytest.param(signal.SIGINT, 130, id="ctrl-c-130"),
    ],
)
def test_a_stop_mid_wait_deletes_the_job_and_its_pods_then_exits(
    flow_env: dict[str, str], queue_name: str, tmp_path: Path, sig: int, status: int
) -> None:
    env = {**os.environ, **flow_env}
    with sigint_delivered():  # as a terminal's Ctrl-C reaches a foreground command
        proc = subprocess.Popen(
            [sys.executable, "-m", "queuejob.flows.cli", "run", *DOCS_ITEMS[:4], "--backend",
             "local", "--queue", queue_name, "--idle-timeout", "2", "--", "sh", "-c", "sleep 120"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: pids_with_env_marker(queue_name), 150, "pods to start")
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Every process that shares the run's stdout is gone (the pods, the supervisors, the
    # temporary Prefect API server the run started), so the pipe ends.
    printed, ended = _read_to_end(proc.stdout, 30)
    try:
        wait_for(lambda: not pids_with_env_marker(queue_name), 30, "pods to be gone")
    except AssertionError as exc:  # say what the run did: did its crash hook run?
        raise AssertionError(f"{exc}; the run printed:\n{printed[-4000:]}") from None
    # The wait task deletes the Job as it stops; the crash hook deletes what is left (nothing,
    # when the task got there first).
    assert "stopping: deleting Job" in printed or "deleted 1 Job(s)" in printed, printed[-4000:]
    assert ended, "a process the run started still holds its stdout (a Prefect server?)"
    assert proc.returncode == status, printed[-4000:]
    if sig == signal.SIGINT:
        assert "queuejob: interrupted; the run's Job and pods were deleted" in printed
    state_dir = Path(flow_env["QUEUEJOB_STATE_DIR"])
    leftovers = [p for p in state_dir.rglob("*.json")] if state_dir.exists() else []
    assert not [p for p in leftovers if json.loads(p.read_text()).get("kind") == "Job"]


def test_cancellation_hook_deletes_the_run_from_its_parameters_alone(
    flow_env: dict[str, str], queue_name: str
) -> None:
    from queuejob.flows.adapters.local import LocalBackend
    from queuejob.flows.core.manifest import JobSpec, build_job, build_secret, job_name, secret_name

    run_id = str(uuid.uuid4())
    spec = JobSpec(image="localhost/queuejob:local", command=("sh", "-c", "sleep 120"))
    name = job_name(spec.name_prefix, run_id)
    backend = LocalBackend(state_dir=Path(flow_env["QUEUEJOB_STATE_DIR"]))
    backend.create_or_adopt(
        secret=build_secret(
            namespace="default", name=secret_name(name), run_id=run_id,
            broker_url=flow_env["QUEUEJOB_BROKER_URL"],
        ),
        job=build_job(spec, run_id=run_id, queue=queue_name, completions=4),
        run_id=run_id,
    )  # fmt: skip
    wait_for(lambda: pids_with_env_marker(queue_name), 30, "pods to start")
    flow_run = SimpleNamespace(
        id=uuid.UUID(run_id), parameters={"backend": "local", "job": {"namespace": "default"}}
    )
    cleanup_hook(None, flow_run, SimpleNamespace(name="Cancelling"))
    wait_for(lambda: not pids_with_env_marker(queue_name), 30, "pods to be gone")
    assert backend.find_job(namespace="default", name=name, run_id=run_id) is None
