"""`queuejob dead-letters`: listing ``<queue>.dead`` and requeueing it, on the real broker.

The requeue must lose no dead letter when killed at any point, and put none back twice when run
again: each dead letter ends up in the work queue exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from queuejob.flows.adapters.broker import (
    HEADER_FAILURES,
    HEADER_INDEX,
    HEADER_RUN_ID,
    BrokerConfig,
    QueueSettings,
    declare_queues,
    delete_queues,
    fill_queue,
    queue_depths,
)
from queuejob.flows.adapters.broker.dead_letters import (
    HEADER_TOKEN,
    list_dead_letters,
    requeue_dead_letters,
)
from queuejob.flows.core.dead_letters import HEADER_REQUEUES
from queuejob.flows.core.errors import FillInProgress
from queuejob.flows.core.items import ItemSource, iter_items

from .support import ROOT, drain_messages, ready_count, wait_until

pytestmark = pytest.mark.broker


@pytest.fixture
def dq(cfg: BrokerConfig, queue_name: str) -> Iterator[QueueSettings]:
    """Declared queues with delivery limit 1 (an item is dead-lettered after 2 deliveries)."""
    qs = QueueSettings(queue_name, delivery_limit=1)
    declare_queues(cfg, qs)
    yield qs
    with contextlib.suppress(Exception):
        delete_queues(cfg, qs)


def _kill_by_rejects(url: str, qs: QueueSettings, n: int) -> None:
    """Reject every message of the work queue until the broker has dead-lettered `n`."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        while ready_count(url, qs.dead_name) < n:
            method, _props, _body = ch.basic_get(qs.name, auto_ack=False)
            if method is None:
                wait_until(
                    lambda: ready_count(url, qs.dead_name) >= n or ready_count(url, qs.name) > 0,
                    what="the dead letters or a message to reject",
                )
                continue
            ch.basic_reject(method.delivery_tag, requeue=True)
    finally:
        conn.close()


def _dead_lettered(url: str, cfg: BrokerConfig, qs: QueueSettings, run_id: str, n: int) -> None:
    """Fill `n` items and have the broker dead-letter them all (delivery limit)."""
    fill_queue(cfg, qs, iter_items(ItemSource.int_range(0, n)), run_id=run_id)
    _kill_by_rejects(url, qs, n)
    assert ready_count(url, qs.name) == 0


