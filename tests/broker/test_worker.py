"""The pod worker, as real ``python -m queuejob.flows.worker`` processes against the real broker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from queuejob.flows.adapters.broker import (
    BrokerConfig,
    QueueSettings,
    dead_letter_ids,
    declare_queues,
    delete_queues,
    fill_queue,
    queue_depths,
)
from queuejob.flows.core.items import ItemSource, iter_items
from queuejob.flows.core.ledger import FAILED, INTERRUPTED, NO_WORK, SUCCEEDED, Ledger
from queuejob.flows.worker import EXIT_BROKER, EXIT_ITEM_FAILED, EXIT_SIGTERM, EXIT_USAGE

from .support import (
    FAIL_ON_POISON,
    ROOT,
    collect_records,
    ready_count,
    run_worker,
    started_worker,
    wait_until,
    worker_env,
)

pytestmark = pytest.mark.broker

IDLE = ["--idle-timeout", "0.4"]


def _fill(cfg: BrokerConfig, qs: QueueSettings, values: list[str], run_id: str) -> dict[str, str]:
    """Declare and fill; return item id by value."""
    declare_queues(cfg, qs)
    fill_queue(cfg, qs, iter_items(ItemSource.inline(values)), run_id=run_id)
    return {item.body.decode(): item.id for item in iter_items(ItemSource.inline(values))}


def _run_like_a_job(
    env: dict[str, str], args: list[str], *, max_pods: int
) -> list[subprocess.CompletedProcess[str]]:
    """Start coarse workers one after another, as a Job would, until one finds no work."""
    pods = []
    for _ in range(max_pods):
        done = run_worker(args, env)
        pods.append(done)
        if "no work" in done.stderr:
            return pods
    raise AssertionError(f"the queue was not drained by {max_pods} pods: {pods[-1].stderr}")


def test_coarse_workers_process_one_item_each(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    ids = _fill(cfg, qs, ["red", "green", "blue"], run_id)
    env = worker_env(broker_url, qs.name, run_id, "pod-a")
    for _ in range(3):
        done = run_worker([*IDLE, "--", "cat"], env)
        assert done.returncode == 0, done.stderr
    assert ready_count(broker_url, qs.name) == 0

    records = collect_records(cfg, qs, run_id, count=3)
    assert sorted(r.item_id or "" for r in records) == sorted(ids.values())
    for r in records:
        assert (r.status, r.attempt, r.pod, r.exit_code) == (SUCCEEDED, 1, "pod-a", 0)
        assert r.index is not None and r.duration_s >= 0 and r.ts > 0
    assert len(records) == 3  # and no "no_work" record: every pod had an item


def test_fine_worker_drains_the_queue_then_exits_0(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    values = [f"item-{i}" for i in range(6)]
    ids = _fill(cfg, qs, values, run_id)
    env = worker_env(broker_url, qs.name, run_id, "pod-fine")
    done = run_worker(["--mode", "fine", *IDLE, "--", "cat"], env)
    assert done.returncode == 0, done.stderr
    assert "done: 6 item(s)" in done.stderr
    # The command's stdout (the bodies, via cat) went to the pod log, in queue order.
    assert done.stdout == "".join(values)
    records = collect_records(cfg, qs, run_id, count=6)
    assert Counter(r.status for r in records) == {SUCCEEDED: 6}  # no "no_work" from a busy pod
    assert {r.item_id for r in records} == set(ids.values())


def test_failure_and_poison_item_end_in_the_dead_letter_queue(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    ids = _fill(cfg, qs, ["a", "poison", "b"], run_id)
    env = worker_env(broker_url, qs.name, run_id, "pod-p")
    pods = _run_like_a_job(env, [*IDLE, "--", *FAIL_ON_POISON], max_pods=12)
    codes = Counter(p.returncode for p in pods)
    # delivery_limit=3: RabbitMQ dead-letters a message returned more than 3 times, so the
    # poison item is attempted 4 times; each failed attempt is a pod exiting 1.
    assert codes == {0: 3, EXIT_ITEM_FAILED: 4}

    wait_until(lambda: queue_depths(cfg, qs)["dead"].ready == 1, what="the dead letter")
    assert dead_letter_ids(cfg, qs, run_id=run_id) == [ids["poison"]]
    assert queue_depths(cfg, qs)["work"].ready == 0

    records = collect_records(cfg, qs, run_id, count=7)  # 2 successes, 4 failures, 1 no work
    poison = sorted((r for r in records if r.item_id == ids["poison"]), key=lambda r: r.attempt)
    assert [r.attempt for r in poison] == [1, 2, 3, 4]
    for r in poison:
        assert (r.status, r.exit_code, r.pod) == (FAILED, 7, "pod-p")
        assert "boom: cannot process poison" in r.stderr_tail
    ok = {r.item_id for r in records if r.status == SUCCEEDED}
    assert ok == {ids["a"], ids["b"]}
    assert [r.status for r in records].count(NO_WORK) == 1

    ledger = Ledger(run_id=run_id, expected=3)
    ledger.add_all(records)
    ledger.mark_dead_lettered(dead_letter_ids(cfg, qs, run_id=run_id))
    summary = ledger.summary()
    assert (summary.succeeded, summary.dead_lettered, summary.left) == (2, 1, 0)


def test_call_mode_success_and_failure(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    ids = _fill(cfg, qs, ["fine", "poison"], run_id)
    env = worker_env(broker_url, qs.name, run_id, "pod-call")
    call = ["--call", "tests.broker.worker_calls:process", *IDLE]
    first = run_worker(call, env)
    second = run_worker(call, env)
    assert (first.returncode, second.returncode) == (0, EXIT_ITEM_FAILED), second.stderr
    records = collect_records(cfg, qs, run_id, count=2)
    by_id = {r.item_id: r for r in records}
    assert by_id[ids["fine"]].status == SUCCEEDED
    failed = by_id[ids["poison"]]
    assert failed.status == FAILED and failed.exit_code == 1
    assert "ValueError: cannot process poison" in failed.stderr_tail


def test_classic_queue_bounded_by_the_workers_delivery_limit(
    cfg: BrokerConfig, queue_name: str, run_id: str, broker_url: str
) -> None:
    qs = QueueSettings(queue_name, queue_type="classic")
    ids = _fill(cfg, qs, ["poison", "ok"], run_id)
    env = worker_env(broker_url, qs.name, run_id, "pod-c", QUEUEJOB_DELIVERY_LIMIT="1")
    try:
        pods = _run_like_a_job(env, [*IDLE, "--", *FAIL_ON_POISON], max_pods=8)
        assert Counter(p.returncode for p in pods) == {0: 2, EXIT_ITEM_FAILED: 2}
        wait_until(lambda: queue_depths(cfg, qs)["dead"].ready == 1, what="the dead letter")
        assert dead_letter_ids(cfg, qs, run_id=run_id) == [ids["poison"]]
        records = collect_records(cfg, qs, run_id, count=4)  # 2 failures, 1 success, 1 no work
        poison = sorted(r.attempt for r in records if r.item_id == ids["poison"])
        assert poison == [1, 2]
    finally:
        delete_queues(cfg, qs, only_if_empty=False)


def test_idle_worker_exits_0_with_a_no_work_record(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    declare_queues(cfg, qs)
    env = worker_env(broker_url, qs.name, run_id, "pod-idle")
    start = time.monotonic()
    done = run_worker(["--idle-timeout", "0.5", "--", "cat"], env)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert 0.5 <= elapsed < 10
    records = collect_records(cfg, qs, run_id, count=1)
    assert len(records) == 1
    record = records[0]
    assert (record.status, record.pod, record.item_id) == (NO_WORK, "pod-idle", None)
    assert record.duration_s >= 0.5


def test_sigterm_mid_item_leaves_it_for_redelivery(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str, tmp_path: Path
) -> None:
    ids = _fill(cfg, qs, ["slow"], run_id)
    mark = tmp_path / "child.pid"
    env = worker_env(broker_url, qs.name, run_id, "pod-t", MARK=str(mark))
    slow = ["sh", "-c", 'echo $$ > "$MARK.tmp"; mv "$MARK.tmp" "$MARK"; exec sleep 60']
    with started_worker(["--grace", "3", *IDLE, "--", *slow], env) as proc:
        wait_until(mark.exists, timeout=15, what="the command to start")
        child = int(mark.read_text())
        assert queue_depths(cfg, qs)["work"].ready == 0  # the item is in flight
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    assert proc.returncode == EXIT_SIGTERM, err
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    wait_until(lambda: ready_count(broker_url, qs.name) == 1, what="the item to be requeued")

    # The next pod gets the same item as its second attempt.
    again = run_worker([*IDLE, "--", "cat"], worker_env(broker_url, qs.name, run_id, "pod-u"))
    assert again.returncode == 0, again.stderr
    records = collect_records(cfg, qs, run_id, count=2)
    assert [(r.status, r.item_id, r.attempt, r.pod) for r in records] == [
        (INTERRUPTED, ids["slow"], 1, "pod-t"),
        (SUCCEEDED, ids["slow"], 2, "pod-u"),
    ]


def test_usage_and_broker_errors_have_their_exit_codes(
    cfg: BrokerConfig, qs: QueueSettings, run_id: str, broker_url: str
) -> None:
    env = worker_env(broker_url, qs.name, run_id, "pod-e")
    no_url = {k: v for k, v in env.items() if k != "BROKER_URL"}
    done = run_worker(["--", "cat"], no_url)
    assert done.returncode == EXIT_USAGE and "BROKER_URL" in done.stderr
    done = run_worker([], env)
    assert done.returncode == EXIT_USAGE and "--call" in done.stderr
    done = run_worker(["--", "cat"], env)  # the queue was never declared
    assert done.returncode == EXIT_USAGE and f"queue {qs.name!r} does not exist" in done.stderr

    secret = "Secret-pw-4711"
    host, port = cfg.host, cfg.port
    bad_pw = {**env, "BROKER_URL": f"amqp://guest:{secret}@{host}:{port}/%2F"}
    done = run_worker(["--", "cat"], bad_pw)
    assert done.returncode == EXIT_USAGE and "refused the credentials" in done.stderr
    assert secret not in done.stderr + done.stdout

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    down = {**env, "BROKER_URL": f"amqp://guest:{secret}@127.0.0.1:{closed}/%2F"}
    start = time.monotonic()
    done = run_worker(["--connect-timeout", "1", "--", "cat"], down)
    assert done.returncode == EXIT_BROKER and f"127.0.0.1:{closed}" in done.stderr
    assert time.monotonic() - start < 10
    assert secret not in done.stderr + done.stdout


def test_help_documents_exit_codes_and_imports_stay_lean() -> None:
    code = (
        "import sys, queuejob.flows.worker\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'kubernetes', "
        "'kubernetes_asyncio', 'pydantic', 'queuejob.flows.core.items'})\n"
        "print(heavy)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "queuejob.flows.worker", "--help"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0
    assert "Exit codes" in shown.stdout and "143" in shown.stdout