def _put_dead_letters(url: str, qs: QueueSettings, run_id: str, n: int) -> None:
    """Publish `n` messages shaped as the broker's dead letters straight into <queue>.dead
    (faster than having the broker dead-letter thousands)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        for i in range(n):
            props = pika.BasicProperties(
                delivery_mode=2,
                message_id=str(i),
                headers={
                    HEADER_RUN_ID: run_id,
                    HEADER_INDEX: i,
                    "x-first-death-reason": "delivery_limit",
                    "x-first-death-queue": qs.name,
                },
            )
            ch.basic_publish("", qs.dead_name, str(i).encode(), props, mandatory=True)
    finally:
        conn.close()
    wait_until(lambda: ready_count(url, qs.dead_name) == n, what=f"{n} dead letters")


def _cli(*args: str, url: str, **env_extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUEJOB_")}
    env.update(QUEUEJOB_BROKER_URL=url, PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.Popen(
        [sys.executable, "-m", "queuejob.flows.cli", "dead-letters", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_listing_shows_each_dead_letter_and_consumes_none(
    cfg: BrokerConfig, dq: QueueSettings, run_id: str, broker_url: str
) -> None:
    _dead_lettered(broker_url, cfg, dq, run_id, 3)
    listing = list_dead_letters(cfg, dq, limit=2)
    assert listing.total == 3
    assert [(d.item_id, d.run_id, d.index, d.reason) for d in listing.letters] == [
        ("0", run_id, 0, "delivery_limit"),
        ("1", run_id, 1, "delivery_limit"),
    ]
    assert ready_count(broker_url, dq.dead_name) == 3  # read, not taken

    proc = _cli(dq.name, url=broker_url)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"queue '{dq.dead_name}' holds 3 dead letters" in out
    lines = [line.split() for line in out.splitlines()[2:]]
    assert [(cells[0], cells[1], cells[3]) for cells in lines] == [
        (str(i), run_id[:8], "delivery_limit") for i in range(3)
    ]
    assert ready_count(broker_url, dq.dead_name) == 3


def test_listing_adds_what_the_runs_ledger_knows(
    cfg: BrokerConfig, dq: QueueSettings, run_id: str, broker_url: str, tmp_path: Path
) -> None:
    _dead_lettered(broker_url, cfg, dq, run_id, 2)
    run_dir = tmp_path / run_id
    run_dir.mkdir()
    report = {"run_id": run_id, "params": {"queue": {"name": dq.name, "delivery_limit": 1}}}
    (run_dir / "report.json").write_text(json.dumps(report))
    row = {"item_id": "0", "index": 0, "status": "dead_lettered", "attempts": 2, "pod": "p",
           "exit_code": 7, "duration_s": 0.1, "error_tail": "Traceback\nboom: bad item 0\n",
           "body": "0"}  # fmt: skip
    (run_dir / "ledger.jsonl").write_text(json.dumps(row) + "\n")

    proc = _cli(dq.name, url=broker_url, QUEUEJOB_LEDGER_DIR=str(tmp_path))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    header, first, second = out.splitlines()[1:]
    assert header.split()[:5] == ["ITEM", "RUN", "ATTEMPTS", "REASON", "EXIT"]
    # Item 0: the ledger's attempts, exit code and the last line of its error tail.
    assert first.split() == [
        "0",
        run_id[:8],
        "2",
        "delivery_limit",
        "7",
        "boom:",
        "bad",
        "item",
        "0",
    ]
    # Item 1 has no ledger row: attempts from the run's delivery limit, nothing else known.
    assert second.split() == ["1", run_id[:8], "2", "delivery_limit", "-", "-"]


def test_requeue_moves_each_back_once_with_a_fresh_set_of_attempts(
    cfg: BrokerConfig, dq: QueueSettings, run_id: str, broker_url: str
) -> None:
    _dead_lettered(broker_url, cfg, dq, run_id, 4)
    seen: list[tuple[str, bool]] = []
    result = requeue_dead_letters(cfg, dq, on_requeued=lambda d, p: seen.append((d.item_id, p)))
    assert (result.requeued, result.already_requeued, result.remaining) == (4, 0, 0)
    assert seen == [(str(i), True) for i in range(4)]
    assert ready_count(broker_url, dq.dead_name) == 0
    assert ready_count(broker_url, dq.requeued_name) == 0  # the records have served
    # Run again: nothing to do, nothing duplicated.
    again = requeue_dead_letters(cfg, dq)
    assert (again.requeued, again.already_requeued) == (0, 0)

    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        ch = conn.channel()
        got = []
        for _ in range(4):
            method, props, body = ch.basic_get(dq.name, auto_ack=True)
            assert method is not None
            got.append((props.message_id, body, props.headers))
        assert ch.basic_get(dq.name, auto_ack=True)[0] is None
    finally:
        conn.close()
    for i, (mid, body, headers) in enumerate(got):
        assert (mid, body) == (str(i), str(i).encode())
        assert headers[HEADER_RUN_ID] == run_id and headers[HEADER_INDEX] == i
        assert headers[HEADER_REQUEUES] == 1 and HEADER_TOKEN in headers
        assert "x-death" not in headers and HEADER_FAILURES not in headers
        assert headers.get("x-delivery-count", 0) == 0  # a full set of attempts again


def test_an_item_dead_lettered_again_after_a_requeue_is_requeued_again(
    cfg: BrokerConfig, dq: QueueSettings, run_id: str, broker_url: str
) -> None:
    _dead_lettered(broker_url, cfg, dq, run_id, 1)
    assert requeue_dead_letters(cfg, dq).requeued == 1
    _kill_by_rejects(broker_url, dq, 1)  # it fails again and dies again
    [letter] = list_dead_letters(cfg, dq, limit=10).letters
    assert letter.requeues == 1
    second = requeue_dead_letters(cfg, dq)
    assert (second.requeued, second.already_requeued) == (1, 0)
    assert ready_count(broker_url, dq.name) == 1


def test_requeue_killed_between_confirm_and_ack_then_run_again_puts_each_back_once(
    cfg: BrokerConfig, dq: QueueSettings, run_id: str, broker_url: str
) -> None:
    n = 12
    _dead_lettered(broker_url, cfg, dq, run_id, n)
    child = subprocess.run(
        [sys.executable, "-m", "tests.broker.requeue_child", dq.name, "5"],
        cwd=ROOT,
        env={**os.environ, "QUEUEJOB_TEST_BROKER_URL": broker_url, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout.split() == ["1", "2", "3", "4", "5"]
    # The fifth is in the work queue and, unacked when the process died, still a dead letter.
    wait_until(lambda: ready_count(broker_url, dq.dead_name) == n - 4, what="unacked returned")
    assert ready_count(broker_url, dq.name) == 5

    result = requeue_dead_letters(cfg, dq)
    assert (result.requeued, result.already_requeued, result.remaining) == (n - 5, 1, 0)
    ids = [p.message_id for p in drain_messages(broker_url, dq.name, expect=n)]
    assert Counter(ids) == Counter(str(i) for i in range(n))  # each exactly once
    assert queue_depths(cfg, dq)["dead"].ready == 0
    assert ready_count(broker_url, dq.requeued_name) == 0


def test_cli_requeue_killed_halfway_and_run_again_puts_every_dead_letter_back_once(
    cfg: BrokerConfig, dq: QueueSettings, run_id: str, broker_url: str
) -> None:
    # One line per dead letter; unread, the pipe (64 KiB, about 2100 lines) holds the process
    # back, so reading 1000 lines then killing it stops it short of the 4000.
    n = 4000
    _put_dead_letters(broker_url, dq, run_id, n)
    proc = _cli(dq.name, "--requeue", url=broker_url)
    assert proc.stdout is not None
    moved = 0
    for line in proc.stdout:  # ends if the process dies; the test's timeout bounds the rest
        if line.startswith("requeued:"):
            moved += 1
            if moved >= 1000:
                break
    assert moved >= 1000, f"the requeue ended early: {proc.stderr.read() if proc.stderr else ''}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    left = ready_count(broker_url, dq.dead_name)
    assert 0 < left < n, "killed halfway: some dead letters moved, some not"

    again = _cli(dq.name, "--requeue", url=broker_url)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert f"left in '{dq.dead_name}'" in out.splitlines()[-1]
    ids = [p.message_id for p in drain_messages(broker_url, dq.name, expect=n)]
    assert len(ids) == n
    assert Counter(ids) == Counter(str(i) for i in range(n))  # every dead letter exactly once
    assert ready_count(broker_url, dq.dead_name) == 0


def test_requeue_into_a_missing_work_queue_is_refused_and_keeps_the_dead_letters(
    cfg: BrokerConfig, dq: QueueSettings, run_id: str, broker_url: str
) -> None:
    _put_dead_letters(broker_url, dq, run_id, 2)
    conn = pika.BlockingConnection(pika.URLParameters(broker_url))
    conn.channel().queue_delete(dq.name)
    conn.close()
    proc = _cli(dq.name, "--requeue", url=broker_url)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"queue '{dq.name}' does not exist" in err
    assert ready_count(broker_url, dq.dead_name) == 2


def test_requeue_with_a_limit_moves_the_oldest_and_leaves_the_rest(
    cfg: BrokerConfig, dq: QueueSettings, run_id: str, broker_url: str
) -> None:
    _put_dead_letters(broker_url, dq, run_id, 5)
    result = requeue_dead_letters(cfg, dq, limit=2)
    assert (result.requeued, result.already_requeued, result.remaining) == (2, 0, 3)
    assert [p.message_id for p in drain_messages(broker_url, dq.name, expect=2)] == ["0", "1"]
    assert ready_count(broker_url, dq.requeued_name) == 0  # their records have served
    assert [d.item_id for d in list_dead_letters(cfg, dq, limit=10).letters] == ["2", "3", "4"]


def test_requeue_waits_its_turn_while_a_fill_holds_the_queue(
    cfg: BrokerConfig, dq: QueueSettings, run_id: str, broker_url: str
) -> None:
    _put_dead_letters(broker_url, dq, run_id, 1)
    holder = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        holder.channel().queue_declare(dq.lock_name, exclusive=True, auto_delete=True)
        with pytest.raises(FillInProgress, match="a fill or a dead-letter requeue of queue"):
            requeue_dead_letters(cfg, dq)
    finally:
        holder.close()
    assert ready_count(broker_url, dq.dead_name) == 1
    assert requeue_dead_letters(cfg, dq).requeued == 1
